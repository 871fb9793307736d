"""The worker connector's loader: one thread that copies layer-wise loads into the paged cache.

Where it runs: owned by a `KvtierWorkerConnector`; `submit` is called from the forward pass's
thread, the jobs run on this one, in order, one step's after another. A thread per step put a
thread start on every step's critical path; this one starts at the first layer-wise load and
lives until `close`, which finishes the queued jobs first. `submit` and `close` may be called
from different threads (never from a job: close would wait for itself).

`submit` raises RuntimeError, queueing nothing, when the thread cannot start (the process at its
thread limit): the caller then copies in line. Jobs keep their own errors for the forward pass (see
`KvtierWorkerConnector._scatter_layers`); one that raises anyway is logged, and the thread goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class LoadThread:
    def __init__(self, name: str = "kvtier-load") -> None:
        self.name = name
        # One lock over "start a thread if there is none", "queue the job" and close's "queue the
        # stop mark, join": a job is never queued behind the mark (no thread would ever run it),
        # and concurrent first submits start one thread. Each thread reads a queue of its own.
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable, *args) -> None:
        """Run `fn(*args)` on the thread, after the jobs submitted before it."""
        with self._lock:
            if self._thread is None:
                jobs: queue.SimpleQueue = queue.SimpleQueue()
                thread = threading.Thread(target=self._run, args=(jobs,), name=self.name, daemon=True)
                thread.start()
                self._thread, self._jobs = thread, jobs
            self._jobs.put((fn, args))

    def _run(self, jobs: queue.SimpleQueue) -> None:
        while (job := jobs.get()) is not None:
            fn, args = job
            try:
                fn(*args)
            except BaseException:
                logger.exception("a %s job raised", self.name)

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread (a later `submit` starts a new one; one made
        while this waits, from another thread, waits for it: jobs never overtake each other)."""
        with self._lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
            self._thread = self._jobs = None
