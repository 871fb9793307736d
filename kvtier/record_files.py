"""Record files: one namespace's directory of `kvtier.record` records, one file per chunk.

Below both the disk tier (`kvtier.tiers.disk`) and kvtier_server's spill (`kvtier.server.spill`):
it imports neither, nor torch (buffers are numpy arrays). `kvtier.record_walk` walks it at start.

    <base>/<namespace hex>/                                 held open by a RecordDir (O_NOFOLLOW)
        <2 hex>/                                            a shard, opened per operation below it
            <32 hex digest>.kvr                             a record
            <32 hex digest>.kvr.tmp.<host>.<pid>.<16 hex>   a write in progress, or a dead writer's
        .probe.tmp.<host>.<pid>.<16 hex>                    the start-up write probe

A file is `[ header, zero-padded to BLOCK ][ payload, zero-padded to a multiple of BLOCK ]`: the
padding lets reads and writes use O_DIRECT (no page-cache copy, no double caching with the CPU tier)
whenever the buffer is BLOCK aligned, as memory-pool slabs are; where the file system refuses
O_DIRECT (tmpfs) "auto" falls back to buffered I/O. Writes are atomic: a temporary file at an
unpredictable name in the shard, then rename, so no reader or crashed writer sees half a record.

The directory may be shared (processes, hosts) and anything may appear in it, so nothing is
followed: the namespace directory is held open and every shard and file below it is opened relative
to it with O_NOFOLLOW; a symlink fails the operation (ELOOP): nothing outside is ever read, written
or deleted. Rename replaces a symlink, never writes through it.

Thread-safe: an operation touches only its own file; each thread has its own scratch buffers.
Failures raise (OSError, CorruptRecord; errno in RESOURCE_ERRNOS: the process, not the record or the
path, failed); counting, logging and indexing are the caller's.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import threading
import weakref
from pathlib import Path

import numpy as np

from kvtier import native_keys
from kvtier.checksum_copy import PieceCopy
from kvtier.errors import ConfigError, CorruptRecord
from kvtier.keys import ChunkKey
from kvtier.record import HEADER_SIZE, RecordHeader, decode_header, verify
from kvtier.record_root import (
    CREATE_FLAGS,
    DIR_FLAGS,
    READ_FLAGS,
    open_root,
    probe_o_direct,
    temp_name,
)

# The O_DIRECT unit: file offsets, lengths and buffer addresses (memory-pool slabs') are multiples.
BLOCK = 4096
SUFFIX = ".kvr"



def align_up(n: int, alignment: int = BLOCK) -> int:
    return (n + alignment - 1) // alignment * alignment


def file_bytes(payload_len: int) -> int:
    """The size of the record file of a `payload_len`-byte payload: a header block, padded payload."""
    return BLOCK + align_up(payload_len)


def aligned(arr: np.ndarray) -> bool:
    return arr.ctypes.data % BLOCK == 0


class _Scratch(threading.local):
    """Per-thread page-aligned buffers: the header block and the payload's unaligned tail."""

    def __init__(self) -> None:
        # Anonymous mmap: page aligned; private, as a shared one is shmem, slower to pin for O_DIRECT.
        self.mem = mmap.mmap(-1, 2 * BLOCK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.head = memoryview(self.mem)[:BLOCK]
        self.tail = memoryview(self.mem)[BLOCK:]


class RecordDir:
    """One namespace's record files under `base`. ConfigError (naming the path) when the directory
    cannot be created, is a symlink or cannot be written, or `o_direct` is "on" and it has no O_DIRECT."""

    def __init__(self, base: str | os.PathLike, namespace: bytes, o_direct: str = "auto",
                 fsync: bool = False):
        self.namespace = namespace
        self.root = Path(base) / namespace.hex()
        self._root = str(self.root)
        self.root_fd = open_root(Path(base), self.root)
        self._close_root = weakref.finalize(self, os.close, self.root_fd)
        self._old_roots: list[weakref.finalize] = []  # namespace directories deleted while open
        self._reopening = threading.Lock()
        supported = probe_o_direct(self.root_fd, self.root)  # also proves the directory writable
        if o_direct == "on" and not supported:
            raise ConfigError(f"disk.o_direct: 'on' but {self.root} does not support O_DIRECT")
        self.o_direct = supported and o_direct != "off"
        self.fsync = fsync
        self._scratch = _Scratch()

    def path(self, key: ChunkKey) -> str:
        # A str, not a Path: pathlib costs ~15 us per file on the I/O hot path.
        digest = key.digest.hex()
        return f"{self._root}/{digest[:2]}/{digest}{SUFFIX}"

    # -- directories: every path opened relative to the held namespace directory, never followed --

    def _shard_fd(self, digest: str, create: bool = False) -> int:
        """The record's 2-hex shard directory, opened without following a symlink (ELOOP)."""
        try:
            return os.open(digest[:2], DIR_FLAGS, dir_fd=self.root_fd)
        except FileNotFoundError:
            if not create:
                raise
        # The first file of its shard: mkdir on demand rather than a syscall per write.
        root_fd = self.root_fd
        try:
            os.mkdir(digest[:2], dir_fd=root_fd)
        except FileExistsError:
            pass
        except FileNotFoundError:
            # The namespace directory was deleted (rm -rf): write to a new one, not fail until restart.
            self._reopen_root(root_fd)
            with contextlib.suppress(FileExistsError):
                os.mkdir(digest[:2], dir_fd=self.root_fd)
        return os.open(digest[:2], DIR_FLAGS, dir_fd=self.root_fd)

    def _reopen_root(self, deleted_fd: int) -> None:
        with self._reopening:
            if self.root_fd != deleted_fd:  # another thread reopened it meanwhile: use that one
                return
            if os.fstat(deleted_fd).st_nlink:  # still linked: the directory was not deleted
                raise FileNotFoundError(f"cannot create a shard directory in {self.root}")
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(self.root, DIR_FLAGS)  # O_NOFOLLOW, as at start
            # The old descriptor stays open until close(): another thread may be using its number.
            self._old_roots.append(self._close_root)
            self.root_fd = fd
            self._close_root = weakref.finalize(self, os.close, fd)

    def _stat(self, key: ChunkKey) -> os.stat_result | None:
        digest = key.digest.hex()
        try:
            fd = self._shard_fd(digest)
            try:
                return os.stat(digest + SUFFIX, dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
        except OSError:
            return None

    def exists(self, key: ChunkKey) -> bool:
        return self._stat(key) is not None

    def indexable_size(self, key: ChunkKey) -> int | None:
        """The size of `key`'s file when the start-up walk would index it (a regular file of whole
        blocks, not a symlink), else None."""
        st = self._stat(key)
        if st is None or not stat.S_ISREG(st.st_mode) or st.st_size < BLOCK or st.st_size % BLOCK:
            return None
        return st.st_size

    def unlink(self, key: ChunkKey) -> None:
        """Delete `key`'s file, if any. OSError when it cannot go."""
        digest = key.digest.hex()
        with contextlib.suppress(FileNotFoundError):
            fd = self._shard_fd(digest)
            try:
                os.unlink(digest + SUFFIX, dir_fd=fd)
            finally:
                os.close(fd)

    def read(self, key: ChunkKey, dest: np.ndarray, copy: PieceCopy | None = None) -> RecordHeader:
        """Read `key`'s record into `dest` (1-D uint8, at least the payload; O_DIRECT when aligned),
        verified (but for a checksum left to `copy`: `record.verify`). FileNotFoundError: no file;
        CorruptRecord: not a whole valid record of `key`."""
        # One read of header block + payload straight into the (aligned) slab, as much as it holds:
        # the byte count tells the file's size (no fstat). O_DIRECT needs whole blocks, as ours are.
        digest, payload, head = key.digest.hex(), memoryview(dest), self._scratch.head
        flags = READ_FLAGS | (os.O_DIRECT if self.o_direct and aligned(dest) else 0)
        room = len(payload) // BLOCK * BLOCK
        if room and room == len(payload) and native_keys.AVAILABLE:  # padded (a slab): no tail read
            shard, name = digest[:2].encode(), f"{digest}{SUFFIX}".encode()
            got = native_keys.read_record(self.root_fd, shard, name, DIR_FLAGS, flags, head, payload)
            return self._checked(key, payload, got, -1, copy)
        fd = self.open_record(key, flags)
        try:
            got = os.preadv(fd, [head, payload[:room]] if room else [head], 0)
            return self._checked(key, payload, got, fd, copy)
        finally:
            os.close(fd)

    def open_record(self, key: ChunkKey, flags: int = READ_FLAGS) -> int:
        """A file descriptor of `key`'s record, opened below the namespace directory's fd, never
        through a symlink (`flags` hold O_NOFOLLOW). FileNotFoundError: no record."""
        digest = key.digest.hex()
        sfd = self._shard_fd(digest)
        try:
            return os.open(digest + SUFFIX, flags, dir_fd=sfd)
        finally:
            os.close(sfd)

    def _checked(self, key: ChunkKey, payload: memoryview, got: int, fd: int,
                 copy: PieceCopy | None) -> RecordHeader:
        """The record read (`got` bytes, its header block in the scratch head) checked; `fd` still
        open for an unpadded buffer's last partial block (read through the aligned scratch tail)."""
        head, room = self._scratch.head, len(payload) // BLOCK * BLOCK
        if got < BLOCK or got % BLOCK:
            raise CorruptRecord(f"{self.path(key)} is {got} bytes, not a whole number of blocks")
        header = decode_header(head)
        end = header.payload_len
        if room < end <= len(payload):  # (never for a padded buffer: the only kind read without fd)
            tail = self._scratch.tail
            got += os.preadv(fd, [tail], BLOCK + room)
            payload[room:end] = tail[: end - room]
        if got < BLOCK + end:
            raise CorruptRecord(f"{self.path(key)} is truncated: {got} bytes read")
        verify(head[:HEADER_SIZE], payload[:end], key, header, defer_to=copy)
        return header

    def write(self, key: ChunkKey, header: bytes, payload: np.ndarray) -> None:
        """Write `key`'s record (1-D uint8 payload; O_DIRECT when aligned) to a temporary file, then
        rename it into place over any old one. OSError, and no temporary file left, on failure."""
        digest = key.digest.hex()
        name = digest + SUFFIX
        tmp = temp_name(name)
        direct = self.o_direct and aligned(payload)
        sfd = self._shard_fd(digest, create=True)
        try:
            # O_EXCL|O_NOFOLLOW at a fresh random name: whatever sits there fails, never redirects.
            fd = os.open(tmp, CREATE_FLAGS | (os.O_DIRECT if direct else 0), 0o600, dir_fd=sfd)
            try:
                try:
                    self._fill(fd, header, payload, direct)
                finally:
                    os.close(fd)
                # rename replaces a symlink at `name` without following it; a directory fails it.
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
            os.ftruncate(fd, file_bytes(n))  # same size as an O_DIRECT file
        if self.fsync:
            os.fsync(fd)

    def close(self) -> None:
        """Release the namespace directory (files close after every operation); later calls fail."""
        self.root_fd = -1
        self._close_root()
        for close_old in self._old_roots:
            close_old()
