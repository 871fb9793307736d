"""Tests for kvtier/tiers/disk.py: round trips (tensor and numpy buffers), O_DIRECT modes, bad records,
restart, capacity, I/O errors.

Real files in `tmp_path`. Engine-level tests store, `flush()` (background writes land), then
`clear("cpu")` or `move(..., "disk")`, so the retrieve that follows can only be served from disk.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens, small_layout
from record_opens import spy_record_opens

from kvtier.dtypes import CODES_BY_NAME
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.metrics import Metrics
from kvtier.record import encode_header, tensor_bytes
from kvtier.record_root import HOST_ID, probe_o_direct
from kvtier.tiers.base import PutItem
from kvtier.tiers.disk import BLOCK, DiskTier

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
FILE_BYTES = 2 * BLOCK  # one fp16 chunk of the small layout: 4 KiB header block + 4 KiB payload


def disk_stats(engine) -> dict:
    return engine.stats()["tiers"]["disk"]


def stored_on_disk(make_engine, layout: KVLayout, num_tokens: int, seed: int = 7, **overrides):
    """An engine whose only copy of one seeded prompt is on disk: (engine, disk tier, tokens, kv)."""
    engine = make_engine("cpu_disk", layout, **overrides)
    tokens, kv = seeded_tokens(num_tokens, seed), seeded_kv(layout, num_tokens, seed)
    engine.store(tokens, kv)
    assert engine.flush(timeout=10)
    engine.clear("cpu")
    assert engine.stats()["tiers"]["cpu"]["chunks"] == 0
    return engine, engine.storage.lower[0], tokens, kv


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_disk_round_trip_is_bit_exact(make_engine, dtype):
    layout = small_layout(dtype)
    engine, disk, tokens, kv = stored_on_disk(make_engine, layout, 4 * CHUNK)
    assert disk.usage().chunks == 4

    got, n = engine.retrieve(tokens)

    assert n == 4 * CHUNK and got.dtype == dtype
    assert torch.equal(got, kv)
    stats = disk_stats(engine)
    assert (stats["hits"], stats["misses"], stats["corrupt"]) == (4, 0, 0)
    assert stats["bytes_read"] == 4 * layout.chunk_bytes(CHUNK)
    assert engine.stats()["promotions"] == 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_move_to_disk_then_retrieve_reads_from_disk(make_engine, dtype):
    layout = small_layout(dtype)
    engine = make_engine("cpu_disk", layout)
    tokens, kv = seeded_tokens(3 * CHUNK, 8), seeded_kv(layout, 3 * CHUNK, 8)
    engine.store(tokens, kv)
    engine.flush()

    assert engine.move(tokens, "disk") == 3
    assert engine.stats()["tiers"]["cpu"]["chunks"] == 0
    got, n = engine.retrieve(tokens)

    assert n == 3 * CHUNK and torch.equal(got, kv)
    assert disk_stats(engine)["hits"] == 3


@pytest.mark.parametrize("save_partial", [True, False], ids=["partial_on", "partial_off"])
def test_partial_last_chunk_round_trips_through_disk_only_when_configured(make_engine, layout, save_partial):
    length = 2 * CHUNK + 5
    engine, disk, tokens, kv = stored_on_disk(make_engine, layout, length,
                                              save_partial_chunks=str(save_partial).lower())
    expected_n = length if save_partial else 2 * CHUNK
    assert disk.usage().chunks == (3 if save_partial else 2)

    got, n = engine.retrieve(tokens)

    assert n == expected_n and torch.equal(got, kv[:, :, :expected_n])
    assert disk_stats(engine)["hits"] == (3 if save_partial else 2)


def o_direct_supported(path) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return probe_o_direct(fd, path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("o_direct", ["off", "auto"])
def test_o_direct_modes_round_trip(make_engine, tmp_path, o_direct):
    # head_dim 24: a 16-token fp16 chunk is 6 KiB, so O_DIRECT writes need the padded-tail path, and
    # the 5-token partial chunk is smaller than one block.
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=24, dtype=torch.float16)
    length = 3 * CHUNK + 5
    engine, disk, tokens, kv = stored_on_disk(make_engine, layout, length, disk__o_direct=o_direct,
                                              save_partial_chunks="true")
    assert disk.o_direct is (o_direct == "auto" and o_direct_supported(tmp_path))
    for path in tmp_path.glob("disk/**/*.kvr"):
        assert path.stat().st_size % BLOCK == 0  # the same file format whichever way it was written

    got, n = engine.retrieve(tokens)

    assert n == length and torch.equal(got, kv)
    stats = disk_stats(engine)
    assert stats["hits"] == 4 and stats["bytes_written"] == stats["bytes_read"] == layout.chunk_bytes(length)


# -- buffers: torch tensors or numpy arrays ------------------------------------------------------


def array_at(n: int, offset: int) -> np.ndarray:
    """`n` bytes starting `offset` bytes past a 4 KiB boundary: over-allocated, then sliced."""
    raw = np.zeros(n + offset + BLOCK, dtype=np.uint8)
    start = -raw.ctypes.data % BLOCK + offset
    return raw[start: start + n]


def numpy_record(i: int, n: int, offset: int = 0) -> PutItem:
    """A record of `n` seeded bytes whose payload is a numpy array `offset` bytes past alignment."""
    key = ChunkKey(RECORD_NS, i.to_bytes(16, "little"))
    payload = array_at(n, offset)
    payload[:] = np.random.default_rng(i).integers(0, 256, n, dtype=np.uint8)
    return PutItem(key, encode_header(key, (1, 1, 1, n), CODES_BY_NAME["uint8"], payload), payload)


def padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK  # a read destination holds the payload's whole blocks


@pytest.fixture
def direct_opens(monkeypatch) -> list[tuple[str, bool]]:
    """(record file name, opened with O_DIRECT) for every record file opened during the test."""
    return spy_record_opens(monkeypatch)


@pytest.mark.parametrize("o_direct", ["off", "auto"])
@pytest.mark.parametrize("src_offset, dest_offset", [(0, 0), (8, 0), (0, 8), (8, 8)],
                         ids=["aligned", "src_unaligned", "dest_unaligned", "unaligned"])
@pytest.mark.parametrize("n", [2 * BLOCK, BLOCK + 2048, 100], ids=["whole_blocks", "tail", "small"])
def test_numpy_buffers_round_trip_with_o_direct_exactly_where_aligned(tmp_path, o_direct, src_offset,
                                                                      dest_offset, n, direct_opens):
    tier = DiskTier(tmp_path, RECORD_NS, 1 << 20, lambda _: False, Metrics(["disk"]), o_direct=o_direct)
    item = numpy_record(1, n, src_offset)
    dest = array_at(padded(n), dest_offset)

    assert tier.put([item]) == [True]
    header = tier.get([item.key], [dest])[0]

    assert header is not None and header.payload_len == n and header.key == item.key
    assert np.array_equal(dest[:n], item.payload)
    assert tier.path_for(item.key).stat().st_size == BLOCK + padded(n)  # the one file format
    assert tier.usage().bytes == BLOCK + padded(n)
    assert tier.o_direct is (o_direct == "auto" and o_direct_supported(tmp_path))
    assert [flag for _, flag in direct_opens] == [tier.o_direct and src_offset == 0,
                                                  tier.o_direct and dest_offset == 0]


@pytest.mark.parametrize("o_direct", ["off", "auto"])
@pytest.mark.parametrize("n", [100, BLOCK + 2048], ids=["small", "tail"])
def test_a_destination_exactly_the_payload_size_reads_the_record_not_drops_it(tmp_path, o_direct, n):
    # Regression: a buffer just as large as the payload (what the contract allows) was read only in
    # whole blocks, so the record looked truncated and was deleted as corrupt.
    tier = DiskTier(tmp_path, RECORD_NS, 1 << 20, lambda _: False, Metrics(["disk"]), o_direct=o_direct)
    item = numpy_record(1, n)
    tier.put([item])
    dest = array_at(n, 0)

    header = tier.get([item.key], [dest])[0]

    assert header is not None and np.array_equal(dest, item.payload)
    assert tier.has([item.key]) == [True]


def test_tensors_and_numpy_arrays_read_each_others_records(tmp_path, layout):
    tier = make_tier(tmp_path)
    from_tensor, from_array = record(1, layout), numpy_record(2, FILE_BYTES - BLOCK)
    tier.put([from_tensor, from_array])

    into_array, into_tensor = array_at(BLOCK, 0), torch.empty(BLOCK, dtype=torch.uint8)
    headers = tier.get([from_tensor.key, from_array.key], [into_array, into_tensor])

    assert all(h is not None for h in headers)
    assert np.array_equal(into_array, from_tensor.payload.numpy())
    assert np.array_equal(into_tensor.numpy(), from_array.payload)


WRONG_BUFFERS = {
    "fp16_tensor": torch.zeros(BLOCK // 2, dtype=torch.float16),
    "strided_tensor": torch.zeros(2 * BLOCK, dtype=torch.uint8)[::2],
    "2d_array": np.zeros((2, BLOCK // 2), dtype=np.uint8),
    "int32_array": np.zeros(BLOCK // 4, dtype=np.int32),
    "bytearray": bytearray(BLOCK),
}


@pytest.mark.parametrize("wrong", WRONG_BUFFERS.values(), ids=WRONG_BUFFERS.keys())
def test_a_buffer_that_is_not_contiguous_uint8_bytes_is_refused_before_any_io(tmp_path, layout, wrong):
    tier = make_tier(tmp_path)
    good = record(1, layout)
    tier.put([good])

    with pytest.raises(ValueError, match="1-D contiguous uint8"):
        tier.put([PutItem(good.key, good.header, wrong)])
    with pytest.raises(ValueError, match="1-D contiguous uint8"):
        tier.get([good.key, good.key], [torch.empty(BLOCK, dtype=torch.uint8), wrong])

    assert tier.usage().chunks == 1 and tier.usage().bytes == FILE_BYTES  # nothing reserved or lost
    assert tier.get([good.key], [array_at(BLOCK, 0)])[0] is not None


# -- bad records are misses, counted and removed -------------------------------------------------


def flip_payload_byte(path, other):
    with open(path, "r+b") as fh:
        fh.seek(BLOCK + 100)
        byte = fh.read(1)
        fh.seek(BLOCK + 100)
        fh.write(bytes([byte[0] ^ 0x01]))


def flip_header_byte(path, other):
    with open(path, "r+b") as fh:
        fh.seek(20)  # inside the shape fields, which the checksum covers
        byte = fh.read(1)
        fh.seek(20)
        fh.write(bytes([byte[0] ^ 0x80]))


def truncate_mid_payload(path, other):
    os.truncate(path, BLOCK + 1000)


def truncate_to_header(path, other):
    os.truncate(path, BLOCK)


def zero_length(path, other):
    os.truncate(path, 0)


def garbage(path, other):
    path.write_bytes(torch.randint(0, 256, (FILE_BYTES,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def wrong_key(path, other):
    shutil.copyfile(other, path)  # a valid record, but of another chunk


DAMAGE = [flip_payload_byte, flip_header_byte, truncate_mid_payload, truncate_to_header, zero_length,
          garbage, wrong_key]


@pytest.mark.parametrize("o_direct", ["off", "auto"])
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_bad_record_is_a_counted_miss_and_is_deleted(make_engine, layout, damage, o_direct):
    engine, disk, tokens, kv = stored_on_disk(make_engine, layout, 4 * CHUNK, disk__o_direct=o_direct)
    keys = engine.db.keys(tokens)
    bad = disk.path_for(keys[2])
    damage(bad, disk.path_for(keys[0]))

    got, n = engine.retrieve(tokens)

    assert n == 2 * CHUNK  # the good prefix only, never the damaged chunk or anything after it
    assert torch.equal(got, kv[:, :, : 2 * CHUNK])
    assert disk_stats(engine)["corrupt"] == 1
    assert not bad.exists()
    assert disk.has(keys) == [True, True, False, True]
    assert disk.usage().chunks == 3 and disk.usage().bytes == 3 * FILE_BYTES
    assert engine.lookup(tokens) == 2 * CHUNK
    assert disk.path_for(keys[0]).exists()  # the source of the wrong-key copy is untouched


def test_bad_record_in_the_first_chunk_is_a_full_miss(make_engine, layout):
    engine, disk, tokens, kv = stored_on_disk(make_engine, layout, 2 * CHUNK)
    keys = engine.db.keys(tokens)
    flip_payload_byte(disk.path_for(keys[0]), None)

    got, n = engine.retrieve(tokens)

    assert n == 0 and got.shape[2] == 0
    assert disk_stats(engine)["corrupt"] == 1
    assert engine.stats()["pool"]["used_slabs"] == 0  # the read slabs went back to the pool


# -- restart: the index is rebuilt from the directory ----------------------------------------------


RECORD_NS = b"\x11" * 8  # the namespace of the hand-made records below


def make_tier(path, capacity: int = 1 << 20, pinned=frozenset(), metrics: Metrics | None = None,
              namespace: bytes = RECORD_NS) -> DiskTier:
    return DiskTier(path, namespace, capacity, pinned.__contains__, metrics or Metrics(["cpu", "disk"]))


def test_index_is_rebuilt_from_the_directory_at_start(make_engine, layout, tmp_path):
    engine, disk, tokens, kv = stored_on_disk(make_engine, layout, 3 * CHUNK)
    keys = engine.db.keys(tokens)
    engine.close()

    fresh = make_tier(tmp_path / "disk", namespace=engine.db.namespace_digest)

    assert fresh.has(keys) == [True, True, True]
    assert fresh.usage().chunks == 3 and fresh.usage().bytes == 3 * FILE_BYTES
    dest = torch.empty(FILE_BYTES, dtype=torch.uint8)
    header = fresh.get([keys[1]], [dest])[0]
    assert header is not None and header.key == keys[1]
    chunk = dest[: header.payload_len].view(layout.dtype).view(header.shape)
    assert torch.equal(chunk, kv[:, :, CHUNK: 2 * CHUNK])


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait(timeout=30)
    return child.pid


def test_stale_tmp_files_are_deleted_at_start(make_engine, layout, tmp_path):
    engine, disk, tokens, _ = stored_on_disk(make_engine, layout, 2 * CHUNK)
    good = disk.path_for(engine.db.keys(tokens)[0])
    stale = good.with_name(f"{good.name}.tmp.{HOST_ID}.{dead_pid()}.{'0' * 16}")  # a dead writer's
    stale.write_bytes(b"half a record")
    junk = good.parent / "README"
    junk.write_text("not ours")

    fresh = make_tier(tmp_path / "disk", namespace=engine.db.namespace_digest)

    assert not stale.exists()
    assert good.exists() and junk.exists()  # foreign names are neither indexed nor deleted
    assert fresh.usage().chunks == 2


def test_rebuild_evicts_oldest_files_beyond_a_smaller_capacity(make_engine, layout, tmp_path):
    engine, disk, tokens, _ = stored_on_disk(make_engine, layout, 6 * CHUNK)
    keys = engine.db.keys(tokens)
    for age, key in enumerate(keys):  # chunk 0 is the oldest
        os.utime(disk.path_for(key), ns=(10**18 + age * 10**9, 10**18 + age * 10**9))
    engine.close()

    fresh = make_tier(tmp_path / "disk", capacity=3 * FILE_BYTES, namespace=engine.db.namespace_digest)

    assert fresh.has(keys) == [False, False, False, True, True, True]
    assert [disk.path_for(k).exists() for k in keys] == [False, False, False, True, True, True]
    assert fresh.usage().bytes == 3 * FILE_BYTES


# -- capacity ------------------------------------------------------------------------------------


def record(i: int, layout: KVLayout, num_tokens: int = CHUNK) -> PutItem:
    key = ChunkKey(RECORD_NS, i.to_bytes(16, "little"))
    payload = seeded_kv(layout, num_tokens, i).reshape(-1).view(torch.uint8)
    header = encode_header(key, layout.chunk_shape(num_tokens), layout.dtype, tensor_bytes(payload))
    return PutItem(key, header, payload)


def test_a_record_another_process_wrote_is_found_by_a_lookup_up_to_the_first_missing_file(tmp_path, layout):
    """Two tiers on one directory, as a vLLM scheduler process and its worker: what the writer
    stores after the reader started is found by the reader's lookup (adopted into its index) and
    read back; adoption stops at the first key with no file (a prefix: one stat per miss)."""
    writer, reader = make_tier(tmp_path), make_tier(tmp_path)
    items = [record(i, layout) for i in range(4)]
    assert writer.put([items[0], items[1], items[3]]) == [True, True, True]
    keys = [item.key for item in items]
    assert reader.has(keys) == [True, True, False, False]  # item 3 is on disk, past the gap
    assert reader.usage().chunks == 2
    dest = torch.empty(FILE_BYTES - BLOCK, dtype=torch.uint8)
    assert reader.get([keys[1]], [dest])[0] is not None and torch.equal(dest, items[1].payload)
    assert reader.has(keys[3:]) == [True] and reader.usage().chunks == 3


def test_adopted_records_past_the_capacity_are_forgotten_never_deleted(tmp_path, layout):
    writer, reader = make_tier(tmp_path), make_tier(tmp_path, capacity=2 * FILE_BYTES)
    items = [record(i, layout) for i in range(4)]
    assert writer.put(items) == [True] * 4
    assert reader.has([item.key for item in items]) == [True] * 4
    assert reader.usage().chunks == 2 and reader.usage().bytes == 2 * FILE_BYTES
    assert all(writer.path_for(item.key).is_file() for item in items)  # the writer's files stay
    assert reader.has([items[0].key]) == [True]  # forgotten, found again


def test_capacity_evicts_oldest_files_but_never_pinned_ones(tmp_path, layout):
    items = [record(i, layout) for i in range(7)]
    metrics = Metrics(["cpu", "disk"])
    tier = make_tier(tmp_path, capacity=4 * FILE_BYTES, pinned={items[0].key}, metrics=metrics)

    for item in items:
        assert tier.put([item]) == [True]
        assert tier.usage().bytes <= tier.capacity_bytes

    # LRU among the unpinned: 1, 2, 3 went to make room for 4, 5, 6; the pinned 0 stayed.
    assert tier.has([item.key for item in items]) == [True, False, False, False, True, True, True]
    assert sorted(p.name for p in tmp_path.glob("**/*.kvr")) == sorted(
        tier.path_for(items[i].key).name for i in (0, 4, 5, 6))
    assert metrics.value("kvtier_tier_evictions_total", {"tier": "disk"}) == 3


def test_a_read_refreshes_recency_so_the_read_file_survives(tmp_path, layout):
    items = [record(i, layout) for i in range(3)]
    tier = make_tier(tmp_path, capacity=2 * FILE_BYTES)
    tier.put(items[:2])
    assert tier.get([items[0].key], [torch.empty(FILE_BYTES, dtype=torch.uint8)])[0] is not None

    tier.put([items[2]])

    assert tier.has([item.key for item in items]) == [True, False, True]


def test_a_tier_full_of_pinned_files_rejects_and_counts(tmp_path, layout):
    items = [record(i, layout) for i in range(3)]
    metrics = Metrics(["cpu", "disk"])
    tier = make_tier(tmp_path, capacity=2 * FILE_BYTES, pinned={items[0].key, items[1].key}, metrics=metrics)
    assert tier.put(items[:2]) == [True, True]

    assert tier.put([items[2]]) == [False]

    assert tier.has([item.key for item in items]) == [True, True, False]
    assert metrics.value("kvtier_tier_rejected_total", {"tier": "disk"}) == 1
    assert tier.usage().bytes == 2 * FILE_BYTES


def test_engine_disk_capacity_is_bounded_and_keeps_pinned_prompts(make_engine, layout):
    engine = make_engine("cpu_disk", disk__capacity=f"{8 * FILE_BYTES}B")  # 8 files
    disk = engine.storage.lower[0]
    keep_tokens, keep_kv = seeded_tokens(2 * CHUNK, 500), seeded_kv(layout, 2 * CHUNK, 500)
    engine.store(keep_tokens, keep_kv)
    engine.flush()
    assert engine.pin(keep_tokens) == 2

    for seed in range(10):  # 20 more chunks through an 8-file disk tier
        engine.store(seeded_tokens(2 * CHUNK, seed), seeded_kv(layout, 2 * CHUNK, seed))
        engine.flush()
        assert disk.usage().bytes <= disk.capacity_bytes

    stats = disk_stats(engine)
    assert stats["chunks"] == 8 and stats["evictions"] == 22 - 8
    assert disk.has(engine.db.keys(keep_tokens)) == [True, True]
    assert len(list(disk.root.glob("**/*.kvr"))) == 8
    engine.clear("cpu")
    got, n = engine.retrieve(keep_tokens)
    assert n == 2 * CHUNK and torch.equal(got, keep_kv)
    assert disk_stats(engine)["hits"] == 2


# -- a failing medium degrades to a miss ---------------------------------------------------------


def test_file_deleted_behind_the_tiers_back_is_a_miss(make_engine, layout):
    engine, disk, tokens, kv = stored_on_disk(make_engine, layout, 3 * CHUNK)
    keys = engine.db.keys(tokens)
    disk.path_for(keys[1]).unlink()

    got, n = engine.retrieve(tokens)

    assert n == CHUNK and torch.equal(got, kv[:, :, :CHUNK])
    assert disk.has(keys) == [True, False, True]  # the index forgot the missing file
    assert engine.lookup(tokens) == CHUNK
    assert disk_stats(engine)["corrupt"] == 0


def replace_file_with_directory(disk: DiskTier, key: ChunkKey) -> None:
    path = disk.path_for(key)
    path.unlink()
    path.mkdir()  # open() succeeds, reading fails with EISDIR (even as root, unlike chmod)


def replace_parent_with_file(disk: DiskTier, key: ChunkKey) -> None:
    parent = disk.path_for(key).parent
    shutil.rmtree(parent)
    parent.write_bytes(b"")  # open() of anything below fails with ENOTDIR


@pytest.mark.parametrize("breakage", [replace_file_with_directory, replace_parent_with_file],
                         ids=lambda f: f.__name__)
def test_io_error_is_a_counted_miss_not_an_exception(make_engine, layout, breakage):
    engine, disk, tokens, kv = stored_on_disk(make_engine, layout, 3 * CHUNK)
    keys = engine.db.keys(tokens)
    breakage(disk, keys[1])
    broken = [not disk.path_for(k).is_file() for k in keys]
    first_bad = broken.index(True)  # chunk 0 can share chunk 1's 2-hex directory

    got, n = engine.retrieve(tokens)

    assert n == first_bad * CHUNK and torch.equal(got, kv[:, :, :n])
    assert disk_stats(engine)["errors"] >= 1
    assert disk_stats(engine)["corrupt"] == 0


# -- regressions ---------------------------------------------------------------------------------


def test_concurrent_writes_of_one_key_reserve_its_bytes_once(tmp_path, layout):
    """Bug: two writers of one key (a write-through job racing `move(tokens, "disk")`) each reserved
    the file's bytes, and only one reservation was ever released, so `usage().bytes` drifted up and
    the tier evicted early and never returned to zero after a clear."""
    tier = make_tier(tmp_path)
    item = record(0, layout)
    write_file = tier._files.write

    def second_writer_lands_first(key: ChunkKey, header: bytes, payload) -> None:
        tier._files.write = write_file  # interleave exactly once: the same put, mid-flight
        assert tier.put([PutItem(key, header, payload)]) == [True]
        write_file(key, header, payload)

    tier._files.write = second_writer_lands_first

    assert tier.put([item]) == [True]
    assert tier.usage().chunks == 1 and tier.usage().bytes == FILE_BYTES
    tier.clear()
    assert tier.usage().bytes == 0 and not list(tmp_path.glob("**/*.kvr"))


def test_disk_tier_moves_records_without_importing_torch(tmp_path):
    """Bug (issue 8, item 16): `kvtier_server` imported torch (~270 MiB RSS at rest) only because
    DiskTier, its spill store, took torch tensors. A fresh process now puts and gets records with
    numpy buffers (aligned, as from an mmap, and unaligned, as from a bytearray) and never loads it."""
    script = textwrap.dedent("""
        import mmap, sys
        import numpy as np
        from kvtier.keys import ChunkKey
        from kvtier.metrics import Metrics
        from kvtier.record import encode_header
        from kvtier.tiers.base import PutItem
        from kvtier.tiers.disk import BLOCK, DiskTier

        tier = DiskTier(sys.argv[1], bytes(8), 1 << 20, lambda key: False, Metrics(["disk"]))
        items = []
        for i, n in enumerate([0, 100, 3 * BLOCK, BLOCK + 7]):
            key = ChunkKey(bytes(8), i.to_bytes(16, "little"))
            payload = np.frombuffer(bytes(range(256)) * (n // 256) + bytes(n % 256), dtype=np.uint8)
            items.append(PutItem(key, encode_header(key, (1, 1, 1, n), 6, payload), payload))
        assert tier.put(items) == [True] * len(items)
        for item in items:
            room = -(-item.payload.size // BLOCK) * BLOCK
            for dest in (np.frombuffer(mmap.mmap(-1, room or BLOCK), dtype=np.uint8),
                         np.frombuffer(bytearray(room + 1), dtype=np.uint8)[1:]):
                header = tier.get([item.key], [dest])[0]
                assert header is not None and header.dtype_code == 6, item.key
                assert bytes(dest[:header.payload_len]) == item.payload.tobytes()
        tier.clear()
        assert tier.usage().bytes == 0
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        assert not loaded, f"torch was imported: {loaded[:5]}"
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def immutable():
    """`chattr +i` on directories: even root then gets EPERM creating or unlinking in them (chmod
    does not stop root). Undone at teardown; the test is skipped where chattr cannot do it."""
    made = []

    def make(path) -> None:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                            capture_output=True).returncode:
            pytest.skip("chattr +i is not available on this file system")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def directory_where_the_record_was(tier: DiskTier, key: ChunkKey, immutable) -> None:
    replace_file_with_directory(tier, key)  # unlink fails with EISDIR


def immutable_shard(tier: DiskTier, key: ChunkKey, immutable) -> None:
    immutable(tier.path_for(key).parent)  # unlink fails with EPERM


UNLINK_FAILURES = [directory_where_the_record_was, immutable_shard]


@pytest.mark.parametrize("breakage", UNLINK_FAILURES, ids=lambda f: f.__name__)
def test_clear_does_not_raise_when_a_record_cannot_be_unlinked(tmp_path, layout, breakage, immutable):
    """Bug: EISDIR/EACCES/EPERM from unlink escaped, so `clear("disk")` raised."""
    tier = make_tier(tmp_path)
    items = [record(i, layout) for i in range(3)]
    tier.put(items)
    breakage(tier, items[1].key, immutable)

    tier.clear()

    assert tier.usage().chunks == 0 and tier.usage().bytes == 0
    assert tier.has([item.key for item in items]) == [False] * 3
    assert tier._metrics.value("kvtier_tier_errors_total", {"tier": "disk"}) == 1


@pytest.mark.parametrize("breakage", UNLINK_FAILURES, ids=lambda f: f.__name__)
def test_eviction_whose_unlink_fails_inside_a_write_returns_the_reservation(tmp_path, layout, breakage,
                                                                             immutable):
    """Bug: an unlink error while a write evicted escaped past the byte reservation, which leaked:
    the tier ended at "0 chunks, 65,536 bytes used" and refused every write."""
    tier = make_tier(tmp_path, capacity=2 * FILE_BYTES)
    items = [record(i, layout) for i in range(5)]  # keys 0..4: one shard each
    assert tier.put(items[:2]) == [True, True]
    breakage(tier, items[0].key, immutable)  # the LRU file, evicted by the next write

    assert tier.put([items[2]]) == [True]  # the victim is forgotten even though its file stayed
    assert tier.usage().chunks == 2 and tier.usage().bytes == 2 * FILE_BYTES  # what the index holds

    # A file that stayed is a valid record: a lookup finds it again (adopted), and the index keeps
    # to its capacity by forgetting its least recently used entry (item 1), whose file stays too.
    # A directory where the record was is no record.
    stayed = breakage.__name__ != "directory_where_the_record_was"
    assert tier.has([items[2].key, items[0].key]) == [True, stayed]
    assert tier.usage().chunks == 2 and tier.usage().bytes == 2 * FILE_BYTES
    assert tier.has([items[1].key]) == [True]
    assert tier.put(items[3:]) == [True, True]  # and the tier keeps taking writes
    assert tier.usage().bytes == 2 * FILE_BYTES
    tier.clear()
    assert tier.usage().bytes == 0


def test_a_read_error_drops_the_index_entry_so_lookup_stops_promising_it(make_engine, layout):
    """Bug: a read that failed with an I/O error (not ENOENT) kept the index entry, so lookup kept
    promising a chunk that every retrieve failed to read."""
    engine, disk, tokens, kv = stored_on_disk(make_engine, layout, 3 * CHUNK)
    keys = engine.db.keys(tokens)
    replace_file_with_directory(disk, keys[1])  # EISDIR on read, and on unlink
    assert engine.lookup(tokens) == 3 * CHUNK  # the index cannot know before reading

    got, n = engine.retrieve(tokens)

    assert n == CHUNK and torch.equal(got, kv[:, :, :CHUNK])
    assert engine.lookup(tokens) == CHUNK
    assert disk.has(keys) == [True, False, True]
    assert disk.usage().chunks == 2 and disk.usage().bytes == 2 * FILE_BYTES


def test_a_write_whose_rename_fails_leaves_no_temp_file_and_fails_that_key_only(tmp_path, layout):
    """A directory where one record should go: that key is a counted miss (its temporary file
    removed), the others in the batch are stored and read back."""
    tier = make_tier(tmp_path)
    items = [record(i, layout) for i in range(3)]
    blocked = tier.path_for(items[1].key)
    blocked.mkdir(parents=True)

    assert tier.put(items) == [True, False, True]

    assert [p.name for p in blocked.parent.iterdir()] == [blocked.name]  # no temporary file left
    assert tier.usage().chunks == 2 and tier.usage().bytes == 2 * FILE_BYTES
    dests = [torch.empty(FILE_BYTES, dtype=torch.uint8) for _ in items]
    assert [h is not None for h in tier.get([item.key for item in items], dests)] == [True, False, True]
    assert tier._metrics.value("kvtier_tier_errors_total", {"tier": "disk"}) == 2  # the write, the read


def path_is_a_file(tmp_path, immutable):
    (tmp_path / "cache").write_bytes(b"")
    return tmp_path / "cache"


def parent_is_a_file(tmp_path, immutable):
    (tmp_path / "file").write_bytes(b"")
    return tmp_path / "file" / "cache"


def namespace_directory_is_a_file(tmp_path, immutable):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / RECORD_NS.hex()).write_bytes(b"")
    return tmp_path / "cache"


def namespace_directory_is_a_symlink(tmp_path, immutable):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / RECORD_NS.hex()).symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    return tmp_path / "cache"


