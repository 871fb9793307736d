"""Tests for kvtier/connector/job_thread.py: the one-thread FIFO of per-request jobs (events, no sleeps)."""

from __future__ import annotations

import threading

import pytest

from kvtier.connector.job_thread import JobThread

WAIT_S = 10.0


class Jobs:
    """A JobThread whose jobs are names; a job named in `held` waits for `release` once started."""

    def __init__(self, held: tuple[str, ...] = ()):
        self.served: list[tuple[str, str | None, bool]] = []  # (job, current request, stopping at the end)
        self.held, self.started, self.release = set(held), threading.Event(), threading.Event()
        self.jobs: JobThread[str] = JobThread("test-jobs", self.serve)

    def serve(self, job: str) -> None:
        if job == "boom":
            raise RuntimeError("injected")
        if job in self.held:
            self.started.set()
            assert self.release.wait(WAIT_S)
        with self.jobs.lock:
            self.served.append((job, self.jobs.current, self.jobs.stopping))

    def put(self, request_id: str, job: str) -> bool:
        with self.jobs.lock:
            return self.jobs.put_locked(request_id, job)

    def busy(self, *queued: tuple[str, str]) -> Jobs:
        """Start r1's held job "a" (`held` must name it), then queue `queued` behind it."""
        assert self.put("r1", "a") and self.started.wait(WAIT_S)
        for rid, job in queued:
            assert self.put(rid, job)
        return self


@pytest.fixture
def make_jobs():
    made: list[Jobs] = []

    def make(*held: str) -> Jobs:
        made.append(Jobs(held))
        return made[-1]

    yield make
    for jobs in made:
        jobs.release.set()
        with jobs.jobs.lock:
            jobs.jobs.shut_locked()
        assert jobs.jobs.join(WAIT_S)


def test_jobs_are_served_in_order_with_their_request_current(make_jobs):
    jobs = make_jobs("a").busy(("r2", "b"), ("r3", "boom"), ("r1", "c"))
    with jobs.jobs.lock:
        assert (jobs.jobs.current, jobs.jobs.queued_locked(), jobs.jobs.idle_locked()) == ("r1", 3, False)
    jobs.release.set()

    assert jobs.jobs.wait_idle(WAIT_S)
    assert jobs.served == [("a", "r1", False), ("b", "r2", False), ("c", "r1", False)]  # "boom" logged only
    with jobs.jobs.lock:
        assert jobs.jobs.current is None and jobs.jobs.idle_locked()


def test_take_removes_a_requests_queued_jobs_or_the_oldest(make_jobs):
    jobs = make_jobs("a").busy(("r2", "b"), ("r3", "c"), ("r2", "d"), ("r4", "e"))
    with jobs.jobs.lock:
        assert jobs.jobs.take_locked("r2") == ["b", "d"]
        assert jobs.jobs.take_locked("r1") == []  # being served, not queued
        assert jobs.jobs.take_locked() == ["c"]
        assert jobs.jobs.queued_locked() == 1
    jobs.release.set()
    assert jobs.jobs.wait_idle(WAIT_S)
    assert [job for job, _, _ in jobs.served] == ["a", "e"]


def test_stop_asks_only_the_current_request_once(make_jobs):
    jobs = make_jobs("a").busy()
    with jobs.jobs.lock:
        assert not jobs.jobs.stop_locked("r2")  # not served
        assert jobs.jobs.stop_locked("r1") and not jobs.jobs.stop_locked("r1")
    jobs.release.set()
    assert jobs.jobs.wait_idle(WAIT_S)
    with jobs.jobs.lock:  # the flag does not outlive its job
        assert not jobs.jobs.stopping and jobs.jobs.current is None
    jobs.put("r2", "b")
    assert jobs.jobs.wait_idle(WAIT_S)
    assert jobs.served == [("a", "r1", True), ("b", "r2", False)]


def test_shut_returns_the_queued_jobs_and_join_is_bounded(make_jobs):
    jobs = make_jobs("a").busy(("r2", "b"))
    with jobs.jobs.lock:
        assert jobs.jobs.shut_locked() == ["b"]
        assert jobs.jobs.stopping and jobs.jobs.closed
        assert not jobs.jobs.put_locked("r3", "c")
    assert jobs.jobs.join(0.05) is False  # the job being served is stuck
    jobs.release.set()
    assert jobs.jobs.join(WAIT_S) is True
    assert [job for job, _, _ in jobs.served] == ["a"]


def test_no_thread_until_the_first_job(make_jobs):
    jobs = make_jobs()
    assert jobs.jobs.join(0) is True and jobs.jobs.wait_idle(0)
    assert not [t for t in threading.enumerate() if t.name == "test-jobs"]


def test_a_thread_that_cannot_start_queues_nothing(make_jobs, monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")

    jobs = make_jobs()
    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert jobs.put("r1", "a") is False
    with jobs.jobs.lock:
        assert jobs.jobs.idle_locked()
