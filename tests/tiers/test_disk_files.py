"""Tests for the disk tier over kvtier/record_files.py and record_walk.py: a shared, hostile directory.

Start-up over whatever may sit in the directory, temp-file cleanup that only removes what is
provably stale, and writes that never go through a symlink. Real files, real symlinks, and real
second processes where the bug needs two (writers evicting while a third process starts up).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHUNK, seeded_kv, small_layout

from kvtier.keys import ChunkKey
from kvtier.metrics import Metrics
from kvtier.record import encode_header, tensor_bytes
from kvtier.record_root import HOST_ID
from kvtier.record_walk import LIVE_KEPT, STALE_DELETED, STALE_TEMP_S
from kvtier.tiers.base import PutItem
from kvtier.tiers.disk import BLOCK, DiskTier

NS = b"\x22" * 8
LAYOUT = small_layout()
FILE_BYTES = 2 * BLOCK
DEADLINE_S = 20.0


def make_tier(path, capacity: int = 1 << 20, metrics: Metrics | None = None) -> DiskTier:
    return DiskTier(path, NS, capacity, lambda _: False, metrics or Metrics(["disk"]))


def record(i: int) -> PutItem:
    key = ChunkKey(NS, i.to_bytes(16, "little"))
    payload = seeded_kv(LAYOUT, CHUNK, i).reshape(-1).view(torch.uint8)
    header = encode_header(key, LAYOUT.chunk_shape(CHUNK), LAYOUT.dtype, tensor_bytes(payload))
    return PutItem(key, header, payload)


def errors(tier: DiskTier) -> float:
    return tier._metrics.value("kvtier_tier_errors_total", {"tier": "disk"})


def unusual(tier: DiskTier) -> set[str]:
    """What the start-up walk met besides records and temporary files."""
    return set(tier.start_counts) - {STALE_DELETED, LIVE_KEPT}


def temp_of(final: Path, pid: int, host: str = HOST_ID) -> Path:
    """A temporary file name as a writer with `pid` on `host` makes it."""
    return final.with_name(f"{final.name}.tmp.{host}.{pid}.{os.urandom(8).hex()}")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait(timeout=30)
    return child.pid


@pytest.fixture
def live_process():
    """A second process that stays alive (blocked on its stdin) until the test ends."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield child
    child.stdin.close()
    child.wait(timeout=30)


@pytest.fixture
def stored(tmp_path):
    """A tier directory holding two good records: (directory, tier, items)."""
    tier = make_tier(tmp_path / "disk")
    items = [record(0), record(1)]
    assert tier.put(items) == [True, True]
    tier.close()
    return tmp_path / "disk", tier, items


# -- 19: start-up tolerates anything in the directory ----------------------------------------------


def dangling_symlink_record(shard: Path, outside: Path) -> None:
    (shard / f"{shard.name}{'ab' * 15}.kvr").symlink_to(outside / "gone")


def directory_named_tmp(shard: Path, outside: Path) -> None:
    (shard / "x.tmp").mkdir()


def directory_named_like_a_record(shard: Path, outside: Path) -> None:
    (shard / f"{shard.name}{'cd' * 15}.kvr").mkdir()


def fifo_named_like_a_record(shard: Path, outside: Path) -> None:
    os.mkfifo(shard / f"{shard.name}{'ef' * 15}.kvr")


def record_too_short_to_be_one(shard: Path, outside: Path) -> None:
    (shard / f"{shard.name}{'01' * 15}.kvr").write_bytes(b"x")


def unused_shard(root: Path) -> Path:
    return next(root / f"{i:02x}" for i in range(256) if not (root / f"{i:02x}").exists())


def file_where_a_shard_should_be(shard: Path, outside: Path) -> None:
    (shard.parent / "zz").write_bytes(b"")  # not hex: a foreign name
    unused_shard(shard.parent).write_bytes(b"")


def symlinked_shard(shard: Path, outside: Path) -> None:
    (outside / "shard").mkdir()
    unused_shard(shard.parent).symlink_to(outside / "shard")


def foreign_files(shard: Path, outside: Path) -> None:
    (shard / "README").write_text("not ours")
    (shard.parent / "notes.txt").write_text("not ours")


ODD_ENTRIES = [dangling_symlink_record, directory_named_tmp, directory_named_like_a_record,
               fifo_named_like_a_record, record_too_short_to_be_one, file_where_a_shard_should_be,
               symlinked_shard, foreign_files]


