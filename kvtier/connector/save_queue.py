"""The worker connector's saver: one thread that stores gathered KV into kvtier.

Where it runs: owned by a `KvtierWorkerConnector`; `submit` and `store` are called from the forward
pass's thread (the KV already gathered into a tensor of its own, so the engine may reuse the blocks
at once), the stores run on the saver thread and never block the forward pass. `drain` and `close`
wait for them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from kvtier.connector.metadata import SaveSpec
from kvtier.engine import CacheEngine
from kvtier.log_limit import LogLimiter


class SaveQueue:
    def __init__(self, engine: CacheEngine, stats: dict[str, int], lock: threading.Lock, log: LogLimiter):
        self.engine = engine
        self._stats, self._lock, self._log = stats, lock, log  # the worker's counters, and their lock
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="kvtier-save")
        self._saves: set[Future] = set()

    def submit(self, fn: Callable, *args) -> None:
        """Run `fn(*args)` on the saver thread, after the saves submitted before it."""
        future = self._saver.submit(fn, *args)
        self._saves.add(future)
        future.add_done_callback(self._saves.discard)

    def store(self, spec: SaveSpec, kv: torch.Tensor) -> None:
        """Store `kv` (tokens `spec.start:spec.end`) in kvtier, on the saver thread."""
        self.submit(self._store, spec, kv)

    def count_failure(self) -> None:
        with self._lock:
            self._stats["save_failures"] += 1

    def _store(self, spec: SaveSpec, kv: torch.Tensor) -> None:
        try:
            self.engine.store(spec.token_ids, kv, start=spec.start)
            with self._lock:
                self._stats["saves"] += 1
                self._stats["saved_tokens"] += spec.end - spec.start
        except Exception:  # the KV is simply not cached; the engine's output is unaffected
            self.count_failure()
            self._log.error("save", "kvtier save for request %s failed", spec.request_id, exc_info=True)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every save handed over has been stored. True if all did in time."""
        _, pending = wait(list(self._saves), timeout)
        return not pending

    def close(self) -> None:
        self._saver.shutdown(wait=True)
