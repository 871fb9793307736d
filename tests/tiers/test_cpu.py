"""Tests for kvtier/tiers/cpu.py: the host-memory tier, on its own and behind a CPU-only CacheEngine."""

from __future__ import annotations

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens, small_layout

from kvtier.keys import ChunkKey
from kvtier.memory import MemoryPool
from kvtier.tiers.cpu import CpuEntry, CpuTier

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def key(i: int) -> ChunkKey:
    return ChunkKey(b"\x00" * 8, i.to_bytes(16, "little"))


# -- the CpuTier index on its own ----------------------------------------------------------------


def test_pop_victim_is_lru_and_skips_pinned_and_read_entries():
    pool = MemoryPool(4 * 4096, 4096, pin=False)
    pinned = {key(1)}
    tier = CpuTier(pool, pinned.__contains__)
    entries = {i: CpuEntry(pool.alloc("cpu"), CHUNK, 4096) for i in range(4)}
    for i, entry in entries.items():
        tier.insert(key(i), entry)
    tier.get(key(0))  # 0 becomes most recently used: LRU order is now 1, 2, 3, 0
    entries[2].readers = 1  # an in-flight copy out of the slab

    victims = []
    while (victim := tier.pop_victim()) is not None:
        victims.append(victim)

    assert [k for k, _ in victims] == [key(3), key(0)]
    assert [e for _, e in victims] == [entries[3], entries[0]]
    assert key(1) in tier and key(2) in tier
    assert tier.usage().chunks == 2 and tier.usage().bytes == 2 * 4096


def test_pop_victim_takes_leased_entries_last_and_only_when_asked():
    pool = MemoryPool(3 * 4096, 4096, pin=False)
    leased = {key(0)}
    tier = CpuTier(pool, lambda k: False, is_leased=leased.__contains__)
    entries = {i: CpuEntry(pool.alloc("cpu"), CHUNK, 4096) for i in range(3)}
    for i, entry in entries.items():
        tier.insert(key(i), entry)  # LRU order 0, 1, 2: the leased chunk is the oldest

    assert [k for k, _ in tier.eviction_order()] == [key(1), key(2)]
    assert tier.pop_victim()[0] == key(1)
    assert tier.pop_victim()[0] == key(2)
    assert tier.pop_victim() is None  # only the leased entry is left: kept unless asked
    assert tier.pop_victim(leased=True) == (key(0), entries[0])


def test_insert_of_a_present_key_raises():
    pool = MemoryPool(2 * 4096, 4096, pin=False)
    tier = CpuTier(pool, lambda k: False)
    tier.insert(key(0), CpuEntry(pool.alloc("cpu"), CHUNK, 4096))
    with pytest.raises(KeyError):
        tier.insert(key(0), CpuEntry(pool.alloc("cpu"), CHUNK, 4096))
    assert len(tier) == 1


def test_usage_tracks_bytes_of_partial_entries_and_pops():
    pool = MemoryPool(4 * 4096, 4096, pin=False)
    tier = CpuTier(pool, lambda k: False)
    tier.insert(key(0), CpuEntry(pool.alloc("cpu"), CHUNK, 4096))
    tier.insert(key(1), CpuEntry(pool.alloc("cpu"), 5, 1280))
    assert tier.usage().bytes == 4096 + 1280
    assert tier.usage().capacity_bytes == pool.capacity_bytes
    assert tier.pop(key(1)).nbytes == 1280
    assert tier.pop(key(1)) is None
    assert tier.usage().chunks == 1 and tier.usage().bytes == 4096


def test_an_entry_frees_its_slab_once_it_is_detached_and_its_last_reader_is_done():
    pool = MemoryPool(2 * 4096, 4096, pin=False)
    entry = CpuEntry(pool.alloc("cpu"), CHUNK, 4096)
    entry.hold()
    entry.hold()
    entry.detach(pool)  # two readers still copy out of it
    assert pool.used_slabs == 1 and entry.detached
    entry.release(pool)
    assert pool.used_slabs == 1
    entry.release(pool)
    assert pool.used_slabs == 0
    with pytest.raises(RuntimeError, match="released more often"):
        entry.release(pool)

    unread = CpuEntry(pool.alloc("cpu"), CHUNK, 4096)
    unread.detach(pool)  # nobody reads it: freed at once
    assert pool.used_slabs == 0


def test_a_reads_entry_attaches_to_the_cpu_tier_only_as_the_reads_own():
    pool = MemoryPool(2 * 4096, 4096, pin=False)
    read = CpuEntry(pool.alloc("read"), CHUNK, 4096, persisted=True, detached=True)
    read.hold()
    read.attach()
    assert (read.readers, read.detached, read.slab.owner) == (0, False, "cpu")
    with pytest.raises(RuntimeError, match="only a read's own entry"):
        read.attach()  # indexed already: not a read's entry any more
    assert pool.used_slabs == 1


def test_a_demoted_entry_stays_held_until_its_demotion_ends_and_a_refused_one_waits_for_room():
    pool = MemoryPool(3 * 4096, 4096, pin=False)
    tier = CpuTier(pool, lambda k: False, is_leased=lambda k: True)
    first, other = CpuEntry(pool.alloc("cpu"), CHUNK, 4096), CpuEntry(pool.alloc("cpu"), CHUNK, 4096)
    tier.insert(key(0), first)
    victim = tier.pop_victim(leased=True)
    assert victim == (key(0), first)
    tier.demote(key(0), first)

    assert key(0) not in tier and tier.holds(key(0)) and tier.held(key(0)) is first
    assert tier.present([key(0), key(1)]) == [True, False] and tier.num_demoting == 1
    with pytest.raises(RuntimeError, match="two host copies"):
        tier.demote(key(0), other)
    assert not tier.demoted(key(0), other)  # not the entry being demoted: nothing changes
    assert tier.demoted(key(0), first) and not tier.holds(key(0)) and tier.num_demoting == 0

    tier.refuse(key(0), first)  # leased, refused below: back in the index, not a victim for now
    assert tier.peek(key(0)) is first and tier.pop_victim(leased=True) is None
    tier.room_below()
    assert tier.pop_victim(leased=True) == (key(0), first)


