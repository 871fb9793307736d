"""Tests for StorageManager.check_invariants (kvtier/storage.py): it passes on a quiet manager,
names each kind of broken accounting, and holds after flush() + clear() whatever came before."""

from __future__ import annotations

import pytest
from conftest import CHUNK, seeded_kv, seeded_tokens


def test_a_quiet_engine_holds_its_invariants_and_is_empty_after_flush_and_clear(make_engine, layout):
    engine = make_engine("cpu_disk", cpu__capacity="16KiB")  # 4 slabs
    storage = engine.storage
    tokens, kv = seeded_tokens(6 * CHUNK, 1), seeded_kv(layout, 6 * CHUNK, 1)
    engine.store(tokens[:4 * CHUNK], kv[:, :, :4 * CHUNK])
    engine.pin(tokens[:CHUNK])
    keys = engine.lease(tokens, 2 * CHUNK)
    assert engine.flush(timeout=10)
    storage.check_invariants()
    with pytest.raises(RuntimeError, match="pinned chunks is 1; leased chunks is 2; disk chunks and bytes"):
        storage.check_invariants(empty=True)

    engine.release(keys)
    engine.move(tokens, "disk")
    engine.retrieve(tokens)
    assert engine.flush(timeout=10)
    engine.clear()
    storage.check_invariants(empty=True)


def test_a_slab_outside_every_entry_is_reported(make_engine, layout):
    engine = make_engine("cpu")
    engine.store(seeded_tokens(CHUNK, 2), seeded_kv(layout, CHUNK, 2))
    with engine.storage._lock:
        leaked = engine.storage.pool.alloc("read")  # what the wave-retrieve leak left behind

    with pytest.raises(RuntimeError, match="slabs in use beyond the CPU tier's is 1; slab owners other than"):
        engine.storage.check_invariants()
    engine.clear()
    with pytest.raises(RuntimeError, match="slabs in use is 1"):
        engine.storage.check_invariants(empty=True)
    with engine.storage._lock:
        engine.storage.pool.free(leaked)
    engine.storage.check_invariants(empty=True)


def test_an_entry_left_with_a_reader_is_reported(make_engine, layout):
    engine = make_engine("cpu")
    tokens = seeded_tokens(CHUNK, 3)
    engine.store(tokens, seeded_kv(layout, CHUNK, 3))
    entry = engine.storage.cpu.peek(engine.db.keys(tokens)[0])
    entry.readers += 1  # a read that never let go

    with pytest.raises(RuntimeError, match="CPU entries being read is 1"):
        engine.storage.check_invariants()
    entry.readers -= 1
    engine.storage.check_invariants()
