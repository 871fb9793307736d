"""Tests for CacheEngine.retrieve from the disk tier (kvtier/engine.py over kvtier/slab_io.py and
kvtier/transfers.py): each chunk is copied into `out` as its read lands, so these pin down what
must not change with that: a chunk counts only once verified, a bad chunk in the middle (corrupt,
truncated) ends the prefix there and nothing after it is reported, promoted or handed back, and
many small read jobs finishing in any order still give the bytes that were stored. Every test runs
with the checksum left to the copy out ("fused", kvtier.checksum_copy) and without it ("two passes")."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import CHUNK, on_disk_only, record_path
from native_paths import use_native

from kvtier import checksum_copy, transfers
from kvtier.record_files import BLOCK

CHUNKS = 12


@pytest.fixture(autouse=True, params=["fused", "two passes"])
def fused(request, monkeypatch) -> None:
    use_native(monkeypatch, checksum_copy, request.param == "fused")


@pytest.fixture
def on_disk(make_engine):
    """An engine whose disk tier alone holds a 12-chunk prompt (the CPU tier cleared)."""
    engine = make_engine("cpu_disk", write_through="true")
    return engine, *on_disk_only(engine, CHUNKS * CHUNK, 7)


def sentinel_out(engine, n: int) -> torch.Tensor:
    return torch.full(engine.layout.chunk_shape(n), 7.0, dtype=engine.layout.dtype)


@pytest.mark.parametrize("job_bytes", [1, 1 << 30])  # a job per chunk, landing in any order; one per thread
def test_a_cold_retrieve_gives_back_every_byte_stored(on_disk, monkeypatch, job_bytes):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", job_bytes)
    engine, tokens, kv = on_disk
    got, n = engine.retrieve(tokens, out=sentinel_out(engine, len(tokens)))
    assert n == len(tokens) and torch.equal(got, kv)
    assert engine.stats()["tiers"]["disk"]["hits"] == CHUNKS


def corrupt_payload(path: str) -> None:
    with open(path, "r+b") as f:  # a payload byte: only the checksum can tell
        f.seek(BLOCK + 100)
        byte = f.read(1)
        f.seek(BLOCK + 100)
        f.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: str) -> None:
    os.truncate(path, BLOCK + BLOCK // 2)  # a short read: the header promises more


@pytest.mark.parametrize("damage", [corrupt_payload, truncate])
def test_a_bad_chunk_in_the_middle_ends_the_prefix_and_nothing_after_counts(on_disk, monkeypatch, damage):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)  # chunks after the bad one land, and are copied
    engine, tokens, kv = on_disk
    bad = 5
    damage(record_path(engine, tokens, bad))

    got, n = engine.retrieve(tokens, out=sentinel_out(engine, len(tokens)))

    assert n == bad * CHUNK
    assert got.shape[2] == bad * CHUNK and torch.equal(got, kv[:, :, :n])
    # Only the good prefix was promoted to host memory; the bad record is gone from the disk tier.
    assert engine.storage.contains_prefix(engine.db.keys(tokens)) == bad
    assert engine.stats()["tiers"]["cpu"]["chunks"] == bad
    assert engine.stats()["tiers"]["disk"]["corrupt"] == 1
    assert not os.path.exists(record_path(engine, tokens, bad))
    assert engine.lookup(tokens) == bad * CHUNK


def test_a_bad_first_chunk_serves_nothing(on_disk):
    engine, tokens, _ = on_disk
    corrupt_payload(record_path(engine, tokens, 0))
    out = sentinel_out(engine, len(tokens))
    got, n = engine.retrieve(tokens, out=out)
    assert n == 0 and got.shape[2] == 0
    assert engine.stats()["tiers"]["cpu"]["chunks"] == 0


def test_a_retrieve_without_out_reads_and_promotes_the_prefix(on_disk):
    engine, tokens, kv = on_disk
    got, n = engine.retrieve(tokens)
    assert n == len(tokens) and torch.equal(got, kv)
    assert engine.stats()["tiers"]["cpu"]["chunks"] == CHUNKS


def test_a_copy_out_that_fails_raises_on_the_caller_and_the_engine_goes_on(on_disk, monkeypatch):
    engine, tokens, kv = on_disk
    pool = engine.storage.pool
    copy = pool.copy_chunks

    def failing(chunks, out, layout, into_slabs):
        raise RuntimeError("out cannot be written")

    monkeypatch.setattr(pool, "copy_chunks", failing)
    with pytest.raises(RuntimeError, match="cannot be written"):
        engine.retrieve(tokens, out=sentinel_out(engine, len(tokens)))
    monkeypatch.setattr(pool, "copy_chunks", copy)
    got, n = engine.retrieve(tokens, out=sentinel_out(engine, len(tokens)))
    assert n == len(tokens) and torch.equal(got, kv)
