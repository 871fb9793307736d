"""The disk tier: the `Tier` protocol over one namespace's record files, bounded in bytes, evicting in
its policy's order (`disk.policy`, LRU by default).

The files (`<path>/<namespace hex>/<2 hex>/<digest hex>.kvr`), O_DIRECT, atomic tmp + rename writes
and never following a symlink are `kvtier.record_files`'; the start-up walk is `kvtier.record_walk`'s.
Here: the index (`kvtier.policy.BoundedIndex`: key -> file bytes, the policy's order), in memory,
rebuilt from the directory at start, oldest modification time first, so a new process finds what an
old one stored. The directory is shared (several processes, each with its own index and byte bound, write
and evict in it); what the walk skipped or deleted is in `start_counts`, logged in one line.

Buffers: a `get` destination or a `put` payload is a contiguous CPU uint8 torch tensor (a memory
pool slab) or a 1-D C-contiguous numpy uint8 array, taken as a numpy array once per item, zero-copy;
below that numpy only, so this module never imports torch.

Thread-safe: the index is guarded by a lock; file I/O runs outside it, so a write of a key whose
old record is being deleted (evicted, removed) waits for that unlink, at most UNLINK_WAIT_S, lest
the late unlink delete the new record under an index entry that promises it. Reads verify every
record (magic, version, key, length, checksum); a bad file is a miss, counted and deleted. Every failure
(open, read, write, rename, unlink) is a counted miss, never an exception out of get/put/remove/
clear; a record that failed to read is forgotten (and deleted) so lookup stops promising it, unless
the process itself ran out of file descriptors or memory. The byte count is always the index's
sum plus the reservations of writes in flight, which are returned in `finally`.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvtier.checksum_copy import PieceCopy
from kvtier.dtypes import is_tensor
from kvtier.errors import CorruptRecord
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.policy import BoundedIndex, EvictionPolicy, IndexListener
from kvtier.record import RecordHeader
from kvtier.record_files import BLOCK, SUFFIX, RecordDir, file_bytes
from kvtier.record_root import RESOURCE_ERRNOS
from kvtier.record_walk import Scan
from kvtier.tiers.base import PinPredicate, PutItem, TierUsage

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch

    from kvtier.tiers.gds import GdsReader, GdsStatus

    ByteBuffer: TypeAlias = torch.Tensor | np.ndarray  # get()'s dests, put()'s payloads: see "Buffers"

__all__ = ["BLOCK", "SUFFIX", "DiskTier"]

logger = logging.getLogger(__name__)

UNLINK_WAIT_S = 10.0  # a write waits this long for its old file's unlink (a hung disk: a counted failure)


def _as_array(buf: ByteBuffer) -> np.ndarray:
    """`buf`'s bytes as a 1-D uint8 numpy array over the same memory (a tensor's `numpy()` shares
    it). ValueError for anything else: a wrong buffer is the caller's bug, not a miss."""
    arr = buf.numpy() if is_tensor(buf) else buf
    if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 1
            and arr.flags.c_contiguous):
        raise ValueError(f"disk tier buffers are 1-D contiguous uint8 tensors or numpy arrays, "
                         f"not {type(buf).__name__} {getattr(buf, 'dtype', '')} {getattr(buf, 'shape', '')}")
    return arr


