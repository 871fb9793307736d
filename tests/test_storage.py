"""Tests for kvtier/storage.py: prefix lookup across tiers, admission, eviction and demotion,
promotion, rejection under pressure, clear accounting, a lower tier that fails, retrieves in waves,
leases that let a chunk leave host memory but not every tier, and the races behind past leaks.

StorageManagers here are built from real parts (memory pool, CPU tier, a DiskTier in `tmp_path`);
the eviction stories at 10x the CPU capacity go through a CacheEngine from configs/cpu_disk.yaml.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens, tier_counter

from kvtier.storage import StorageManager
from kvtier.tiers.disk import DiskTier


def fetch(manager: StorageManager, spans, layout) -> tuple[torch.Tensor, int]:
    out = torch.zeros(layout.chunk_shape(spans[-1].end), dtype=layout.dtype)
    got = manager.get(spans, out)
    return out, (spans[got - 1].end if got else 0)


# -- lookup --------------------------------------------------------------------------------------


def test_contains_prefix_spans_tiers_and_stops_at_the_first_gap(make_manager, db, layout):
    manager = make_manager()
    spans = db.spans(seeded_tokens(4 * CHUNK, 1))
    keys = [s.key for s in spans]
    assert manager.put(spans, seeded_kv(layout, 4 * CHUNK, 1)) == 4
    assert manager.flush(timeout=10)
    assert manager.move_down(keys[:1], manager.lower[0]) == 1  # chunk 0 only on disk, 1 only in CPU ...
    manager.lower[0].remove(keys[1:2])
    manager.move_down(keys[2:3], manager.lower[0])
    manager.lower[0].remove(keys[2:3])  # ... and chunk 2 nowhere

    assert manager.contains_prefix(keys) == 2
    assert manager.contains_prefix(keys[1:2]) == 1
    assert manager.contains_prefix([]) == 0
    assert tier_counter(manager, "disk", "bytes_read") == 0  # lookup never reads a payload


# -- store ---------------------------------------------------------------------------------------


def test_put_deduplicates_and_a_re_store_refreshes_recency(make_manager, db, layout):
    manager = make_manager(slabs=4, disk=False)
    a, b, c = (db.spans(seeded_tokens(2 * CHUNK, seed)) for seed in (1, 2, 3))
    kv = seeded_kv(layout, 2 * CHUNK, 0)
    assert manager.put(a, kv) == 2
    assert manager.put(b, kv) == 2
    assert manager.put(a, kv) == 0  # already cached: nothing copied, but `a` is now most recent
    assert manager.metrics.value("kvtier_deduplicated_chunks_total") == 2

    assert manager.put(c, kv) == 2

    assert manager.contains_prefix([s.key for s in a]) == 2
    assert manager.contains_prefix([s.key for s in b]) == 0
    assert tier_counter(manager, "cpu", "evictions") == 2


def test_a_store_larger_than_the_cpu_tier_streams_down_to_the_tier_below(make_manager, db, layout):
    # Regression: the chunks past host memory were rejected (a 4,096-token prompt through a 4-chunk
    # CPU tier kept 1,024 tokens, the disk tier below notwithstanding). Now each wave is written through
    # and the next waits for those writes to free slabs.
    manager = make_manager(slabs=4)
    spans = db.spans(seeded_tokens(10 * CHUNK, 4))
    kv = seeded_kv(layout, 10 * CHUNK, 4)

    assert manager.put(spans, kv) == 10
    assert tier_counter(manager, "cpu", "rejected") == 0
    assert manager.flush(timeout=10)
    assert len(manager.cpu) == 4 and manager.lower[0].usage().chunks == 10  # the last wave in memory
    out, n = fetch(manager, spans, layout)
    assert n == 10 * CHUNK and torch.equal(out, kv)
    manager.check_invariants()


def test_without_a_tier_below_a_store_larger_than_the_cpu_tier_keeps_its_prefix(make_manager, db, layout):
    # Nothing below to write to: the store does not wait; the tail is rejected and counted.
    manager = make_manager(slabs=4, disk=False)
    spans = db.spans(seeded_tokens(6 * CHUNK, 4))
    kv = seeded_kv(layout, 6 * CHUNK, 4)

    assert manager.put(spans, kv) == 4
    assert tier_counter(manager, "cpu", "rejected") == 2
    assert manager.contains_prefix([s.key for s in spans]) == 4
    out, n = fetch(manager, spans[:4], layout)
    assert n == 4 * CHUNK and torch.equal(out, kv[:, :, : 4 * CHUNK])


# -- retrieve ------------------------------------------------------------------------------------


@pytest.mark.parametrize("promote", [True, False], ids=["promote", "no_promote"])
def test_get_serves_cpu_and_disk_hits_and_promotes_only_when_configured(make_manager, db, layout, promote):
    manager = make_manager(promote_on_hit=promote)
    spans = db.spans(seeded_tokens(3 * CHUNK, 5))
    kv = seeded_kv(layout, 3 * CHUNK, 5)
    manager.put(spans, kv)
    manager.flush()
    manager.move_down([spans[1].key, spans[2].key], manager.lower[0])
    used = manager.pool.used_slabs

    out, n = fetch(manager, spans, layout)

    assert n == 3 * CHUNK and torch.equal(out, kv)
    assert (tier_counter(manager, "cpu", "hits"), tier_counter(manager, "disk", "hits")) == (1, 2)
    assert (spans[1].key in manager.cpu) is promote
    assert manager.metrics.value("kvtier_promotions_total") == (2 if promote else 0)
    assert manager.pool.used_slabs == used + (2 if promote else 0)  # read slabs freed when not kept


class FailingDiskTier(DiskTier):
    """A disk tier whose reads raise, breaking the Tier contract (tiers must not raise)."""

    def get(self, keys, dests):
        raise OSError("device gone")


def test_a_tier_that_raises_is_a_counted_miss(make_manager, db, layout):
    manager = make_manager(tier_class=FailingDiskTier)
    spans = db.spans(seeded_tokens(3 * CHUNK, 6))
    kv = seeded_kv(layout, 3 * CHUNK, 6)
    manager.put(spans, kv)
    manager.flush()
    manager.move_down([spans[1].key], manager.lower[0])

    out, n = fetch(manager, spans, layout)

    assert n == CHUNK and torch.equal(out[:, :, :CHUNK], kv[:, :, :CHUNK])
    assert tier_counter(manager, "disk", "errors") == 1
    assert manager.pool.owners() == {"cpu": 2}  # the read slab went back to the pool


# -- write-back: demotion on eviction ------------------------------------------------------------


def test_write_back_demotes_an_evicted_chunk_and_serves_it_from_disk(make_manager, db, layout):
    manager = make_manager(slabs=4, write_through=False, clean_ahead=0)  # no early writes: demotion only
    a = db.spans(seeded_tokens(4 * CHUNK, 7))
    kv = seeded_kv(layout, 4 * CHUNK, 7)
    assert manager.put(a, kv) == 4
    assert manager.lower[0].usage().chunks == 0  # nothing written below yet

    # Evicting a[0] starts its demotion; its slab is free only once the write lands, and the store
    # waits for that (background writes never wait on a store).
    assert manager.put(db.spans(seeded_tokens(CHUNK, 8)), seeded_kv(layout, CHUNK, 8)) == 1
    assert tier_counter(manager, "cpu", "rejected") == 0
    assert manager.contains_prefix([s.key for s in a]) == 4  # from host memory and the disk
    assert manager.flush(timeout=10)

    assert manager.metrics.value("kvtier_demotions_total") == 1
    assert manager.lower[0].has([s.key for s in a]) == [True, False, False, False]
    out, n = fetch(manager, a, layout)
    assert n == 4 * CHUNK and torch.equal(out, kv)
    assert tier_counter(manager, "disk", "hits") == 1


def test_write_back_cleans_ahead_so_a_full_tier_evicts_without_rejecting(make_manager, db, layout):
    manager = make_manager(slabs=4, write_through=False, clean_ahead=1)
    a = db.spans(seeded_tokens(4 * CHUNK, 7))
    kv = seeded_kv(layout, 4 * CHUNK, 7)
    assert manager.put(a, kv) == 4  # the pool is full: the next victim, a[0], is written below
    assert manager.flush(timeout=10)
    assert manager.lower[0].has([s.key for s in a]) == [True, False, False, False]

    assert manager.put(db.spans(seeded_tokens(CHUNK, 8)), seeded_kv(layout, CHUNK, 8)) == 1
    assert tier_counter(manager, "cpu", "rejected") == 0
    assert manager.metrics.value("kvtier_demotions_total") == 0  # a[0] had a copy: dropped at once


def test_write_back_full_cpu_tier_still_serves_a_fully_cached_prefix(make_manager, db, layout):
    """Bug: with every slab holding an unpersisted chunk, a retrieve could not get a slab to read
    a[0] into (it gave up when a demotion was in flight), so a cached prefix read as a miss."""
    manager = make_manager(slabs=4, write_through=False, clean_ahead=0)
    a = db.spans(seeded_tokens(4 * CHUNK, 7))
    kv = seeded_kv(layout, 4 * CHUNK, 7)
    manager.put(a, kv)
    manager.put(db.spans(seeded_tokens(CHUNK, 8)), seeded_kv(layout, CHUNK, 8))  # demotes a[0]
    manager.flush()
    manager.put(db.spans(seeded_tokens(CHUNK, 9)), seeded_kv(layout, CHUNK, 9))  # takes the freed slab
    assert manager.contains_prefix([s.key for s in a]) == 4  # a[0] on disk, a[1:] in CPU

    out, n = fetch(manager, a, layout)  # waits for chunk 9's demotion to lend a slab to a[0]

    assert n == 4 * CHUNK and torch.equal(out, kv)


def test_a_prefix_larger_than_the_cpu_tier_is_retrieved_in_waves(make_manager, db, layout):
    manager = make_manager(slabs=4)
    a = db.spans(seeded_tokens(10 * CHUNK, 11))
    kv = seeded_kv(layout, 10 * CHUNK, 11)
    for start in range(0, 10, 2):  # store in pieces, letting write-through land in between
        assert manager.put(a[start:start + 2], kv) == 2
        assert manager.flush(timeout=10)
    assert manager.lower[0].usage().chunks == 10

    out, n = fetch(manager, a, layout)

    assert n == 10 * CHUNK and torch.equal(out, kv)
    assert manager.pool.used_slabs <= 4


# -- eviction at 10x the CPU capacity with a disk tier below -------------------------------------


def test_storing_10x_capacity_keeps_every_prompt_retrievable_through_disk(make_engine, layout, tmp_path):
    engine = make_engine("cpu_disk", cpu__capacity="64KiB")  # 16 one-chunk slabs
    capacity = engine.stats()["pool"]["slabs"] * engine.stats()["pool"]["slab_bytes"]
    prompt = 4 * CHUNK
    pinned = [(seeded_tokens(prompt, s), seeded_kv(layout, prompt, s)) for s in (100, 101)]
    for tokens, kv in pinned:
        engine.store(tokens, kv)
        assert engine.pin(tokens) == 4
    others = [(seeded_tokens(prompt, s), seeded_kv(layout, prompt, s)) for s in range(40)]  # 160 chunks
    for tokens, kv in others:
        # flush: let the write-through land, so the chunks are evictable before the next store
        assert engine.flush(timeout=10)
        assert engine.store(tokens, kv) == 4
        assert engine.stats()["pool"]["used_bytes"] <= capacity
    engine.flush()

    stats = engine.stats()
    assert stats["tiers"]["cpu"]["evictions"] == 168 - 16 and stats["tiers"]["cpu"]["rejected"] == 0
    assert stats["tiers"]["disk"]["chunks"] == 168  # every chunk persisted below
    cpu_keys = {k for k, _ in engine.storage.cpu.items()}
    assert all(k in cpu_keys for tokens, _ in pinned for k in engine.db.keys(tokens))
    for tokens, kv in pinned + others:
        got, n = engine.retrieve(tokens)
        assert n == prompt and torch.equal(got, kv)
        assert engine.stats()["pool"]["used_bytes"] <= capacity
    assert engine.stats()["tiers"]["disk"]["hits"] >= 150  # the old prompts came back from disk

    engine.clear()
    stats = engine.stats()
    assert stats["pool"]["used_bytes"] == 0 and stats["pool"]["owners"] == {}
    assert stats["pool"]["pinned_chunks"] == 0 and stats["pool"]["demoting_chunks"] == 0
    for tier in ("cpu", "disk"):
        assert (stats["tiers"][tier]["chunks"], stats["tiers"][tier]["bytes"]) == (0, 0)
    assert not list(tmp_path.glob("disk/**/*.kvr"))


def test_clear_cpu_waits_for_background_writes_and_keeps_the_disk_copy(make_engine, layout):
    engine = make_engine("cpu_disk")
    tokens, kv = seeded_tokens(4 * CHUNK, 9), seeded_kv(layout, 4 * CHUNK, 9)
    engine.store(tokens, kv)  # no flush: clear must drain the queued writes itself

    engine.clear("cpu")

    stats = engine.stats()
    assert stats["tiers"]["cpu"]["chunks"] == 0 and stats["pool"]["used_slabs"] == 0
    assert stats["tiers"]["disk"]["chunks"] == 4
    got, n = engine.retrieve(tokens)
    assert n == 4 * CHUNK and torch.equal(got, kv)


# -- regressions ---------------------------------------------------------------------------------


def test_lookup_counts_cpu_chunks_behind_a_disk_only_chunk(make_engine, layout):
    """Bug: contains_prefix credited CPU residency only for the leading run, so once eviction had
    demoted a prompt's first chunk, its later CPU-only chunks read as misses (lookup 16 of 64)."""
    engine = make_engine("cpu_disk", cpu__capacity="16KiB")  # 4 slabs
    tokens, kv = seeded_tokens(4 * CHUNK, 10), seeded_kv(layout, 4 * CHUNK, 10)
    engine.store(tokens, kv)
    engine.flush()
    assert engine.move(tokens, "cpu") == 4  # a relocation: the disk copies are gone
    assert engine.move(tokens[:CHUNK], "disk") == 1  # chunk 0 only on disk, as if evicted first
    keys = engine.db.keys(tokens)
    assert engine.storage.lower[0].has(keys) == [True, False, False, False]
    assert [k in engine.storage.cpu for k in keys] == [False, True, True, True]

    assert engine.lookup(tokens) == 4 * CHUNK
    got, n = engine.retrieve(tokens)
    assert n == 4 * CHUNK and torch.equal(got, kv)


