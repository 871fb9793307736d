"""The disk tier's directory as the file system sees it: names, opening without following
symlinks, temporary files and when they are stale, and the start-up walk.

    <path>/<namespace hex>/                                 held open by the DiskTier (O_NOFOLLOW)
        <2 hex>/                                            a shard, opened per operation below it
            <32 hex digest>.kvr                             a record
            <32 hex digest>.kvr.tmp.<host>.<pid>.<16 hex>   a write in progress, or a dead writer's
        .probe.tmp.<host>.<pid>.<16 hex>                    the start-up write probe

The directory may be shared by several processes (and hosts, on a network file system) and
anything may appear in it. `<host>` is 8 hex of a hash of the host name and PID namespace, so a
writer's pid is only asked about (`os.kill(pid, 0)`) where it names the same process. A temporary
file is stale, and deleted at start-up, when it is a regular file and either its writer is gone
(same host, ESRCH) or it is older than `STALE_TEMP_S`, whoever wrote it. A live writer's temporary
file is never touched. The only other files deleted at start are record-named regular files whose
size no record can have. Nothing is ever followed: entries are lstat'ed (a symlink is skipped),
shards are opened O_NOFOLLOW relative to the namespace directory's descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import time
import zlib
from collections import Counter
from pathlib import Path

from kvtier.errors import ConfigError
from kvtier.keys import DIGEST_BYTES, ChunkKey

BLOCK = 4096
SUFFIX = ".kvr"
STALE_TEMP_S = 3600.0  # no write takes an hour: an older temporary file is a dead writer's

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted at a record's name must not block a read thread (no effect on files).
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_DIGEST = f"[0-9a-f]{{{2 * DIGEST_BYTES}}}"
_SHARD = re.compile("[0-9a-f]{2}")
_RECORD = re.compile(f"({_DIGEST}){re.escape(SUFFIX)}")
# <record or .probe>.tmp.<host id>.<pid>.<random>: exactly what temp_name() makes, nothing else.
_TEMP = re.compile(rf"(?:{_DIGEST}{re.escape(SUFFIX)}|\.probe)\.tmp"
                   rf"\.([0-9a-f]{{8}})\.([0-9]{{1,10}})\.[0-9a-f]{{16}}")

STALE_DELETED, LIVE_KEPT = "stale temp files deleted", "live temp files kept"  # the normal outcomes


def _host_id() -> str:
    try:
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_namespace = 0
    return f"{zlib.crc32(f'{socket.gethostname()}/{pid_namespace}'.encode()):08x}"


HOST_ID = _host_id()


def temp_name(final: str) -> str:
    """A fresh, unpredictable temporary name for `final` (the pid read now: a forked child's own)."""
    return f"{final}.tmp.{HOST_ID}.{os.getpid()}.{os.urandom(8).hex()}"


def _stale(temp: re.Match, mtime: float, now: float) -> bool:
    if now - mtime > STALE_TEMP_S:
        return True
    host, pid = temp.group(1), int(temp.group(2))
    if host != HOST_ID:
        return False  # another host or container: its pid means nothing here, only age counts
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive under another user; not a pid at all
        return False
    return False


def open_root(base: Path, root: Path) -> int:
    """Create `root` (`base`/<namespace hex>) if needed and open it without following a symlink.
    ConfigError, naming the path, when that cannot be done."""
    if base.exists() and not base.is_dir():
        raise ConfigError(f"disk tier path {base} exists and is not a directory")
    if root.is_symlink():
        raise ConfigError(f"disk tier path {base}: {root} is a symlink (never followed)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        return os.open(root, DIR_FLAGS)  # O_NOFOLLOW: a symlink swapped in since is refused too
    except OSError as exc:
        raise ConfigError(f"disk tier path {base}: {root} cannot be created: {exc.strerror}") from None


def probe_o_direct(root_fd: int, root: Path) -> bool:
    """Create and delete one file in the namespace directory, as writes will: True when the file
    system takes O_DIRECT. ConfigError when no file can be created there."""
    name = temp_name(".probe")
    attempts = ([CREATE_FLAGS | os.O_DIRECT] if hasattr(os, "O_DIRECT") else []) + [CREATE_FLAGS]
    for flags in attempts:
        try:
            fd = os.open(name, flags, 0o600, dir_fd=root_fd)
        except OSError as exc:
            error = exc
            continue
        os.close(fd)
        with contextlib.suppress(OSError):  # a leftover probe is stale, deleted at a later start
            os.unlink(name, dir_fd=root_fd)
        return flags != CREATE_FLAGS
    raise ConfigError(f"disk tier path {root} is not writable: {error.strerror}")


class Scan:
    """One start-up walk of a namespace directory. `run()` returns the records found as
    (mtime_ns, key, file bytes); `counts` tells everything else, by what became of it. Never
    raises for what is in the directory: entries vanish under it while other processes evict."""

    def __init__(self, root_fd: int, namespace: bytes):
        self.root_fd = root_fd
        self.namespace = namespace
        self.counts: Counter[str] = Counter()
        self.now = time.time()

    def run(self) -> list[tuple[int, ChunkKey, int]]:
        found: list[tuple[int, ChunkKey, int]] = []
        for entry in self._list(self.root_fd):
            if entry.is_symlink():  # d_type from the listing: no syscall; never followed
                self.counts["symlinks skipped"] += 1
            elif _SHARD.fullmatch(entry.name):
                self._shard(entry.name, found)
            elif (temp := _TEMP.fullmatch(entry.name)) is not None:
                self._temp(self.root_fd, entry, temp)
            else:
                self.counts["foreign names skipped"] += 1
        return found

    def unusual(self) -> bool:
        """Whether the walk met anything but records and temporary files (worth a warning)."""
        return any(what not in (STALE_DELETED, LIVE_KEPT) for what in self.counts)

    def _shard(self, shard: str, found: list) -> None:
        try:
            fd = os.open(shard, DIR_FLAGS, dir_fd=self.root_fd)
        except OSError as exc:
            self._skip(exc)
            return
        try:
            for entry in self._list(fd):
                record = _RECORD.fullmatch(entry.name)
                if record is not None and entry.name.startswith(shard):
                    self._record(fd, entry, record.group(1), found)
                elif (temp := _TEMP.fullmatch(entry.name)) is not None:
                    self._temp(fd, entry, temp)
                else:
                    self.counts["foreign names skipped"] += 1
        finally:
            os.close(fd)

    def _record(self, fd: int, entry: os.DirEntry, digest: str, found: list) -> None:
        st = self._lstat(entry)
        if st is None:
            return
        if st.st_size < BLOCK or st.st_size % BLOCK:
            # Records appear only whole, by rename: this one lost its data in a crash before it
            # reached the disk, or was cut by hand. It would only ever be a corrupt miss. (One
            # block is a whole record: the header block of an empty payload, which kvtier_server
            # stores; a file cut to one block is caught by the read's length check.)
            self._unlink(fd, entry.name, "damaged records deleted")
            return
        found.append((st.st_mtime_ns, ChunkKey(self.namespace, bytes.fromhex(digest)), st.st_size))

    def _temp(self, fd: int, entry: os.DirEntry, temp: re.Match) -> None:
        st = self._lstat(entry)
        if st is None:
            return
        if _stale(temp, st.st_mtime, self.now):
            self._unlink(fd, entry.name, STALE_DELETED)
        else:
            self.counts[LIVE_KEPT] += 1

    def _lstat(self, entry: os.DirEntry) -> os.stat_result | None:
        """The entry's own metadata (fstatat relative to the scanned fd, a symlink not followed),
        or None, counted, when it is gone or not a regular file."""
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            self._skip(exc)
            return None
        if stat.S_ISREG(st.st_mode):
            return st
        self.counts["symlinks skipped" if stat.S_ISLNK(st.st_mode) else "not regular files skipped"] += 1
        return None

    def _unlink(self, fd: int, name: str, what: str) -> None:
        try:
            os.unlink(name, dir_fd=fd)
        except OSError as exc:
            self._skip(exc)
        else:
            self.counts[what] += 1

    def _list(self, fd: int) -> list[os.DirEntry]:
        try:
            with os.scandir(fd) as entries:
                return list(entries)
        except OSError as exc:
            self._skip(exc)
            return []

    def _skip(self, exc: OSError) -> None:
        # ELOOP/ENOTDIR: O_NOFOLLOW met a symlink swapped in since the listing, or a non-directory.
        reason = {errno.ENOENT: "vanished", errno.ELOOP: "symlinks",
                  errno.ENOTDIR: "not directories"}.get(exc.errno, f"unreadable ({exc.strerror})")
        self.counts[f"{reason} skipped"] += 1
