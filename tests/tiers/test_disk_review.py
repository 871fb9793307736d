"""Guards from reviewing the disk tier over `kvtier.record_files` after issue 9: a full disk and
file descriptors. Real files; ENOSPC is simulated in-process by patching os.pwritev (every record
write goes through it), as filling a real disk is not something a test may do."""

from __future__ import annotations

import errno
import os

import numpy as np
from test_disk_races import FILE_BYTES, items

from kvtier.metrics import Metrics
from kvtier.tiers.disk import BLOCK, DiskTier

NS = b"\x44" * 8


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def files_in(tier: DiskTier, pattern: str) -> list:
    return list(tier.root.rglob(pattern))


def test_a_full_disk_is_a_counted_miss_with_no_temp_file_and_an_honest_byte_count(tmp_path, monkeypatch):
    metrics = Metrics(["disk"])
    tier = DiskTier(tmp_path, NS, 3 * FILE_BYTES, lambda _: False, metrics)
    stored = items(NS, 5)
    assert tier.put(stored[:3]) == [True] * 3

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full)
    assert tier.put(stored[3:4]) == [False]  # made room (evicted the oldest), then the write failed
    monkeypatch.undo()

    usage = tier.usage()
    assert metrics.value("kvtier_tier_errors_total", {"tier": "disk"}) == 1
    assert usage.bytes == usage.chunks * FILE_BYTES == len(files_in(tier, "*.kvr")) * FILE_BYTES
    assert not files_in(tier, "*.tmp.*")
    assert tier.put(stored[4:]) == [True] and tier.has([stored[4].key]) == [True]
    tier.close()


def test_the_tier_holds_one_descriptor_whatever_it_does_and_none_after_close(tmp_path):
    before = open_fds()
    tier = DiskTier(tmp_path, NS, 3 * FILE_BYTES, lambda _: False, Metrics(["disk"]), o_direct="on")
    stored = items(NS, 6)
    for _ in range(20):
        tier.put(stored)
        tier.get([i.key for i in stored], [np.zeros(FILE_BYTES - BLOCK, np.uint8) for _ in stored])
    missing = stored[5].key
    tier.path_for(missing).unlink()  # deleted behind its back: a miss
    tier.get([missing], [np.zeros(FILE_BYTES - BLOCK, np.uint8)])
    tier.path_for(stored[4].key).write_bytes(b"garbage")  # corrupt: a miss, deleted
    tier.get([stored[4].key], [np.zeros(FILE_BYTES - BLOCK, np.uint8)])
    tier.clear()

    assert open_fds() - before == 1  # the namespace directory
    tier.close()
    assert open_fds() == before
