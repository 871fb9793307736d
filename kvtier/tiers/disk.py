"""The disk tier: one record file per chunk in a local directory, bounded in bytes, LRU eviction.

File layout (`<path>/<namespace hex>/<2 hex>/<digest hex>.kvr`, names derived from hashes only):

    [ record header, zero-padded to 4 KiB ][ payload, zero-padded to a multiple of 4 KiB ]

The padding lets reads and writes use O_DIRECT (no page-cache copy, no double caching with the
CPU tier) whenever the payload buffer is 4 KiB aligned, which memory-pool slabs are. Where the file
system refuses O_DIRECT (tmpfs) "auto" falls back to buffered I/O.

Writes are atomic: a temporary file in the same directory, then rename, so a reader or a crashed
writer never leaves a half record under a real name (`*.tmp` leftovers are deleted at start). The
index (key -> file bytes, LRU order) lives in memory and is rebuilt from the directory at start,
oldest modification time first, so a new process finds what an old one stored.

Thread-safe: the index is guarded by a lock; file I/O runs outside it. Reads verify every record
(magic, version, key, length, checksum); a bad file is a miss, counted and deleted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from kvtier.errors import ConfigError, CorruptRecord
from kvtier.keys import DIGEST_BYTES, ChunkKey
from kvtier.metrics import Metrics
from kvtier.policy import LRUPolicy
from kvtier.record import HEADER_SIZE, decode_header, verify
from kvtier.tiers.base import PinPredicate, PutItem, TierUsage

logger = logging.getLogger(__name__)

BLOCK = 4096
SUFFIX = ".kvr"


def _padded(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _aligned(buf: torch.Tensor) -> bool:
    return buf.data_ptr() % BLOCK == 0


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _Scratch(threading.local):
    """Per-thread page-aligned buffers: the header block and the payload's unaligned tail."""

    def __init__(self) -> None:
        # Anonymous mmap is page aligned; private, because a shared one is shmem-backed and slower
        # to pin for O_DIRECT.
        self.mem = mmap.mmap(-1, 2 * BLOCK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.head = memoryview(self.mem)[:BLOCK]
        self.tail = memoryview(self.mem)[BLOCK:]


def _probe_o_direct(root: Path) -> bool:
    probe = root / f".o_direct_probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return True


class DiskTier:
    name = "disk"

    def __init__(self, path: str | os.PathLike, namespace: bytes, capacity_bytes: int,
                 is_pinned: PinPredicate, metrics: Metrics, o_direct: str = "auto", fsync: bool = False):
        # One directory per namespace: the index, the byte bound and clear() cover this engine's
        # model/geometry/TP rank only, so models sharing a disk path never evict or clear each other.
        self.namespace = namespace
        self.root = Path(path) / namespace.hex()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root = str(self.root)
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self._is_pinned = is_pinned
        self._metrics = metrics
        supported = hasattr(os, "O_DIRECT") and _probe_o_direct(self.root)
        if o_direct == "on" and not supported:
            raise ConfigError(f"disk.o_direct: 'on' but {self.root} does not support O_DIRECT")
        self.o_direct = supported and o_direct != "off"
        self._scratch = _Scratch()
        self._lock = threading.Lock()
        self._sizes: dict[ChunkKey, int] = {}
        self._policy = LRUPolicy()
        self._used = 0
        self._rebuild()

    # -- index ---------------------------------------------------------------------------------

    def path_for(self, key: ChunkKey) -> Path:
        return Path(self._path(key))

    def _path(self, key: ChunkKey) -> str:
        # A str, not a Path: pathlib costs ~15 us per file on the I/O hot path.
        digest = key.digest.hex()
        return f"{self._root}/{digest[:2]}/{digest}{SUFFIX}"

    def _rebuild(self) -> None:
        found = []
        for file in self.root.glob("*/*"):
            if ".tmp" in file.name:
                file.unlink(missing_ok=True)  # a writer died mid-write
                continue
            key = self._key_from_path(file)
            if key is not None:
                st = file.stat()
                found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found, key=lambda f: f[0]):
            self._sizes[key] = size
            self._policy.insert(key)
            self._used += size
        with self._lock:
            victims = self._make_room_locked(0) or []
        self._unlink_all(victims)
        if found:
            logger.info("disk tier %s: found %d chunks, %d bytes", self.root, len(self._sizes), self._used)

    def _key_from_path(self, file: Path) -> ChunkKey | None:
        stem = file.name.removesuffix(SUFFIX)
        if not file.name.endswith(SUFFIX) or len(stem) != 2 * DIGEST_BYTES or file.parent.name != stem[:2]:
            return None
        try:
            return ChunkKey(self.namespace, bytes.fromhex(stem))
        except ValueError:
            return None

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
        self._metrics.tier_inc(self.name, "evictions", len(victims))
        return victims

    def _unlink_all(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            _unlink(self._path(key))

    def _forget(self, key: ChunkKey) -> bool:
        size = self._sizes.pop(key, None)
        if size is None:
            return False
        self._used -= size
        self._policy.remove(key)
        return True

    # -- Tier protocol -------------------------------------------------------------------------

    def has(self, keys: Sequence[ChunkKey]) -> list[bool]:
        sizes = self._sizes
        return [key in sizes for key in keys]

    def get(self, keys: Sequence[ChunkKey], dests: Sequence[torch.Tensor]) -> list:
        results = [self._read(key, dest) for key, dest in zip(keys, dests, strict=True)]
        with self._lock:
            for key, header in zip(keys, results, strict=True):
                if header is not None:
                    self._policy.touch(key)
        self._metrics.tier_inc(self.name, "bytes_read", sum(h.payload_len for h in results if h is not None))
        return results

    def _read(self, key: ChunkKey, dest: torch.Tensor):
        path = self._path(key)
        direct = self.o_direct and _aligned(dest)
        try:
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        except FileNotFoundError:
            with self._lock:
                self._forget(key)  # deleted behind our back
            return None
        except OSError as exc:
            return self._failed("open", path, exc)
        try:
            # One read of header block + payload straight into the (aligned) slab, as much as the
            # slab holds: the byte count tells the file's size, so no fstat. O_DIRECT needs whole
            # blocks, which our files and slabs are; anything that is not is damaged.
            head = self._scratch.head
            payload = memoryview(dest.numpy())  # one view for the read and the checksum
            room = len(payload) // BLOCK * BLOCK
            got = os.preadv(fd, [head, payload[:room]] if room else [head], 0)
            if got < BLOCK or got % BLOCK:
                raise CorruptRecord(f"{path} is {got} bytes, not a whole number of blocks")
            header = decode_header(head)
            if got < BLOCK + header.payload_len:
                raise CorruptRecord(f"{path} is truncated: {got} bytes read")
            verify(head[:HEADER_SIZE], payload[: header.payload_len], key, header)
            return header
        except CorruptRecord as exc:
            logger.warning("disk tier: dropping corrupt record: %s", exc)
            self._metrics.tier_inc(self.name, "corrupt")
            self.remove([key])
            return None
        except OSError as exc:
            return self._failed("read", path, exc)
        finally:
            os.close(fd)

    def _failed(self, op: str, path: str, exc: OSError) -> None:
        logger.warning("disk tier: %s %s failed: %s", op, path, exc)
        self._metrics.tier_inc(self.name, "errors")
        return None

    def put(self, items: Sequence[PutItem]) -> list[bool]:
        return [self._write(item) for item in items]

    def _write(self, item: PutItem) -> bool:
        if item.key.namespace != self.namespace:
            raise ValueError(f"key {item.key} is not of this disk tier's namespace {self.namespace.hex()}")
        size = BLOCK + _padded(item.payload.numel())
        with self._lock:
            if item.key in self._sizes:
                self._policy.touch(item.key)
                return True
            # Reserve the bytes before writing so concurrent writers cannot overshoot capacity.
            victims = self._make_room_locked(size)
            if victims is not None:
                self._used += size
        if victims is None:
            self._metrics.tier_inc(self.name, "rejected")
            return False
        self._unlink_all(victims)
        try:
            self._write_file(item)
        except OSError as exc:
            with self._lock:
                self._used -= size
            self._failed("write", self._path(item.key), exc)
            return False
        with self._lock:
            if item.key in self._sizes:
                # A concurrent writer of the same key (write-through racing move_down) landed first;
                # both renamed the same record into place, so only one reservation is real.
                self._used -= size
            else:
                self._sizes[item.key] = size
                self._policy.insert(item.key)
        self._metrics.tier_inc(self.name, "bytes_written", item.payload.numel())
        return True

    def _write_file(self, item: PutItem) -> None:
        path = self._path(item.key)
        tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
        payload = item.payload
        n = payload.numel()
        direct = self.o_direct and _aligned(payload)
        head, tail = self._scratch.head, self._scratch.tail
        head[:] = bytes(BLOCK)
        head[: len(item.header)] = item.header
        whole = n // BLOCK * BLOCK if direct else n
        bufs = [head, memoryview(payload[:whole].numpy())] if whole else [head]
        if direct and n > whole:
            tail[:] = bytes(BLOCK)
            tail[: n - whole] = memoryview(payload[whole:].numpy())
            bufs.append(tail)
        flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(tmp, flags, 0o600)
        except FileNotFoundError:  # the first file of its directory (a mkdir per write costs a syscall)
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            fd = os.open(tmp, flags, 0o600)
        try:
            written = os.pwritev(fd, bufs, 0)
            expected = sum(memoryview(b).nbytes for b in bufs)
            if written != expected:
                raise OSError(errno.EIO, f"short write: {written} of {expected} bytes")
            if not direct:
                os.ftruncate(fd, BLOCK + _padded(n))  # same size as an O_DIRECT file
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, path)

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            gone = [key for key in keys if self._forget(key)]
        self._unlink_all(gone)
        return len(gone)

    def clear(self) -> None:
        with self._lock:
            keys = list(self._sizes)
        self.remove(keys)

    def usage(self) -> TierUsage:
        return TierUsage(len(self._sizes), self._used, self.capacity_bytes)

    def close(self) -> None:
        """Nothing to release: files are closed after every operation."""
