"""Connector fixtures: a tiny Llama checkpoint, kvtier configs with 16-token chunks, engines on both.

The checkpoint is tests/integrations/kvtier_engine/conftest.py's "llama" (written by transformers,
weights drawn large enough that attention is peaked): KV that is wrong, misplaced or missing changes
the tokens, so "the same tokens as without kvtier" means something. Its tokenizer is the byte-level
one, whose EOS a random model may pick; every request here sets `ignore_eos`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import REPO
from integrations.kvtier_engine.conftest import write_checkpoint

from kvtier import load_config
from kvtier.config import KvtierConfig
from kvtier.record_files import BLOCK
from kvtier_engine import LLM, SamplingParams

CHUNK = 16  # kvtier tokens per chunk: one 16-token engine block
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def prompt(num_tokens: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (num_tokens,), generator=torch.Generator().manual_seed(seed)).tolist()


def kvtier_config(disk: Path | None, chunk_size: int = CHUNK, save_partial: bool = False) -> KvtierConfig:
    """configs/cpu_disk.yaml (configs/cpu.yaml when `disk` is None) with small chunks, 4 MiB of
    unpinned CPU memory and the disk tier in `disk`."""
    config = load_config(REPO / "configs" / ("cpu.yaml" if disk is None else "cpu_disk.yaml"), env={})
    config = dataclasses.replace(config, chunk_size=chunk_size, save_partial_chunks=save_partial,
                                 cpu=dataclasses.replace(config.cpu, capacity=4 << 20, pin_memory="off"))
    if disk is not None:
        config = dataclasses.replace(config, disk=dataclasses.replace(config.disk, path=str(disk)))
    return config


def flip_payload_byte(path: Path, mask: int = 0x01) -> None:
    """Flip bits of one payload byte of a record file (past its header block): only the checksum
    can tell."""
    with open(path, "r+b") as fh:
        fh.seek(BLOCK + 100)
        byte = fh.read(1)
        fh.seek(BLOCK + 100)
        fh.write(bytes([byte[0] ^ mask]))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    return str(write_checkpoint(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture
def make_llm(model_dir, tmp_path):
    """`make_llm(kvtier="disk", save_partial=False, **engine_options)`: an LLM on the tiny checkpoint
    with kvtier on CPU + the disk tier in tmp_path/disk ("disk"), on CPU only ("cpu"), off (None),
    or with a given KvtierConfig. 1 MiB of paged cache (85 blocks). Closed at teardown."""
    made: list[LLM] = []

    def make(kvtier: str | KvtierConfig | None = "disk", save_partial: bool = False, **options) -> LLM:
        config = kvtier
        if kvtier in ("disk", "cpu"):
            config = kvtier_config(tmp_path / "disk" if kvtier == "disk" else None, save_partial=save_partial)
        options = {"device": "cpu", "dtype": "float32", "kv_cache_bytes": 1 << 20, **options}
        llm = LLM(model_dir, kvtier_config=config, **options)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.close()


@pytest.fixture
def baseline(make_llm):
    """`baseline(prompt)`: the tokens the engine generates for `prompt` without kvtier (GREEDY)."""
    llm = None

    def tokens(token_ids: list[int]) -> list[int]:
        nonlocal llm
        llm = llm or make_llm(kvtier=None)
        return llm.generate(token_ids, GREEDY)[0].token_ids

    return tokens
