"""Tests for kvtier/record_files.py and kvtier/record_walk.py: the record-file store under the disk
tier and kvtier_server's spill, on its own (numpy buffers, no tier, no index). Every test runs with
reads into padded buffers in one C call (`native_keys.read_record`, csrc/record_read.cpp) and with
Python's five system calls; both must see the same files the same way."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from native_paths import use_native
from record_opens import spy_record_opens

from kvtier import native_keys
from kvtier.errors import ConfigError, CorruptRecord
from kvtier.keys import ChunkKey
from kvtier.record import encode_header
from kvtier.record_files import BLOCK, SUFFIX, RecordDir, align_up, file_bytes
from kvtier.record_root import temp_name
from kvtier.record_walk import LIVE_KEPT, STALE_DELETED, STALE_TEMP_S, Scan

NS = b"\x5a" * 8


@pytest.fixture(autouse=True, params=["C reads", "Python reads"])
def read_path(request, monkeypatch) -> None:
    use_native(monkeypatch, native_keys, request.param == "C reads")


def key(i: int) -> ChunkKey:
    return ChunkKey(NS, i.to_bytes(16, "little"))


def payload(i: int, n: int, offset: int = 0) -> np.ndarray:
    """`n` seeded bytes starting `offset` bytes past a page boundary (0: BLOCK aligned)."""
    buf = np.frombuffer(mmap.mmap(-1, n + offset + BLOCK), dtype=np.uint8)[offset:offset + n]
    buf[:] = np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)
    return buf


def header(k: ChunkKey, data: np.ndarray) -> bytes:
    return encode_header(k, (1, 1, 1, data.size), 6, data)  # dtype code 6: uint8


def dest(n: int, offset: int = 0) -> np.ndarray:
    return np.frombuffer(mmap.mmap(-1, n + offset + BLOCK), dtype=np.uint8)[offset:offset + n]


def write(files: RecordDir, i: int, n: int = 3 * BLOCK, offset: int = 0) -> tuple[ChunkKey, np.ndarray]:
    k, data = key(i), payload(i, n, offset)
    files.write(k, header(k, data), data)
    return k, data


def test_align_up_and_file_sizes():
    assert [align_up(n) for n in (0, 1, BLOCK, BLOCK + 1)] == [0, BLOCK, BLOCK, 2 * BLOCK]
    assert align_up(5, 8) == 8 and align_up(16, 8) == 16
    assert file_bytes(0) == BLOCK and file_bytes(100) == 2 * BLOCK and file_bytes(2 * BLOCK) == 3 * BLOCK


@pytest.mark.parametrize("o_direct", ["off", "auto"])
@pytest.mark.parametrize("n", [0, 100, 2 * BLOCK, BLOCK + 7])
@pytest.mark.parametrize("src_offset, dest_offset", [(0, 0), (8, 8)], ids=["aligned", "unaligned"])
def test_write_then_read_round_trips_bit_exact(tmp_path, o_direct, n, src_offset, dest_offset):
    files = RecordDir(tmp_path, NS, o_direct)
    assert files.o_direct == (o_direct == "auto" and RecordDir(tmp_path, NS, "auto").o_direct)
    k, data = write(files, 1, n, src_offset)

    out = dest(align_up(n) or BLOCK, dest_offset)
    got = files.read(k, out)

    assert got.payload_len == n and np.array_equal(out[:n], data)
    path = files.path(k)
    assert path == f"{tmp_path}/{NS.hex()}/{k.digest.hex()[:2]}/{k.digest.hex()}{SUFFIX}"
    assert os.path.getsize(path) == file_bytes(n)  # O_DIRECT or not: the same padded file
    files.close()


def test_o_direct_on_is_used_for_aligned_buffers_only(tmp_path, monkeypatch):
    files = RecordDir(tmp_path, NS, "auto")
    if not files.o_direct:
        pytest.skip("this file system refuses O_DIRECT")
    opened = spy_record_opens(monkeypatch)
    k, _ = write(files, 1, offset=0)
    write(files, 2, offset=8)
    files.read(k, dest(3 * BLOCK, 8))
    files.read(k, dest(3 * BLOCK))
    assert [direct for _, direct in opened] == [True, False, False, True]


def test_a_failed_write_leaves_no_partial_file_and_keeps_the_old_record(tmp_path, monkeypatch):
    files = RecordDir(tmp_path, NS, "off")
    k, old = write(files, 1)
    shard = os.path.dirname(files.path(k))

    def short(fd, bufs, offset):
        os.write(fd, b"partial")
        return 7

    monkeypatch.setattr(os, "pwritev", short)
    new = payload(2, 3 * BLOCK)
    with pytest.raises(OSError, match="short write"):
        files.write(k, header(k, new), new)
    monkeypatch.undo()

    assert os.listdir(shard) == [os.path.basename(files.path(k))]  # no temporary file left
    out = dest(3 * BLOCK)
    assert files.read(k, out).payload_len == old.size and np.array_equal(out, old)


def test_a_write_whose_rename_fails_leaves_no_file(tmp_path):
    files = RecordDir(tmp_path, NS, "off")
    k = key(3)
    os.makedirs(files.path(k))  # a directory where the record goes: rename fails

    with pytest.raises(OSError):
        write(files, 3)

    assert os.listdir(os.path.dirname(files.path(k))) == [os.path.basename(files.path(k))]


@pytest.mark.parametrize("cut", [BLOCK + 100, BLOCK, 100], ids=["payload", "header_block", "header"])
def test_a_truncated_file_is_corrupt(tmp_path, cut):
    files = RecordDir(tmp_path, NS, "off")
    k, _ = write(files, 1)
    os.truncate(files.path(k), cut)

    with pytest.raises(CorruptRecord):
        files.read(k, dest(3 * BLOCK))


def test_a_flipped_payload_byte_or_a_record_of_another_key_is_corrupt(tmp_path):
    files = RecordDir(tmp_path, NS, "off")
    k, _ = write(files, 1)
    with open(files.path(k), "r+b") as f:
        f.seek(BLOCK + 5)
        byte = f.read(1)
        f.seek(BLOCK + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptRecord):
        files.read(k, dest(3 * BLOCK))

    other, _ = write(files, 2)
    os.makedirs(os.path.dirname(files.path(key(4))), exist_ok=True)
    os.rename(files.path(other), files.path(key(4)))  # key 2's record under key 4's name
    with pytest.raises(CorruptRecord):
        files.read(key(4), dest(3 * BLOCK))


def test_a_missing_record_is_file_not_found_and_unlink_of_it_is_quiet(tmp_path):
    files = RecordDir(tmp_path, NS, "off")
    with pytest.raises(FileNotFoundError):
        files.read(key(9), dest(BLOCK))
    files.unlink(key(9))
    k, _ = write(files, 9)
    assert files.exists(k)
    files.unlink(k)
    assert not files.exists(k) and not os.path.exists(files.path(k))


def test_a_missing_shard_or_record_a_symlink_or_a_fifo_at_a_record_name_fail_cleanly(tmp_path):
    files = RecordDir(tmp_path / "d", NS, "auto")
    with pytest.raises(FileNotFoundError):  # no shard directory yet
        files.read(key(1), dest(3 * BLOCK))
    k, data = write(files, 2)
    target = files.path(k)
    os.replace(target, target + ".real")
    os.symlink(target + ".real", target)
    with pytest.raises(OSError) as link:  # O_NOFOLLOW: a symlink at the record's name is refused
        files.read(k, dest(3 * BLOCK))
    assert link.value.errno == errno.ELOOP
    os.unlink(target)
    os.mkfifo(target)
    for o_direct in ("auto", "off"):  # O_NONBLOCK: no wait for a writer; then EINVAL or ESPIPE
        with pytest.raises(OSError):
            RecordDir(tmp_path / "d", NS, o_direct).read(k, dest(3 * BLOCK))


def test_read_record_refuses_bad_arguments_before_any_system_call(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    head, payload = bytearray(BLOCK), bytearray(BLOCK)
    try:
        with pytest.raises(ValueError, match="null"):
            native_keys.read_record(fd, b"a\0b", b"x.kvr", 0, 0, head, payload)
        with pytest.raises(TypeError):
            native_keys.read_record(fd, "ab", b"x.kvr", 0, 0, head, payload)
        with pytest.raises((BufferError, TypeError)):
            native_keys.read_record(fd, b"ab", b"x.kvr", 0, 0, bytes(BLOCK), payload)
        for bad_fd in (fd + 2**32, -1, 2**70):  # (review: a huge fd was truncated to `fd` and read)
            with pytest.raises(OverflowError):
                native_keys.read_record(bad_fd, b"ab", b"x.kvr", 0, 0, head, payload)
        with pytest.raises(TypeError):
            native_keys.read_record(fd, b"ab", b"x.kvr", 1.5, "flags", head, payload)
        with pytest.raises(ValueError, match="never creates"):
            native_keys.read_record(fd, b"ab", b"x.kvr", 0, os.O_RDONLY | os.O_CREAT, head, payload)
        with pytest.raises(FileNotFoundError):
            native_keys.read_record(fd, b"ab", b"x.kvr", os.O_RDONLY | os.O_DIRECTORY, os.O_RDONLY, head,
                                    payload)
        assert os.listdir(tmp_path) == []
    finally:
        os.close(fd)


def test_a_symlinked_shard_is_never_followed(tmp_path):
    files = RecordDir(tmp_path / "d", NS, "off")
    outside = tmp_path / "outside"
    outside.mkdir()
    k = key(5)
    os.symlink(outside, os.path.dirname(files.path(k)))

    with pytest.raises(OSError):
        write(files, 5)
    with pytest.raises(OSError):
        files.read(k, dest(3 * BLOCK))
    assert list(outside.iterdir()) == []


def test_a_symlinked_namespace_directory_is_a_config_error(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / NS.hex()).symlink_to(tmp_path / "outside")
    with pytest.raises(ConfigError, match="symlink"):
        RecordDir(tmp_path / "d", NS)


def test_a_deleted_namespace_directory_is_recreated_by_the_next_write(tmp_path):
    files = RecordDir(tmp_path, NS, "off")
    write(files, 1)
    shutil.rmtree(files.root)  # an operator's rm -rf

    k, data = write(files, 2)

    out = dest(3 * BLOCK)
    assert files.read(k, out) is not None and np.array_equal(out, data)
    files.close()


def test_the_walk_finds_what_was_written_and_removes_stale_temps(tmp_path):
    files = RecordDir(tmp_path, NS, "off")
    written = {write(files, i, n)[0]: file_bytes(n) for i, n in enumerate([0, 100, 3 * BLOCK])}
    shard = os.path.dirname(files.path(key(1)))
    stale = os.path.join(shard, temp_name(os.path.basename(files.path(key(1)))))
    live = os.path.join(shard, temp_name(os.path.basename(files.path(key(2)))))  # this process: alive
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"half a record")
    hour_ago = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (hour_ago, hour_ago))
    damaged = files.path(key(7))
    os.makedirs(os.path.dirname(damaged), exist_ok=True)
    with open(damaged, "wb") as f:
        f.write(b"x" * 100)  # a record's name, a size no record has

    scan = Scan(files.root_fd, NS)
    found = scan.run()

    assert {k: size for _, k, size in found} == written
    assert not os.path.exists(stale) and os.path.exists(live) and not os.path.exists(damaged)
    assert scan.counts == {STALE_DELETED: 1, LIVE_KEPT: 1, "damaged records deleted": 1}
    assert scan.unusual()  # the damaged record is worth a warning


def test_record_files_never_import_torch(tmp_path):
    code = ("import sys; from kvtier.record_files import RecordDir; from kvtier.record_walk import Scan; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_two_writes_that_find_the_namespace_directory_deleted_both_succeed(tmp_path, monkeypatch):
    # Two writer threads (the disk tier's write-behind and a move-down) both find the namespace
    # directory gone: each mkdir of its shard fails on the old descriptor. One reopens the
    # directory; the other used to find it "still linked" (the new one) and fail its write.
    # The barrier (a patched os.mkdir) only makes both first mkdirs fail before either reopens.
    files = RecordDir(tmp_path, NS, "off")
    shutil.rmtree(files.root)
    both_failed = threading.Barrier(2, timeout=10)
    first_tries = iter(range(2))
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if next(first_tries, None) is not None:
            try:
                return real_mkdir(path, *args, **kwargs)
            finally:
                both_failed.wait()
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    errors = []

    def writer(i: int) -> None:
        try:
            write(files, i)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in (1, 2)]  # shards 01 and 02
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert errors == []
    for i in (1, 2):
        out = dest(3 * BLOCK)
        assert files.read(key(i), out) is not None and np.array_equal(out, payload(i, 3 * BLOCK))
    files.close()
