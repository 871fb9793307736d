"""The start-up walk of a record directory (`kvtier.record_files`): what is a record, what is a
stale temporary file, and what is neither.

The directory may be shared by several processes (and hosts, on a network file system) and
anything may appear in it. A temporary file is stale, and deleted at start-up, when it is a regular
file and either its writer is gone (same host, ESRCH) or it is older than `STALE_TEMP_S`, whoever
wrote it. A live writer's temporary file is never touched. The only other files deleted at start
are record-named regular files whose size no record can have. Nothing is ever followed: entries are
lstat'ed (a symlink is skipped), shards are opened O_NOFOLLOW relative to the namespace directory's
descriptor. Never raises for what is in the directory: entries vanish under it while other
processes evict.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections import Counter

from kvtier.keys import DIGEST_BYTES, ChunkKey
from kvtier.record_files import BLOCK, SUFFIX
from kvtier.record_root import DIR_FLAGS, HOST_ID

STALE_TEMP_S = 3600.0  # no write takes an hour: an older temporary file is a dead writer's

_DIGEST = f"[0-9a-f]{{{2 * DIGEST_BYTES}}}"
_SHARD = re.compile("[0-9a-f]{2}")
_RECORD = re.compile(f"({_DIGEST}){re.escape(SUFFIX)}")
# <record or .probe>.tmp.<host id>.<pid>.<random>: exactly what temp_name() makes, nothing else.
_TEMP = re.compile(rf"(?:{_DIGEST}{re.escape(SUFFIX)}|\.probe)\.tmp"
                   rf"\.([0-9a-f]{{8}})\.([0-9]{{1,10}})\.[0-9a-f]{{16}}")

STALE_DELETED, LIVE_KEPT = "stale temp files deleted", "live temp files kept"  # the normal outcomes


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