@pytest.mark.parametrize("odd", ODD_ENTRIES, ids=lambda f: f.__name__)
def test_start_up_skips_dangling_symlinks_tmp_directories_and_other_odd_entries(stored, tmp_path, odd):
    """Bug: a dangling symlink made start-up raise FileNotFoundError, a directory named `x.tmp`
    IsADirectoryError; other non-files were indexed as records."""
    path, tier, items = stored
    outside = tmp_path / "outside"
    outside.mkdir()
    odd(tier.path_for(items[0].key).parent, outside)

    fresh = make_tier(path)  # must not raise

    assert fresh.has([item.key for item in items]) == [True, True]
    assert fresh.usage().chunks == 2 and fresh.usage().bytes == 2 * FILE_BYTES
    assert unusual(fresh)
    dests = [torch.empty(FILE_BYTES, dtype=torch.uint8) for _ in items]
    assert all(h is not None for h in fresh.get([item.key for item in items], dests))
    assert errors(fresh) == 0


WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from kvtier.dtypes import CODES_BY_NAME
    from kvtier.keys import ChunkKey
    from kvtier.metrics import Metrics
    from kvtier.record import encode_header
    from kvtier.tiers.base import PutItem
    from kvtier.tiers.disk import DiskTier

    path, ns, seed, stop = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    metrics = Metrics(["disk"])
    # 32 files of 8 KiB: from the 33rd put on, every put evicts (unlinks) one of this writer's files.
    tier = DiskTier(path, ns, 32 * 8192, lambda _: False, metrics)
    payload = np.arange(4096, dtype=np.int32).astype(np.uint8) ^ seed  # numpy: no torch import
    puts = 0
    print("ready", flush=True)
    while puts % 64 or not os.path.exists(stop):
        key = ChunkKey(ns, (seed << 64 | puts).to_bytes(16, "little"))
        header = encode_header(key, (2, 1, 16, 64), CODES_BY_NAME["float16"], payload)
        tier.put([PutItem(key, header, payload)])
        puts += 1
    print(puts, int(metrics.value("kvtier_tier_errors_total", {"tier": "disk"})), flush=True)
