"""The disk tier: one record file per chunk in a local directory, bounded in bytes, LRU eviction.

File layout (`<path>/<namespace hex>/<2 hex>/<digest hex>.kvr`, names derived from hashes only):

    [ record header, zero-padded to 4 KiB ][ payload, zero-padded to a multiple of 4 KiB ]

The padding lets reads and writes use O_DIRECT (no page-cache copy, no double caching with the
CPU tier) whenever the payload buffer is 4 KiB aligned, which memory-pool slabs are. Where the file
system refuses O_DIRECT (tmpfs) "auto" falls back to buffered I/O.

Writes are atomic: a temporary file in the same directory, then rename, so a reader or a crashed
writer never leaves a half record under a real name. The index (key -> file bytes, LRU order)
lives in memory and is rebuilt from the directory at start, oldest modification time first, so a
new process finds what an old one stored.

The directory is shared (several processes, each with its own index and byte bound, may write and
evict in it) and anything may appear in it, so (see `kvtier.tiers.disk_files`):
- Nothing is followed: the namespace directory is held open and every shard directory and file
  below it is opened relative to it with O_NOFOLLOW; a symlink is a miss (ELOOP), so the tier never
  reads, writes or deletes outside its directory. Rename replaces a symlink, never writes through.
- A temporary file is created O_CREAT|O_EXCL|O_NOFOLLOW at an unpredictable name carrying its
  writer's host, pid and a random token; start-up deletes only provably stale ones.
- The start-up walk skips whatever vanishes under it, is not a regular file, or has a name or size
  no record has; it counts them (`start_counts`) and logs one line.

Buffers: a `get` destination or a `put` payload is a contiguous CPU uint8 torch tensor (a memory
pool slab) or a 1-D C-contiguous numpy uint8 array (`kvtier_server`'s spill store), taken as a
numpy array once per item, zero-copy; below that numpy only, so this module never imports torch
and a process that only moves records need not load it (~250 MiB of RSS).

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

import contextlib
import errno
import logging
import mmap
import os
import threading
import weakref
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kvtier.dtypes import is_tensor
from kvtier.errors import ConfigError, CorruptRecord
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.policy import LRUPolicy
from kvtier.record import HEADER_SIZE, RecordHeader, decode_header, verify
from kvtier.tiers.base import PinPredicate, PutItem, TierUsage
from kvtier.tiers.disk_files import (
    BLOCK,
    CREATE_FLAGS,
    DIR_FLAGS,
    READ_FLAGS,
    SUFFIX,
    Scan,
    open_root,
    probe_o_direct,
    temp_name,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    import torch

    ByteBuffer: TypeAlias = torch.Tensor | np.ndarray  # get()'s dests, put()'s payloads: see "Buffers"

__all__ = ["BLOCK", "SUFFIX", "DiskTier"]

logger = logging.getLogger(__name__)

# Failures of the process, not of the record: the file is fine, so its index entry stays.
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
# How long a write waits for the deletion of its key's old file (one unlink; a hung file system
# makes the write a counted failure instead of a stuck write thread).
UNLINK_WAIT_S = 10.0


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _aligned(arr: np.ndarray) -> bool:
    return arr.ctypes.data % BLOCK == 0


def _as_array(buf: ByteBuffer) -> np.ndarray:
    """`buf`'s bytes as a 1-D uint8 numpy array over the same memory (a tensor's `numpy()` shares
    it). ValueError for anything else: a wrong buffer is the caller's bug, not a miss."""
    arr = buf.numpy() if is_tensor(buf) else buf
    if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 1
            and arr.flags.c_contiguous):
        raise ValueError(f"disk tier buffers are 1-D contiguous uint8 tensors or numpy arrays, "
                         f"not {type(buf).__name__} {getattr(buf, 'dtype', '')} {getattr(buf, 'shape', '')}")
    return arr


