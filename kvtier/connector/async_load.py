"""Asynchronous loads: a request's kvtier hit is read in the background while the engine runs steps
for the others, and the request is scheduled once its KV is in place.

Where it runs: owned by a `KvtierWorkerConnector`. `submit`, `cancel`, `pop_finished`, `wait`,
`stats` and `close` may be called from any thread (one lock); the loads run one after another on
one thread of its own (a `JobThread`, started at the first submit).

One load: `engine.retrieve` into a staging buffer of the loader's own, at most `max_bytes_in_flight`
(a larger load is cut there: the tokens past it are recomputed, counted as `async_cut`), then the
scatter into the request's blocks on this thread (on CUDA on a stream of its own, synchronised before
it reports), then the lease is released and the token reached recorded. Writing the paged cache off
the forward thread is safe: the blocks belong to a request that waits for its KV, which no step runs
and whose blocks the engine frees only after the load is reported, even when it is aborted meanwhile.

Every submitted load is reported exactly once by `pop_finished` (request id -> token reached): landed,
short (reached < end), failed (reached = start), or cancelled before it started (`cancel`, `close`:
reached = start, lease released at once; recorded as a cancel, not a shortfall). Staging bytes and
loads in flight are back to zero once every load is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.connector.job_thread import JobThread
from kvtier.connector.load_read import PagedKV, StagingBuffer, first_token, read_load
from kvtier.connector.metadata import LoadSpec
from kvtier.engine import CacheEngine
from kvtier.log_limit import LogLimiter
from kvtier.platforms.base import CopyStream, Platform, SyncStream

logger = logging.getLogger(__name__)

CLOSE_WAIT_S = 30.0  # close(): how long the running load may take to land
COUNTERS = ("async_loads", "async_cut", "async_cancelled", "async_failures")


@dataclass(frozen=True, slots=True)
class _Job:
    spec: LoadSpec
    step: int


class AsyncLoader:
    def __init__(self, engine: CacheEngine, max_bytes_in_flight: int,
                 record: Callable[[LoadSpec, int, int, bool], None]):
        self.engine = engine
        self.max_bytes_in_flight = max_bytes_in_flight
        self._record = record  # (spec, step, reached, cancelled): the worker's events and counters
        self._log = LogLimiter(logger)
        self._cache: PagedKV | None = None  # `bind`
        self._staging: StagingBuffer | None = None
        self._stream: CopyStream = SyncStream()  # the loader's own copy stream for its scatters (`bind`)
        # The queue and the load being read (`JobThread`); its lock also guards what finished, the
        # counters and the staging bytes, and its `changed` wakes `wait` when a load finished.
        self._jobs: JobThread[_Job] = JobThread("kvtier-async-load", self._serve)
        self._lock = self._jobs.lock
        self._staging_bytes = 0  # of the load being read
        self._finished: dict[str, int] = {}
        self._counts = dict.fromkeys(COUNTERS, 0)

    def bind(self, cache: PagedKV, platform: Platform) -> None:
        """The paged cache to scatter into; before the first `submit`."""
        self._cache = cache
        # Where the disk tier reads straight into GPU memory (kvtier.tiers.gds), these loads (the ones
        # that reach below the CPU tier) stage there: disk chunks never cross host memory.
        kv = getattr(cache, "kv", None)
        device = kv.device if kv is not None and self.engine.storage.reads_into(kv.device) else None
        self._staging = StagingBuffer(self.engine, platform.pin_by_default(), device)
        self._stream = platform.copy_stream()  # one for every load, not one each

    def submit(self, spec: LoadSpec, step: int) -> None:
        """Queue `spec` (its lease taken); it is reported by `pop_finished` whatever happens."""
        job = _Job(spec, step)
        with self._lock:
            if self._jobs.closed:
                self._drop_locked(job)
                return
            self._counts["async_loads"] += 1
            if self._jobs.put_locked(spec.request_id, job):
                return
        # No thread to be had (the process at its limit): load in line, as bulk loads do.
        self._log.error("thread", "could not start the asynchronous load thread; loading in line")
        self._serve(job)

    def drop(self, spec: LoadSpec, step: int) -> None:
        """A load whose request was aborted before it was handed over: never read, its lease released,
        reported by `pop_finished` at its start, as a cancelled load is."""
        with self._lock:
            self._counts["async_loads"] += 1
            self._drop_locked(_Job(spec, step))

    def cancel(self, request_id: str) -> None:
        """A queued load of the request never starts (reported at its start); one being read lands."""
        with self._lock:
            for job in self._jobs.take_locked(request_id):
                self._drop_locked(job)

    def _drop_locked(self, job: _Job) -> None:
        self.engine.release(job.spec.lease)
        self._counts["async_cancelled"] += 1
        self._finished[job.spec.request_id] = job.spec.start
        self._record(job.spec, job.step, job.spec.start, True)
        self._jobs.changed.notify_all()

    def pop_finished(self) -> dict[str, int]:
        """The loads finished since the last call: request id -> token reached (each reported once)."""
        with self._lock:
            done, self._finished = self._finished, {}
            return done

    def wait(self, timeout: float | None) -> bool:
        """Block until some load has finished and is not popped yet, or none is in flight. True if one
        has, within `timeout` seconds."""
        with self._lock:
            self._jobs.changed.wait_for(lambda: self._finished or self._jobs.idle_locked(), timeout)
            return bool(self._finished)

    def stats(self) -> dict[str, int]:
        """Loads submitted, cut to the staging bound, cancelled and failed; loads in flight (queued or
        being read) and the staging bytes of the one being read."""
        with self._lock:
            in_flight = self._jobs.queued_locked() + (self._jobs.current is not None)
            return {**self._counts, "async_in_flight": in_flight, "async_staging_bytes": self._staging_bytes}

    def close(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Cancel the queued loads, let the one being read land (at most `timeout` seconds), stop the
        thread. True if it stopped in time. Later submits are cancelled at once."""
        with self._lock:
            for job in self._jobs.shut_locked():
                self._drop_locked(job)
        return self._jobs.join(timeout)

    # -- the thread ----------------------------------------------------------------------------

    def _serve(self, job: _Job) -> None:
        reached = job.spec.start
        try:
            reached = self._load(job.spec)
        except Exception:  # the scatter failed: the KV is not in place, recomputed from the start
            self._log.error("scatter", "asynchronous kvtier load for request %s failed",
                            job.spec.request_id, exc_info=True)
            with self._lock:
                self._counts["async_failures"] += 1
        finally:
            self._record(job.spec, job.step, reached, False)
            with self._lock:
                self._staging_bytes = 0
                self._finished[job.spec.request_id] = reached
                self._jobs.changed.notify_all()

    def _load(self, spec: LoadSpec) -> int:
        """Read and scatter one load; the token it reached."""
        first = first_token(spec, self.engine.db.chunk_size)
        upto = self._fit(spec, first)
        if upto <= spec.start:
            self.engine.release(spec.lease)
            return spec.start
        try:
            out = self._staging.get(upto - first)
        except BaseException:  # no host memory for it: `read_load` never runs, which releases the lease
            self.engine.release(spec.lease)
            raise
        with self._lock:
            self._staging_bytes = self.engine.layout.chunk_bytes(upto - first)
        kv, reached = read_load(self.engine, spec, first, out, self._log, upto)
        if reached > spec.start:
            with self._stream.active():
                bs = self._cache.block_size
                self._cache.scatter(list(spec.block_ids[spec.start // bs:]), kv[:, :, spec.start - first:
                                                                                   reached - first])
            self._stream.synchronize()  # the staging buffer is reused, and the request may run next
        return reached

    def _fit(self, spec: LoadSpec, first: int) -> int:
        """Where the load's read stops: the whole hit, or the last chunk that fits the staging bound."""
        chunk = self.engine.db.chunk_size
        fit = self.max_bytes_in_flight // self.engine.layout.chunk_bytes(1)
        upto = min(len(spec.token_ids), first + fit - fit % chunk)
        if upto < spec.end:
            with self._lock:
                self._counts["async_cut"] += 1
        return upto
