"""Regressions found reviewing kvtier_server's spill (`kvtier.server.spill`) after issue 9.

In-process stores over a real spill directory (the helpers of test_store.py), real failures: file
descriptors really exhausted with RLIMIT_NOFILE, not a patched os.open.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource

from test_store import OTHER_NS, assert_served, held, put, record, spill_store

from kvtier.config import SpillConfig
from kvtier.keys import ChunkKey
from kvtier.record import HEADER_SIZE
from kvtier.server.spill import OPEN_DIRS
from kvtier.server.store import RECORD_OVERHEAD, RecordStore
from kvtier.wire.frames import PutResult


@contextlib.contextmanager
def out_of_file_descriptors():
    """Every file descriptor this process may open is taken (EMFILE), as when a connection flood
    fills the server's fd limit; all given back on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
    taken = []
    try:
        with contextlib.suppress(OSError):
            while True:
                taken.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_spilled_record_survives_a_get_while_the_server_is_out_of_file_descriptors(tmp_path):
    # The process failed, not the record: the get is a miss, counted, and the record stays spilled
    # (as the disk tier keeps its entry on EMFILE). It used to be forgotten, its file left on disk
    # uncounted by the spill's byte bound.
    store = spill_store(tmp_path, records=1)
    put(store, 1, 2, 3)  # 1 and 2 spilled

    with out_of_file_descriptors():
        assert store.get(record(1)[0]) is None

    assert store.counters.spill_errors == 1 and store.counters.misses == 1
    assert held(store, 1, 2, 3) == [1, 2, 3] and store.spill.records == 2
    assert_served(store, 1)


def spill_files(tmp_path) -> int:
    return len(list((tmp_path / "spill").rglob("*.kvr")))


def test_files_the_spill_could_not_delete_for_want_of_descriptors_are_deleted_once_it_can(tmp_path):
    # Out of fds, evictions and a DELETE forget their keys but cannot unlink the files. Those files
    # used to stay: uncounted, over the spill's byte bound, and adopted again (the deleted record
    # served) by the next server on the directory.
    store = spill_store(tmp_path, records=1, spill_records=3)
    put(store, 1, 2, 3, 4)  # spill: 1, 2, 3
    with out_of_file_descriptors():
        put(store, 5)  # 4 is evicted to the spill, which evicts 1 (its unlink fails); 4's write fails
        assert store.delete([record(3)[0]]) == 1  # forgotten at once; its unlink fails too
    assert held(store, 1, 2, 3, 4, 5) == [2, 5]

    put(store, 6, 7)  # fds back: 5 and 6 spilled

    assert store.spill.records == 3 and spill_files(tmp_path) == 3
    store.close()
    again = spill_store(tmp_path, records=1, spill_records=3)
    assert held(again, 1, 2, 3, 4, 5, 6, 7) == [2, 5, 6]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_records_of_many_namespaces_do_not_hold_a_file_descriptor_each(tmp_path):
    # The spill held its namespace directory open for every namespace it ever saw (one DiskTier
    # each before issue 9, one RecordDir after), never closed: a client writing records of a few
    # thousand namespaces took every descriptor the server had, and it stopped accepting.
    store = spill_store(tmp_path, records=1, spill_records=1000)
    before = open_fds()
    namespaces = [i.to_bytes(8, "little") for i in range(300)]
    for ns in namespaces:
        put(store, 1, ns=ns)  # each evicts the namespace before it into the spill

    assert store.spill.records == 299 and open_fds() - before <= 70
    assert_served(store, 1, ns=namespaces[0])  # a namespace whose directory was closed: reopened
    store.close()
    assert open_fds() <= before