""")


class BusyWriters:
    """Two processes putting (and so evicting) records in one directory as fast as they can."""

    def __init__(self, path: Path):
        self.stop = path.parent / "stop-writers"
        self.procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), NS.hex(), str(seed),
                                        str(self.stop)], stdout=subprocess.PIPE, text=True)
                      for seed in (1, 2)]
        for proc in self.procs:
            assert proc.stdout.readline() == "ready\n"

    def finish(self) -> list[tuple[int, int]]:
        """Stop both; (puts, write errors) of each."""
        self.stop.touch()
        results = []
        for proc in self.procs:
            out, _ = proc.communicate(timeout=DEADLINE_S)
            assert proc.returncode == 0
            puts, errs = out.split()
            results.append((int(puts), int(errs)))
        return results


@pytest.fixture
def busy_writers(tmp_path):
    writers = BusyWriters(tmp_path / "disk")
    yield writers
    if not writers.stop.exists():
        writers.finish()


def start_up_repeatedly(path: Path, times: int = 150, vanishing_crashes_ok: bool = False) -> list[DiskTier]:
    """Open the directory `times` times (bounded by a deadline), as a third process starting up
    would; the tiers' capacity is large, so they never evict the writers' files themselves.
    `vanishing_crashes_ok`: count a start-up that crashed on a vanished record as an opening (the
    bug the test before pins down) so that a test can look at another bug alone."""
    opened, deadline = [], time.monotonic() + DEADLINE_S
    while len(opened) < times and time.monotonic() < deadline:
        try:
            tier = make_tier(path, capacity=1 << 30)
        except FileNotFoundError:
            if not vanishing_crashes_ok:
                raise
            opened.append(None)
            continue
        tier.close()
        opened.append(tier)
    return opened


def test_start_up_tolerates_records_vanishing_while_two_processes_write_and_evict(busy_writers, tmp_path):
    """Bug: a record another process evicted between the directory listing and its stat made
    start-up raise FileNotFoundError (15 of 281 openings failed while two processes wrote)."""
    opened = start_up_repeatedly(tmp_path / "disk")  # raises on HEAD

    results = busy_writers.finish()
    assert len(opened) >= 20
    assert all(puts > 32 for puts, _ in results)  # both writers were evicting all along
    assert all(unusual(tier) <= {"vanished skipped"} for tier in opened)


def test_a_record_with_an_empty_payload_survives_a_restart(tmp_path):
    """Bug: start-up deleted every record file under two blocks as damaged, but a record with an
    empty payload (kvtier_server stores 0-byte values, and spills them here) is one header block:
    each restart of the server lost it."""
    tier = make_tier(tmp_path / "disk")
    key = ChunkKey(NS, bytes(16))
    empty = np.empty(0, dtype=np.uint8)
    assert tier.put([PutItem(key, encode_header(key, (2, 1, 0, 64), LAYOUT.dtype, empty), empty)]) == [True]
    assert tier.path_for(key).stat().st_size == BLOCK
    tier.close()

    fresh = make_tier(tmp_path / "disk")

    assert fresh.has([key]) == [True] and fresh.usage().bytes == BLOCK
    assert not unusual(fresh)
    header = fresh.get([key], [np.empty(0, dtype=np.uint8)])[0]
    assert header is not None and header.payload_len == 0 and header.key == key


# -- 20: the temp-file cleanup removes only provably stale files, never through a symlink ----------


def test_start_up_never_deletes_a_live_writers_temp_files(busy_writers, tmp_path):
    """Bug: start-up deleted every `*.tmp*` it saw, including those other live processes were
    writing, whose renames then failed (214 and 226 write errors in 6 s while a replica restarted)."""
    opened = start_up_repeatedly(tmp_path / "disk", vanishing_crashes_ok=True)

    results = busy_writers.finish()
    assert len(opened) >= 20 and all(puts > 32 for puts, _ in results)
    assert [errs for _, errs in results] == [0, 0]
    assert all(tier is not None for tier in opened)


def test_start_up_keeps_live_and_foreign_temp_files_and_deletes_stale_ones(stored, live_process):
    path, tier, items = stored
    final = tier.path_for(items[0].key)
    live = temp_of(final, live_process.pid)
    dead = temp_of(final, dead_pid())
    old_live = temp_of(final, live_process.pid)
    other_host = temp_of(final, dead_pid(), host="0badc0de" if HOST_ID != "0badc0de" else "0badc0df")
    probe = path / NS.hex() / f".probe.tmp.{HOST_ID}.{dead_pid()}.{'0' * 16}"
    for file in (live, dead, old_live, other_host, probe):
        file.write_bytes(b"half a record")
    hour_ago = time.time() - STALE_TEMP_S - 60
    os.utime(old_live, (hour_ago, hour_ago))

    fresh = make_tier(path)

    assert live.exists() and other_host.exists()  # a live writer's; another host's, not old yet
    assert not dead.exists() and not old_live.exists() and not probe.exists()
    assert fresh.start_counts["stale temp files deleted"] == 3
    assert fresh.start_counts["live temp files kept"] == 2
    assert not unusual(fresh)
    assert fresh.usage().chunks == 2


def test_temp_cleanup_never_follows_a_symlinked_shard_directory(stored, tmp_path):
    """Bug: the cleanup walked into a symlinked subdirectory and deleted `notes.tmp.txt` there,
    outside the cache."""
    path, tier, _ = stored
    outside = tmp_path / "outside"
    outside.mkdir()
    notes = outside / "notes.tmp.txt"
    notes.write_text("mine")
    stale_looking = temp_of(outside / f"ab{'00' * 15}.kvr", dead_pid())
    stale_looking.write_bytes(b"x")
    unused_shard(path / NS.hex()).symlink_to(outside, target_is_directory=True)

    fresh = make_tier(path)

    assert notes.read_text() == "mine" and stale_looking.exists()
    assert fresh.start_counts["symlinks skipped"] == 1
    assert fresh.usage().chunks == 2


def test_a_symlinked_temp_file_is_neither_followed_nor_deleted(stored, tmp_path):
    path, tier, items = stored
    target = tmp_path / "precious"
    target.write_text("keep")
    os.utime(target, (0, 0))  # as old as can be: only the link's own age could count
    link = temp_of(tier.path_for(items[0].key), dead_pid())
    link.symlink_to(target)

    fresh = make_tier(path)

    assert target.read_text() == "keep" and link.is_symlink()
    assert fresh.start_counts["symlinks skipped"] == 1


# -- 21: nothing is written, read or created through a symlink -------------------------------------


def test_a_symlink_planted_at_the_temp_name_cannot_redirect_a_write(tmp_path, monkeypatch):
    """Bug: temp files were opened O_CREAT|O_TRUNC at a predictable name, so a symlink planted
    there got a file outside the cache overwritten."""
    tier = make_tier(tmp_path / "disk")
    item = record(3)
    victim = tmp_path / "victim"
    victim.write_text("do not overwrite")
    final = tier.path_for(item.key)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The name the old code would use, and, to prove the open itself refuses, a name this writer is
    # made to pick (the real one carries a random token nobody can guess).
    predictable = f"{final}.tmp.{os.getpid()}.{threading.get_ident()}"
    os.symlink(victim, predictable)
    forced = f"{final}.tmp.{HOST_ID}.{os.getpid()}.{'0' * 16}"
    os.symlink(victim, forced)
    monkeypatch.setattr("kvtier.record_files.temp_name", lambda name: os.path.basename(forced), raising=False)

    assert tier.put([item]) == [False]  # the forced name is taken: a counted miss, never a redirect

    assert victim.read_text() == "do not overwrite"
    assert not final.exists() and tier.usage().bytes == 0 and errors(tier) == 1
    monkeypatch.undo()
    assert tier.put([item]) == [True] and final.is_file() and not final.is_symlink()
    assert victim.read_text() == "do not overwrite"


def test_a_write_never_goes_through_a_symlinked_shard_directory(tmp_path):
    tier = make_tier(tmp_path / "disk")
    item = record(4)
    outside = tmp_path / "outside"
    outside.mkdir()
    tier.path_for(item.key).parent.symlink_to(outside, target_is_directory=True)

    assert tier.put([item]) == [False]

    assert list(outside.iterdir()) == []
    assert tier.usage().chunks == 0 and tier.usage().bytes == 0 and errors(tier) == 1


def test_a_record_symlinked_to_a_file_outside_is_neither_indexed_nor_read(stored, tmp_path):
    path, tier, items = stored
    outside = tmp_path / "outside.kvr"
    final = tier.path_for(items[1].key)
    os.rename(final, outside)  # a valid record, now outside the cache
    final.symlink_to(outside)

    fresh = make_tier(path)

    assert fresh.has([items[0].key, items[1].key]) == [True, False]
    assert fresh.start_counts["symlinks skipped"] == 1
    # And a link that appears after start-up is a miss on read (ELOOP), dropped from the index.
    other = fresh.path_for(items[0].key)
    os.rename(other, tmp_path / "outside0.kvr")
    other.symlink_to(tmp_path / "outside0.kvr")
    assert fresh.get([items[0].key], [torch.empty(FILE_BYTES, dtype=torch.uint8)]) == [None]
    assert fresh.has([items[0].key]) == [False] and fresh.usage().bytes == 0
    assert (tmp_path / "outside0.kvr").stat().st_size == FILE_BYTES  # the outside file untouched


def test_a_write_replaces_a_symlink_at_the_record_name_without_following_it(tmp_path):
    tier = make_tier(tmp_path / "disk")
    item = record(5)
    victim = tmp_path / "victim"
    victim.write_text("do not overwrite")
    final = tier.path_for(item.key)
    final.parent.mkdir(parents=True, exist_ok=True)
    final.symlink_to(victim)

    assert tier.put([item]) == [True]

    assert victim.read_text() == "do not overwrite"
    assert final.is_file() and not final.is_symlink()
    assert tier.get([item.key], [torch.empty(FILE_BYTES, dtype=torch.uint8)])[0] is not None


def test_the_start_up_probe_cannot_be_redirected_by_a_planted_symlink(tmp_path):
    """Bug: the O_DIRECT probe opened `.o_direct_probe.<pid>` with O_CREAT and no O_NOFOLLOW, so
    a symlink planted there created a file outside the cache."""
    root = tmp_path / "disk" / NS.hex()
    root.mkdir(parents=True)
    target = tmp_path / "created-outside"
    (root / f".o_direct_probe.{os.getpid()}").symlink_to(target)

    make_tier(tmp_path / "disk")

    assert not target.exists()