class _Scratch(threading.local):
    """Per-thread page-aligned buffers: the header block and the payload's unaligned tail."""

    def __init__(self) -> None:
        # Anonymous mmap is page aligned; private, because a shared one is shmem-backed and slower
        # to pin for O_DIRECT.
        self.mem = mmap.mmap(-1, 2 * BLOCK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.head = memoryview(self.mem)[:BLOCK]
        self.tail = memoryview(self.mem)[BLOCK:]


class DiskTier:
    name = "disk"

    def __init__(self, path: str | os.PathLike, namespace: bytes, capacity_bytes: int,
                 is_pinned: PinPredicate, metrics: Metrics, o_direct: str = "auto", fsync: bool = False):
        """Raises ConfigError (naming the path) when `path` is not a directory, cannot be created,
        or its namespace directory cannot be written or is a symlink."""
        # One directory per namespace: the index, the byte bound and clear() cover this engine's
        # model/geometry/TP rank only, so models sharing a disk path never evict or clear each other.
        self.namespace = namespace
        self.root = Path(path) / namespace.hex()
        self._root = str(self.root)
        self._root_fd = open_root(Path(path), self.root)
        self._close_root = weakref.finalize(self, os.close, self._root_fd)
        self._old_roots: list[weakref.finalize] = []  # namespace directories deleted while open
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self._is_pinned = is_pinned
        self._metrics = metrics
        self._log = LogLimiter(logger)  # a broken disk fails every I/O: one line a minute per kind
        supported = probe_o_direct(self._root_fd, self.root)  # also proves the directory writable
        if o_direct == "on" and not supported:
            raise ConfigError(f"disk.o_direct: 'on' but {self.root} does not support O_DIRECT")
        self.o_direct = supported and o_direct != "off"
        self._scratch = _Scratch()
        self._lock = threading.Lock()
        self._sizes: dict[ChunkKey, int] = {}
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
        self._policy = LRUPolicy()
        self._used = 0
        self.start_counts: Counter[str] = self._rebuild()  # what the walk skipped or deleted

    # -- index ---------------------------------------------------------------------------------

    def path_for(self, key: ChunkKey) -> Path:
        return Path(self._path(key))

    def _path(self, key: ChunkKey) -> str:
        # A str, not a Path: pathlib costs ~15 us per file on the I/O hot path.
        digest = key.digest.hex()
        return f"{self._root}/{digest[:2]}/{digest}{SUFFIX}"

    def _rebuild(self) -> Counter[str]:
        scan = Scan(self._root_fd, self.namespace)
        found = scan.run()
        for _, key, size in sorted(found, key=lambda f: f[0]):
            self._sizes[key] = size
            self._policy.insert(key)
            self._used += size
        with self._lock:
            victims = self._make_room_locked(0) or []
        self._unlink_all(victims)
        if found or scan.counts:
            level = logging.WARNING if scan.unusual() else logging.INFO
            logger.log(level, "disk tier %s: found %d chunks, %d bytes%s", self.root, len(self._sizes),
                       self._used, "".join(f"; {n} {what}" for what, n in sorted(scan.counts.items())))
        return scan.counts

    def _make_room_locked(self, incoming: int) -> list[ChunkKey] | None:
        """Forget LRU unpinned files until `incoming` more bytes fit, and return them for the caller
        to unlink outside the lock; None (evicting nothing) when even that would not make room."""
        if self._used + incoming <= self.capacity_bytes:
            return []
        victims, freed = [], 0
        for key in self._policy.victims(lambda k: not self._is_pinned(k)):
            victims.append(key)
            freed += self._sizes[key]
            if self._used - freed + incoming <= self.capacity_bytes:
                break
        else:
            return None
        for key in victims:
            self._forget(key)
        self._unlinking_locked(victims)
        self._metrics.tier_inc(self.name, "evictions", len(victims))
        return victims

    def _unlinking_locked(self, keys: list[ChunkKey]) -> None:
        """`keys` (just forgotten) will be unlinked by the caller, outside the lock."""
        self._unlinking.update(keys)
        self._clobbered.update(key for key in keys if key in self._writing)

    def _forget(self, key: ChunkKey) -> bool:
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self._used -= size
        self._policy.remove(key)
        return True

    # -- files: every path opened relative to the held namespace directory, never followed -------

    def _shard_fd(self, digest: str, create: bool = False) -> int:
        """The record's 2-hex shard directory, opened without following a symlink (ELOOP)."""
        try:
            return os.open(digest[:2], DIR_FLAGS, dir_fd=self._root_fd)
        except FileNotFoundError:
            if not create:
                raise
        # The first file of its shard: mkdir on demand rather than a syscall per write.
        try:
            os.mkdir(digest[:2], dir_fd=self._root_fd)
        except FileExistsError:
            pass
        except FileNotFoundError:
            # The namespace directory itself was deleted (an operator's rm -rf): writes go to a new
            # one at the same path instead of failing until a restart.
            self._reopen_root()
            with contextlib.suppress(FileExistsError):
                os.mkdir(digest[:2], dir_fd=self._root_fd)
        return os.open(digest[:2], DIR_FLAGS, dir_fd=self._root_fd)

    def _reopen_root(self) -> None:
        with self._lock:
            if os.fstat(self._root_fd).st_nlink:  # still linked: not deleted, or already reopened
                raise FileNotFoundError(f"cannot create a shard directory in {self.root}")
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(self.root, DIR_FLAGS)  # O_NOFOLLOW, as at start
            # The old descriptor stays open until close(): another thread may be using its number.
            self._old_roots.append(self._close_root)
            self._root_fd = fd
            self._close_root = weakref.finalize(self, os.close, fd)

    def _unlink_all(self, keys: Sequence[ChunkKey]) -> None:
        """Best effort, never raises: a file that cannot go (a directory in its place, EPERM) is
        logged and counted; its key is already out of the index and the byte count. `keys` were
        marked as unlinking (`_make_room_locked`, `remove`); each is unmarked once done."""
        for key in keys:
            digest = key.digest.hex()
            try:
                fd = self._shard_fd(digest)
                try:
                    os.unlink(digest + SUFFIX, dir_fd=fd)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._failed("unlink", self._path(key), exc)
            finally:
                with self._lock:
                    self._unlinking[key] -= 1
                    if self._unlinking[key] <= 0:
                        del self._unlinking[key]
                        self._unlinked.notify_all()

    def _exists(self, digest: str) -> bool:
        try:
            fd = self._shard_fd(digest)
            try:
                os.stat(digest + SUFFIX, dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
        except OSError:
            return False
        return True

    def _failed(self, op: str, path: str, exc: OSError) -> None:
        self._log.warning(op, "disk tier: %s %s failed: %s", op, path, exc)
        self._metrics.tier_inc(self.name, "errors")

    # -- Tier protocol -------------------------------------------------------------------------

    def has(self, keys: Sequence[ChunkKey]) -> list[bool]:
        sizes = self._sizes
        return [key in sizes for key in keys]

    def get(self, keys: Sequence[ChunkKey], dests: Sequence[ByteBuffer]) -> list:
        arrays = [_as_array(dest) for dest in dests]  # every buffer checked before any I/O
        results = [self._read(key, dest) for key, dest in zip(keys, arrays, strict=True)]
        with self._lock:
            for key, header in zip(keys, results, strict=True):
                if header is not None:
                    self._policy.touch(key)
        self._metrics.tier_inc(self.name, "bytes_read", sum(h.payload_len for h in results if h is not None))
        return results

    def _read(self, key: ChunkKey, dest: np.ndarray) -> RecordHeader | None:
        digest = key.digest.hex()
        direct = self.o_direct and _aligned(dest)
        try:
            sfd = self._shard_fd(digest)
            try:
                fd = os.open(digest + SUFFIX, READ_FLAGS | (os.O_DIRECT if direct else 0), dir_fd=sfd)
            finally:
                os.close(sfd)
        except FileNotFoundError:
            with self._lock:
                # Deleted behind our back. Checked again under the lock: a write of this key that
                # renamed a new record into place since must keep the entry it adds (or added).
                if not self._exists(digest):
                    self._forget(key)
            return None
        except OSError as exc:
            return self._unreadable(key, "open", exc)
        try:
            # One read of header block + payload straight into the (aligned) slab, as much as the
            # slab holds: the byte count tells the file's size, so no fstat. O_DIRECT needs whole
            # blocks, which our files and slabs are; anything that is not is damaged.
            head = self._scratch.head
            payload = memoryview(dest)  # one view for the read and the checksum
            room = len(payload) // BLOCK * BLOCK
            got = os.preadv(fd, [head, payload[:room]] if room else [head], 0)
            if got < BLOCK or got % BLOCK:
                raise CorruptRecord(f"{self._path(key)} is {got} bytes, not a whole number of blocks")
            header = decode_header(head)
            end = header.payload_len
            if room < end <= len(payload):
                # A buffer not padded to whole blocks: the last partial block goes through the
                # scratch tail (one aligned block, fine for O_DIRECT) and is copied in.
                tail = self._scratch.tail
                got += os.preadv(fd, [tail], BLOCK + room)
                payload[room:end] = tail[: end - room]
            if got < BLOCK + end:
                raise CorruptRecord(f"{self._path(key)} is truncated: {got} bytes read")
            verify(head[:HEADER_SIZE], payload[: header.payload_len], key, header)
            return header
        except CorruptRecord as exc:
            self._log.warning("corrupt", "disk tier: dropping corrupt record: %s", exc)
            self._metrics.tier_inc(self.name, "corrupt")
            self.remove([key])
            return None
        except OSError as exc:
            return self._unreadable(key, "read", exc)
        finally:
            os.close(fd)

    def _unreadable(self, key: ChunkKey, op: str, exc: OSError) -> None:
        """A counted miss. The record is forgotten and deleted (so lookup stops promising what get
        cannot deliver) unless the process, not the record, failed: out of fds or memory."""
        self._failed(op, self._path(key), exc)
        if exc.errno not in _RESOURCE_ERRNOS:
            self.remove([key])

    def put(self, items: Sequence[PutItem]) -> list[bool]:
        return [self._write(item) for item in items]

    def _write(self, item: PutItem) -> bool:
        if item.key.namespace != self.namespace:
            raise ValueError(f"key {item.key} is not of this disk tier's namespace {self.namespace.hex()}")
        payload = _as_array(item.payload)
        size = BLOCK + _padded(payload.size)
        with self._lock:
            if not self._unlinked.wait_for(lambda: item.key not in self._unlinking, UNLINK_WAIT_S):
                self._failed("write", self._path(item.key),
                             OSError(errno.ETIMEDOUT, "its old file is still being deleted"))
                return False
            if item.key in self._sizes:
                self._policy.touch(item.key)
                return True
            # Reserve the bytes before writing so concurrent writers cannot overshoot capacity.
            victims = self._make_room_locked(size)  # never item.key: it is not in the index
            if victims is not None:
                self._writing[item.key] += 1
                self._used += size
        if victims is None:
            self._metrics.tier_inc(self.name, "rejected")
            return False
        stored = False
        try:
            self._unlink_all(victims)
            self._write_file(item.key, item.header, payload)
            stored = True
        except OSError as exc:
            self._failed("write", self._path(item.key), exc)
        finally:
            with self._lock:
                self._used -= size  # the reservation goes back whatever happened
                if stored and item.key in self._clobbered:
                    stored = self._survived_locked(item.key)
                self._done_writing_locked(item.key)
                # A concurrent writer of the same key (write-through racing move_down) may have
                # landed first; both renamed the same record into place, so index it once.
                if stored and item.key not in self._sizes:
                    self._sizes[item.key] = size
                    self._policy.insert(item.key)
                    self._used += size
        if stored:
            self._metrics.tier_inc(self.name, "bytes_written", payload.size)
        return stored

    def _survived_locked(self, key: ChunkKey) -> bool:
        """Whether the record this write renamed into place is still there, once the unlink of
        the key's previous record (which it may have met) is done."""
        if not self._unlinked.wait_for(lambda: key not in self._unlinking, UNLINK_WAIT_S):
            return False
        return self._exists(key.digest.hex())

    def _done_writing_locked(self, key: ChunkKey) -> None:
        self._writing[key] -= 1
        if self._writing[key] <= 0:
            del self._writing[key]
            self._clobbered.discard(key)

    def _write_file(self, key: ChunkKey, header: bytes, payload: np.ndarray) -> None:
        digest = key.digest.hex()
        name = digest + SUFFIX
        tmp = temp_name(name)
        direct = self.o_direct and _aligned(payload)
        sfd = self._shard_fd(digest, create=True)
        try:
            # O_EXCL|O_NOFOLLOW at a fresh random name: whatever sits there makes the write fail,
            # never redirects it.
            fd = os.open(tmp, CREATE_FLAGS | (os.O_DIRECT if direct else 0), 0o600, dir_fd=sfd)
            try:
                try:
                    self._fill(fd, header, payload, direct)
                finally:
                    os.close(fd)
                # rename replaces whatever is at `name` (a symlink too) without following it; a
                # directory there fails it, a miss for this key only.
                os.rename(tmp, name, src_dir_fd=sfd, dst_dir_fd=sfd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=sfd)
                raise
        finally:
            os.close(sfd)

    def _fill(self, fd: int, header: bytes, payload: np.ndarray, direct: bool) -> None:
        n = payload.size
        head, tail = self._scratch.head, self._scratch.tail
        head[:] = bytes(BLOCK)
        head[: len(header)] = header
        whole = n // BLOCK * BLOCK if direct else n
        bufs = [head, memoryview(payload[:whole])] if whole else [head]
        if direct and n > whole:
            tail[:] = bytes(BLOCK)
            tail[: n - whole] = memoryview(payload[whole:])
            bufs.append(tail)
        written = os.pwritev(fd, bufs, 0)
        expected = sum(memoryview(b).nbytes for b in bufs)
        if written != expected:
            raise OSError(errno.EIO, f"short write: {written} of {expected} bytes")
        if not direct:
            os.ftruncate(fd, BLOCK + _padded(n))  # same size as an O_DIRECT file
        if self.fsync:
            os.fsync(fd)

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            gone = [key for key in keys if self._forget(key)]
            self._unlinking_locked(gone)
        self._unlink_all(gone)
        return len(gone)

    def clear(self) -> None:
        with self._lock:
            keys = list(self._sizes)
        self.remove(keys)

    def usage(self) -> TierUsage:
        return TierUsage(len(self._sizes), self._used, self.capacity_bytes)

    def close(self) -> None:
        """Release the namespace directory (files are closed after every operation). Call after
        the last operation has returned; later calls fail as counted misses."""
        self._root_fd = -1
        self._close_root()
        for close_old in self._old_roots:
            close_old()
