"""Tests for kvtier/p2p/holding.py: holding chunks in slabs while a peer reads them.

Real StorageManagers (tests/conftest.py `make_manager`: memory pool of one-chunk slabs, CPU tier, a
DiskTier in tmp_path): host-memory hits held as they are, disk-only chunks read into fresh slabs and
promoted, the leading-run rule, memory running out, a non-writable tier never read, and the
accounting back to zero after let_go.
"""

from __future__ import annotations

import time

import pytest
from conftest import CHUNK, seeded_kv, seeded_tokens, tier_counter
from p2p_holder_helpers import payload, settled, store

from kvtier.keys import ChunkKey
from kvtier.p2p.holding import HeldChunk, hold, let_go, payload_view, present
from kvtier.record import verify
from kvtier.tiers.disk import DiskTier


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def check_held(manager, held: list[HeldChunk], spans, kv) -> None:
    """Each held chunk: its slot is its slab, its header verifies its payload, the bytes are the KV."""
    for chunk, span in zip(held, spans, strict=True):
        assert chunk.key == span.key
        assert chunk.slot == chunk.entry.slab.index and chunk.entry.readers >= 1
        view = payload_view(manager, chunk)
        assert len(view) == chunk.payload_len == manager.layout.chunk_bytes(span.num_tokens)
        assert verify(chunk.header, view, span.key).num_tokens == span.num_tokens
        assert bytes(view) == payload(kv, span)


def test_host_memory_chunks_are_held_in_their_slabs_and_let_go(make_manager, db, layout):
    manager = make_manager(slabs=8, disk=False)
    spans, kv = store(manager, db, layout, 4, seed=1)
    used = manager.pool.used_slabs

    held = hold(manager, [s.key for s in spans], soon())

    check_held(manager, held, spans, kv)
    assert manager.pool.used_slabs == used  # no new slab: the host copies themselves
    assert manager._holders == 4
    # Held chunks are not evictable: of 8 new chunks, the 4 free slabs take 4, the rest is rejected.
    flood = db.spans(seeded_tokens(8 * CHUNK, 2))
    assert manager.put(flood, seeded_kv(layout, 8 * CHUNK, 2)) == 4
    assert tier_counter(manager, "cpu", "rejected") == 4
    assert manager.contains_prefix([s.key for s in spans]) == 4
    let_go(manager, held)
    assert settled(manager) and manager._holders == 0
    assert manager.put(flood[4:], seeded_kv(layout, 8 * CHUNK, 2)) == 4  # evictable now


def test_disk_only_chunks_are_read_into_fresh_slabs_and_promoted(make_manager, db, layout):
    manager = make_manager(slabs=8)
    spans, kv = store(manager, db, layout, 3, seed=4, disk_only=True)
    assert manager.pool.used_slabs == 0

    held = hold(manager, [s.key for s in spans], soon())

    check_held(manager, held, spans, kv)
    assert manager.metrics.value("kvtier_promotions_total") == 3
    with manager._lock:
        assert all(manager.cpu.peek(s.key) is h.entry for s, h in zip(spans, held))
    let_go(manager, held)
    assert settled(manager)
    assert manager.pool.used_slabs == 3 and manager.pool.owners() == {"cpu": 3}


def test_a_mixed_run_holds_host_copies_and_reads_the_rest(make_manager, db, layout):
    manager = make_manager(slabs=8)
    spans, kv = store(manager, db, layout, 4, seed=5)
    manager.move_down([spans[1].key, spans[3].key], manager.lower[0])

    held = hold(manager, [s.key for s in spans], soon())

    check_held(manager, held, spans, kv)
    let_go(manager, held)
    assert settled(manager)


def test_only_the_leading_run_is_held_and_missing_keys_cost_no_slab(make_manager, db, layout):
    manager = make_manager(slabs=4)
    spans, kv = store(manager, db, layout, 3, seed=6)
    missing = ChunkKey(db.namespace_digest, b"\x01" * 16)
    used = manager.pool.used_slabs

    held = hold(manager, [spans[0].key, missing, spans[2].key], soon())
    assert [h.key for h in held] == [spans[0].key]
    assert manager.pool.used_slabs == used
    let_go(manager, held)

    assert hold(manager, [missing, spans[0].key], soon()) == []
    assert hold(manager, [], soon()) == []
    assert tier_counter(manager, "cpu", "evictions") == 0  # nobody's chunk made room for a miss
    assert settled(manager)


