"""`kvtier_engine serve` on an engine whose every forward pass fails, as on a device that fell over.

test_server.py runs it as a process (`python .../serving/broken_engine_server.py PORT`) to see the
server give up the way a supervisor needs: /health turns 503 and the process exits non-zero.
"""

from __future__ import annotations

import sys

from kvtier_engine.llm_engine import EngineOptions, LLMEngine
from kvtier_engine.serving.server import ServedModel, run_server


def lost_device(*_args: object) -> None:
    raise RuntimeError("injected: the device is lost")


def main(port: int) -> int:
    engine = LLMEngine(EngineOptions("random:llama-tiny", kv_cache_bytes=64 << 20))
    engine.model.hidden_states = lost_device
    return run_server(engine, ServedModel("broken", engine.max_model_len, 0), "127.0.0.1", port, "warning")


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
