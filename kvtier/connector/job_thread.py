"""JobThread: one background thread serving a FIFO of per-request jobs, cancellable while queued.

The connector's background work for a request (a prefetch, kvtier.connector.prefetch) is queued
here and served one job after another on one thread, started at the first job (none at all when
nothing is ever queued). The owner decides what serving means and what dropping a job costs (a
counter, a lease to release): this class only keeps the queue, the request being served, and the
thread's start and stop.

Where it runs: `lock` is the owner's lock too: the owner keeps its own state (counters, bytes in
flight) under it, so that "queued", "being served" and the owner's numbers change together. The
`*_locked` methods are called with `lock` held; `wait_idle` and `join` without it. `serve(job)`
runs on the thread without the lock; whatever it raises is logged and the thread goes on.

Lifecycle: put_locked (starts the thread) -> the thread pops the oldest job, makes its request
`current` and serves it -> current is None again (`changed` is notified at every step).
`take_locked` removes a request's queued jobs; `stop_locked` asks the job being served to stop
(`stopping`: it checks between pieces of its work). `shut_locked` closes the queue (returning the
jobs still queued) and `join` waits, bounded, for the job being served.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

J = TypeVar("J")


class JobThread(Generic[J]):
    def __init__(self, name: str, serve: Callable[[J], None]):
        self.name = name
        self._serve = serve
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # a job queued, taken, started, ended; shut
        self._queue: deque[tuple[str, J]] = deque()
        self.current: str | None = None  # the request whose job is being served
        self.stopping = False  # stop_locked asked the current job to end early
        self.closed = False
        self._thread: threading.Thread | None = None

    def queued_locked(self) -> int:
        return len(self._queue)

    def idle_locked(self) -> bool:
        return not self._queue and self.current is None

    def put_locked(self, request_id: str, job: J) -> bool:
        """Queue `job` for `request_id`, starting the thread if there is none. False, and nothing
        queued, when shut, or when no thread can be started (the process at its thread limit)."""
        if self.closed:
            return False
        if self._thread is None:
            thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            try:
                thread.start()
            except RuntimeError:
                return False
            self._thread = thread
        self._queue.append((request_id, job))
        self.changed.notify_all()
        return True

    def take_locked(self, request_id: str | None = None) -> list[J]:
        """Remove and return the queued jobs of `request_id` (the oldest queued job when None)."""
        if request_id is None:
            return [self._queue.popleft()[1]] if self._queue else []
        taken = [job for rid, job in self._queue if rid == request_id]
        if taken:
            self._queue = deque((rid, job) for rid, job in self._queue if rid != request_id)
            self.changed.notify_all()
        return taken

    def stop_locked(self, request_id: str) -> bool:
        """Ask the job being served, if it is `request_id`'s, to stop. True if newly asked."""
        if self.current != request_id or self.stopping:
            return False
        self.stopping = True
        return True

    def shut_locked(self) -> list[J]:
        """Refuse new jobs, stop the current one, and return the queued ones (no longer served)."""
        self.closed, self.stopping = True, self.current is not None
        jobs = [job for _, job in self._queue]
        self._queue.clear()
        self.changed.notify_all()
        return jobs

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or served. True if so within `timeout` seconds."""
        with self.lock:
            return self.changed.wait_for(self.idle_locked, timeout)

    def join(self, timeout: float | None = None) -> bool:
        """After `shut_locked`: wait for the job being served. True if the thread ended in time."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._serve(job)
            except Exception:
                logger.exception("a %s job raised", self.name)
            finally:
                with self.lock:
                    self.current, self.stopping = None, False
                    self.changed.notify_all()

    def _next(self) -> J | None:
        """The oldest queued job, its request made current in the same lock hold (no idle gap)."""
        with self.lock:
            self.changed.wait_for(lambda: self._queue or self.closed)
            if self.closed:
                return None
            self.current, job = self._queue.popleft()
            self.stopping = False
            return job
