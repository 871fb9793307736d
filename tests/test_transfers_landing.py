"""Tests for TierReader's `landed` (kvtier/transfers.py): each read job hands over the requests it
read, verified, as soon as it has them, on its own thread, in whatever order the jobs finish; a
corrupt record or one of the wrong shape is never handed over; a chunk that the first tier misses
lands from the next; jobs are about READ_JOB_BYTES, in order, and every thread gets work."""

from __future__ import annotations

import threading

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
N = 6


class Held(WrappedTier):
    """Holds the read of `first` until `release` is set (by a later chunk landing)."""

    def __init__(self, inner, first: ChunkKey):
        super().__init__(inner)
        self.first = first
        self.release = threading.Event()

    def get(self, keys, dests):
        if self.first in keys:
            assert self.release.wait(10), "the later chunks never landed"
        return self.inner.get(keys, dests)


def chunk(kv: torch.Tensor, i: int) -> torch.Tensor:
    return kv[:, :, i * TOKENS:(i + 1) * TOKENS].contiguous()


@pytest.fixture
def stored(tmp_path):
    """A disk tier holding N raw chunks, their keys and KV, buffers to read into, and a 2-thread queue."""
    metrics = Metrics(["cpu", "disk", "disk2"])
    disk = DiskTier(tmp_path / "disk", b"landings", 1 << 24, lambda key: False, metrics)
    kv = seeded_kv(LAYOUT, N * TOKENS, 3)
    keys = [ChunkKey(b"landings", bytes([i + 1]) * 16) for i in range(N)]
    items = []
    for i, key in enumerate(keys):
        payload = chunk(kv, i).view(-1).view(torch.uint8)
        items.append(PutItem(key, encode_header(key, SHAPE, LAYOUT.dtype, tensor_bytes(payload)), payload))
    assert disk.put(items) == [True] * N
    dests = [np.zeros(-(-NBYTES // BLOCK) * BLOCK, dtype=np.uint8) for _ in keys]
    queue = TransferQueue(2)
    yield disk, keys, kv, dests, queue, metrics
    queue.close()


def requests(keys, dests):
    return [ReadRequest(k, d, SHAPE) for k, d in zip(keys, dests)]


def recorder():
    calls: list[tuple[list[int], int]] = []
    lock = threading.Lock()

    def landed(indices: list[int]) -> None:
        with lock:
            calls.append((list(indices), threading.get_ident()))

    return calls, landed


def test_chunks_land_out_of_order_and_each_is_whole(stored, monkeypatch):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)  # a job per chunk
    disk, keys, kv, dests, queue, metrics = stored
    tier = Held(disk, keys[0])
    calls, record = recorder()

    def landed(indices):
        record(indices)
        if N - 1 in indices:
            tier.release.set()  # chunk 0 is read only after the last one has landed

    reader = TierReader([tier], LAYOUT.dtype, metrics, queue)
    found = reader.finish(reader.start(requests(keys, dests), landed))

    assert found == [True] * N
    order = [i for indices, _ in calls for i in indices]
    assert sorted(order) == list(range(N)) and order[-1] == 0  # the first chunk landed last
    assert threading.get_ident() not in {thread for _, thread in calls}  # on the read threads
    for i, dest in enumerate(dests):
        assert torch.equal(torch.from_numpy(dest[:NBYTES]).view(LAYOUT.dtype).view(SHAPE), chunk(kv, i))


def test_a_corrupt_record_never_lands_and_the_others_do(stored, monkeypatch):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)
    disk, keys, _, dests, queue, metrics = stored
    with open(disk.path_for(keys[2]), "r+b") as f:
        f.seek(BLOCK + 10)
        f.write(b"\xff\xfe")
    calls, landed = recorder()
    reader = TierReader([disk], LAYOUT.dtype, metrics, queue)
    found = reader.finish(reader.start(requests(keys, dests), landed))
    assert found == [True, True, False, True, True, True]
    assert sorted(i for indices, _ in calls for i in indices) == [0, 1, 3, 4, 5]


def test_a_record_of_another_shape_never_lands(stored):
    disk, keys, _, dests, queue, metrics = stored
    calls, landed = recorder()
    wrong = [ReadRequest(k, d, LAYOUT.chunk_shape(TOKENS // 2)) for k, d in zip(keys, dests)]
    reader = TierReader([disk], LAYOUT.dtype, metrics, queue)
    assert reader.finish(reader.start(wrong, landed)) == [False] * N
    assert calls == []


def test_a_chunk_the_first_tier_misses_lands_from_the_next(stored, tmp_path):
    disk, keys, kv, dests, queue, metrics = stored
    empty = DiskTier(tmp_path / "empty", b"landings", 1 << 24, lambda key: False, metrics)
    calls, landed = recorder()
    reader = TierReader([empty, disk], LAYOUT.dtype, metrics, queue)
    assert reader.finish(reader.start(requests(keys, dests), landed)) == [True] * N
    assert sorted(i for indices, _ in calls for i in indices) == list(range(N))


@pytest.mark.parametrize(("job_bytes", "parts"), [(1, [[i] for i in range(N)]),
                                                  (2 * NBYTES, [[0, 1], [2, 3], [4, 5]]),
                                                  (1 << 30, [[0, 1, 2], [3, 4, 5]])])  # 2 threads: both work
def test_jobs_are_consecutive_runs_of_about_read_job_bytes(stored, monkeypatch, job_bytes, parts):
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", job_bytes)
    disk, keys, _, dests, queue, metrics = stored
    reader = TierReader([disk], LAYOUT.dtype, metrics, queue)
    dests = [np.zeros(NBYTES, dtype=np.uint8) for _ in keys]  # exactly a chunk each
    pending = reader.start(requests(keys, dests))
    assert [part for part, _ in pending.jobs] == parts
    assert reader.finish(pending) == [True] * N


class Interrupted(WrappedTier):
    """The read of `interrupted` raises KeyboardInterrupt; the read of `held` waits for `release`."""

    def __init__(self, inner, interrupted: ChunkKey, held: ChunkKey):
        super().__init__(inner)
        self.interrupted, self.held = interrupted, held
        self.release, self.done = threading.Event(), threading.Event()

    def get(self, keys, dests):
        if self.interrupted in keys:
            raise KeyboardInterrupt
        if self.held in keys:
            assert self.release.wait(10), "the test never released the held read"
            headers = self.inner.get(keys, dests)
            self.done.set()
            return headers
        return self.inner.get(keys, dests)


def test_an_interrupt_while_waiting_lets_every_read_end_before_it_is_raised(stored, monkeypatch):
    """Regression: finish raised at once, while another job still wrote into the caller's buffers."""
    monkeypatch.setattr(transfers, "READ_JOB_BYTES", 1)  # a job per chunk
    disk, keys, _, dests, queue, metrics = stored
    tier = Interrupted(disk, keys[0], keys[1])
    reader = TierReader([tier], LAYOUT.dtype, metrics, queue)
    pending = reader.start(requests(keys[:2], dests[:2]))
    raised: list[BaseException] = []

    def finish() -> None:
        try:
            reader.finish(pending)
        except BaseException as exc:  # noqa: BLE001 (the interrupt is what is expected)
            raised.append(exc)

    waiter = threading.Thread(target=finish)
    waiter.start()
    waiter.join(0.2)  # a bounded look: finish must still be waiting for the held read
    assert waiter.is_alive() and not raised
    tier.release.set()
    waiter.join(10)
    assert not waiter.is_alive() and tier.done.is_set()
    assert len(raised) == 1 and isinstance(raised[0], KeyboardInterrupt)
