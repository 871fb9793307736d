"""Review regressions for kvtier/storage.py and kvtier/slab_io.py (issue 8 follow-up)."""

from __future__ import annotations

import threading
from concurrent.futures import wait as real_wait

import pytest
from conftest import CHUNK, seeded_kv, seeded_tokens

import kvtier.slab_io


def test_a_retrieve_whose_copy_out_fails_frees_no_slab_a_read_below_still_writes_into(
        make_manager, db, layout, monkeypatch):
    """The copy of the CPU hits runs while the lower-tier reads fill their slabs; when it raised,
    the wave let go of those slabs at once, and a read still running wrote into a freed slab (the
    next owner's KV)."""
    manager = make_manager(slabs=4)
    spans = db.spans(seeded_tokens(2 * CHUNK, 1))
    assert manager.put(spans, seeded_kv(layout, 2 * CHUNK, 1)) == 2
    assert manager.flush(timeout=10)
    assert manager.move_down([spans[1].key], manager.lower[0]) == 1  # chunk 0 in CPU, chunk 1 only on disk

    go, seen = threading.Event(), []
    disk, pool = manager.lower[0], manager.pool
    real_get, real_free, real_copy = disk.get, pool.free, pool.copy_chunks

    def blocked_get(keys, dests):  # on a read thread: blocked until the slab is freed or waited for
        go.wait(10)
        seen.append(pool.used_slabs)
        return real_get(keys, dests)

    def free(slab):
        real_free(slab)
        go.set()

    def waiting(futures):
        go.set()
        return real_wait(futures)

    def copy(chunks, kv, layout, into_slabs):
        if not into_slabs:
            raise RuntimeError("device lost")
        return real_copy(chunks, kv, layout, into_slabs)

    monkeypatch.setattr(disk, "get", blocked_get)
    monkeypatch.setattr(pool, "free", free)
    monkeypatch.setattr(pool, "copy_chunks", copy)
    monkeypatch.setattr(kvtier.slab_io, "wait", waiting, raising=False)

    out = seeded_kv(layout, 2 * CHUNK, 0)
    with pytest.raises(RuntimeError, match="device lost"):
        manager.get(spans, out)
    assert manager._reads.drain(10)
    assert seen == [2]  # the CPU chunk's slab and the read's, still held while the read ran
    assert pool.used_slabs == 1
    manager.check_invariants()
