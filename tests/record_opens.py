"""Spying on how record files are opened: `os.open` (writes, and reads into unpadded buffers) and
`native_keys.read_record` (reads into padded buffers, in one C call). Pass-through: the real calls run."""

from __future__ import annotations

import os

from kvtier import native_keys
from kvtier.record_files import SUFFIX


def spy_record_opens(monkeypatch) -> list[tuple[str, bool]]:
    """(record file name, opened with O_DIRECT) for every record file opened from now on."""
    opened, real_open, real_read = [], os.open, native_keys.read_record

    def spy_open(path, flags, *args, **kwargs):
        if SUFFIX in str(path):
            opened.append((str(path), bool(flags & os.O_DIRECT)))
        return real_open(path, flags, *args, **kwargs)

    def spy_read(dir_fd, shard, name, dir_flags, file_flags, head, payload):
        opened.append((name.decode(), bool(file_flags & os.O_DIRECT)))
        return real_read(dir_fd, shard, name, dir_flags, file_flags, head, payload)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(native_keys, "read_record", spy_read)
    return opened
