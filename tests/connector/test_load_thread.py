"""Tests for kvtier/connector/load_thread.py: one thread runs every layer-wise load, in order."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from waiting import wait_until

from kvtier.connector import ConnectorMetadata, LoadSpec, load_thread
from kvtier.connector.load_thread import LoadThread

from .test_worker import CHUNK, TABLE, leased, run_step, setup, worker_for  # noqa: F401 (fixture)


def test_jobs_run_in_order_on_one_thread_and_close_finishes_them_first():
    loader = LoadThread()
    gate, ran = threading.Event(), []
    loader.submit(gate.wait)  # holds the thread until the other jobs are queued behind it
    for i in range(5):
        loader.submit(lambda i=i: ran.append((i, threading.get_ident())))
    gate.set()
    loader.close()

    assert [i for i, _ in ran] == [0, 1, 2, 3, 4]
    assert len({ident for _, ident in ran}) == 1 and ran[0][1] != threading.get_ident()


def test_a_job_that_raises_is_logged_and_the_next_job_still_runs(caplog):
    loader = LoadThread()
    done = threading.Event()

    def broken():
        raise RuntimeError("injected: a job that raises")

    loader.submit(broken)
    loader.submit(done.set)
    assert wait_until(done.is_set, "the job after a failed one ran", 10)
    loader.close()
    assert any("kvtier-load job raised" in r.getMessage() for r in caplog.records)


def test_a_thread_that_cannot_start_raises_and_queues_nothing(monkeypatch):
    class NoThreads(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")  # what CPython raises at the limit

    loader = LoadThread()
    ran = []
    with monkeypatch.context() as patch:
        patch.setattr(load_thread, "threading", SimpleNamespace(Thread=NoThreads))
        with pytest.raises(RuntimeError):
            loader.submit(ran.append, "lost")
    done = threading.Event()
    loader.submit(done.set)  # threads to be had again: a new start
    assert wait_until(done.is_set, "the job after the failed start ran", 10)
    loader.close()
    assert ran == []  # the job whose thread could not start was not left queued to run later


def test_layerwise_loads_of_many_steps_share_one_loader_thread(setup, monkeypatch):  # noqa: F811
    engine, cache, tokens, _ = setup
    worker = worker_for(engine, cache, layerwise=True)
    starts = []

    class Counted(threading.Thread):
        def start(self):
            starts.append(self.name)
            super().start()

    monkeypatch.setattr(load_thread, "threading", SimpleNamespace(Thread=Counted))
    for step in range(1, 4):
        spec = LoadSpec(f"r{step}", tokens[:32], TABLE, start=CHUNK, end=31, lease=engine.lease(tokens, 32))
        run_step(worker, ConnectorMetadata(step, loads=[spec]))
        assert worker.get_loaded_tokens() == {f"r{step}": 31}
    worker.close()

    assert starts == ["kvtier-load"]
    assert leased(engine) == 0



class Joined(threading.Thread):
    """A loader thread that says when close() has begun waiting for it."""

    joining = threading.Event()

    def join(self, timeout=None):
        Joined.joining.set()
        super().join(timeout)


def test_a_job_submitted_while_close_waits_for_the_running_one_still_runs_and_runs_last(monkeypatch):
    # close() queued its stop mark, then joined; a job submitted meanwhile (another thread) saw the
    # loader thread still alive and queued behind the mark, so it never ran: a layer-wise load's
    # layer events stayed unset, and wait_for_layer_load (and the engine loop) waited forever.
    loader = LoadThread()
    monkeypatch.setattr(load_thread, "threading", SimpleNamespace(Thread=Joined))
    Joined.joining.clear()
    gate, ran = threading.Event(), []
    loader.submit(gate.wait)  # the job running while close() waits for it
    loader.submit(ran.append, "queued before close")
    closing = threading.Thread(target=loader.close)
    closing.start()
    assert Joined.joining.wait(10)
    late = threading.Thread(target=loader.submit, args=(ran.append, "submitted during close"))
    late.start()
    gate.set()
    closing.join(10)
    late.join(10)
    assert not closing.is_alive() and not late.is_alive()
    assert wait_until(lambda: len(ran) == 2, "the job submitted during close ran", 5, required=False)
    assert ran == ["queued before close", "submitted during close"]
    loader.close()


class RacedStart(threading.Thread):
    """A loader thread whose start waits (briefly) for a second one to be started beside it."""

    both = threading.Barrier(2)
    started: list = []

    def start(self):
        RacedStart.started.append(self)
        with contextlib.suppress(threading.BrokenBarrierError):
            RacedStart.both.wait(timeout=0.5)
        super().start()


def test_two_threads_submitting_at_once_start_one_loader_and_keep_the_order(monkeypatch):
    # submit() tested and set its thread without a lock: two first submits at once started two
    # threads on one queue (jobs ran two at a time, out of order), and close() stopped one of them.
    loader, ran = LoadThread(), []
    monkeypatch.setattr(load_thread, "threading", SimpleNamespace(Thread=RacedStart))
    RacedStart.started.clear()
    submitters = [threading.Thread(target=loader.submit, args=(ran.append, i)) for i in range(2)]
    for t in submitters:
        t.start()
    for t in submitters:
        t.join(10)
    assert len(RacedStart.started) == 1
    loader.close()
    assert sorted(ran) == [0, 1]


def test_two_layerwise_workers_on_one_engine_load_at_once_each_on_its_own_loader(setup):  # noqa: F811
    engine, cache, tokens, kv = setup
    caches = [cache, type(cache)(cache.config, 8, CHUNK)]  # two engines' paged caches
    workers = [worker_for(engine, c, layerwise=True) for c in caches]
    both = threading.Barrier(2)

    def steps(worker):
        for step in range(1, 6):
            both.wait(10)
            spec = LoadSpec(f"r{step}", tokens[:32], TABLE, start=0, end=31, lease=engine.lease(tokens, 32))
            run_step(worker, ConnectorMetadata(step, loads=[spec]))
            assert worker.get_loaded_tokens() == {f"r{step}": 31}
        return {t.name for t in threading.enumerate()}

    with ThreadPoolExecutor(2) as pool:
        seen = [f.result(timeout=30) for f in [pool.submit(steps, w) for w in workers]]
    for worker, c in zip(workers, caches):
        worker.close()
        assert torch.equal(c.gather(TABLE, 31), kv[:, :, :31])
    assert all("kvtier-load" in names for names in seen)
    assert leased(engine) == 0
