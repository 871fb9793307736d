"""kvtier_server's record store: records in memory, bounded in bytes, LRU, optionally spilling to disk.

Where it runs: on the server's event-loop thread only, so nothing here locks. Records from every
client and namespace share one store (a key carries its namespace) and one byte bound.

    put:    validate the record (header, key, length, checksum: garbage is never stored), then
            evict least recently used records until it fits. A full store evicts; it never refuses
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
miss (and forgotten); neither fails the request around it (each is counted; logged at most once
a minute per kind). Records read back from the spill land in fresh buffers that return their memory
to the OS when dropped (`kvtier.server.decoder.fresh_buffer`). `Spill` checks its directory at start
(ConfigError: not a directory, cannot be created, not writable), so a bad `spill.path` stops the
server at once instead of failing every eviction later.

Spill I/O is synchronous on the loop thread: a spill or a spill hit delays the server's other
connections by one disk write or read. Acceptable for an optional overflow on local NVMe; a writer
thread would need in-flight bookkeeping (a record being written must stay readable), left out.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvtier.config import SpillConfig
from kvtier.errors import ConfigError, CorruptRecord, KvtierError
from kvtier.keys import NAMESPACE_BYTES, ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.policy import LRUPolicy
from kvtier.record import encode_header, verify
from kvtier.server.decoder import fresh_buffer
from kvtier.server.protocol import PutResult
from kvtier.tiers.base import PutItem
from kvtier.tiers.disk import BLOCK, SUFFIX, DiskTier

logger = logging.getLogger(__name__)

_NAMESPACE_DIR = re.compile(f"[0-9a-f]{{{2 * NAMESPACE_BYTES}}}")
# What one record costs in Python objects besides its head and payload bytes: the key (bytes), the
# head (bytes), the payload's bytearray and memoryview, the Record, its dict entry and its LRU entry.
# tracemalloc measures ~610 bytes (tests/server/test_store.py checks this covers it); 768 leaves
# room for allocator rounding. Without it, 0-16 byte records grew RSS to ~15x the capacity.
RECORD_OVERHEAD = 768


def _uint8(buf) -> np.ndarray:
    """A uint8 array over `buf` without a copy. numpy, not torch: the server moves records, never
    tensors, and a torch import alone costs ~250 MiB of RSS."""
    return np.frombuffer(buf, dtype=np.uint8)


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


class RecordStore:
    def __init__(self, capacity: int, spill: SpillConfig | None = None):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.counters = StoreCounters()
        self._records: dict[bytes, Record] = {}
        self._lru = LRUPolicy()
        self._used = 0
        self.spill = Spill(spill, self.counters) if spill is not None else None

    @property
    def records(self) -> int:
        return len(self._records)

    @property
    def bytes(self) -> int:
        return self._used

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
            self._lru.touch(key)
            self.counters.hits += 1
            return record
        record = self.spill.get(key) if self.spill is not None else None
        if record is None:
            self.counters.misses += 1
            return None
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
        removed = 0
        for key in keys:
            record = self._records.pop(key, None)
            if record is not None:
                self._lru.remove(key)
                self._used -= record.cost
                removed += 1
        if self.spill is not None:
            removed += self.spill.remove(keys)
        return removed

    def clear(self, namespaces: Iterable[bytes]) -> int:
        """Remove every record of `namespaces`; the number removed."""
        wanted = set(namespaces)
        return self.delete([k for k in self._records if k[:NAMESPACE_BYTES] in wanted]) + (
            self.spill.clear(wanted) if self.spill is not None else 0)

    def _insert(self, key: bytes, record: Record) -> None:
        # Oldest first; every record fits alone (checked by the callers), so this ends.
        while self._used + record.cost > self.capacity:
            victim = next(self._lru.victims(lambda _: True))
            self._evict(victim)
        self._records[key] = record
        self._lru.insert(key)
        self._used += record.cost

    def _evict(self, key: bytes) -> None:
        record = self._records.pop(key)
        self._lru.remove(key)
        self._used -= record.cost
        self.counters.evictions += 1
        if self.spill is not None and self.spill.put(key, record):
            self.counters.spills += 1
        else:
            self.counters.dropped += 1

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()


class Spill:
    """Evicted records on disk: one `DiskTier` per namespace under one root directory, with one
    byte bound and one LRU order over all of them (each DiskTier alone would bound only its own
    namespace). Records a previous server left in the directory are adopted at start, oldest
    first, and served like any other. A key whose file cannot be read, written or removed is that
    key's miss or drop, counted in `counters.spill_errors`; the rest of a batch goes on."""

    def __init__(self, config: SpillConfig, counters: StoreCounters | None = None):
        self.root = Path(config.path)
        self.counters = counters if counters is not None else StoreCounters()
        _check_directory(self.root)
        self.capacity = config.capacity
        self.o_direct = config.o_direct
        self.metrics = Metrics(["disk"])  # the DiskTiers' own counters (corrupt, errors, bytes)
        self._tiers: dict[bytes, DiskTier] = {}
        self._sizes: dict[bytes, int] = {}  # key -> bytes on disk (padded header + payload)
        self._lru = LRUPolicy()
        self._used = 0
        self._log = LogLimiter(logger)
        self._adopt()

    @property
    def records(self) -> int:
        return len(self._sizes)

    @property
    def bytes(self) -> int:
        return self._used

    def _tier(self, namespace: bytes) -> DiskTier:
        tier = self._tiers.get(namespace)
        if tier is None:
            # Each tier may use the whole capacity: the bound that counts is this class's.
            tier = DiskTier(self.root, namespace, self.capacity, lambda _: False, self.metrics,
                            o_direct=self.o_direct)
            self._tiers[namespace] = tier
        return tier

    def _adopt(self) -> None:
        found = []
        for folder in self.root.glob("*") if self.root.is_dir() else []:
            if not (folder.is_dir() and _NAMESPACE_DIR.fullmatch(folder.name)):
                continue
            namespace = bytes.fromhex(folder.name)
            try:
                found += self._adopt_namespace(namespace, folder)
            except (OSError, KvtierError) as exc:  # one bad folder costs its records, not the server
                logger.warning("spill %s: skipping %s: %s", self.root, folder.name, exc)
        for _, key, size in sorted(found):
            self._sizes[key] = size
            self._lru.insert(key)
            self._used += size
        self._make_room(0)
        if found:
            logger.info("spill %s: adopted %d records, %d bytes", self.root, len(found), self._used)

    def _adopt_namespace(self, namespace: bytes, folder: Path) -> list[tuple[int, ChunkKey, int]]:
        tier = self._tier(namespace)  # rebuilds its index from the folder
        found = []
        for file in folder.glob(f"*/*{SUFFIX}"):
            try:
                key = ChunkKey(namespace, bytes.fromhex(file.name.removesuffix(SUFFIX)))
                if tier.has([key])[0]:
                    st = file.stat()
                    found.append((st.st_mtime_ns, key, st.st_size))
            except (ValueError, OSError):  # not a record name; gone or unreadable meanwhile
                continue
        return found

    def _make_room(self, size: int) -> None:
        while self._sizes and self._used + size > self.capacity:
            self.remove([next(self._lru.victims(lambda _: True))])

    def put(self, key: bytes, record: Record) -> bool:
        n = record.payload.nbytes
        size = BLOCK + -(-n // BLOCK) * BLOCK  # the disk tier's file: a header block, padded payload
        if size > self.capacity:
            return False
        self.remove([key])
        self._make_room(size)
        ck = ChunkKey.from_bytes(key)
        try:
            if not self._tier(ck.namespace).put([PutItem(ck, record.head, _uint8(record.payload))])[0]:
                return False
        except (OSError, KvtierError) as exc:
            self._failed("write", key, exc)
            return False
        self._sizes[key] = size
        self._lru.insert(key)
        self._used += size
        return True

    def get(self, key: bytes) -> Record | None:
        """Read and verify a spilled record (it stays spilled). None when absent or bad (then gone)."""
        size = self._sizes.get(key)
        if size is None:
            return None
        ck = ChunkKey.from_bytes(key)
        buf = fresh_buffer(size - BLOCK)  # the padded payload, as the disk tier reads it
        try:
            header = self._tier(ck.namespace).get([ck], [_uint8(buf)])[0]  # verified there
        except (OSError, KvtierError) as exc:
            self._failed("read", key, exc)
            header = None
        if header is None:
            self.remove([key])
            return None
        payload = memoryview(buf)[:header.payload_len]
        # The disk tier returns the parsed header, not its bytes; re-encoding gives an equivalent
        # valid header (reserved field zeroed, checksum recomputed).
        head = encode_header(ck, header.shape, header.dtype_code, payload, header.codec)
        self._lru.touch(key)
        return Record(head, payload)

    def contains(self, key: bytes) -> bool:
        return key in self._sizes

    def payload_bytes(self, key: bytes) -> int | None:
        size = self._sizes.get(key)
        return None if size is None else size - BLOCK  # the padded payload: an upper bound

    def remove(self, keys: Iterable[bytes]) -> int:
        removed = 0
        for key in keys:
            size = self._sizes.pop(key, None)
            if size is None:
                continue
            self._lru.remove(key)
            self._used -= size
            ck = ChunkKey.from_bytes(key)
            try:
                self._tier(ck.namespace).remove([ck])
            except (OSError, KvtierError) as exc:  # forgotten here all the same: never served again
                self._failed("remove", key, exc)
            removed += 1
        return removed

    def _failed(self, what: str, key: bytes, exc: Exception) -> None:
        # Rate-limited: when the disk is full or the directory broken, every eviction fails, and a
        # line for each (thousands a second, driven by clients' PUTs) would fill the same disk.
        self.counters.spill_errors += 1
        self._log.warning(what, "spill %s: cannot %s %s: %s", self.root, what, key.hex(), exc)

    def clear(self, namespaces: set[bytes]) -> int:
        return self.remove([k for k in self._sizes if k[:NAMESPACE_BYTES] in namespaces])

    def close(self) -> None:
        for tier in self._tiers.values():
            tier.close()


def _check_directory(root: Path) -> None:
    """`root` exists (created if need be) and takes new files; ConfigError naming it otherwise."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except FileExistsError:
        raise ConfigError(f"spill.path {str(root)!r} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"spill.path {str(root)!r} is not a usable directory: "
                          f"{exc.strerror or exc}") from None
