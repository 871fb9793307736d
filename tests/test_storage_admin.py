"""Tests for kvtier/storage_admin.py: the StorageManager's moves and clears take tier objects (names
are the CacheEngine's to resolve), and only tiers of that manager."""

from __future__ import annotations

import pytest
from conftest import CHUNK, seeded_kv, seeded_tokens

from kvtier.errors import KvtierError
from kvtier.tiers.disk import DiskTier


def test_a_tier_of_another_manager_is_refused_before_anything_moves(make_manager, db, layout, tmp_path):
    manager = make_manager(slabs=4)
    spans = db.spans(seeded_tokens(2 * CHUNK, 1))
    manager.put(spans, seeded_kv(layout, 2 * CHUNK, 1))
    assert manager.flush(timeout=10)
    stranger = DiskTier(tmp_path / "other", db.namespace_digest, 1 << 20, lambda k: False, manager.metrics)
    try:
        with pytest.raises(ValueError, match="'disk' is not one this storage may move to"):
            manager.move_down([s.key for s in spans], stranger)
        with pytest.raises(ValueError, match="'disk' is not one this storage may clear"):
            manager.clear(stranger)
        with pytest.raises(ValueError, match="'cpu' is not one this storage may move to"):
            manager.move_down([s.key for s in spans], manager.cpu)
    finally:
        stranger.close()
    assert manager.contains_prefix([s.key for s in spans]) == 2 and len(manager.cpu) == 2
    manager.check_invariants()


def test_clearing_one_tier_object_leaves_the_others(make_manager, db, layout):
    manager = make_manager(slabs=4)
    spans = db.spans(seeded_tokens(2 * CHUNK, 2))
    manager.put(spans, seeded_kv(layout, 2 * CHUNK, 2))
    assert manager.flush(timeout=10)

    manager.clear(manager.lower[0])
    assert len(manager.cpu) == 2 and manager.lower[0].usage().chunks == 0
    manager.clear(manager.cpu)
    assert len(manager.cpu) == 0 and manager.contains_prefix([s.key for s in spans]) == 0
    manager.check_invariants(empty=True)


def test_moves_and_clears_are_refused_after_close_and_pins_and_leases_still_balance(make_manager, db, layout):
    # The bound functions keep the old methods' gate: those that use the tiers or the I/O queues
    # refuse once close() began; pins and leases (index only) still work, so a request finishing
    # after close can release what it leased.
    manager = make_manager(slabs=4)
    spans = db.spans(seeded_tokens(2 * CHUNK, 3))
    manager.put(spans, seeded_kv(layout, 2 * CHUNK, 3))
    keys = [s.key for s in spans]
    manager.lease(keys)
    manager.close()
    for call in (lambda: manager.move_down(keys, manager.lower[0]), lambda: manager.move_up(spans),
                 lambda: manager.clear(), lambda: manager.clear(manager.cpu)):
        with pytest.raises(KvtierError, match="closed"):
            call()
    assert manager.pin(keys) == 2 and manager.unpin(keys) == 2
    manager.release(keys)
    assert manager.pins.num_leased == 0 and len(manager.cpu) == 2
    manager.check_invariants()


def test_two_key_listeners_both_hear_every_change_and_one_that_raises_stops_neither(make_manager, db, layout):
    # A fleet agent and vLLM's KV events may listen to one storage at once; the indexes have one slot.
    from kvtier import storage_admin

    manager = make_manager(slabs=4)
    heard: dict[str, list] = {"first": [], "second": []}

    def first(op, tier, key):
        heard["first"].append((op, tier, key))
        raise RuntimeError("a broken listener")

    def second(op, tier, key):
        heard["second"].append((op, tier, key))

    storage_admin.add_key_listener(manager, first)
    storage_admin.add_key_listener(manager, second)
    spans = db.spans(seeded_tokens(2 * CHUNK, 4))
    manager.put(spans, seeded_kv(layout, 2 * CHUNK, 4))
    assert manager.flush(timeout=10)
    keys = {s.key for s in spans}
    for name in ("first", "second"):
        assert {(tier, key) for op, tier, key in heard[name] if op == "stored"} == {
            (tier, key) for tier in ("cpu", "disk") for key in keys}, name

    storage_admin.remove_key_listener(manager, first)
    heard["first"].clear()
    manager.clear(manager.cpu)
    assert heard["first"] == [] and {key for op, tier, key in heard["second"] if op == "evicted"} == keys
    storage_admin.remove_key_listener(manager, second)
    storage_admin.remove_key_listener(manager, second)  # twice: a no-op
    assert manager.key_listeners == ()
    manager.check_invariants()
