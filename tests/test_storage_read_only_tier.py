"""A read-only tier below host memory (`Tier.writable` False: the P2P tier) in kvtier/storage.py and
kvtier/storage_admin.py: it is read, promoted from and counted like any tier, but never written,
demoted, moved to, cleared or removed from; with it as the only tier below, host memory drops what
it evicts (as with no tier below); the fleet's local tiers leave it out.

The read-only tier here serves another engine's disk directory (a stand-in for a peer's memory)."""

from __future__ import annotations

import pytest
import torch
from conftest import CHUNK, NAMESPACE_MODEL, seeded_kv, seeded_tokens, tier_counter

from kvtier import storage_admin
from kvtier.keys import Namespace
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.pins import PinTable
from kvtier.storage import StorageManager
from kvtier.tiers.base import TierUsage, writable_tiers
from kvtier.tiers.disk import DiskTier


class ReadOnlyTier:
    """Reads another engine's disk directory; records every write-side call it gets."""

    name = "p2p"
    writable, fans_out = False, False

    def __init__(self, source: DiskTier):
        self.source = source
        self.calls: list[str] = []

    def has(self, keys):
        return self.source.has(keys)

    def get(self, keys, dests):
        return self.source.get(keys, dests)

    def put(self, items):
        self.calls.append("put")
        return [False] * len(items)

    def remove(self, keys):
        self.calls.append("remove")
        return 0

    def clear(self):
        self.calls.append("clear")

    def usage(self):
        return TierUsage(0, 0, 0)

    def close(self):
        self.source.close()


@pytest.fixture
def peer_prompt(make_manager, db, layout):
    """Four chunks another engine stored on its disk (tmp_path/disk): (spans, kv)."""
    other = make_manager(slabs=8)
    spans = db.spans(seeded_tokens(4 * CHUNK, 5))
    kv = seeded_kv(layout, 4 * CHUNK, 5)
    assert other.put(spans, kv) == 4 and other.flush(timeout=10)
    return spans, kv


@pytest.fixture
def make_reader(tmp_path, layout):
    """A StorageManager with `slabs` slabs over [a disk of its own (if `disk`), a read-only tier]."""
    built = []

    def make(slabs: int, disk: bool = False) -> tuple[StorageManager, ReadOnlyTier]:
        namespace = Namespace.for_layout(NAMESPACE_MODEL, layout).digest()
        metrics = Metrics(["cpu", "disk", "p2p"] if disk else ["cpu", "p2p"])
        pins = PinTable()
        source = DiskTier(tmp_path / "disk", namespace, 1 << 24, pins.__contains__, Metrics(["cpu", "disk"]))
        read_only = ReadOnlyTier(source)
        lower = [DiskTier(tmp_path / "own", namespace, 1 << 24, pins.__contains__, metrics)] if disk else []
        pool = MemoryPool(slabs * layout.chunk_bytes(CHUNK), layout.chunk_bytes(CHUNK), pin=False)
        manager = StorageManager(layout, pool, [*lower, read_only], metrics, pins=pins, io_threads=2)
        built.append(manager)
        return manager, read_only

    yield make
    for manager in built:
        manager.close()


def test_writable_tiers_keeps_the_order_and_leaves_read_only_ones_out(make_reader):
    manager, read_only = make_reader(4, disk=True)
    assert [t.name for t in manager.lower] == ["disk", "p2p"]
    assert manager.writable == writable_tiers(manager.lower) == manager.lower[:1]


def test_a_read_only_tier_is_read_and_promoted_from(make_reader, peer_prompt, layout):
    manager, read_only = make_reader(8)
    spans, kv = peer_prompt
    assert manager.contains_prefix([s.key for s in spans]) == 4
    out = torch.zeros_like(kv)
    assert manager.get(spans, out) == 4 and torch.equal(out, kv)
    assert tier_counter(manager, "p2p", "hits") == 4 and len(manager.cpu) == 4  # promoted
    assert manager.flush(timeout=10) and read_only.calls == []
    manager.check_invariants()


def test_with_only_a_read_only_tier_below_evicted_chunks_are_dropped_not_demoted(make_reader, db, layout):
    manager, read_only = make_reader(2)
    prompts = [db.spans(seeded_tokens(2 * CHUNK, seed)) for seed in (11, 12, 13)]
    for spans in prompts:
        assert manager.put(spans, seeded_kv(layout, 2 * CHUNK, 7)) == 2  # each store evicts the last
    assert manager.flush(timeout=10)
    assert manager.metrics.value("kvtier_demotions_total") == 0
    assert tier_counter(manager, "cpu", "evictions") == 4
    assert manager.contains_prefix([s.key for s in prompts[0]]) == 0  # gone: nowhere to write it
    assert read_only.calls == [] and manager._writes.in_flight == 0
    manager.check_invariants()


def test_leased_chunks_stay_in_memory_as_with_no_tier_below(make_reader, db, layout):
    manager, read_only = make_reader(2)
    first, second = (db.spans(seeded_tokens(2 * CHUNK, seed)) for seed in (21, 22))
    manager.put(first, seeded_kv(layout, 2 * CHUNK, 1))
    manager.lease([s.key for s in first])
    # No tier below can keep a leased chunk: it is no victim, and the store is refused (counted).
    assert manager.put(second, seeded_kv(layout, 2 * CHUNK, 2)) == 0
    assert manager.contains_prefix([s.key for s in first]) == 2
    manager.release([s.key for s in first])
    assert manager.put(second, seeded_kv(layout, 2 * CHUNK, 2)) == 2
    assert read_only.calls == [] and manager.metrics.value("kvtier_demotions_total") == 0
    manager.check_invariants()


def test_writes_go_to_the_writable_tier_only(make_reader, db, layout):
    manager, read_only = make_reader(4, disk=True)
    spans = db.spans(seeded_tokens(2 * CHUNK, 31))
    assert manager.put(spans, seeded_kv(layout, 2 * CHUNK, 3)) == 2 and manager.flush(timeout=10)
    assert manager.lower[0].usage().chunks == 2 and read_only.calls == []


def test_nothing_is_moved_to_cleared_or_removed_from_a_read_only_tier(make_reader, peer_prompt, db, layout):
    manager, read_only = make_reader(8, disk=True)
    spans, _ = peer_prompt
    keys = [s.key for s in spans]
    manager.get(spans[:2], None, promote=True)
    with pytest.raises(ValueError, match="'p2p' is not one this storage may move to"):
        manager.move_down(keys[:2], read_only)
    with pytest.raises(ValueError, match="'p2p' is not one this storage may clear"):
        manager.clear(read_only)
    assert manager.move_up(spans) == 0  # read from the peer's copy: nothing of ours below to remove
    manager.clear()
    assert read_only.calls == []
    assert manager.contains_prefix(keys) == 4  # the peer still holds them
    manager.check_invariants()


def test_the_fleets_local_tiers_leave_a_read_only_tier_out(make_reader, peer_prompt):
    manager, _ = make_reader(4, disk=True)
    assert [t.name for t in storage_admin.local_tiers(manager)] == ["disk"]
    assert list(storage_admin.key_snapshot(manager)) == ["cpu", "disk"]
    assert [name for name, _ in storage_admin.local_usage(manager)] == ["cpu", "disk"]
