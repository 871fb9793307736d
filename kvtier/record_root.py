"""Opening a directory of record files (kvtier.record_files): the namespace directory created and
held without following a symlink, the start-up write probe that decides O_DIRECT, the unpredictable
temporary names writes use, and the open flags every operation below it uses.

No state beyond HOST_ID (computed at import); numpy- and torch-free, as record_files is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import zlib
from pathlib import Path

from kvtier.errors import ConfigError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted at a record's name must not block a read thread (no effect on files).
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


def _host_id() -> str:
    # Host name and PID namespace: the walk asks about a temp file's pid only where it means this pid.
    try:
        pid_namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_namespace = 0
    return f"{zlib.crc32(f'{socket.gethostname()}/{pid_namespace}'.encode()):08x}"


HOST_ID = _host_id()


def temp_name(final: str) -> str:
    """A fresh, unpredictable temporary name for `final` (the pid read now: a forked child's own)."""
    return f"{final}.tmp.{HOST_ID}.{os.getpid()}.{os.urandom(8).hex()}"


def open_root(base: Path, root: Path) -> int:
    """Create `root` if need be and open it, never through a symlink; ConfigError naming it if not."""
    if base.exists() and not base.is_dir():
        raise ConfigError(f"disk tier path {base} exists and is not a directory")
    if root.is_symlink():
        raise ConfigError(f"disk tier path {base}: {root} is a symlink (never followed)")
    try:
        root.mkdir(parents=True, exist_ok=True)
        return os.open(root, DIR_FLAGS)  # O_NOFOLLOW: a symlink swapped in since is refused too
    except OSError as exc:
        if exc.errno in RESOURCE_ERRNOS:
            raise  # the process failed (out of fds, memory), not the path
        raise ConfigError(f"disk tier path {base}: {root} cannot be created: {exc.strerror}") from None


def probe_o_direct(root_fd: int, root: Path) -> bool:
    """Create and delete one file in the namespace directory, as writes will: True when the file
    system takes O_DIRECT. ConfigError when no file can be created there (OSError: out of fds)."""
    name = temp_name(".probe")
    attempts = ([CREATE_FLAGS | os.O_DIRECT] if hasattr(os, "O_DIRECT") else []) + [CREATE_FLAGS]
    for flags in attempts:
        try:
            fd = os.open(name, flags, 0o600, dir_fd=root_fd)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise
            error = exc
            continue
        os.close(fd)
        with contextlib.suppress(OSError):  # a leftover probe is stale, deleted at a later start
            os.unlink(name, dir_fd=root_fd)
        return flags != CREATE_FLAGS
    raise ConfigError(f"disk tier path {root} is not writable: {error.strerror}")