class GatedDiskTier(DiskTier):
    """A real disk tier that can hold the next call of one operation at its start until the test
    opens the gate, so a race between a background job and the caller runs in a fixed order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._gates: dict[str, tuple[threading.Event, threading.Event]] = {}

    def hold(self, op: str) -> tuple[threading.Event, threading.Event]:
        """(entered, gate): `entered` is set when the next `op` call arrives; it runs once `gate` is."""
        self._gates[op] = (threading.Event(), threading.Event())
        return self._gates[op]

    def _pass(self, op: str) -> None:
        held = self._gates.pop(op, None)  # one call only
        if held is not None:
            held[0].set()
            if not held[1].wait(10):
                raise TimeoutError(f"the test never opened the {op} gate")

    def get(self, keys, dests, *copies):
        self._pass("get")
        return super().get(keys, dests, *copies)

    def put(self, items):
        self._pass("put")
        return super().put(items)

    def remove(self, keys):
        self._pass("remove")
        return super().remove(keys)


def assert_pool_empty_after_clear(manager: StorageManager) -> None:
    assert manager.flush(timeout=10)
    manager.clear()
    assert (manager.pool.used_slabs, manager.pool.owners()) == (0, {})
    manager.check_invariants(empty=True)


def test_a_wave_retrieve_does_not_leak_slabs_past_the_cut(make_manager, db, layout):
    """Bug: _plan_reads cut `plan = plan[:i + 1]` while its loop still ran over the old list, so
    slabs allocated for lower-tier chunks past the cut were never freed (one per wave here)."""
    manager = make_manager(slabs=4)
    a = db.spans(seeded_tokens(6 * CHUNK, 46))
    kv = seeded_kv(layout, 6 * CHUNK, 46)
    for start in range(0, 6, 2):
        manager.put(a[start:start + 2], kv)
        assert manager.flush(timeout=10)
    manager.clear(manager.cpu)
    manager.put(a[3:5], kv)  # a[3], a[4] in host memory; a[0:3] and a[5] only on disk
    assert manager.flush(timeout=10)

    out, n = fetch(manager, a, layout)  # needs 2 waves: 4 slabs for 6 chunks

    assert n == 6 * CHUNK and torch.equal(out, kv)
    assert manager.pool.used_slabs == len(manager.cpu)  # no slab outside the index
    assert_pool_empty_after_clear(manager)


def test_a_promotion_meeting_a_demotion_of_the_same_key_does_not_leak_its_slab(make_manager, db, layout):
    """Bug: a read of K promoted a second host copy of K while an older one was being demoted;
    once that copy was demoted too it overwrote `_demoting[K]`, and the first one's slab was never
    freed when its write landed."""
    manager = make_manager(slabs=3, tier_class=GatedDiskTier, write_through=False, clean_ahead=0)
    disk = manager.lower[0]
    k, x1, x2, x3 = (db.spans(seeded_tokens(CHUNK, seed)) for seed in (40, 41, 42, 43))
    kv = seeded_kv(layout, CHUNK, 40)
    manager.put(k, kv)
    assert manager.move_down([k[0].key], manager.lower[0]) == 1  # K only on disk
    read_entered, open_read = disk.hold("get")
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(fetch, manager, k, layout)
        assert read_entered.wait(10)  # the read of K holds a slab and waits on the disk
        write_entered, open_write = disk.hold("put")
        manager.put(k, kv)  # K stored again: host copy 1
        manager.put(x1, kv)  # takes the last free slab
        manager.put(x2, kv)  # evicts copy 1: its demotion waits on the disk
        assert write_entered.wait(10)
        open_read.set()
        out, n = reading.result(timeout=10)
    assert n == CHUNK and torch.equal(out, kv)

    manager.pin([x1[0].key])
    manager.move_up(k)  # a relocation: any host copy of K is no longer "written below"
    manager.put(x3, kv)  # evicts (demotes) what is evictable
    open_write.set()
    assert manager.flush(timeout=10)
    manager.unpin([x1[0].key])

    out, n = fetch(manager, k, layout)
    assert n == CHUNK and torch.equal(out, kv)  # K is still somewhere
    assert_pool_empty_after_clear(manager)


def test_move_to_cpu_never_loses_a_chunk_evicted_before_its_copy_below_is_removed(make_manager, db, layout):
    """Bug: move(tokens, "cpu") promoted, then removed the disk copies; a CPU eviction in between
    dropped (or wrote back, then lost to the removal) a chunk, which was then in no tier at all."""
    manager = make_manager(slabs=2, tier_class=GatedDiskTier)
    disk = manager.lower[0]
    a = db.spans(seeded_tokens(2 * CHUNK, 44))
    kv = seeded_kv(layout, 2 * CHUNK, 44)
    manager.put(a, kv)
    assert manager.flush(timeout=10)
    assert manager.move_down([s.key for s in a], manager.lower[0]) == 2  # only on disk
    entered, open_remove = disk.hold("remove")
    with ThreadPoolExecutor(1) as pool:
        moving = pool.submit(manager.move_up, a)
        assert entered.wait(10)  # promoted; about to remove the copies below
        manager.put(db.spans(seeded_tokens(2 * CHUNK, 45)), seeded_kv(layout, 2 * CHUNK, 45))
        assert manager.flush(timeout=10)  # let any demotion this started land
        open_remove.set()
        moving.result(timeout=10)

    assert manager.contains_prefix([s.key for s in a]) == 2
    out, n = fetch(manager, a, layout)
    assert n == 2 * CHUNK and torch.equal(out, kv)
    assert_pool_empty_after_clear(manager)


def test_clear_disk_forgets_that_cpu_chunks_were_written_below(make_manager, db, layout):
    """Bug: clear("disk") left host copies marked as written below, so evicting them later dropped
    them instead of demoting them: the chunks were in no tier."""
    manager = make_manager(slabs=4)
    a = db.spans(seeded_tokens(4 * CHUNK, 47))
    kv = seeded_kv(layout, 4 * CHUNK, 47)
    manager.put(a, kv)
    assert manager.flush(timeout=10)  # write-through: all four on disk too
    manager.clear(manager.lower[0])

    for seed in range(48, 56):  # push `a` out of host memory, one chunk at a time
        manager.put(db.spans(seeded_tokens(CHUNK, seed)), seeded_kv(layout, CHUNK, seed))
        assert manager.flush(timeout=10)
    assert not any(s.key in manager.cpu for s in a)

    assert manager.lower[0].has([s.key for s in a]) == [True] * 4  # demoted, not dropped
    out, n = fetch(manager, a, layout)
    assert n == 4 * CHUNK and torch.equal(out, kv)


def test_a_leased_chunk_may_leave_host_memory_but_not_every_tier(make_manager, db, layout):
    # A lease protects a chunk in some tier, not in host memory: with everything else pinned, the
    # leased chunk is the one evicted, demoted to disk, and the disk then keeps it over older files.
    record = 2 * 4096  # header block + one 4 KiB payload
    manager = make_manager(slabs=2, write_through=False, clean_ahead=0, disk_bytes=3 * record)
    k, x = (db.spans(seeded_tokens(CHUNK, seed)) for seed in (57, 58))
    kv = seeded_kv(layout, CHUNK, 57)
    manager.put(k, kv)
    manager.lease([k[0].key])
    manager.put(x, kv)
    manager.pin([x[0].key])

    manager.put(db.spans(seeded_tokens(CHUNK, 59)), kv)  # the only victim is the leased chunk
    assert manager.flush(timeout=10)
    assert k[0].key not in manager.cpu and manager.lower[0].has([k[0].key]) == [True]
    for seed in range(70, 76):  # more records than the disk holds, all newer than k's
        other = db.spans(seeded_tokens(CHUNK, seed))
        manager.put(other, kv)
        assert manager.move_down([other[0].key], manager.lower[0]) == 1

    assert manager.lower[0].has([k[0].key]) == [True]
    out, n = fetch(manager, k, layout)
    assert n == CHUNK and torch.equal(out, kv)
    manager.release([k[0].key])


def test_a_leased_chunk_whose_demotion_fails_stays_in_host_memory(make_manager, db, layout):
    manager = make_manager(slabs=2, write_through=False, clean_ahead=0, disk_bytes=4096)  # holds no record
    k, x, y = (db.spans(seeded_tokens(CHUNK, seed)) for seed in (77, 78, 79))
    kv = seeded_kv(layout, CHUNK, 77)
    manager.put(k, kv)
    manager.lease([k[0].key])
    manager.put(x, kv)
    manager.pin([x[0].key])

    assert manager.put(y, kv) == 0  # evicts the leased chunk: its demotion is refused below
    assert manager.flush(timeout=10)

    assert tier_counter(manager, "disk", "rejected") == 1
    assert k[0].key in manager.cpu  # back where it was: the lease keeps it in some tier
    out, n = fetch(manager, k, layout)
    assert n == CHUNK and torch.equal(out, kv)
    manager.release([k[0].key])
    manager.put(y, kv)  # unleased now: a failed demotion drops it (the disk counted the refusal)
    assert manager.flush(timeout=10)
    assert manager.contains_prefix([k[0].key]) == 0
    manager.check_invariants()


def test_a_record_with_a_valid_checksum_but_a_short_payload_is_a_miss_not_stale_slab_bytes(
        make_manager, db, layout):
    # Regression: a record whose header claims the right shape and dtype but whose (checksummed)
    # payload is shorter passed the shape check, and the rest of the slab kept its old bytes.
    from kvtier.record import encode_header
    from kvtier.tiers.base import PutItem

    manager = make_manager(slabs=4)
    spans = db.spans(seeded_tokens(CHUNK, 1))
    key, shape = spans[0].key, layout.chunk_shape(CHUNK)
    short = torch.zeros(layout.chunk_bytes(CHUNK) // 2, dtype=torch.uint8)
    assert manager.lower[0].put([PutItem(key, encode_header(key, shape, layout.dtype, short.numpy()), short)])

    _, got = fetch(manager, spans, layout)

    assert got == 0
    assert tier_counter(manager, "disk", "corrupt") == 1 and manager.lower[0].has([key]) == [False]