class DiskTier:
    name, writable, fans_out, local = "disk", True, False, True
    copies_out = True  # `get` takes `copies`: a raw record's checksum left to its copier (record.verify)

    def __init__(self, path: str | os.PathLike, namespace: bytes, capacity_bytes: int,
                 is_pinned: PinPredicate, metrics: Metrics, o_direct: str = "auto", fsync: bool = False,
                 policy: EvictionPolicy | None = None, gds: GdsReader | None = None,
                 gds_status: GdsStatus | None = None):
        """Raises ConfigError (naming the path) when `path` is not a directory, cannot be created,
        or its namespace directory cannot be written or is a symlink."""
        # One directory per namespace: the index, the byte bound and clear() cover this engine's
        # model/geometry/TP rank only, so models sharing a disk path never evict or clear each other.
        self.namespace = namespace
        self._files = RecordDir(path, namespace, o_direct, fsync)
        self.root, self.o_direct, self.fsync = self._files.root, self._files.o_direct, fsync
        self.gds = gds  # GPUDirect Storage reads (`get_to_device`), where selected: kvtier.tiers.gds
        self.gds_status = gds_status  # why it is used or not, for stats
        self._is_pinned = is_pinned
        self._metrics = metrics
        self._log = LogLimiter(logger)  # a broken disk fails every I/O: one line a minute per kind
        self._lock = threading.Lock()
        self._index: BoundedIndex[ChunkKey] = BoundedIndex(capacity_bytes, policy)  # None: LRU
        self._reserved = 0  # bytes of writes in flight, not yet in the index
        # Keys forgotten whose files are being unlinked outside the lock, and writes in flight.
        # An unlink deletes whatever record is at the key's name when it runs: a new record of
        # that key renamed into place first would be the one deleted, and the index would promise
        # a file that is gone. So a write of a key being unlinked waits for the unlink, and a write
        # already in flight when its key starts being unlinked (a concurrent writer of the key
        # indexed it, then it was evicted) is `clobbered`: it checks that its file survived.
        self._unlinking: Counter[ChunkKey] = Counter()
        self._unlinked = threading.Condition(self._lock)
        self._writing: Counter[ChunkKey] = Counter()
        self._clobbered: set[ChunkKey] = set()
        self.start_counts: Counter[str] = self._rebuild()  # what the walk skipped or deleted

    @property
    def capacity_bytes(self) -> int:
        return self._index.capacity_bytes

    @capacity_bytes.setter
    def capacity_bytes(self, value: int) -> None:
        self._index.capacity_bytes = value

    # -- index ---------------------------------------------------------------------------------

    def path_for(self, key: ChunkKey) -> Path:
        return Path(self._files.path(key))

    def _rebuild(self) -> Counter[str]:
        scan = Scan(self._files.root_fd, self.namespace)
        found = scan.run()
        for _, key, size in sorted(found, key=lambda f: f[0]):
            self._index.add(key, size)
        with self._lock:
            victims = self._make_room_locked(0) or []
        self._unlink_all(victims)
        if found or scan.counts:
            level = logging.WARNING if scan.unusual() else logging.INFO
            logger.log(level, "disk tier %s: found %d chunks, %d bytes%s", self.root, len(self._index),
                       self._index.used_bytes,
                       "".join(f"; {n} {what}" for what, n in sorted(scan.counts.items())))
        return scan.counts

    def _make_room_locked(self, incoming: int) -> list[ChunkKey] | None:
        """Forget unpinned files (the policy's victims) until `incoming` more bytes fit beside the
        writes in flight, and return them for the caller to unlink outside the lock; None (evicting
        nothing) when even that would not make room."""
        victims = self._index.make_room(incoming + self._reserved, self._is_pinned)
        if victims:
            self._unlinking_locked(victims)
            self._metrics.tier_inc(self.name, "evictions", len(victims))
        return victims

    def _unlinking_locked(self, keys: list[ChunkKey]) -> None:
        """`keys` (just forgotten) will be unlinked by the caller, outside the lock."""
        self._unlinking.update(keys)
        self._clobbered.update(key for key in keys if key in self._writing)

    def _unlink_all(self, keys: Sequence[ChunkKey]) -> None:
        """Best effort, never raises: a file that cannot go (a directory in its place, EPERM) is
        logged and counted; its key is already out of the index and the byte count. `keys` were
        marked as unlinking (`_make_room_locked`, `remove`); each is unmarked once done."""
        for key in keys:
            try:
                self._files.unlink(key)
            except OSError as exc:
                self._failed("unlink", key, exc)
            finally:
                with self._lock:
                    self._unlinking[key] -= 1
                    if self._unlinking[key] <= 0:
                        del self._unlinking[key]
                        self._unlinked.notify_all()

    def _failed(self, op: str, key: ChunkKey, exc: OSError) -> None:
        self._log.warning(op, "disk tier: %s %s failed: %s", op, self._files.path(key), exc)
        self._metrics.tier_inc(self.name, "errors")

    # -- Tier protocol -------------------------------------------------------------------------

    def has(self, keys: Sequence[ChunkKey]) -> list[bool]:
        index = self._index
        found = [key in index for key in keys]
        if not all(found):
            self._adopt(keys, found)
        return found

    def _adopt(self, keys: Sequence[ChunkKey], found: list[bool]) -> None:
        """Index the records of `keys` another process wrote since the start-up walk (a vLLM
        instance's scheduler and workers are separate processes; instances may share a directory),
        up to the first key whose file is not there either: callers read a prefix, so a lookup that
        misses costs one stat. The index then keeps to its capacity by forgetting its policy's
        victims, never deleting their files: they are another process's to evict, and found
        again when asked for. A record adopted while its writer deletes it is a miss when read."""
        for i, key in enumerate(keys):
            if found[i]:
                continue
            size = self._files.indexable_size(key)
            if size is None:
                return
            with self._lock:
                if key not in self._index and not self._unlinking[key]:
                    self._index.add(key, size)
                    self._index.make_room(self._reserved, lambda k, new=key: k == new or self._is_pinned(k))
            found[i] = True

    def touch(self, keys: Sequence[ChunkKey]) -> None:
        """Mark the held `keys` recently used, unread (a chunk served from another key's record)."""
        with self._lock:
            for key in keys:
                self._index.touch(key)

    def get(self, keys: Sequence[ChunkKey], dests: Sequence[ByteBuffer],
            copies: Sequence[PieceCopy | None] | None = None) -> list:
        """`copies[i]`: record i's checksum may be left to it (`record.verify`): unverified until then."""
        arrays = [_as_array(dest) for dest in dests]  # every buffer checked before any I/O
        results = [self._read(key, dest, copy) for key, dest, copy
                   in zip(keys, arrays, copies or [None] * len(keys), strict=True)]
        self.touch([key for key, header in zip(keys, results, strict=True) if header is not None])
        self._metrics.tier_inc(self.name, "bytes_read", sum(h.payload_len for h in results if h is not None))
        return results

    def get_to_device(self, key: ChunkKey, dest: torch.Tensor) -> RecordHeader | None:
        """`key`'s payload read by GPUDirect Storage straight into `dest` (a 1-D uint8 device tensor)
        and verified there; None for a miss, which is handled as `get` handles one."""
        if self.gds is None:
            raise RuntimeError("this disk tier has no GPUDirect Storage reader")
        header = self._guarded(key, lambda: self.gds.read(self._files, key, dest))
        if header is not None:
            self.touch([key])
            self._metrics.tier_inc(self.name, "bytes_read", header.payload_len)
        return header

    def _read(self, key: ChunkKey, dest: np.ndarray, copy: PieceCopy | None) -> RecordHeader | None:
        return self._guarded(key, lambda: self._files.read(key, dest, copy))

    def _guarded(self, key: ChunkKey, read: Callable[[], RecordHeader]) -> RecordHeader | None:
        """`read()`'s header, or None for a miss: no file (forgotten), a corrupt record (counted and
        deleted) or a failed read (`_unreadable`)."""
        try:
            return read()
        except FileNotFoundError:
            with self._lock:
                # Deleted behind our back. Checked again under the lock: a write of this key that
                # renamed a new record into place since must keep the entry it adds (or added).
                if not self._files.exists(key):
                    self._index.remove(key)
            return None
        except CorruptRecord as exc:
            self._log.warning("corrupt", "disk tier: dropping corrupt record: %s", exc)
            self._metrics.tier_inc(self.name, "corrupt")
            self.remove([key])
            return None
        except OSError as exc:
            return self._unreadable(key, exc)

    def _unreadable(self, key: ChunkKey, exc: OSError) -> None:
        """A counted miss. The record is forgotten and deleted (so lookup stops promising what get
        cannot deliver) unless the process, not the record, failed: out of fds or memory."""
        self._failed("read", key, exc)
        if exc.errno not in RESOURCE_ERRNOS:
            self.remove([key])

    def put(self, items: Sequence[PutItem]) -> list[bool]:
        return [self._write(item) for item in items]

    def _write(self, item: PutItem) -> bool:
        if item.key.namespace != self.namespace:
            raise ValueError(f"key {item.key} is not of this disk tier's namespace {self.namespace.hex()}")
        payload = _as_array(item.payload)
        size = file_bytes(payload.size)
        with self._lock:
            if not self._unlinked.wait_for(lambda: item.key not in self._unlinking, UNLINK_WAIT_S):
                stuck = OSError(errno.ETIMEDOUT, "its old file is still being deleted")
                self._failed("write", item.key, stuck)
                return False
            if item.key in self._index:
                self._index.touch(item.key)
                return True
            # Reserve the bytes before writing so concurrent writers cannot overshoot capacity.
            victims = self._make_room_locked(size)  # never item.key: it is not in the index
            if victims is not None:
                self._writing[item.key] += 1
                self._reserved += size
        if victims is None:
            self._metrics.tier_inc(self.name, "rejected")
            return False
        stored = False
        try:
            self._unlink_all(victims)
            self._files.write(item.key, item.header, payload)
            stored = True
        except OSError as exc:
            self._failed("write", item.key, exc)
        finally:
            stored = self._written(item.key, size, stored)
        if stored:
            self._metrics.tier_inc(self.name, "bytes_written", payload.size)
        return stored

    def _written(self, key: ChunkKey, size: int, stored: bool) -> bool:
        """A write is over: its reservation goes back; a stored record that survived is indexed."""
        with self._lock:
            self._reserved -= size
            if stored and key in self._clobbered:
                stored = self._survived_locked(key)
            self._done_writing_locked(key)
            # A concurrent writer of the same key (write-through racing move_down) may have
            # landed first; both renamed the same record into place, so index it once.
            if stored and key not in self._index:
                self._index.add(key, size)
        return stored

    def _survived_locked(self, key: ChunkKey) -> bool:
        """Whether this write's record is still there once the old record's unlink is done."""
        if not self._unlinked.wait_for(lambda: key not in self._unlinking, UNLINK_WAIT_S):
            return False
        return self._files.exists(key)

    def _done_writing_locked(self, key: ChunkKey) -> None:
        self._writing[key] -= 1
        if self._writing[key] <= 0:
            del self._writing[key]
            self._clobbered.discard(key)

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            gone = [key for key in keys if self._index.remove(key) is not None]
            self._unlinking_locked(gone)
        self._unlink_all(gone)
        return len(gone)

    def clear(self) -> None:
        self.remove(self.keys())

    def usage(self) -> TierUsage:
        return TierUsage(len(self._index), self._index.used_bytes + self._reserved, self.capacity_bytes)

    def keys(self) -> list[ChunkKey]:  # what the key listener was told is stored here
        with self._lock:
            return list(self._index)

    def set_key_listener(self, listener: IndexListener | None) -> None:
        with self._lock:  # ordered with every change: a `keys()` taken after it misses nothing
            self._index.set_listener(listener, self.name)

    def close(self) -> None:
        """Release the namespace directory, after the last operation (later ones: counted misses)."""
        self._files.close()
