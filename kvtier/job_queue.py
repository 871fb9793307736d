"""Background I/O jobs: the only place kvtier runs work on other threads (the disk and socket reads
of kvtier.transfers, the writes of kvtier.write_behind).

Where it runs: in the CacheEngine's process; jobs run on a small thread pool (disk and socket
calls release the GIL, so threads overlap real I/O). Lifecycle: `submit(fn, *args)` returns a
`Future` at once and never blocks the caller on I/O; `drain()` waits for every job submitted so far
(flush, clear, close); `close()` drains and stops the threads. Completion callbacks are the job's
own business (a write calls back into the StorageManager under its lock: kvtier.write_behind). A
job that raises is logged (at most a line a minute: kvtier.log_limit) and counted, never lost silently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from kvtier.log_limit import LogLimiter

logger = logging.getLogger(__name__)


class TransferQueue:
    def __init__(self, threads: int, name: str = "kvtier-io"):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._inflight: set[Future] = set()
        self.failed = 0
        self.threads = threads
        self._log = LogLimiter(logger)  # a job failing for every batch must not log for every batch

    def submit(self, fn: Callable, *args) -> Future:
        future = self._pool.submit(fn, *args)
        with self._lock:
            self._inflight.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future) -> None:
        with self._lock:
            self._inflight.discard(future)
        if future.exception() is not None:
            self.failed += 1
            self._log.error("job", "background transfer failed", exc_info=future.exception())

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._inflight)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every job submitted so far. True when all finished within `timeout`."""
        with self._lock:
            jobs = list(self._inflight)
        done, not_done = wait(jobs, timeout=timeout)
        return not not_done

    def close(self) -> None:
        self.drain()
        self._pool.shutdown(wait=True)
