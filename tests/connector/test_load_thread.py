"""Tests for kvtier/connector/load_thread.py: one thread runs every layer-wise load, in order."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
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