def test_memory_running_out_ends_the_run_and_a_second_hold_gives_up_at_its_deadline(
        make_manager, db, layout):
    manager = make_manager(slabs=4)
    first, kv1 = store(manager, db, layout, 4, seed=7, disk_only=True)
    second, _ = store(manager, db, layout, 4, seed=8, disk_only=True)
    keys = [s.key for s in first + second]

    held = hold(manager, keys, soon())  # 8 chunks on disk, 4 slabs: the first 4 only
    check_held(manager, held, first, kv1)

    start = time.monotonic()
    assert hold(manager, [s.key for s in second], time.monotonic() + 0.2) == []
    assert time.monotonic() - start < 5  # gave up at its deadline
    let_go(manager, held)
    assert settled(manager)
    assert len(hold_and_let_go(manager, [s.key for s in second])) == 4  # memory is back


def hold_and_let_go(manager, keys) -> list[HeldChunk]:
    held = hold(manager, keys, soon())
    let_go(manager, held)
    return held


def test_a_key_promoted_meanwhile_keeps_the_holds_own_copy(make_manager, db, layout):
    # A retrieve promotes the chunk while the hold reads it: the hold keeps serving the bytes its
    # header was computed over, and frees its own slab at let_go; host memory keeps one entry.
    manager = make_manager(slabs=8)
    spans, kv = store(manager, db, layout, 1, seed=9, disk_only=True)
    tier = manager.lower[0]
    original_get = tier.get

    def get_then_race(keys, dests, *copies):
        result = original_get(keys, dests, *copies)
        tier.get = original_get  # (the retrieve reads through the tier itself)
        assert manager.get(spans, None) == 1  # promotes it into the CPU tier
        return result

    tier.get = get_then_race
    held = hold(manager, [spans[0].key], soon())
    check_held(manager, held, spans, kv)
    with manager._lock:
        assert manager.cpu.peek(spans[0].key) is not held[0].entry
    let_go(manager, held)
    assert settled(manager) and manager.pool.used_slabs == 1


class ReadOnlyTier(DiskTier):
    """A tier that says it holds everything and must never be read: P2P's place below."""

    writable, fans_out = False, False

    def has(self, keys):
        return [True] * len(keys)

    def get(self, keys, dests):
        raise AssertionError("a hold read from a non-writable tier")


def test_a_non_writable_tier_is_never_asked(make_manager, db, layout):
    manager = make_manager(slabs=4, tier_class=ReadOnlyTier)
    spans = db.spans(seeded_tokens(2 * CHUNK, 10))
    keys = [s.key for s in spans]
    assert present(manager, keys) == [False, False]
    assert hold(manager, keys, soon()) == []
    assert settled(manager)


def test_present_answers_from_host_memory_and_writable_tiers(make_manager, db, layout):
    manager = make_manager(slabs=8)
    spans, _ = store(manager, db, layout, 3, seed=11)
    manager.move_down([spans[1].key], manager.lower[0])
    missing = ChunkKey(db.namespace_digest, b"\x02" * 16)
    assert present(manager, [spans[0].key, missing, spans[1].key, spans[2].key]) == [True, False, True, True]
    assert tier_counter(manager, "disk", "bytes_read") == 0


def test_a_closed_manager_holds_nothing(make_manager, db, layout):
    manager = make_manager(slabs=4, disk=False)
    spans, _ = store(manager, db, layout, 2, seed=12)
    manager.close()
    assert hold(manager, [s.key for s in spans], soon()) == []


def test_let_go_twice_is_a_loud_error(make_manager, db, layout):
    manager = make_manager(slabs=4, disk=False)
    spans, _ = store(manager, db, layout, 1, seed=13)
    held = hold(manager, [spans[0].key], soon())
    let_go(manager, held)
    with pytest.raises(RuntimeError, match="released more often"):
        let_go(manager, held)


def test_a_host_copy_is_hashed_once_and_a_disk_read_brings_its_own_header(make_manager, db, layout,
                                                                           monkeypatch):
    manager = make_manager(slabs=8)
    spans, kv = store(manager, db, layout, 2, seed=9)  # written through: the writes hashed them
    below, kv_below = store(manager, db, layout, 2, seed=10, disk_only=True)
    hashed = []
    import kvtier.p2p.holding as holding_module

    real = holding_module.encode_header
    monkeypatch.setattr(holding_module, "encode_header", lambda *a, **k: hashed.append(a) or real(*a, **k))
    for _ in range(3):
        held = hold(manager, [s.key for s in spans], soon())
        check_held(manager, held, spans, kv)
        assert all(h.header is h.entry.header for h in held)
        let_go(manager, held)
        held = hold(manager, [s.key for s in below], soon())
        check_held(manager, held, below, kv_below)
        let_go(manager, held)
    assert hashed == []  # neither the written-through host copies nor the records read from disk
    assert settled(manager)
