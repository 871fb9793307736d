"""Tests for the CPU tier's lookup probe (kvtier/tiers/cpu.py `present`, `probe_prefix` of key
lists and of packed keys, and the KeyTable mirror behind them): after any sequence of inserts,
pops, evictions, demotions and refusals it answers exactly as the tier's own maps do, with the C
table and without it."""

from __future__ import annotations

import random

import pytest
from conftest import CHUNK

from kvtier import native_keys
from kvtier.keys import ChunkKey
from kvtier.lookup import prefix_length
from kvtier.memory import MemoryPool
from kvtier.packed_keys import PackedKeys
from kvtier.tiers.cpu import CpuEntry, CpuTier

SLABS = 24


def key(i: int) -> ChunkKey:
    return ChunkKey(b"\x00" * 8, i.to_bytes(16, "little"))


@pytest.fixture(params=["table", "dicts"])
def tier(request, monkeypatch) -> CpuTier:
    if request.param == "table" and not native_keys.AVAILABLE:
        pytest.skip(f"native keys off: {native_keys.WHY_NOT}")
    if request.param == "dicts":
        monkeypatch.setattr(native_keys, "AVAILABLE", False)
    tier = CpuTier(MemoryPool(SLABS * 4096, 4096, pin=False), lambda k: False, is_leased=lambda k: True)
    assert isinstance(tier._held, native_keys.NoKeyTable) == (request.param == "dicts")
    return tier


def truth(tier: CpuTier, keys: list[ChunkKey]) -> list[bool]:
    return [tier.holds(k) for k in keys]


def check(tier: CpuTier, rng: random.Random) -> None:
    keys = [key(rng.randrange(40)) for _ in range(rng.randrange(1, 30))]
    want = truth(tier, keys)
    assert tier.present(keys) == want
    lead = want.index(False) if False in want else len(want)
    assert tier.probe_prefix(keys, below=False) == (lead, [], [])
    got = tier.probe_prefix(tuple(keys), below=True)
    assert got == ((lead, [], []) if lead == len(keys) else (lead, keys[lead:], want[lead:]))
    if native_keys._ext is not None:  # (packed keys exist only where the extension is built)
        assert tier.probe_prefix(PackedKeys(b"".join(keys)), below=True) == got


def step(tier: CpuTier, rng: random.Random, demoting: dict) -> None:
    """One random change: insert, pop, evict (leased: demoted), end a demotion, refuse one."""
    op, k = rng.randrange(5), key(rng.randrange(40))
    if op == 0 and tier.peek(k) is None and tier.pool.used_slabs < SLABS:
        tier.insert(k, CpuEntry(tier.pool.alloc("cpu"), CHUNK, 4096))
    elif op == 1:
        tier.pop(k)
    elif op == 2 and (victim := tier.pop_victim(leased=True)) is not None:
        if victim[0] in demoting:  # one host copy at most: this one is dropped
            return
        tier.demote(*victim)
        demoting[victim[0]] = victim[1]
    elif op == 3 and demoting:
        done = rng.choice(list(demoting))
        assert tier.demoted(done, demoting.pop(done))
    elif op == 4 and demoting:
        back = rng.choice(list(demoting))
        entry = demoting.pop(back)
        assert tier.demoted(back, entry)
        if tier.peek(back) is None:
            tier.refuse(back, entry)


def test_the_probe_answers_as_the_maps_through_every_change(tier):
    rng, demoting = random.Random(3), {}
    for _ in range(3000):
        step(tier, rng, demoting)
        check(tier, rng)
    assert tier.num_demoting == len(demoting)


def test_a_key_being_demoted_is_held_and_one_whose_demotion_ended_is_not(tier):
    first = CpuEntry(tier.pool.alloc("cpu"), CHUNK, 4096)
    tier.insert(key(0), first)
    tier.insert(key(1), CpuEntry(tier.pool.alloc("cpu"), CHUNK, 4096))
    assert tier.probe_prefix([key(0), key(1)], below=True) == (2, [], [])
    assert tier.pop_victim(leased=True) == (key(0), first)
    assert tier.probe_prefix([key(0), key(1)], below=True) == (0, [key(0), key(1)], [False, True])
    tier.demote(key(0), first)
    assert tier.probe_prefix([key(0), key(1)], below=True) == (2, [], [])
    tier.demoted(key(0), first)
    assert tier.present([key(0), key(1)]) == [False, True]
    tier.refuse(key(0), first)  # back into the index
    assert tier.probe_prefix([key(0), key(1), key(2)], below=True) == (2, [key(2)], [False])


class _Below:
    name, writable = "below", True

    def __init__(self, held: set):
        self.held, self.asked = held, []

    def has(self, keys):
        self.asked.append(list(keys))
        return [k in self.held for k in keys]


def test_the_rest_after_a_gap_is_what_prefix_length_needs_to_ask_below(tier):
    for i in (0, 1, 3):
        tier.insert(key(i), CpuEntry(tier.pool.alloc("cpu"), CHUNK, 4096))
    keys = [key(i) for i in range(5)]
    below = _Below({key(2)})  # chunk 2 only below; chunk 3 in memory again; chunk 4 nowhere
    held, rest, in_memory = tier.probe_prefix(keys, below=True)
    assert held + prefix_length(rest, in_memory, [below]) == 4
    assert below.asked == [[key(2), key(3), key(4)]]  # once, from the first gap on
    full = tier.probe_prefix(keys[:2], below=True)
    assert full == (2, [], []) and prefix_length(full[1], full[2], [below]) == 0
    assert len(below.asked) == 1  # a full hit in memory asks nothing below