def test_tiny_records_promoted_from_the_spill_hold_no_more_memory_than_they_cost(tmp_path):
    # A spilled record is read into a buffer of its padded file size (whole 4 KiB blocks). A
    # 16-byte record promoted back to memory kept that buffer: 4 KiB held, ~850 bytes counted, so
    # a store of tiny records (what RECORD_OVERHEAD is for) grew to ~5x its capacity in memory.
    store = RecordStore(20 * (HEADER_SIZE + 16 + RECORD_OVERHEAD), SpillConfig(str(tmp_path / "spill"),
                                                                              1 << 20, "off"))
    tiny = [record(i, size=16) for i in range(40)]
    for key, head, payload in tiny:
        assert store.put(key, head, payload) == PutResult.STORED
    for key, _, payload in tiny[:20]:  # spilled: each promoted, evicting one of the others
        got = store.get(key)
        assert got is not None and bytes(got.payload) == bytes(payload)

    resident = [store.get(key) for key, _, _ in tiny[:20]]
    held_bytes = sum(len(r.head) + memoryview(r.payload.obj).nbytes + RECORD_OVERHEAD for r in resident)
    assert store.counters.spill_hits == 20 and held_bytes <= store.capacity


def test_a_full_disk_drops_the_evicted_record_and_leaves_no_temp_file_or_byte_count(tmp_path, monkeypatch):
    # (A guard.) ENOSPC simulated in-process: os.pwritev, which every record write goes through,
    # raises it. The eviction is a drop, counted; the spill's count matches its files; nothing
    # half-written stays; once the disk has room the spill takes records again.
    store = spill_store(tmp_path, records=1, spill_records=3)
    put(store, 1, 2)  # spill: 1

    def full(*_args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full)
    put(store, 3, 4)  # 2 and 3 evicted: their writes fail
    monkeypatch.undo()

    assert (store.counters.dropped, store.counters.spill_errors) == (2, 2)
    assert held(store, 1, 2, 3, 4) == [1, 4] and store.spill.bytes == store.spill.records * 2 * 4096
    assert spill_files(tmp_path) == 1 and not list((tmp_path / "spill").rglob("*.tmp.*"))
    put(store, 5)
    assert held(store, 1, 4, 5) == [1, 4, 5] and spill_files(tmp_path) == 2


def test_evictions_into_a_broken_namespace_folder_do_not_push_other_records_out_of_the_spill(tmp_path):
    # One namespace's folder is a file (a symlink, unwritable, ...): every record of it the spill
    # is given fails. Each failure used to come after making room: each evicted a good record of
    # another namespace for nothing, until the spill held nothing at all.
    store = spill_store(tmp_path, records=1, spill_records=3)
    put(store, 1, 2, 3, 4)  # spill: 1, 2, 3 (full)
    (tmp_path / "spill" / OTHER_NS.hex()).write_text("not a folder")

    put(store, 1, 2, 3, ns=OTHER_NS)  # 4, then OTHER 1 and 2 are evicted to the spill

    assert held(store, 1, 2, 3, 4) == [2, 3, 4]  # 4 took 1's place; the failures took nothing
    assert held(store, 1, 2, 3, ns=OTHER_NS) == [3] and store.counters.spill_errors == 2


def test_out_of_descriptors_a_namespace_whose_folder_must_be_reopened_keeps_its_records(tmp_path):
    # The spill keeps OPEN_DIRS namespace folders open; another is opened again when used. Out of
    # fds that open fails too: a failure of the process (OSError EMFILE), not of the folder (it
    # was a ConfigError, "cannot be created: Too many open files", and the record was forgotten).
    store = spill_store(tmp_path, records=1, spill_records=1000)
    namespaces = [i.to_bytes(8, "little") for i in range(OPEN_DIRS + 2)]
    for ns in namespaces:
        put(store, 1, ns=ns)  # the first namespace's folder is closed by the last ones

    with out_of_file_descriptors():
        assert store.get(record(1, namespaces[0])[0]) is None
        assert store.delete([record(1, namespaces[1])[0]]) == 1

    assert held(store, 1, ns=namespaces[0]) == [1] and store.counters.spill_errors == 2
    assert_served(store, 1, ns=namespaces[0])
    put(store, 2)  # the next put deletes the deleted record's file, now that it can
    assert not store.spill.path_for(ChunkKey.from_bytes(record(1, namespaces[1])[0])).exists()
