"""Tests for how a retrieve's lower-tier reads are handed to the read threads (kvtier/slab_io.py
`_SlabRequests` over kvtier/transfers.py `TierReader`): each read request is made by the job that
reads it, on its read thread, so the first reads start before the batch is made; every chunk is
read once whatever order the jobs finish in; a read that raises costs its chunks (the prefix ends
there, nothing after it counts); an interrupt on the retrieving thread lets every read in flight
end before it propagates and the slabs are freed."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
from conftest import CHUNK, stored_below, tier_counter

from kvtier import slab_io, transfers

CHUNKS = 12
READ_THREADS = 2  # make_manager's io_threads


@pytest.fixture
def on_disk(make_manager, db, layout):
    """A StorageManager (2 read threads) whose disk tier alone holds a 12-chunk prompt."""
    manager = make_manager()
    spans, kv = stored_below(manager, db, layout, CHUNKS, 11)
    return manager, spans, kv


def record_requests(monkeypatch) -> list[int]:
    """The thread that made each read request, in the order they were made."""
    threads: list[int] = []
    make = slab_io._SlabRequests.__getitem__

    def recorded(self, i):
        threads.append(threading.get_ident())
        return make(self, i)

    monkeypatch.setattr(slab_io._SlabRequests, "__getitem__", recorded)
    return threads


def on_each_read(tier, monkeypatch, note) -> None:
    """`note(keys)` before each of `tier`'s reads, one at a time (reads run on several threads)."""
    lock, get = threading.Lock(), tier.get

    def noted(keys, dests, *copies):
        with lock:
            note(keys)
        return get(keys, dests, *copies)

    monkeypatch.setattr(tier, "get", noted)


def test_the_first_read_starts_before_every_request_is_made_and_jobs_make_their_own(on_disk, monkeypatch):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)  # a job per chunk
    manager, spans, kv = on_disk
    made = record_requests(monkeypatch)
    at_first_read: list[int] = []

    def first_read_counts(keys):  # no read has returned yet when the first one starts
        if not at_first_read:
            at_first_read.append(len(made))  # each thread made one request

    on_each_read(manager.lower[0], monkeypatch, first_read_counts)
    out = torch.zeros_like(kv)

    assert manager.get(spans, out) == CHUNKS

    assert torch.equal(out, kv)
    # At most the one that sized the jobs (on the retrieving thread) and one per read thread.
    assert at_first_read and at_first_read[0] <= 1 + READ_THREADS < CHUNKS
    here = threading.get_ident()
    assert made.count(here) <= 1 and len(made) == CHUNKS + made.count(here)


@pytest.mark.parametrize("job_chunks", [1, 2, 5])
def test_every_chunk_is_read_once_in_jobs_of_at_most_read_job_bytes(on_disk, monkeypatch, job_chunks, layout):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", job_chunks * layout.chunk_bytes(CHUNK))
    manager, spans, kv = on_disk
    batches: list[list] = []
    on_each_read(manager.lower[0], monkeypatch, lambda keys: batches.append(list(keys)))
    out = torch.zeros_like(kv)

    assert manager.get(spans, out) == CHUNKS

    assert torch.equal(out, kv)
    read = Counter(key for batch in batches for key in batch)
    assert set(read) == {s.key for s in spans} and set(read.values()) == {1}
    assert max(len(batch) for batch in batches) <= job_chunks


def test_a_read_that_raises_ends_the_prefix_there_and_nothing_after_counts(on_disk, monkeypatch):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)  # a job per chunk: the later ones land
    manager, spans, kv = on_disk
    bad = 4
    disk = manager.lower[0]
    get = disk.get

    def raising(keys, dests, *copies):
        if spans[bad].key in keys:
            raise OSError("the disk went away")  # a tier must not raise; the reader copes anyway
        return get(keys, dests, *copies)

    monkeypatch.setattr(disk, "get", raising)
    out = torch.zeros_like(kv)

    assert manager.get(spans, out) == bad

    assert torch.equal(out[:, :, :bad * CHUNK], kv[:, :, :bad * CHUNK])
    assert tier_counter(manager, "disk", "errors") == 1
    assert manager.contains_prefix([s.key for s in spans], lower=False) == bad  # only the prefix promoted


def test_an_interrupt_on_the_retrieving_thread_waits_for_the_reads_in_flight(on_disk, monkeypatch):
    """The slabs being read into are freed once the interrupt propagates: no read may still run."""
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)
    manager, spans, kv = on_disk
    disk, pool = manager.lower[0], manager.pool
    held, release, done = spans[-1].key, threading.Event(), threading.Event()
    get, copy = disk.get, pool.copy_chunks

    def held_read(keys, dests, *copies):
        if held in keys:
            assert release.wait(10), "the test never released the held read"
            headers = get(keys, dests, *copies)
            done.set()
            return headers
        return get(keys, dests, *copies)

    def interrupted(chunks, out, layout, into_slabs):  # the first copy out, on the retrieving thread
        if not into_slabs:
            raise KeyboardInterrupt
        return copy(chunks, out, layout, into_slabs)

    monkeypatch.setattr(disk, "get", held_read)
    monkeypatch.setattr(pool, "copy_chunks", interrupted)
    raised: list[tuple[BaseException, bool]] = []

    def retrieve() -> None:
        try:
            manager.get(spans, torch.zeros_like(kv))
        except BaseException as exc:  # noqa: BLE001 (the interrupt is what is expected)
            raised.append((exc, done.is_set()))

    retriever = threading.Thread(target=retrieve)
    retriever.start()
    retriever.join(0.2)  # a bounded look: the retrieve must still be waiting for the held read
    assert retriever.is_alive() and not raised
    release.set()
    retriever.join(10)
    assert not retriever.is_alive()
    assert len(raised) == 1 and isinstance(raised[0][0], KeyboardInterrupt) and raised[0][1]
    assert pool.owners() == {}  # every slab of the retrieve given back, after its read ended
