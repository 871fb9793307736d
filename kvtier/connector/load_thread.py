"""The worker connector's loader: one thread that copies layer-wise loads into the paged cache.

Where it runs: owned by a `KvtierWorkerConnector`; `submit` is called from the forward pass's
thread, the jobs run on this one, in order, one step's after another. A thread per step put a
thread start on every step's critical path; this one starts at the first layer-wise load and
lives until `close`, which finishes the queued jobs first.

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
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable, *args) -> None:
        """Run `fn(*args)` on the thread, after the jobs submitted before it."""
        if self._thread is None or not self._thread.is_alive():
            thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            thread.start()
            self._thread = thread
        self._jobs.put((fn, args))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args = job
            try:
                fn(*args)
            except BaseException:
                logger.exception("a %s job raised", self.name)

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread (a later `submit` starts a new one)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