def cannot_be_created(tmp_path, immutable):
    return Path("/proc/kvtier-cannot-create-here")


def not_writable(tmp_path, immutable):
    (tmp_path / "cache" / RECORD_NS.hex()).mkdir(parents=True)
    immutable(tmp_path / "cache" / RECORD_NS.hex())
    return tmp_path / "cache"


BAD_PATHS = [path_is_a_file, parent_is_a_file, namespace_directory_is_a_file,
             namespace_directory_is_a_symlink, cannot_be_created, not_writable]


@pytest.mark.parametrize("bad_path", BAD_PATHS, ids=lambda f: f.__name__)
def test_a_disk_path_that_is_not_a_writable_directory_is_a_config_error_naming_it(tmp_path, bad_path,
                                                                                  immutable):
    """Bug: a path that is a regular file (or cannot be written) raised a bare OSError, or started
    fine and failed every write later."""
    path = bad_path(tmp_path, immutable)

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        make_tier(path)


def test_a_namespace_directory_deleted_while_running_is_recreated_for_new_writes(tmp_path, layout):
    # Regression: the tier held a descriptor of the deleted directory, so after an operator's
    # rm -rf every write failed until the process restarted.
    tier = make_tier(tmp_path)
    old, new = record(1, layout), record(2, layout)
    assert tier.put([old]) == [True]
    shutil.rmtree(tier.root)

    assert tier.put([new]) == [True]
    dest = torch.empty(FILE_BYTES - BLOCK, dtype=torch.uint8)
    assert tier.get([new.key], [dest])[0] is not None and torch.equal(dest[:new.payload.numel()], new.payload)
    assert tier.get([old.key], [dest]) == [None]  # gone with the directory: a miss, then forgotten
    assert tier.usage().chunks == 1 and tier.path_for(new.key).is_file()
    tier.close()


def test_a_disk_tier_whose_writes_all_fail_logs_once_not_once_per_write(tmp_path, layout, caplog):
    # Regression: a broken disk logged a warning per failed I/O, so the writes drove the log volume
    # (onto the same disk, often). Now a line a minute per kind of failure; the counter has them all.
    tier = make_tier(tmp_path)
    shutil.rmtree(tier.root)
    tier.root.write_bytes(b"")  # a file where the namespace directory was: every write fails
    items = [record(i, layout) for i in range(100)]
    caplog.set_level(logging.WARNING, logger="kvtier.tiers.disk")

    assert tier.put(items) == [False] * 100

    assert len(caplog.messages) <= 2, caplog.messages
    assert "write" in caplog.messages[0]
    assert tier._metrics.value("kvtier_tier_errors_total", {"tier": "disk"}) == 100
    assert tier.usage().chunks == 0 and tier.usage().bytes == 0
    tier.close()
