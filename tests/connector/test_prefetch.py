"""Tests for kvtier/connector/prefetch.py: the Prefetcher over a real CacheEngine (CPU + disk in
tmp_path). The disk tier is wrapped (kvtier.engine's build_lower_tiers patched) so that a test sees
every read it gets and can hold one on an Event: no sleeps, no wall-clock asserts."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens

import kvtier.engine
from kvtier.connector.prefetch import Prefetcher
from kvtier.tiers.wrapped import WrappedTier

WAIT_S = 10.0


class Watched(WrappedTier):
    """The disk tier, recording the keys of every read and the payload bytes being read at once;
    `hold` makes the next read wait for `release` (after setting `entered`); `fail` keys raise."""

    def __init__(self, inner, chunk_bytes: int):
        super().__init__(inner)
        self.chunk_bytes = chunk_bytes
        self.lock = threading.Lock()
        self.read_keys: list = []
        self.reading = self.max_reading = 0
        self.hold, self.entered, self.release = False, threading.Event(), threading.Event()
        self.fail: set = set()

    def get(self, keys, dests):
        nbytes = len(keys) * self.chunk_bytes
        with self.lock:
            self.read_keys.extend(keys)
            self.reading += nbytes
            self.max_reading = max(self.max_reading, self.reading)
            held, self.hold = self.hold, False
        try:
            if held:
                self.entered.set()
                assert self.release.wait(WAIT_S), "the test never released the held read"
            if self.fail.intersection(keys):
                raise OSError("injected: the medium failed")
            return self.inner.get(keys, dests)
        finally:
            with self.lock:
                self.reading -= nbytes


@pytest.fixture
def setup(make_engine, layout, monkeypatch):
    """(engine, watched disk tier, `stored(n, seed)`: spans of n chunks on disk only, with their KV)."""
    real = kvtier.engine.build_lower_tiers
    watched: list[Watched] = []

    def build(*args, **kwargs):
        tiers = real(*args, **kwargs)
        watched.extend(Watched(t, layout.chunk_bytes(CHUNK)) for t in tiers)
        return watched[-len(tiers):]

    monkeypatch.setattr(kvtier.engine, "build_lower_tiers", build)
    engine = make_engine("cpu_disk")

    def stored(num_chunks: int, seed: int):
        tokens, kv = seeded_tokens(num_chunks * CHUNK, seed), seeded_kv(layout, num_chunks * CHUNK, seed)
        engine.store(tokens, kv)
        assert engine.flush(WAIT_S)
        engine.clear("cpu")
        return engine.db.spans(tokens), tokens, kv

    return engine, watched[0], stored


@pytest.fixture
def make_prefetcher(setup, layout):
    made: list[Prefetcher] = []

    def make(max_bytes_in_flight: int = 1 << 20, **options) -> Prefetcher:
        made.append(Prefetcher(setup[0].storage, layout, max_bytes_in_flight, **options))
        return made[-1]

    yield make
    for prefetcher in made:
        assert prefetcher.close(WAIT_S)


def cpu_holds(engine, spans) -> list[bool]:
    with engine.storage._lock:
        return [engine.storage.cpu.holds(s.key) for s in spans]


def settled(engine, prefetcher: Prefetcher) -> dict:
    """The prefetcher's stats once idle, with the storage's invariants checked."""
    assert prefetcher.wait_idle(WAIT_S)
    engine.storage.check_invariants()
    return prefetcher.stats()


# -- prefetch ------------------------------------------------------------------------------------


def test_chunks_on_disk_only_are_in_the_cpu_tier_after_the_prefetch(setup, make_prefetcher, layout):
    engine, disk, stored = setup
    spans, tokens, kv = stored(5, 1)
    assert cpu_holds(engine, spans) == [False] * 5
    prefetcher = make_prefetcher()

    prefetcher.submit("r1", spans)

    stats = settled(engine, prefetcher)
    assert cpu_holds(engine, spans) == [True] * 5
    assert stats == {"prefetch_requests": 1, "prefetch_chunks": 5,
                     "prefetch_bytes": 5 * layout.chunk_bytes(CHUNK), "prefetch_cancelled": 0,
                     "prefetch_dropped": 0, "prefetch_failures": 0, "in_flight_bytes": 0}
    reads = len(disk.read_keys)
    got, n = engine.retrieve(tokens)  # served from host memory now, bit for bit
    assert n == 5 * CHUNK and torch.equal(got, kv)
    assert len(disk.read_keys) == reads
    pool = engine.stats()["pool"]
    assert (pool["leased_chunks"], pool["pinned_chunks"]) == (0, 0)  # a prefetch never leases or pins


def test_spans_the_cpu_tier_already_holds_are_not_read_again(setup, make_prefetcher):
    engine, disk, stored = setup
    spans, tokens, _ = stored(4, 2)
    engine.retrieve(tokens[: 2 * CHUNK])  # chunks 0 and 1 promoted
    assert cpu_holds(engine, spans) == [True, True, False, False]
    disk.read_keys.clear()
    prefetcher = make_prefetcher()

    prefetcher.submit("r1", spans)

    assert settled(engine, prefetcher)["prefetch_chunks"] == 2
    assert disk.read_keys == [spans[2].key, spans[3].key]
    assert cpu_holds(engine, spans) == [True] * 4


def test_cancel_before_start_reads_nothing(setup, make_prefetcher):
    engine, disk, stored = setup
    first, _, _ = stored(1, 3)
    second, _, _ = stored(3, 4)
    prefetcher = make_prefetcher()
    disk.hold = True
    prefetcher.submit("busy", first)
    assert disk.entered.wait(WAIT_S)  # the thread is inside busy's read: r2 stays queued

    prefetcher.submit("r2", second)
    prefetcher.cancel("r2")
    prefetcher.cancel("never-submitted")  # ignored
    disk.release.set()

    stats = settled(engine, prefetcher)
    assert disk.read_keys == [first[0].key]
    assert cpu_holds(engine, second) == [False] * 3
    assert (stats["prefetch_requests"], stats["prefetch_cancelled"], stats["prefetch_chunks"]) == (2, 1, 1)


def test_cancel_while_reading_stops_after_the_piece_in_flight(setup, make_prefetcher, layout):
    engine, disk, stored = setup
    spans, _, _ = stored(4, 5)
    prefetcher = make_prefetcher(layout.chunk_bytes(CHUNK))  # one chunk per piece
    disk.hold = True
    prefetcher.submit("r1", spans)
    assert disk.entered.wait(WAIT_S)
    assert prefetcher.stats()["in_flight_bytes"] == layout.chunk_bytes(CHUNK)

    prefetcher.cancel("r1")
    prefetcher.cancel("r1")  # counted once
    disk.release.set()

    stats = settled(engine, prefetcher)
    assert disk.read_keys == [spans[0].key]
    assert cpu_holds(engine, spans) == [True, False, False, False]
    assert (stats["prefetch_cancelled"], stats["prefetch_chunks"], stats["in_flight_bytes"]) == (1, 1, 0)


def test_bytes_in_flight_never_exceed_the_bound(setup, make_prefetcher, layout, monkeypatch):
    engine, disk, stored = setup
    spans, _, _ = stored(10, 6)
    bound = 3 * layout.chunk_bytes(CHUNK)
    pieces: list[int] = []
    real_get = engine.storage.get

    def get(piece, out, promote=None):
        assert out is None and promote is True  # no copy out: the chunks land in the CPU tier
        pieces.append(len(piece))
        return real_get(piece, out, promote)

    monkeypatch.setattr(engine.storage, "get", get)
    prefetcher = make_prefetcher(bound)

    prefetcher.submit("r1", spans)

    assert settled(engine, prefetcher)["prefetch_chunks"] == 10
    assert pieces == [3, 3, 3, 1]
    assert 0 < disk.max_reading <= bound  # what the tier was asked for at once, across its I/O threads
    assert sorted(disk.read_keys) == sorted(s.key for s in spans)


def test_a_chunk_larger_than_the_bound_is_never_read(setup, make_prefetcher, layout):
    engine, disk, stored = setup
    spans, _, _ = stored(2, 7)
    prefetcher = make_prefetcher(layout.chunk_bytes(CHUNK) - 1)
    prefetcher.submit("r1", spans)
    assert settled(engine, prefetcher)["prefetch_chunks"] == 0
    assert disk.read_keys == []


def test_a_failing_tier_is_counted_and_the_prefix_stops_there(setup, make_prefetcher):
    engine, disk, stored = setup
    spans, _, _ = stored(5, 8)
    disk.fail = {spans[2].key}
    prefetcher = make_prefetcher()

    prefetcher.submit("r1", spans)

    stats = settled(engine, prefetcher)
    assert (stats["prefetch_failures"], stats["prefetch_chunks"]) == (1, 2)
    assert cpu_holds(engine, spans) == [True, True, False, False, False]
    assert engine.stats()["tiers"]["disk"]["errors"] >= 1
    disk.fail = set()
    prefetcher.submit("r1", spans)  # the thread survived: the next prefetch brings up the rest
    assert settled(engine, prefetcher)["prefetch_chunks"] == 5
    assert cpu_holds(engine, spans) == [True] * 5


def test_a_storage_that_raises_is_a_failure_and_the_thread_goes_on(setup, make_prefetcher, monkeypatch):
    engine, disk, stored = setup
    spans, _, _ = stored(2, 9)
    real_get = engine.storage.get
    calls = []

    def get(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real_get(*args, **kwargs)

    monkeypatch.setattr(engine.storage, "get", get)
    prefetcher = make_prefetcher()
    prefetcher.submit("r1", spans)
    assert settled(engine, prefetcher)["prefetch_failures"] == 1
    prefetcher.submit("r2", spans)
    stats = settled(engine, prefetcher)
    assert (stats["prefetch_failures"], stats["prefetch_chunks"]) == (1, 2)


def test_past_max_queued_the_oldest_queued_prefetch_is_dropped(setup, make_prefetcher):
    engine, disk, stored = setup
    prompts = [stored(1, 10 + i)[0] for i in range(5)]
    prefetcher = make_prefetcher(max_queued=2)
    disk.hold = True
    prefetcher.submit("r0", prompts[0])
    assert disk.entered.wait(WAIT_S)
    for i in range(1, 5):
        prefetcher.submit(f"r{i}", prompts[i])  # r1, r2 dropped in turn
    disk.release.set()

    stats = settled(engine, prefetcher)
    assert (stats["prefetch_dropped"], stats["prefetch_chunks"]) == (2, 3)
    assert disk.read_keys == [prompts[0][0].key, prompts[3][0].key, prompts[4][0].key]


def test_close_with_work_queued_returns_in_bounded_time(setup, make_prefetcher):
    engine, disk, stored = setup
    prompts = [stored(1, 20 + i)[0] for i in range(6)]
    prefetcher = make_prefetcher()
    disk.hold = True
    prefetcher.submit("r0", prompts[0])
    assert disk.entered.wait(WAIT_S)
    for i in range(1, 6):
        prefetcher.submit(f"r{i}", prompts[i])

    assert prefetcher.close(timeout=0.05) is False  # the read in flight is stuck: close gives up waiting
    prefetcher.submit("late", prompts[1])  # ignored once closed
    disk.release.set()
    assert prefetcher.close(WAIT_S) is True

    stats = prefetcher.stats()
    assert (stats["prefetch_dropped"], stats["prefetch_requests"], stats["in_flight_bytes"]) == (5, 6, 0)
    assert disk.read_keys == [prompts[0][0].key]
    engine.storage.check_invariants()


def test_close_before_any_submit_starts_no_thread(make_prefetcher):
    assert make_prefetcher().close(0) is True


def test_bad_bounds_are_refused(setup, layout):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes_in_flight"):
            Prefetcher(setup[0].storage, layout, bad)
    with pytest.raises(ValueError, match="max_queued"):
        Prefetcher(setup[0].storage, layout, 1 << 20, max_queued=0)


def test_many_threads_submitting_and_cancelling_at_once(setup, make_prefetcher, layout):
    engine, disk, stored = setup
    prompts = [stored(3, 40 + i) for i in range(6)]
    prefetcher = make_prefetcher(2 * layout.chunk_bytes(CHUNK), max_queued=8)
    submitted = [0] * 8

    def client(t: int) -> None:
        rng = random.Random(t)
        for _ in range(60):
            rid = f"r{rng.randrange(12)}"
            if rng.random() < 0.6:
                prefetcher.submit(rid, prompts[rng.randrange(len(prompts))][0])
                submitted[t] += 1
            else:
                prefetcher.cancel(rid)
            if rng.random() < 0.05:
                engine.clear("cpu")  # chunks leave host memory while prefetches bring them up

    threads = [threading.Thread(target=client, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads)

    stats = settled(engine, prefetcher)
    assert stats["prefetch_requests"] == sum(submitted) and stats["in_flight_bytes"] == 0
    assert stats["prefetch_cancelled"] + stats["prefetch_dropped"] <= stats["prefetch_requests"]
    assert stats["prefetch_failures"] == 0
    assert stats["prefetch_bytes"] == stats["prefetch_chunks"] * layout.chunk_bytes(CHUNK)
    assert disk.max_reading <= 2 * layout.chunk_bytes(CHUNK)
    pool = engine.stats()["pool"]
    assert pool["owners"].get("read", 0) == 0 and pool["leased_chunks"] == 0  # no read left holding a slab
    for _, tokens, kv in prompts:  # whatever the CPU tier holds now is the KV stored
        got, n = engine.retrieve(tokens)
        assert n == 3 * CHUNK and torch.equal(got, kv)
