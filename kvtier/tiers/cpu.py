"""The CPU tier: chunks held in memory-pool slabs, indexed by key, LRU over evictable entries.

Where it runs: under the StorageManager's lock (this class has no lock of its own). It owns no I/O
and never frees a slab itself: `pop_victim` hands the chosen entry back to the StorageManager,
which either frees its slab (a copy exists below, or there is no tier below) or demotes it.

An entry is evictable when it is not pinned and nobody is reading its slab (`readers == 0`): a
reader is a retrieve copying out of it or a background write sending it to a lower tier. Leased
entries are evicted last, and only when the caller says it can keep them in a tier below.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kvtier.keys import ChunkKey
from kvtier.memory import MemoryPool, Slab
from kvtier.policy import EvictionPolicy, LRUPolicy
from kvtier.tiers.base import PinPredicate, TierUsage


@dataclass(slots=True, eq=False)
class CpuEntry:
    slab: Slab
    num_tokens: int
    nbytes: int
    persisted: bool = False  # a lower tier holds a copy: eviction may drop this without writing
    readers: int = 0  # in-flight copies out of the slab; the slab stays while > 0
    detached: bool = False  # no longer indexed: the last reader frees the slab
    # The tiers below refused a write of it (no room, or failing): evicted unleased, it is dropped
    # rather than written again (the store that needs its slab must not wait on a doomed write).
    write_failed: bool = False
    # Leased, and its demotion was refused: not pushed down again until room may have appeared
    # below (a lease released, a chunk unpinned, a removal below).
    refused: bool = False


class CpuTier:
    name = "cpu"

    def __init__(self, pool: MemoryPool, is_pinned: PinPredicate, policy: EvictionPolicy | None = None,
                 is_leased: PinPredicate | None = None):
        self.pool = pool
        self._is_pinned = is_pinned
        self._is_leased = is_leased or (lambda key: False)
        self._policy = policy or LRUPolicy()
        self._entries: dict[ChunkKey, CpuEntry] = {}
        self._bytes = 0

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._entries

    def present(self, keys: list[ChunkKey]) -> list[bool]:
        """Membership of many keys at once (no recency update): the lookup hot path."""
        entries = self._entries
        return [key in entries for key in keys]

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: ChunkKey) -> CpuEntry | None:
        """The entry for `key`, marked as recently used."""
        entry = self._entries.get(key)
        if entry is not None:
            self._policy.touch(key)
        return entry

    def peek(self, key: ChunkKey) -> CpuEntry | None:
        """The entry for `key`, recency unchanged."""
        return self._entries.get(key)

    def insert(self, key: ChunkKey, entry: CpuEntry) -> None:
        if key in self._entries:
            raise KeyError(f"{key} is already in the CPU tier")
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self._policy.insert(key)

    def pop(self, key: ChunkKey) -> CpuEntry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes
            self._policy.remove(key)
        return entry

    def pop_victim(self, leased: bool = False) -> tuple[ChunkKey, CpuEntry] | None:
        """Remove and return the least recently used evictable entry, or None if there is none.
        Unleased entries go first; leased ones only when `leased` (a copy can be kept below)."""
        victim = next(self._policy.victims(self._evictable), None)
        if victim is None and leased:
            victim = next(self._policy.victims(self._evictable_leased), None)
        return None if victim is None else (victim, self.pop(victim))

    def eviction_order(self) -> Iterator[tuple[ChunkKey, CpuEntry]]:
        """Unleased evictable entries, next victim first (lazy: do not change the tier while iterating)."""
        for key in self._policy.victims(self._evictable):
            yield key, self._entries[key]

    def _evictable(self, key: ChunkKey) -> bool:
        entry = self._entries[key]
        return entry.readers == 0 and not self._is_pinned(key) and not self._is_leased(key)

    def _evictable_leased(self, key: ChunkKey) -> bool:
        entry = self._entries[key]
        return entry.readers == 0 and not entry.refused and not self._is_pinned(key)

    def items(self) -> list[tuple[ChunkKey, CpuEntry]]:
        return list(self._entries.items())

    def usage(self) -> TierUsage:
        return TierUsage(len(self._entries), self._bytes, self.pool.capacity_bytes)
