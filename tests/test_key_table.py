"""Tests for the KeyTable of kvtier/native_keys.py (csrc/key_table.cpp): a set of 24-byte keys whose
`prefix` / `prefix_packed` / `present` answer as a Python set would, through growth and
backward-shift deletions, and answer None (never a guess) once a key it cannot hold was added;
NoKeyTable without the extension."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import native_keys
from kvtier.keys import ChunkKey

needs_native = pytest.mark.skipif(not native_keys.AVAILABLE, reason=f"native keys off: {native_keys.WHY_NOT}")


def key(i: int) -> ChunkKey:
    # Digests that differ in a few low bytes only: the slot mix must spread them anyway.
    return ChunkKey(b"\x00" * 8, i.to_bytes(16, "little"))


def leading(keys: list, held: set) -> int:
    return next((i for i, k in enumerate(keys) if k not in held), len(keys))


@needs_native
def test_random_adds_and_discards_answer_as_a_set():
    rng = random.Random(7)
    pool = [key(i) for i in range(1500)] + [os.urandom(24) for _ in range(1500)]
    table, held = native_keys.key_table(), set()
    for step in range(60_000):  # grows from 64 slots to 8K, and deletes inside long runs
        k = rng.choice(pool)
        if rng.random() < 0.6:
            assert table.add(k) == (k not in held)
            held.add(k)
        else:
            assert table.discard(k) == (k in held)
            held.discard(k)
        if step % 499 == 0:
            query = rng.sample(pool, 40) + sorted(held, key=pool.index)[:30]
            assert table.present(query) == [k in held for k in query]
            assert table.prefix(query) == leading(query, held)
            assert table.prefix(tuple(query)) == leading(query, held)
            assert table.prefix_packed(b"".join(query)) == leading(query, held)
            assert len(table) == len(held)
    assert held and table.prefix(sorted(held, key=pool.index)) == len(held)


@needs_native
@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 40)), max_size=300),
       query=st.lists(st.integers(0, 40), max_size=150))
def test_any_sequence_of_changes_probes_as_a_set(ops, query):
    table, held = native_keys.key_table(), set()
    for add, i in ops:
        (table.add if add else table.discard)(key(i))
        (held.add if add else held.discard)(key(i))
    keys = [key(i) for i in query]
    assert table.present(keys) == [k in held for k in keys]
    assert table.prefix(keys) == leading(keys, held)
    assert table.prefix_packed(b"".join(keys)) == leading(keys, held)


@needs_native
def test_plain_bytes_and_chunk_keys_of_the_same_bytes_are_one_key():
    table = native_keys.key_table()
    assert table.add(key(1)) and not table.add(bytes(key(1)))
    assert table.prefix([bytes(key(1)), key(1)]) == 2
    assert table.discard(bytes(key(1))) and len(table) == 0


@needs_native
@pytest.mark.parametrize("odd", [b"short", "a str", 24, bytearray(24)])
def test_a_key_it_cannot_hold_turns_its_probes_to_none_until_cleared(odd):
    table = native_keys.key_table()
    table.add(key(1))
    assert table.present([key(1), odd]) is None  # a query it cannot answer: the caller's dicts do
    assert table.prefix([odd]) is None and table.prefix([key(1)]) == 1
    assert table.add(odd) is False
    assert table.prefix([key(1)]) is None and table.present([key(1)]) is None  # it may be held: no guess
    assert table.prefix_packed(bytes(key(1))) is None
    table.clear()
    assert table.prefix([key(1)]) == 0 and len(table) == 0
    assert table.add(key(1)) and table.prefix([key(1)]) == 1


@needs_native
def test_probes_take_only_a_list_or_a_tuple():
    table = native_keys.key_table()
    for bad in (iter([key(1)]), {key(1)}, key(1)):
        with pytest.raises(TypeError):
            table.prefix(bad)
        with pytest.raises(TypeError):
            table.present(bad)
    assert table.prefix([]) == 0 and table.present(()) == []


@needs_native
def test_packed_probes_take_whole_24_byte_keys_of_any_buffer():
    table = native_keys.key_table()
    table.add(key(1))
    for form in (bytes, bytearray, memoryview):
        assert table.prefix_packed(form(key(1) + key(2) + key(1))) == 1
    assert table.prefix_packed(b"") == 0
    with pytest.raises(ValueError, match="24 bytes"):
        table.prefix_packed(bytes(key(1)) + b"x")
    with pytest.raises(TypeError):
        table.prefix_packed([key(1)])


def test_without_the_extension_the_table_holds_nothing_and_answers_none(monkeypatch):
    monkeypatch.setattr(native_keys, "AVAILABLE", False)
    table = native_keys.key_table()
    assert isinstance(table, native_keys.NoKeyTable)
    assert table.add(key(1)) is False and table.discard(key(1)) is False
    assert table.prefix([key(1)]) is None and table.present([key(1)]) is None
    assert table.prefix_packed(bytes(key(1))) is None
    table.clear()


@needs_native
def test_self_test_reports_a_key_table_that_disagrees_with_a_set():
    class WrongPrefix:
        def __init__(self):
            self._table = native_keys._ext.KeyTable()

        def __getattr__(self, name):
            return getattr(self._table, name)

        def __len__(self):
            return len(self._table)

        def prefix(self, keys):
            return len(keys)  # "all held"

    class Ext:
        KeyTable = WrongPrefix

        def __getattr__(self, name):
            return getattr(native_keys._ext, name)

    class Old:  # an extension built before KeyTable
        def __getattr__(self, name):
            if name == "KeyTable":
                raise AttributeError(name)
            return getattr(native_keys._ext, name)

    assert "key table" in native_keys.self_test(Ext())
    assert "no KeyTable" in native_keys.self_test(Old())


def unseeded_home(raw: np.ndarray, mask: int) -> np.ndarray:
    """The slot the table's mix gave a key before it was seeded (the same multiply-xorshift, no seed)."""
    words = raw.view("<u8").reshape(-1, 3)
    m = [np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                                0x94D049BB133111EB)]
    with np.errstate(over="ignore"):
        h = (words[:, 0] * m[0]) ^ (words[:, 1] * m[1]) ^ (words[:, 2] * m[2])
        h ^= h >> np.uint64(31)
        h *= m[3]
        h ^= h >> np.uint64(29)
    return h & np.uint64(mask)


@needs_native
def test_keys_chosen_to_share_a_run_of_slots_spread_out_in_a_seeded_table():
    """Chunk keys are public (XXH3 of tokens anyone can choose): keys picked to land in one sixteenth
    of an unseeded table would make every probe walk a run of thousands of slots under the storage
    lock. Each table draws its own seed, so they scatter like any keys."""
    rng = np.random.default_rng(3)
    candidates = rng.integers(0, 256, (64_000, 24), dtype=np.uint8)
    crafted = [bytes(row) for row in candidates[unseeded_home(candidates.copy(), 8191) < 512][:3500]]
    assert len(crafted) == 3500
    table = native_keys.key_table()
    for k in crafted:
        table.add(k)
    assert len(table) == 3500 and table.longest_run() < 200  # unseeded: one run of about 3,500
