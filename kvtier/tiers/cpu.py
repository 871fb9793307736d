"""The CPU tier: chunks held in memory-pool slabs, indexed by key, a policy (LRU by default) over
evictable entries.

Where it runs: under the StorageManager's lock (this class has no lock of its own). It owns no I/O
and decides nothing: `pop_victim` hands the chosen entry back to the StorageManager, which either
detaches it (its slab is freed once no reader holds it: a copy exists below, or there is no tier
below) or demotes it.

An entry is evictable when it is not pinned and nobody is reading its slab (`readers == 0`): a
reader is a retrieve copying out of it or a background write sending it to a lower tier. Leased
entries are evicted last, and only when the caller says it can keep them in a tier below.

Host memory holds at most one entry per key: indexed here, or being demoted (out of the index,
still readable from its slab until its write below lands; `demote` / `demoted`). `held` and
`holds` see both; `present` and `probe_prefix` too. A leased entry whose demotion the tiers below
refused goes back into the index marked `refused` (not a victim again until `room_below`).

Sizes and the eviction order live in the shared `kvtier.policy.BoundedIndex` (its policy is the
pluggable part); this tier keeps the `CpuEntry` objects beside it. The index reports every key it
gains or loses to a key listener (`set_key_listener`, the fleet agent's), as "cpu": an entry being
demoted has left it (evicted; the tier below reports it stored once its write lands). It evicts one
victim at a time as the memory pool runs out of slabs, never by bytes (`make_room`): a slab holds one
chunk.

The lookup's probe reads a `kvtier.native_keys` KeyTable that mirrors the keys of both maps (added
and discarded beside every change to them, in `insert`, `pop`, `demote`, `demoted`): it answers for a
prompt's keys with their cache misses overlapped (32 bytes a slot, at most half of them used). Without
the C extension it answers None and the maps are probed as they are.

A `CpuEntry` counts its readers and knows whether it is still indexed: `hold`, `release`, `detach`
and `attach` keep the rule "a slab is freed once it is neither indexed nor read" in one place.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvtier import native_keys
from kvtier.keys import ChunkKey
from kvtier.memory import MemoryPool, Slab
from kvtier.packed_keys import PackedKeys
from kvtier.policy import BoundedIndex, EvictionPolicy, IndexListener
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
    # Its record header (kvtier.record), once a write below or a peer's read computed it: a slab's
    # bytes never change while its entry lives, so the payload is hashed once, not per write or read.
    header: bytes | None = None

    def hold(self) -> None:
        """One more reader: the slab outlives it (a retrieve copying out, a background write)."""
        self.readers += 1

    def release(self, pool: MemoryPool) -> None:
        """A reader is done: the last one frees the slab of a detached entry."""
        self.readers -= 1
        if self.readers < 0:
            raise RuntimeError("CPU entry released more often than leased")
        if self.readers == 0 and self.detached:
            pool.free(self.slab)

    def detach(self, pool: MemoryPool) -> None:
        """The entry left host memory's index: free its slab now, or when its last reader is done."""
        self.detached = True
        if self.readers == 0:
            pool.free(self.slab)

    def attach(self) -> None:
        """A lower-tier read's entry (detached, held by the read alone) joins the CPU tier:
        the read is over, and its slab is now the CPU tier's."""
        if self.readers != 1 or not self.detached:
            raise RuntimeError(f"only a read's own entry can join the CPU tier ({self.readers} readers)")
        self.readers, self.detached = 0, False
        self.slab.owner = "cpu"


