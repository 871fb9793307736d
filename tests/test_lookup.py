"""Tests for kvtier/lookup.py: the prefix lookup's walk down the tiers below host memory."""

from __future__ import annotations

from kvtier.keys import ChunkKey
from kvtier.lookup import prefix_length


def key(i: int) -> ChunkKey:
    return ChunkKey(b"\x00" * 8, i.to_bytes(16, "little"))


class IndexTier:
    """A tier that answers `has` from a set, and records what it was asked."""

    def __init__(self, name: str, held: set[int]):
        self.name, self.held, self.asked = name, {key(i) for i in held}, []

    def has(self, keys):
        self.asked.append(list(keys))
        return [k in self.held for k in keys]


KEYS = [key(i) for i in range(5)]


def test_the_tiers_below_are_asked_only_from_the_first_gap_in_memory_on():
    disk, remote = IndexTier("disk", {1, 3}), IndexTier("remote", {2, 4})
    assert prefix_length(KEYS, [True, False, False, True, False], [disk, remote]) == 5
    assert disk.asked == [KEYS[1:]] and remote.asked == [KEYS[1:]]


def test_a_tier_is_not_asked_once_the_ones_above_cover_every_key():
    disk, remote = IndexTier("disk", {1, 2}), IndexTier("remote", set())
    assert prefix_length(KEYS[:3], [True, False, False], [disk, remote]) == 3
    assert remote.asked == []
    assert prefix_length(KEYS[:2], [True, True], [disk, remote]) == 2 and len(disk.asked) == 1


def test_the_prefix_stops_at_the_first_chunk_no_tier_holds():
    disk = IndexTier("disk", {1, 3, 4})
    assert prefix_length(KEYS, [True, False, False, False, False], [disk]) == 2
    assert prefix_length(KEYS, [False] * 5, []) == 0
