"""Tests for kvtier/server/store.py: the server's bounded LRU record store and its disk spill.

In-process, no sockets: stories on a store that holds exactly a few records, with a real spill
directory under tmp_path.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch

from kvtier.config import SpillConfig
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.record import HEADER_SIZE, encode_header
from kvtier.record_files import BLOCK
from kvtier.record_root import temp_name
from kvtier.record_walk import STALE_TEMP_S
from kvtier.server.store import RECORD_OVERHEAD, RecordStore
from kvtier.wire.decoder import FrameDecoder
from kvtier.wire.frames import MAX_KEYS, Frame, Op, PutResult, check_request, encode

NS, OTHER_NS = b"ns-one..", b"ns-two.."
SIZE = 1000  # payload bytes per test record
RECORD = HEADER_SIZE + SIZE + RECORD_OVERHEAD  # what one record costs the store
SPILLED = BLOCK + BLOCK  # what one record costs the spill (header block + padded payload)


def record(i: int, ns: bytes = NS, size: int = SIZE) -> tuple[bytes, bytes, memoryview]:
    key = ChunkKey(ns, i.to_bytes(16, "little"))
    payload = memoryview(bytearray(random.Random(i).randbytes(size)))
    return bytes(key), encode_header(key, (2, 1, 1, size // 4), torch.float16, payload), payload


def put(store: RecordStore, *ids: int, ns: bytes = NS) -> list[PutResult]:
    return [store.put(*record(i, ns)) for i in ids]


def held(store: RecordStore, *ids: int, ns: bytes = NS) -> list[int]:
    return [i for i in ids if store.contains(record(i, ns)[0])]


def assert_served(store: RecordStore, i: int, ns: bytes = NS) -> None:
    key, head, payload = record(i, ns)
    got = store.get(key)
    assert got is not None and got.head == head and bytes(got.payload) == bytes(payload)


def spill_store(tmp_path, records: int = 2, spill_records: int = 100) -> RecordStore:
    return RecordStore(records * RECORD, SpillConfig(str(tmp_path / "spill"), spill_records * SPILLED, "off"))


# -- memory --------------------------------------------------------------------------------------


def test_round_trip_keeps_the_record_bit_exact():
    store = RecordStore(10 * RECORD)
    assert put(store, 1) == [PutResult.STORED]
    assert_served(store, 1)
    assert (store.records, store.bytes, store.counters.hits) == (1, RECORD, 1)
    assert store.get(record(2)[0]) is None and store.counters.misses == 1


def test_full_store_evicts_least_recently_used_instead_of_failing_puts():
    store = RecordStore(3 * RECORD)
    assert put(store, 1, 2, 3) == [PutResult.STORED] * 3
    store.get(record(1)[0])  # 1 is now the most recently used

    assert put(store, 4, 5) == [PutResult.STORED] * 2

    assert held(store, 1, 2, 3, 4, 5) == [1, 4, 5]
    assert store.bytes == 3 * RECORD <= store.capacity
    assert (store.counters.evictions, store.counters.dropped) == (2, 2)


def test_put_again_replaces_without_double_counting():
    store = RecordStore(3 * RECORD)
    put(store, 1, 1, 1)
    assert (store.records, store.bytes) == (1, RECORD)
    assert_served(store, 1)


def test_record_larger_than_the_store_is_refused_and_evicts_nothing():
    store = RecordStore(2 * RECORD)
    put(store, 1)
    assert store.put(*record(2, size=3 * SIZE)) == PutResult.TOO_LARGE
    assert held(store, 1, 2) == [1]


def _flip(buf: bytes | memoryview, at: int) -> bytearray:
    out = bytearray(buf)
    out[at] ^= 1
    return out


GARBAGE = {
    "flipped payload bit": lambda k, h, p: (k, h, memoryview(_flip(p, 17))),
    "flipped header bit": lambda k, h, p: (k, bytes(_flip(h, 30)), p),
    "another key's record": lambda k, h, p: (record(9)[0], h, p),
    "truncated header": lambda k, h, p: (k, h[:40], p),
    "short payload": lambda k, h, p: (k, h, p[:-1]),
    "bad magic": lambda k, h, p: (k, b"XXXX" + h[4:], p),
    "random bytes": lambda k, h, p: (k, random.Random(5).randbytes(HEADER_SIZE), p),
}


@pytest.mark.parametrize("name", GARBAGE)
def test_garbage_is_rejected_and_never_stored(name):
    store = RecordStore(10 * RECORD)
    key, head, payload = GARBAGE[name](*record(1))

    assert store.put(key, head, payload) == PutResult.INVALID
    assert (store.records, store.bytes, store.counters.invalid) == (0, 0, 1)
    assert store.get(key) is None


def test_delete_and_clear_by_namespace():
    store = RecordStore(10 * RECORD)
    put(store, 1, 2, 3)
    put(store, 1, 2, ns=OTHER_NS)

    assert store.delete([record(1)[0], record(7)[0]]) == 1
    assert store.clear([NS]) == 2
    assert held(store, 1, 2, 3) == [] and held(store, 1, 2, ns=OTHER_NS) == [1, 2]
    assert (store.records, store.bytes) == (2, 2 * RECORD)


# -- spill ---------------------------------------------------------------------------------------


def test_evicted_records_spill_to_disk_and_come_back_promoted(tmp_path):
    store = spill_store(tmp_path, records=2)
    put(store, 1, 2, 3, 4)  # 1 and 2 are spilled
    assert (store.counters.spills, store.counters.dropped) == (2, 0)
    assert held(store, 1, 2, 3, 4) == [1, 2, 3, 4]
    assert (store.spill.records, store.spill.bytes) == (2, 2 * SPILLED)

    assert_served(store, 1)  # from disk, promoted: 3 (the LRU in memory) goes down instead

    assert store.counters.spill_hits == 1
    assert store.records == 2 and store.bytes <= store.capacity
    assert [i for i in (1, 2, 3, 4) if store.spill.contains(record(i)[0])] == [2, 3]
    for i in (2, 3, 4):
        assert_served(store, i)


def test_spill_is_bounded_and_drops_its_oldest(tmp_path):
    store = spill_store(tmp_path, records=1, spill_records=2)
    put(store, 1, 2, 3, 4)  # memory: 4; spill: 2, 3 (1 was pushed out of the spill)

    assert held(store, 1, 2, 3, 4) == [2, 3, 4]
    assert store.spill.bytes == 2 * SPILLED <= store.spill.capacity
    assert len(list((tmp_path / "spill").rglob("*.kvr"))) == 2


def test_spill_keeps_namespaces_apart_under_one_bound(tmp_path):
    store = spill_store(tmp_path, records=1, spill_records=3)
    put(store, 1, 2)
    put(store, 1, 2, ns=OTHER_NS)  # spill: NS 1, NS 2, OTHER 1

    assert store.spill.records == 3
    assert store.clear([NS]) == 2
    assert held(store, 1, 2, ns=OTHER_NS) == [1, 2]
    assert_served(store, 1, ns=OTHER_NS)


def test_a_new_store_adopts_the_spill_a_previous_one_left(tmp_path):
    first = spill_store(tmp_path, records=1)
    put(first, 1, 2, 3)  # 1 and 2 spilled
    first.close()

    second = spill_store(tmp_path, records=1)

    assert second.spill.records == 2 and held(second, 1, 2, 3) == [1, 2]
    assert_served(second, 2)


def test_corrupt_spill_file_is_a_miss_and_is_removed(tmp_path):
    store = spill_store(tmp_path, records=1)
    put(store, 1, 2)
    (path,) = (tmp_path / "spill").rglob("*.kvr")
    data = bytearray(path.read_bytes())
    data[BLOCK + 5] ^= 0xFF
    path.write_bytes(data)

    assert store.get(record(1)[0]) is None
    assert held(store, 1) == [] and store.spill.records == 0 and not path.exists()
    assert store.spill.metrics.value("kvtier_tier_corrupt_total", {"tier": "disk"}) == 1


def test_a_directory_in_place_of_a_spill_file_is_that_keys_miss_not_an_exception(tmp_path):
    store = spill_store(tmp_path, records=1)
    put(store, 1, 2, 3)  # 1 and 2 spilled
    path = store.spill.path_for(ChunkKey.from_bytes(record(1)[0]))
    path.unlink()
    path.mkdir()

    got = [store.get(record(i)[0]) for i in (1, 2, 3)]

    assert got[0] is None and got[1] is not None and got[2] is not None
    assert not store.spill.contains(record(1)[0]) and store.spill.records <= 2


def test_a_new_store_walks_its_spill_once_and_deletes_damaged_records_and_stale_temps(tmp_path, caplog):
    first = spill_store(tmp_path, records=1)
    put(first, 1, 2, 3)  # 1 and 2 spilled
    first.close()
    path = first.spill.path_for(ChunkKey.from_bytes(record(1)[0]))
    path.write_bytes(path.read_bytes()[:100])  # cut mid-header: no record has this size
    stale = path.with_name(temp_name(path.name))
    stale.write_bytes(b"half a record")
    hour_ago = time.time() - STALE_TEMP_S - 60
    os.utime(stale, (hour_ago, hour_ago))
    caplog.set_level(logging.INFO, logger="kvtier.server.spill")

    second = spill_store(tmp_path, records=1)

    assert second.spill.records == 1 and held(second, 1, 2) == [2]
    assert not path.exists() and not stale.exists()
    (line,) = [m for m in caplog.messages if "adopted" in m]  # one walk, one line
    assert "1 records" in line and "1 damaged records deleted" in line and "1 stale temp" in line


def test_the_server_store_imports_no_tier_and_no_torch():
    """Issue 9: the server depends on the wire codec, records, record files and the policy, not on
    `kvtier.tiers` (whose DiskTier the spill used to build, one per namespace)."""
    code = ("import sys, kvtier.server.app; bad = [m for m in sys.modules "
            "if m.startswith('kvtier.tiers') or m == 'torch']; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_an_unusable_spill_path_is_a_config_error_at_start(tmp_path, kind):
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" if kind == "a file" else tmp_path / "file" / "spill"

    with pytest.raises(ConfigError, match="spill.path"):
        RecordStore(RECORD, SpillConfig(str(path), 100 * SPILLED, "off"))


# -- what a record really costs --------------------------------------------------------------------


def test_record_overhead_covers_what_a_tiny_record_really_costs():
    """Records of 0-16 bytes through the real decoder into the store, measured with tracemalloc:
    the accounted bytes must cover the Python objects, or tiny records overrun the capacity."""
    n = 4 * MAX_KEYS
    keys = [ChunkKey(NS, i.to_bytes(16, "little")) for i in range(n)]
    payloads = [bytes(4 * (i % 5)) for i in range(n)]
    heads = [encode_header(k, (2, 1, 1, len(p) // 4), torch.float16, p) for k, p in zip(keys, payloads)]
    data = b"".join(bytes(b) for i in range(0, n, MAX_KEYS) for b in encode(
        Frame(Op.PUT, 1, keys=keys[i:i + MAX_KEYS], heads=heads[i:i + MAX_KEYS]), payloads[i:i + MAX_KEYS]))
    store = RecordStore(1 << 30)
    decoder = FrameDecoder(1 << 30, check=check_request)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoder.feed(data)
        while (frame := decoder.next_frame()) is not None:
            for key, head, payload in zip(frame.keys, frame.heads, frame.payloads):
                store.put(key, head, payload)
        del frame
        gc.collect()
        real = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert store.records == n
    assert store.bytes >= real, f"{real / n:.0f} bytes per record, {store.bytes / n:.0f} accounted"
