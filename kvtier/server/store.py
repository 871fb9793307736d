"""kvtier_server's record store: records in memory, bounded in bytes, evicted in a policy's order (the
config's `policy`, LRU by default), optionally spilling to disk.

Where it runs: on the server's event-loop thread only, so nothing here locks. Records from every
client and namespace share one store (a key carries its namespace) and one byte bound.

    put:    validate the record (header, key, length, checksum: garbage is never stored), then
            evict the policy's victims until it fits. A full store evicts; it never refuses
            a record that fits in its capacity.
    evict:  with a spill, the victim is written to disk (`Spill`), else it is dropped.
    get:    memory first (marks the record recently used), then the spill: a spill hit moves the
            record back into memory (promotion), evicting others as a put would.

A record is its 68-byte header plus its payload buffer, kept as received (no copy). It costs the
byte bound its head, its payload and RECORD_OVERHEAD for the Python objects that hold it, so a store
of tiny records stays within its capacity in real memory too. The buffers are never written after
the put, so a reply still sending a record that was evicted meanwhile sends valid bytes; the memory
goes when the last view of it does.

Spill failures are per key: a record the spill cannot write is dropped, one it cannot read is a
miss (and forgotten); neither fails the request around it (`kvtier.server.spill`). Records read back
from the spill land in fresh buffers that return their memory to the OS when dropped
(`kvtier.wire.decoder.fresh_buffer`). The spill checks its directory at start (ConfigError: not a
directory, cannot be created, not writable), so a bad `spill.path` stops the server at once instead
of failing every eviction later.

A fleet agent (`kvtier.fleet.server_member`) hears every key stored into or evicted from memory
("memory") and the spill ("spill") through both indexes' key listener (`kvtier.policy`), and reads
and clears them, on the loop thread like everything here.

Spill I/O is synchronous on the loop thread: a spill or a spill hit delays the server's other
connections by one disk write or read. Acceptable for an optional overflow on local NVMe; a writer
thread would need in-flight bookkeeping (a record being written must stay readable), left out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from kvtier.config import SpillConfig
from kvtier.errors import CorruptRecord
from kvtier.keys import NAMESPACE_BYTES, ChunkKey
from kvtier.policy import BoundedIndex, EvictionPolicy, IndexListener
from kvtier.record import verify
from kvtier.server.spill import Spill
from kvtier.wire.frames import PutResult

logger = logging.getLogger(__name__)
# What one record costs in Python objects besides its head and payload bytes: the key (bytes), the
# head (bytes), the payload's bytearray and memoryview, the Record, its dict entry and its index
# entries (size, LRU order). tracemalloc measures ~700 bytes (tests/server/test_store.py checks this
# covers it); 768 leaves room for allocator rounding. Without it, 0-16 byte records grew RSS to ~15x
# the capacity.
RECORD_OVERHEAD = 768
MEMORY, SPILL = "memory", Spill.name  # the store's tiers, as a fleet agent names them


@dataclass(frozen=True, slots=True)
class Record:
    head: bytes  # kvtier.record header
    payload: memoryview  # never written after the put

    @property
    def nbytes(self) -> int:
        return len(self.head) + self.payload.nbytes

    @property
    def cost(self) -> int:
        """What the record counts against the store's capacity."""
        return self.nbytes + RECORD_OVERHEAD


@dataclass(slots=True)
class StoreCounters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0  # records that left memory to make room
    spills: int = 0  # ... of which were written to the spill
    spill_hits: int = 0  # gets served from the spill (and promoted)
    dropped: int = 0  # evicted records the spill could not take (none configured, or it failed)
    invalid: int = 0  # puts rejected by record validation
    spill_errors: int = 0  # spill reads, writes or removals that failed (each one key's miss or drop)


def _never(_key: bytes) -> bool:
    return False  # the store pins nothing: any record may be evicted