# -- round trips through a CPU-only engine -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_round_trip_is_bit_exact(make_engine, dtype):
    layout = small_layout(dtype)
    engine = make_engine("cpu", layout)
    tokens, kv = seeded_tokens(4 * CHUNK, 1), seeded_kv(layout, 4 * CHUNK, 1)

    assert engine.store(tokens, kv) == 4
    got, n = engine.retrieve(tokens)

    assert n == 4 * CHUNK
    assert got.dtype == dtype
    assert torch.equal(got, kv)
    cpu = engine.stats()["tiers"]["cpu"]
    assert (cpu["hits"], cpu["misses"], cpu["chunks"]) == (4, 0, 4)
    assert list(engine.stats()["tiers"]) == ["cpu"]


def test_store_copies_so_the_caller_may_reuse_its_tensor(make_engine, layout):
    engine = make_engine("cpu")
    tokens, kv = seeded_tokens(2 * CHUNK, 2), seeded_kv(layout, 2 * CHUNK, 2)
    expected = kv.clone()
    engine.store(tokens, kv)
    kv.zero_()
    got, n = engine.retrieve(tokens)
    assert n == 2 * CHUNK and torch.equal(got, expected)


@pytest.mark.parametrize("save_partial", [True, False], ids=["partial_on", "partial_off"])
def test_partial_last_chunk_is_stored_only_when_configured(make_engine, layout, save_partial):
    engine = make_engine("cpu", save_partial_chunks=str(save_partial).lower())
    length = 2 * CHUNK + 5
    tokens, kv = seeded_tokens(length, 3), seeded_kv(layout, length, 3)

    stored = engine.store(tokens, kv)
    got, n = engine.retrieve(tokens)

    expected_n = length if save_partial else 2 * CHUNK
    assert stored == (3 if save_partial else 2)
    assert engine.lookup(tokens) == expected_n
    assert n == expected_n
    assert torch.equal(got, kv[:, :, :expected_n])
    # A longer prompt shares only the whole chunks: the partial chunk's key names exactly 5 tokens.
    longer = torch.cat([tokens, seeded_tokens(CHUNK, 4)])
    assert engine.lookup(longer) == 2 * CHUNK


# -- eviction: 10x the capacity through a CPU-only engine ----------------------------------------


def test_storing_10x_capacity_evicts_lru_but_never_pinned_prompts(make_engine, layout):
    engine = make_engine("cpu", cpu__capacity="64KiB")  # 16 slabs of one 16-token chunk each
    pool = engine.stats()["pool"]
    capacity, slabs = pool["slabs"] * pool["slab_bytes"], pool["slabs"]
    assert slabs == 16
    prompt = 4 * CHUNK  # 4 chunks per prompt
    pinned = [(seeded_tokens(prompt, s), seeded_kv(layout, prompt, s)) for s in (100, 101)]
    for tokens, kv in pinned:
        engine.store(tokens, kv)
        assert engine.pin(tokens) == 4

    others = [(seeded_tokens(prompt, s), seeded_kv(layout, prompt, s)) for s in range(40)]  # 160 chunks
    for tokens, kv in others:
        assert engine.store(tokens, kv) == 4
        assert engine.stats()["pool"]["used_bytes"] <= capacity

    stats = engine.stats()
    cpu = stats["tiers"]["cpu"]
    assert cpu["chunks"] == slabs and cpu["bytes"] <= capacity
    assert cpu["evictions"] == 8 + 160 - slabs  # everything stored minus what is resident
    assert cpu["rejected"] == 0
    for tokens, kv in pinned:
        got, n = engine.retrieve(tokens)
        assert n == prompt and torch.equal(got, kv)
    last_tokens, last_kv = others[-1]
    got, n = engine.retrieve(last_tokens)
    assert n == prompt and torch.equal(got, last_kv)
    assert engine.lookup(others[0][0]) == 0  # the oldest unpinned prompt is gone

    engine.clear()
    stats = engine.stats()
    assert stats["pool"]["used_bytes"] == 0 and stats["pool"]["used_slabs"] == 0
    assert stats["pool"]["owners"] == {} and stats["pool"]["pinned_chunks"] == 0
    assert (stats["tiers"]["cpu"]["chunks"], stats["tiers"]["cpu"]["bytes"]) == (0, 0)
    assert engine.lookup(pinned[0][0]) == 0


def test_store_into_a_tier_full_of_pinned_chunks_is_rejected_and_counted(make_engine, layout):
    engine = make_engine("cpu", cpu__capacity="16KiB")  # 4 slabs
    tokens, kv = seeded_tokens(4 * CHUNK, 5), seeded_kv(layout, 4 * CHUNK, 5)
    engine.store(tokens, kv)
    engine.pin(tokens)

    other, other_kv = seeded_tokens(2 * CHUNK, 6), seeded_kv(layout, 2 * CHUNK, 6)
    assert engine.store(other, other_kv) == 0
    assert engine.stats()["tiers"]["cpu"]["rejected"] == 2
    assert engine.lookup(other) == 0

    assert engine.unpin(tokens) == 4
    assert engine.store(other, other_kv) == 2
    got, n = engine.retrieve(other)
    assert n == 2 * CHUNK and torch.equal(got, other_kv)
