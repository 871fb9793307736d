"""The Prefetcher: moves the chunks of a waiting request's hit from below the CPU tier into it.

Where it runs: owned by the scheduler-side connector, which submits the requests that arrived and
still wait for a seat after a step (`submit_below`), and cancels a request's prefetch when it
finishes. `submit`, `submit_below`, `cancel` and `stats` may be called from any thread and never
wait on I/O; `wait_idle` and `close` wait, at most their `timeout`, for the piece being read. The
reads run on one thread of its own (kvtier.connector.job_thread), started at the first submit.

Lifecycle of one prefetch, by request id:

    submit(rid, spans) -> queued ──► read piece by piece ──► done
                            │                 │
             cancel / close: dropped     cancel / close: the piece being read lands, no more start

A request's `spans` are its hit (what a lookup found), in token order. The leading ones the CPU tier
already holds are skipped; the rest are read with `storage.get(piece, None, promote=True)` in pieces
of at most `max_bytes_in_flight` payload bytes, so no more than that is ever being read for
prefetch: no copy out, the chunks land in the CPU tier. A prefetch never leases or pins: what it
promotes may be evicted again (LRU), which costs a later load a read from below, never wrong KV.

The queue is bounded: past `max_queued` waiting requests the oldest one is dropped (counted). Its
request is the nearest to being scheduled, when its own load reads the chunks anyway; the newest have
the most time for a prefetch to land. The queue is FIFO otherwise: requests are scheduled roughly in
arrival order.

Failures never leave the thread: a chunk of the hit that no tier serves any more (a tier failing,
a record gone or corrupt; the tiers count which) ends that request's prefetch there, as a prefix
must, and counts one failure; so does an exception out of the storage (e.g. closed under us).
The storage reads are concurrent with everyone else's, so a prefetch never delays a load, except
by sharing the tiers' bandwidth, which `max_bytes_in_flight` bounds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvtier.connector.job_thread import JobThread
from kvtier.keys import ChunkSpan
from kvtier.layout import KVLayout
from kvtier.log_limit import LogLimiter
from kvtier.storage import StorageManager

logger = logging.getLogger(__name__)

MAX_QUEUED = 256  # waiting requests; past this the oldest queued prefetch is dropped
COUNTERS = ("prefetch_requests", "prefetch_chunks", "prefetch_bytes", "prefetch_cancelled",
            "prefetch_dropped", "prefetch_failures")


class Prefetcher:
    def __init__(self, storage: StorageManager, layout: KVLayout, max_bytes_in_flight: int,
                 max_queued: int = MAX_QUEUED):
        for name, value in (("max_bytes_in_flight", max_bytes_in_flight), ("max_queued", max_queued)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Prefetcher {name} must be a positive int, got {value!r}")
        self.storage, self.layout = storage, layout
        self.max_bytes_in_flight, self.max_queued = max_bytes_in_flight, max_queued
        self._log = LogLimiter(logger)
        # The queue, the request being read and the thread (kvtier.connector.job_thread); its lock
        # also guards the counters and the bytes in flight.
        self._jobs: JobThread[list[ChunkSpan]] = JobThread("kvtier-prefetch", self._serve)
        self._lock = self._jobs.lock
        self._in_flight = 0  # payload bytes of the piece being read
        self._counts = dict.fromkeys(COUNTERS, 0)

    def submit(self, request_id: str, spans: Sequence[ChunkSpan]) -> None:
        """Queue a prefetch of `spans` (the request's hit, in token order). Does not wait. A second
        submit for a request still queued replaces the first; after close, nothing is queued."""
        with self._lock:
            if self._jobs.closed or not spans:
                return
            self._jobs.take_locked(request_id)
            self._counts["prefetch_requests"] += 1
            if not self._jobs.put_locked(request_id, list(spans)):  # no thread to be had: an optimisation
                self._counts["prefetch_dropped"] += 1
                self._log.warning("thread", "kvtier prefetch: cannot start a thread; prefetch dropped")
            while self._jobs.queued_locked() > self.max_queued:
                self._counts["prefetch_dropped"] += len(self._jobs.take_locked())

    def submit_below(self, request_id: str, spans: Sequence[ChunkSpan]) -> None:
        """`submit`, unless the CPU tier already holds every span (nothing to bring up: not counted)."""
        if self.storage.cpu_prefix([s.key for s in spans]) < len(spans):
            self.submit(request_id, spans)

    def cancel(self, request_id: str) -> None:
        """Drop the request's prefetch: queued, it never starts; being read, it stops after the
        piece in flight. A request with no prefetch is ignored."""
        with self._lock:
            if self._jobs.take_locked(request_id) or self._jobs.stop_locked(request_id):
                self._counts["prefetch_cancelled"] += 1

    def stats(self) -> dict[str, int]:
        """The counters (requests submitted, chunks and payload bytes brought up, prefetches
        cancelled, dropped from a full queue and failed) and the bytes being read right now."""
        with self._lock:
            return {**self._counts, "in_flight_bytes": self._in_flight}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or being read. True if so within `timeout` seconds."""
        return self._jobs.wait_idle(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Drop the queued prefetches (counted as dropped), let the piece in flight land, stop the
        thread. True if it stopped within `timeout` seconds. Later submits are ignored."""
        with self._lock:
            self._counts["prefetch_dropped"] += len(self._jobs.shut_locked())
        return self._jobs.join(timeout)

    # -- the thread ----------------------------------------------------------------------------

    def _serve(self, spans: list[ChunkSpan]) -> None:
        try:
            self._prefetch(spans)
        except Exception:  # the storage raised (closed under us): this request's prefetch fails
            self._log.warning("read", "kvtier prefetch: a storage call failed", exc_info=True)
            with self._lock:
                self._counts["prefetch_failures"] += 1
        finally:
            with self._lock:
                self._in_flight = 0

    def _prefetch(self, spans: list[ChunkSpan]) -> None:
        """Read the spans past the CPU tier's leading ones, piece by piece, until done, a piece
        comes back short (one failure), or cancel/close asks to stop."""
        done = self.storage.cpu_prefix([s.key for s in spans])
        while done < len(spans) and (piece := self._piece(spans, done)):
            nbytes = [self.layout.chunk_bytes(s.num_tokens) for s in piece]
            with self._lock:
                if self._jobs.stopping:
                    return
                self._in_flight = sum(nbytes)
            got = self.storage.get(piece, None, promote=True)
            with self._lock:
                self._in_flight = 0
                self._counts["prefetch_chunks"] += got
                self._counts["prefetch_bytes"] += sum(nbytes[:got])
                if got < len(piece):  # a prefix ends at its first chunk no tier serves
                    self._counts["prefetch_failures"] += 1
                    return
            done += got

    def _piece(self, spans: list[ChunkSpan], start: int) -> list[ChunkSpan]:
        """The spans from `start` on whose payload fits `max_bytes_in_flight`. Empty when the first
        alone does not fit (a misconfigured bound): the prefetch stops rather than exceed it."""
        piece, nbytes = [], 0
        for s in spans[start:]:
            nbytes += self.layout.chunk_bytes(s.num_tokens)
            if nbytes > self.max_bytes_in_flight:
                break
            piece.append(s)
        if not piece:
            self._log.warning("bound", "kvtier prefetch: a chunk is larger than max_bytes_in_flight "
                              "(%d): nothing prefetched", self.max_bytes_in_flight)
        return piece
