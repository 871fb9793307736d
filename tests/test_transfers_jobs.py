"""Tests for how TierReader hands a batch's read jobs to the read threads (kvtier/transfers.py
`_submit`, `_take_jobs`): one task per thread takes the next job left, so each job runs once, on
a read thread, whatever order they end in; a job that raises costs its own chunks only (an
exception is a counted error, an interrupt is raised by `finish` once every job has ended)."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import seeded_kv

from kvtier import transfers
from kvtier.job_queue import TransferQueue
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.metrics import Metrics
from kvtier.record import encode_header, tensor_bytes
from kvtier.record_files import BLOCK
from kvtier.tiers.base import PutItem
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.wrapped import WrappedTier
from kvtier.transfers import ReadRequest, TierReader

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.float16)
TOKENS = 32
SHAPE = LAYOUT.chunk_shape(TOKENS)
NBYTES = LAYOUT.chunk_bytes(TOKENS)
N = 9
THREADS = 3


class Recorded(WrappedTier):
    """Records every batch read (keys, thread); the batch holding `raising` raises `error`."""

    def __init__(self, inner, raising: ChunkKey | None = None, error: BaseException | None = None):
        super().__init__(inner)
        self.raising, self.error = raising, error
        self.lock = threading.Lock()
        self.batches: list[tuple[list[ChunkKey], int]] = []

    def get(self, keys, dests):
        with self.lock:
            self.batches.append((list(keys), threading.get_ident()))
        if self.raising in keys:
            raise self.error
        return self.inner.get(keys, dests)


@pytest.fixture
def stored(tmp_path):
    """A disk tier holding N chunks, their read requests, and a 3-thread queue counting its tasks."""
    metrics = Metrics(["disk"])
    disk = DiskTier(tmp_path / "disk", b"the-jobs", 1 << 24, lambda key: False, metrics)
    kv = seeded_kv(LAYOUT, N * TOKENS, 5)
    keys = [ChunkKey(b"the-jobs", bytes([i + 1]) * 16) for i in range(N)]
    for i, key in enumerate(keys):
        payload = kv[:, :, i * TOKENS:(i + 1) * TOKENS].contiguous().view(-1).view(torch.uint8)
        header = encode_header(key, SHAPE, LAYOUT.dtype, tensor_bytes(payload))
        assert disk.put([PutItem(key, header, payload)]) == [True]
    requests = [ReadRequest(k, np.zeros(-(-NBYTES // BLOCK) * BLOCK, dtype=np.uint8), SHAPE) for k in keys]
    queue = TransferQueue(THREADS)
    yield disk, keys, requests, queue, metrics
    queue.close()


def count_tasks(queue: TransferQueue, monkeypatch) -> list[object]:
    tasks: list[object] = []
    submit = queue.submit

    def counted(fn, *args):
        tasks.append(fn)
        return submit(fn, *args)

    monkeypatch.setattr(queue, "submit", counted)
    return tasks


def test_one_task_per_thread_runs_every_job_once_on_the_read_threads(stored, monkeypatch):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)  # a job per chunk: 9 jobs, 3 threads
    disk, keys, requests, queue, metrics = stored
    tier, tasks = Recorded(disk), count_tasks(queue, monkeypatch)
    reader = TierReader([tier], LAYOUT.dtype, metrics, queue)

    pending = reader.start(requests)
    assert reader.finish(pending) == [True] * N

    assert len(tasks) == THREADS and len(pending.jobs) == N
    assert Counter(key for batch, _ in tier.batches for key in batch) == Counter(keys)  # each once
    assert threading.get_ident() not in {thread for _, thread in tier.batches}


def test_a_job_that_raises_costs_its_own_chunks_and_the_others_still_run(stored, monkeypatch):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 2 * NBYTES)  # jobs [0, 1] [2, 3] [4, 5] [6, 7] [8]
    disk, keys, requests, queue, metrics = stored
    tier = Recorded(disk, raising=keys[3], error=OSError("the disk went away"))
    reader = TierReader([tier], LAYOUT.dtype, metrics, queue)

    found = reader.finish(reader.start(requests))

    assert found == [True, True, False, False, True, True, True, True, True]
    assert metrics.value("kvtier_tier_errors_total", {"tier": "disk"}) == 2  # per chunk of the job
    assert Counter(key for batch, _ in tier.batches for key in batch) == Counter(keys)


def test_an_interrupt_in_one_job_is_raised_once_every_other_job_has_run(stored, monkeypatch):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)
    disk, keys, requests, queue, metrics = stored
    tier = Recorded(disk, raising=keys[0], error=KeyboardInterrupt())
    reader = TierReader([tier], LAYOUT.dtype, metrics, queue)
    pending = reader.start(requests)

    with pytest.raises(KeyboardInterrupt):
        reader.finish(pending)

    assert all(future.done() for _, future in pending.jobs)  # none still writes into the buffers
    assert Counter(key for batch, _ in tier.batches for key in batch) == Counter(keys)
    assert [future.exception() is None for _, future in pending.jobs] == [False] + [True] * (N - 1)


def failing_submit(queue: TransferQueue, monkeypatch, fail_at: int, error: BaseException) -> None:
    """`queue.submit` raises `error` at its `fail_at`-th call (0-based), as when no thread can be had."""
    submit, calls = queue.submit, []

    def flaky(fn, *args):
        calls.append(fn)
        if len(calls) - 1 == fail_at:
            raise error
        return submit(fn, *args)

    monkeypatch.setattr(queue, "submit", flaky)


def test_a_read_task_that_cannot_start_after_another_did_costs_nothing(stored, monkeypatch):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)
    disk, keys, requests, queue, metrics = stored
    failing_submit(queue, monkeypatch, 1, RuntimeError("can't start new thread"))
    tier = Recorded(disk)
    reader = TierReader([tier], LAYOUT.dtype, metrics, queue)

    assert reader.finish(reader.start(requests)) == [True] * N  # the task that started took every job
    assert Counter(key for batch, _ in tier.batches for key in batch) == Counter(keys)


def test_no_read_task_started_makes_every_chunk_a_miss_and_none_is_read_later(stored, monkeypatch):
    disk, keys, requests, queue, metrics = stored
    failing_submit(queue, monkeypatch, 0, RuntimeError("cannot schedule new futures after shutdown"))
    tier = Recorded(disk)
    reader = TierReader([tier], LAYOUT.dtype, metrics, queue)

    assert reader.finish(reader.start(requests)) == [False] * N
    assert metrics.value("kvtier_tier_errors_total", {"tier": "disk"}) == N
    queue.drain()
    assert tier.batches == []


def test_an_interrupt_while_starting_the_read_tasks_leaves_no_read_running(stored, monkeypatch):
    """The caller frees the buffers once `start` raises: no job may run (or start) after it."""
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)
    disk, keys, requests, queue, metrics = stored
    failing_submit(queue, monkeypatch, 1, KeyboardInterrupt())
    tier = Recorded(disk)
    reader = TierReader([tier], LAYOUT.dtype, metrics, queue)

    with pytest.raises(KeyboardInterrupt):
        reader.start(requests)

    read = len(tier.batches)
    queue.drain()
    assert len(tier.batches) == read  # nothing read after start raised
