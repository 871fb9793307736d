"""Tests for kvtier/write_behind.py: background writes of host-memory entries, their outcome on the
entry, the removal epochs that void an overlapping write, and write-back's clean-ahead budget."""

from __future__ import annotations

import threading

import pytest
from conftest import CHUNK

from kvtier.keys import ChunkKey
from kvtier.memory import MemoryPool
from kvtier.tiers.cpu import CpuEntry
from kvtier.write_behind import WriteBehind


def key(i: int) -> ChunkKey:
    return ChunkKey(b"\x00" * 8, i.to_bytes(16, "little"))


class GatedIO:
    """Stands in for SlabIO.write: blocks until `go`, then answers `result` (the bytes don't matter here)."""

    def __init__(self, result: bool = True):
        self.go, self.result, self.writes = threading.Event(), result, []

    def write(self, key, entry, tiers, confirm=False) -> bool:
        self.writes.append((key, confirm))
        assert self.go.wait(10)
        return self.result


@pytest.fixture
def rig():
    """(write-behind over a gated writer, its lock, the pool, the landings it reported)."""
    lock = threading.Lock()
    pool = MemoryPool(4 * 4096, 4096, pin=False)
    landed = []
    io = GatedIO()
    writes = WriteBehind(threading.Condition(lock), io, pool, [], 1,
                         landed=lambda k, e, ok: landed.append((k, ok, lock.locked())))
    yield writes, io, lock, pool, landed
    io.go.set()
    writes.close()


def test_a_landed_write_marks_the_entry_written_and_lets_go_of_its_slab(rig):
    writes, io, lock, pool, landed = rig
    entry = CpuEntry(pool.alloc("cpu"), CHUNK, 4096)
    with lock:
        future = writes.submit_locked(key(0), entry)
        assert (entry.readers, writes.in_flight) == (1, 1)  # the slab outlives the write
    entry.detached = True  # evicted meanwhile: the write's release frees the slab
    io.go.set()

    assert future.result(10) is True
    assert entry.persisted and not entry.write_failed and entry.readers == 0
    assert landed == [(key(0), True, True)]  # reported under the lock
    assert writes.in_flight == 0 and pool.used_slabs == 0


def test_a_write_overlapping_a_removal_below_does_not_count_as_written(rig):
    writes, io, lock, pool, _ = rig
    before, during = CpuEntry(pool.alloc("cpu"), CHUNK, 4096), CpuEntry(pool.alloc("cpu"), CHUNK, 4096)
    with lock:
        started_before = writes.submit_locked(key(0), before)
        writes.begin_removal_locked()
        started_during = writes.submit_locked(key(1), during)
    io.go.set()
    assert writes.drain(10)
    with lock:
        writes.end_removal_locked()

    assert started_before.result() is False and started_during.result() is False
    assert not before.persisted and not during.persisted
    assert not before.write_failed  # the tiers took it: a removal is not a refusal


def test_a_write_every_tier_refused_forgets_a_stale_claim_and_is_not_tried_again(rig):
    writes, io, lock, pool, landed = rig
    io.result = False
    entry = CpuEntry(pool.alloc("cpu"), CHUNK, 4096, persisted=True)  # written before, since evicted below
    with lock:
        future = writes.submit_locked(key(0), entry)
    io.go.set()

    assert future.result(10) is False
    assert io.writes == [(key(0), True)]  # written before: the tiers are asked first
    assert not entry.persisted and entry.write_failed and landed == [(key(0), False, True)]


def test_clean_ahead_writes_only_victims_without_a_copy_below_up_to_its_budget(rig):
    writes, io, lock, pool, _ = rig
    entries = [CpuEntry(pool.alloc("cpu"), CHUNK, 4096, persisted=i == 0) for i in range(4)]
    with lock:
        writes.submit_locked(key(9), entries[3])  # one write in flight already
        writes.clean_ahead_locked([(key(i), e) for i, e in enumerate(entries[:3])], target=3)
    io.go.set()
    assert writes.drain(10)
    assert [k for k, _ in io.writes] == [key(9), key(1), key(2)]  # entry 0 has a copy below