class CpuTier:
    name = "cpu"

    def __init__(self, pool: MemoryPool, is_pinned: PinPredicate, policy: EvictionPolicy | None = None,
                 is_leased: PinPredicate | None = None):
        self.pool = pool
        self._is_pinned = is_pinned
        self._is_leased = is_leased or (lambda key: False)
        self._index: BoundedIndex[ChunkKey] = BoundedIndex(pool.capacity_bytes, policy)
        self._entries: dict[ChunkKey, CpuEntry] = {}
        self._demoting: dict[ChunkKey, CpuEntry] = {}
        self._held = native_keys.key_table()  # the keys of both maps (the module docstring)
        self._refused: list[CpuEntry] = []

    def __contains__(self, key: ChunkKey) -> bool:
        return key in self._entries

    def present(self, keys: list[ChunkKey]) -> list[bool]:
        """Which keys host memory holds, indexed or being demoted (no recency update): the lookup
        hot path."""
        keys = keys if type(keys) is list else list(keys)
        if (got := self._held.present(keys)) is not None:
            return got
        entries, demoting = self._entries, self._demoting
        if demoting:
            return [key in entries or key in demoting for key in keys]
        return [key in entries for key in keys]

    def probe_prefix(self, keys: Sequence[ChunkKey], below: bool) -> tuple[int, list[ChunkKey], list[bool]]:
        """(how many leading `keys` host memory holds, as `present` says; the keys from the first it
        lacks on; which of those it holds), the last two empty when all are held or not `below` (no
        tier below is asked then): `kvtier.lookup.prefix_length`'s arguments for the rest."""
        held = self._held.prefix_packed(keys.packed) if type(keys) is PackedKeys else None
        if held is None:
            keys = keys if type(keys) is list else list(keys)
            held = self._held.prefix(keys)
        if held is None:
            e, d = self._entries, self._demoting
            held = next((i for i, key in enumerate(keys) if key not in e and key not in d), len(keys))
        if held == len(keys) or not below:
            return held, [], []
        rest = keys[held:]  # (a list: of packed keys, the only objects made)
        return held, rest, self.present(rest)

    def held(self, key: ChunkKey, touch: bool = True) -> CpuEntry | None:
        """The host-memory entry for `key`: indexed (marked recently used when `touch`), or still
        readable from its slab while being demoted."""
        return (self.get(key) if touch else self._entries.get(key)) or self._demoting.get(key)

    def holds(self, key: ChunkKey) -> bool:
        return key in self._entries or key in self._demoting

    def demote(self, key: ChunkKey, entry: CpuEntry) -> None:
        """`entry`, just popped as a victim, stays readable until its write below lands."""
        if key in self._demoting:
            raise RuntimeError(f"{key} has two host copies: one indexed, one being demoted")
        self._demoting[key] = entry
        self._held.add(key)

    def demoted(self, key: ChunkKey, entry: CpuEntry) -> bool:
        """The demotion of `entry` ends (its first write landed or failed). False when `entry` is
        not the one being demoted for `key` (another write of it, or none)."""
        if self._demoting.get(key) is not entry:
            return False
        del self._demoting[key]
        if key not in self._entries:
            self._held.discard(key)
        return True

    def refuse(self, key: ChunkKey, entry: CpuEntry) -> None:
        """Back into the index, a leased entry the tiers below refused: the next victim again only
        after `room_below` (the tiers below are as full now; every allocation would re-write it)."""
        entry.refused = True
        self._refused.append(entry)
        self.insert(key, entry)

    def room_below(self) -> None:
        """Room may have appeared below (a release, unpin or removal): refused entries are victims again."""
        for entry in self._refused:
            entry.refused = False
        self._refused.clear()

    @property
    def num_demoting(self) -> int:
        return len(self._demoting)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: ChunkKey) -> CpuEntry | None:
        """The entry for `key`, marked as recently used."""
        entry = self._entries.get(key)
        if entry is not None:
            self._index.touch(key)
        return entry

    def peek(self, key: ChunkKey) -> CpuEntry | None:
        """The entry for `key`, recency unchanged."""
        return self._entries.get(key)

    def insert(self, key: ChunkKey, entry: CpuEntry, admit: bool = True) -> None:
        """Index `entry`; not `admit`ted, as the next victim until it is used (kvtier.admission)."""
        if key in self._entries:
            raise KeyError(f"{key} is already in the CPU tier")
        self._index.add(key, entry.nbytes, admit)
        self._entries[key] = entry
        self._held.add(key)

    def pop(self, key: ChunkKey) -> CpuEntry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._index.remove(key)
            if key not in self._demoting:
                self._held.discard(key)
        return entry

    def pop_victim(self, leased: bool = False) -> tuple[ChunkKey, CpuEntry] | None:
        """Remove and return the policy's first evictable entry, or None if there is none.
        Unleased entries go first; leased ones only when `leased` (a copy can be kept below)."""
        victim = next(self._index.victims(self._evictable), None)
        if victim is None and leased:
            victim = next(self._index.victims(self._evictable_leased), None)
        return None if victim is None else (victim, self.pop(victim))

    def eviction_order(self) -> Iterator[tuple[ChunkKey, CpuEntry]]:
        """Unleased evictable entries, next victim first (lazy: do not change the tier while iterating)."""
        for key in self._index.victims(self._evictable):
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
        return TierUsage(len(self._entries), self._index.used_bytes, self.pool.capacity_bytes)

    def keys(self) -> list[ChunkKey]:
        """Every indexed key (what the key listener was told is stored here), in no order."""
        return list(self._index)

    def set_key_listener(self, listener: IndexListener | None) -> None:
        """Report keys stored into / evicted from this tier from now on (`kvtier.policy`)."""
        self._index.set_listener(listener, self.name)