class RecordStore:
    def __init__(self, capacity: int, spill: SpillConfig | None = None, policy: EvictionPolicy | None = None):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.counters = StoreCounters()
        self._records: dict[bytes, Record] = {}
        self._index: BoundedIndex[bytes] = BoundedIndex(capacity, policy)  # key -> Record.cost; None: LRU
        self.spill = Spill(spill, self.counters) if spill is not None else None

    @property
    def capacity(self) -> int:
        return self._index.capacity_bytes

    @property
    def records(self) -> int:
        return len(self._records)

    @property
    def bytes(self) -> int:
        return self._index.used_bytes

    def put(self, key: bytes, head: bytes, payload: memoryview) -> PutResult:
        """Validate and store one record (replacing any copy), evicting LRU records to make room."""
        try:
            verify(head, payload, ChunkKey.from_bytes(key))
        except CorruptRecord as exc:
            self.counters.invalid += 1
            logger.debug("rejected record %s: %s", key.hex(), exc)
            return PutResult.INVALID
        record = Record(bytes(head), payload)
        if record.cost > self.capacity:
            return PutResult.TOO_LARGE
        self.delete([key])
        self._insert(key, record)
        return PutResult.STORED

    def get(self, key: bytes) -> Record | None:
        record = self._records.get(key)
        if record is not None:
            self._index.touch(key)
            self.counters.hits += 1
            return record
        spilled = self.spill.get(key) if self.spill is not None else None
        if spilled is None:
            self.counters.misses += 1
            return None
        record = Record(*spilled)
        self.counters.hits += 1
        self.counters.spill_hits += 1
        if record.cost <= self.capacity:  # (a spill adopted from a server with more memory)
            self.spill.remove([key])
            self._insert(key, record)
        return record

    def contains(self, key: bytes) -> bool:
        return key in self._records or (self.spill is not None and self.spill.contains(key))

    def payload_bytes(self, key: bytes) -> int | None:
        """What `get(key)` would return, in payload bytes (at most, for a spilled record); None
        when absent. Side-effect free: no hit counted, nothing promoted."""
        record = self._records.get(key)
        if record is not None:
            return record.payload.nbytes
        return self.spill.payload_bytes(key) if self.spill is not None else None

    def delete(self, keys: Iterable[bytes]) -> int:
        """Remove keys from memory and spill; the number of records removed."""
        keys = list(keys)
        return self._drop(keys) + (self.spill.remove(keys) if self.spill is not None else 0)

    def _drop(self, keys: Iterable[bytes]) -> int:
        """Remove keys from memory only (not spilled); the number removed."""
        removed = 0
        for key in keys:
            if self._records.pop(key, None) is not None:
                self._index.remove(key)
                removed += 1
        return removed

    def clear(self, namespaces: Iterable[bytes]) -> int:
        """Remove every record of `namespaces`; the number removed."""
        wanted = set(namespaces)
        return self.delete([k for k in self._records if k[:NAMESPACE_BYTES] in wanted]) + (
            self.spill.clear(wanted) if self.spill is not None else 0)

    def set_key_listener(self, listener: IndexListener | None) -> None:
        """Report every key stored into or evicted from memory or the spill, from now on."""
        self._index.set_listener(listener, MEMORY)
        if self.spill is not None:
            self.spill.set_key_listener(listener)

    def key_snapshot(self) -> dict[str, list[bytes]]:
        """Every key held now: {"memory": [...], "spill": [...] (with a spill)}."""
        return {MEMORY: list(self._records), **({SPILL: self.spill.keys()} if self.spill is not None else {})}

    def usage(self) -> dict[str, tuple[int, int, int]]:
        """(records, bytes, capacity) of memory, then of the spill (with one)."""
        usage = {MEMORY: (self.records, self.bytes, self.capacity)}
        if self.spill is not None:
            usage[SPILL] = (self.spill.records, self.spill.bytes, self.spill.capacity)
        return usage

    def clear_tier(self, tier: str | None) -> int:
        """Remove every record (every namespace) from `tier`, "memory" or "spill", or both when
        None; the number removed. ValueError for any other tier (or "spill" without one)."""
        tiers = list(self.usage())
        if tier is not None and tier not in tiers:
            raise ValueError(f"no tier named {tier!r}; this kvtier_server has {tiers}")
        removed = self._drop(list(self._records)) if tier in (None, MEMORY) else 0
        if tier in (None, SPILL) and self.spill is not None:
            removed += self.spill.remove(self.spill.keys())
        return removed

    def _insert(self, key: bytes, record: Record) -> None:
        # Oldest first. Every record fits alone (checked by the callers) and nothing is protected,
        # so make_room always finds enough.
        victims = self._index.make_room(record.cost, _never)
        if victims is None:
            raise RuntimeError(f"a record of {record.cost} bytes cannot fit a store of {self.capacity}")
        for victim in victims:
            self._evict(victim)
        self._records[key] = record
        self._index.add(key, record.cost)

    def _evict(self, key: bytes) -> None:
        """`key` has left the index: its record leaves memory, for the spill if there is one."""
        record = self._records.pop(key)
        self.counters.evictions += 1
        if self.spill is not None and self.spill.put(key, record.head, record.payload):
            self.counters.spills += 1
        else:
            self.counters.dropped += 1

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
