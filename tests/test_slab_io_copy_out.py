"""Tests for the copy out of a retrieve's lower-tier reads (kvtier/slab_io.py): while the first
tier's reads run, the retrieving thread copies each chunk into `out` as it lands (the read threads go
straight back to the disk), checking its checksum as it copies where the disk tier left it to the
copy (kvtier.checksum_copy: "fused"; without the extension, "two passes"); a chunk that a next tier
serves is copied too; the bytes are the ones stored whatever order the reads land in. Every test
runs both ways."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import CHUNK, NAMESPACE_MODEL, seeded_kv, seeded_tokens, stored_below
from connector.conftest import flip_payload_byte
from native_paths import use_native
from waiting import wait_until

from kvtier import checksum_copy, transfers
from kvtier.keys import Namespace
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.pins import PinTable
from kvtier.storage import StorageManager
from kvtier.tiers.disk import DiskTier

CHUNKS = 6


@pytest.fixture(autouse=True, params=["fused", "two passes"])
def fused(request, monkeypatch) -> None:
    use_native(monkeypatch, checksum_copy, request.param == "fused")


def record_copy_threads(manager: StorageManager, monkeypatch) -> list[int]:
    """The thread of each copy out of slabs into `out` (not of none, nor the pool's copies the other
    way), checked (`checksum_copy.finish`) or not."""
    pool, threads = manager.pool, []
    copy, finish = pool.copy_chunks, checksum_copy.finish

    def recorded(chunks, kv, layout, into_slabs):
        if not into_slabs and chunks:
            threads.append(threading.get_ident())
        return copy(chunks, kv, layout, into_slabs)

    def recorded_finish(piece_copy, payload):
        threads.append(threading.get_ident())
        return finish(piece_copy, payload)

    monkeypatch.setattr(pool, "copy_chunks", recorded)
    monkeypatch.setattr(checksum_copy, "finish", recorded_finish)
    return threads


def test_the_retrieving_thread_copies_each_read_as_it_lands_while_later_reads_run(
        make_manager, db, layout, monkeypatch):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)  # a job per chunk
    manager = make_manager()
    spans = db.spans(seeded_tokens(CHUNKS * CHUNK, 3))
    kv = seeded_kv(layout, CHUNKS * CHUNK, 3)
    manager.put(spans, kv)
    assert manager.flush()
    manager.move_down([s.key for s in spans], manager.lower[0])  # on disk only
    out = torch.zeros_like(kv)
    disk, held = manager.lower[0], []
    get = disk.get

    def get_last_once_the_first_is_out(keys, dests, *copies):
        if spans[-1].key in keys:  # the last read waits for the first chunk to be in `out`
            held.append(wait_until(lambda: torch.equal(out[:, :, :CHUNK], kv[:, :, :CHUNK]),
                                   "the first chunk copied out while the last read was held", 10))
        return get(keys, dests, *copies)

    monkeypatch.setattr(disk, "get", get_last_once_the_first_is_out)
    threads = record_copy_threads(manager, monkeypatch)

    assert manager.get(spans, out) == CHUNKS

    assert held == [True] and torch.equal(out, kv)
    assert threads and set(threads) == {threading.get_ident()}  # every copy on the retrieving thread


@pytest.fixture
def two_disks(tmp_path, layout):
    """A StorageManager over two disk tiers, "near" then "far" (both hold what is stored)."""
    metrics = Metrics(["cpu", "near", "far"])
    pool = MemoryPool(2 * CHUNKS * layout.chunk_bytes(CHUNK), layout.chunk_bytes(CHUNK), pin=False)
    pins = PinTable()
    namespace = Namespace.for_layout(NAMESPACE_MODEL, layout).digest()
    near, far = (DiskTier(tmp_path / name, namespace, 1 << 24, pins.__contains__, metrics)
                 for name in ("near", "far"))
    near.name, far.name = "near", "far"
    manager = StorageManager(layout, pool, [near, far], metrics, pins=pins, io_threads=2)
    yield manager, metrics, near
    manager.close()


def test_a_chunk_the_first_tier_misses_is_copied_out_from_the_next(two_disks, db, layout):
    manager, metrics, near = two_disks
    spans, kv = stored_below(manager, db, layout, CHUNKS, 4)
    near.remove([spans[i].key for i in (1, 4)])  # these two are read from `far`, after the rest
    out = torch.zeros_like(kv)

    assert manager.get(spans, out) == CHUNKS

    assert torch.equal(out, kv)
    assert (metrics.value("kvtier_tier_hits_total", {"tier": "near"}),
            metrics.value("kvtier_tier_hits_total", {"tier": "far"})) == (CHUNKS - 2, 2)


def test_a_chunk_that_fails_its_checksum_in_the_first_tier_is_served_by_the_next(two_disks, db, layout):
    """Bug (review of the fused pass): a checksum left to the copy out failed after the reader had
    settled the first tier's answer, so the next tier, which held a good copy, was never asked; and
    the first tier counted a hit for it."""
    manager, metrics, near = two_disks
    spans, kv = stored_below(manager, db, layout, CHUNKS, 6)
    flip_payload_byte(near.path_for(spans[2].key))  # only its checksum can tell
    out = torch.zeros_like(kv)

    assert manager.get(spans, out) == CHUNKS

    assert torch.equal(out, kv)
    hits = {t: metrics.value("kvtier_tier_hits_total", {"tier": t}) for t in ("near", "far")}
    assert hits == {"near": CHUNKS - 1, "far": 1}
    assert metrics.value("kvtier_tier_corrupt_total", {"tier": "near"}) == 1
    assert near.has([spans[2].key]) == [False]  # dropped from the tier that held it damaged
    assert manager.pool.owners() == {"cpu": CHUNKS}  # promoted, every read slab accounted for


def test_a_copy_out_that_raises_loses_no_record_below(make_manager, db, layout, monkeypatch):
    """Review: a chunk whose checksum was left to a copy out that then raised (an `out` that cannot be
    written) counted as a failed check, and its good record was deleted from the disk."""
    manager = make_manager()
    spans, kv = stored_below(manager, db, layout, CHUNKS, 9)
    copy_chunks, finish = manager.pool.copy_chunks, checksum_copy.finish

    def failing(*args, **kwargs):
        raise RuntimeError("out cannot be written")

    def failing_if_any(chunks, *args, **kwargs):
        return failing() if chunks else copy_chunks(chunks, *args, **kwargs)

    monkeypatch.setattr(manager.pool, "copy_chunks", failing_if_any)
    monkeypatch.setattr(checksum_copy, "finish", failing)
    with pytest.raises(RuntimeError, match="cannot be written"):
        manager.get(spans, torch.zeros_like(kv))
    monkeypatch.setattr(manager.pool, "copy_chunks", copy_chunks)
    monkeypatch.setattr(checksum_copy, "finish", finish)

    disk = manager.lower[0]
    assert disk.has([s.key for s in spans]) == [True] * CHUNKS and disk.usage().chunks == CHUNKS
    assert manager.metrics.value("kvtier_tier_corrupt_total", {"tier": "disk"}) == 0
    assert manager.pool.owners() == {}
    out = torch.zeros_like(kv)
    assert manager.get(spans, out) == CHUNKS and torch.equal(out, kv)


def test_an_out_that_requires_grad_is_copied_into_through_torch(make_manager, db, layout):
    """Review: the fused pass wrote through numpy into an `out` that requires grad, where torch's own
    copy refuses; such an `out` takes the two-pass path and fails the same way from any tier."""
    manager = make_manager()
    spans, kv = stored_below(manager, db, layout, CHUNKS, 8)
    out = torch.zeros_like(kv).requires_grad_(True)
    with pytest.raises(RuntimeError, match="requires grad"):
        manager.get(spans, out)
    assert manager.pool.owners() == {}


@pytest.mark.parametrize("job_bytes", [1, 1 << 30])
def test_reads_landing_in_any_order_give_back_the_stored_bytes_with_cpu_hits_between(
        make_manager, db, layout, monkeypatch, job_bytes):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", job_bytes)
    manager = make_manager()
    spans = db.spans(seeded_tokens(CHUNKS * CHUNK, 5))
    kv = seeded_kv(layout, CHUNKS * CHUNK, 5)
    manager.put(spans, kv)
    assert manager.flush()
    manager.move_down([s.key for i, s in enumerate(spans) if i % 3], manager.lower[0])  # 0 and 3 in CPU
    out = torch.zeros_like(kv)
    assert manager.get(spans, out) == CHUNKS
    assert torch.equal(out, kv)
