"""Lookups: a request's prefix lookup off the scheduler's thread when it would be a network round trip.

Why: a lookup asks the tiers below host memory in turn until the prefix is found. A tier whose index
is not in this process (Redis, kvtier_server, a peer) answers over the network, and a stalled server
holds the call up to the tier's timeout: inside `schedule()` that would hold the step of every
running request. vLLM lets `get_num_new_matched_tokens` answer None, "not known yet": the request
stays waiting, holding nothing, and is asked again at the next step. Built only when some tier below
is not local (`remote_tiers`) and loads are not "off" (`loads.asynchronous`: everything within its
step, the synchronous baseline); otherwise every lookup is answered at once, as before.

Where it runs: owned by the scheduler-side connector (kvtier.connector.scheduler). `answer`,
`arrived`, `drop`, `landed_for_prefetch` and `stats` are called from the scheduler's thread and never
wait on I/O; `wait_landed` and `close` wait, at most their `timeout`. The lookups themselves run on
one thread of their own (kvtier.connector.job_thread), started at the first one.

Lifecycle of one request's lookup (at most one entry per request id, with the token count it is for):

    answer(rid, tokens) ─┬─ the CPU and local tiers hold every chunk ─► engine.lookup now (no network)
                         └─ else start ─► queued ─► engine.lookup on the thread ─► landed
    answer(rid, tokens) while queued or running -> None; once landed -> the hit, and the entry is gone
    drop(rid) (the request finished or was aborted): a queued lookup never starts, a running one's
    answer is thrown away when it returns

`arrived` starts the lookup of a request the scheduler could not admit at once, so that its answer is
usually there when it is scheduled, and asks for a prefetch of its hit once it lands (the connector
submits those from `landed_for_prefetch`, each step). A landed answer may be a few steps old when it
is used: a chunk evicted since is read short (the load recomputes from there), one stored since is
computed again; never wrong KV.

Bounded: at most `max_in_flight` lookups are queued or running (a dropped request's running one
counts until it returns); past that, `answer` says None and counts a deferral: the request is asked
again at the next step. A lookup that raises answers 0 (its prompt is computed) and counts a
failure, as does one that cannot be queued (closed, or no thread to be had); a tier that times out
answers misses by itself (counted in its `errors`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.connector.job_thread import JobThread
from kvtier.engine import CacheEngine
from kvtier.keys import ChunkSpan
from kvtier.log_limit import LogLimiter
from kvtier.storage_admin import KeyedTier
from kvtier.tiers.base import Tier

logger = logging.getLogger(__name__)

COUNTERS = ("lookups_local", "lookups_background", "lookups_deferred", "lookups_dropped", "lookup_failures")


def is_local(tier: Tier) -> bool:
    """Whether `tier` answers `has` from this process's own index (the disk tier), not over a network:
    its `local` (kvtier.tiers.base.Tier). A tier from outside kvtier that does not say is local when it
    indexes and reports its own keys (`storage_admin.KeyedTier`), else it is taken as a round trip."""
    local = getattr(tier, "local", None)
    return bool(local) if local is not None else isinstance(tier, KeyedTier)


def remote_tiers(tiers: Sequence[Tier]) -> list[Tier]:
    """The tiers of `tiers` whose lookup is a round trip (Redis, kvtier_server, peers)."""
    return [tier for tier in tiers if not is_local(tier)]


@dataclass(slots=True, eq=False)
class _Lookup:
    request_id: str
    tokens: Sequence[int]  # a waiting request's tokens: the engine does not change them while it waits
    num_tokens: int
    hit: int | None = None  # tokens found, once landed
    prefetch: bool = False  # `arrived` asked for a prefetch of the hit once it lands


class Lookups:
    def __init__(self, engine: CacheEngine, max_in_flight: int):
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight <= 0:
            raise ValueError(f"Lookups max_in_flight must be a positive int, got {max_in_flight!r}")
        self.engine, self.max_in_flight = engine, max_in_flight
        self._local = [t for t in engine.storage.lower if is_local(t)]
        self._log = LogLimiter(logger)
        # The queue and the thread; its lock also guards the entries and the counters.
        self._jobs: JobThread[_Lookup] = JobThread("kvtier-lookup", self._serve)
        self._lock = self._jobs.lock
        self._entries: dict[str, _Lookup] = {}
        self._landed = 0  # entries with an answer not taken yet
        self._counts = dict.fromkeys(COUNTERS, 0)

    def answer(self, request_id: str, tokens: Sequence[int]) -> int | None:
        """The hit of `tokens` (as `CacheEngine.lookup`), or None while it is not known yet: a lookup
        is then queued or running for the request, or could not start (the bound), and the caller
        asks again at its next step. A landed answer is given once."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is not None and entry.num_tokens == len(tokens):
                if entry.hit is None:
                    return None
                self._forget_locked(entry)
                return entry.hit
            if entry is not None:  # for other tokens (the request was preempted since): not this answer
                self._forget_locked(entry)
        # One probe of host memory and the local tiers answers or says it cannot (not a check and
        # then a lookup: a chunk evicted in between would send that lookup over the network here).
        if (hit := self.engine.lookup(tokens, only=self._local)) is not None:
            with self._lock:
                self._counts["lookups_local"] += 1
            return hit
        self._start(request_id, tokens)
        return None

    def arrived(self, request_id: str, tokens: Sequence[int], prefetch: bool) -> None:
        """A request left waiting after the step it arrived in: start its lookup unless one is under
        way; with `prefetch`, its hit is handed to `landed_for_prefetch` once it lands."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is not None and entry.num_tokens != len(tokens):
                self._forget_locked(entry)
                entry = None
        if entry is None:
            entry = self._start(request_id, tokens)
        if entry is not None and prefetch:
            with self._lock:
                entry.prefetch = True

    def landed_for_prefetch(self) -> list[tuple[str, list[ChunkSpan]]]:
        """(request id, the spans of its hit) of each lookup that `arrived` asked to prefetch and that
        has landed since the last call, its answer still to be taken."""
        with self._lock:
            due = [e for e in self._entries.values() if e.prefetch and e.hit is not None]
            for entry in due:
                entry.prefetch = False
        spans = [(e.request_id, self.engine.db.spans(e.tokens), e.hit) for e in due]
        return [(rid, [s for s in all_spans if s.end <= hit]) for rid, all_spans, hit in spans]

    def drop(self, request_id: str) -> None:
        """The request is done: its queued lookup never starts, a running one's answer is discarded."""
        with self._lock:
            entry = self._entries.get(request_id)
            if entry is not None:
                self._forget_locked(entry)
                self._counts["lookups_dropped"] += 1

    def wait_landed(self, timeout: float) -> bool:
        """Block until some answer has landed (not taken yet), or nothing is queued or running. True
        if an answer is there within `timeout` seconds."""
        with self._lock:
            self._jobs.changed.wait_for(lambda: self._landed or self._jobs.idle_locked(), timeout)
            return self._landed > 0

    def stats(self) -> dict[str, int]:
        """The counters (answered at once from local tiers, started in the background, deferred at the
        bound, dropped with their request, failed), the lookups queued or running, and the requests
        with a lookup kept (queued, running or landed, not taken)."""
        with self._lock:
            return {**self._counts, "lookups_in_flight": self._in_flight_locked(),
                    "lookups_kept": len(self._entries)}

    def close(self, timeout: float | None = None) -> bool:
        """Drop the queued lookups, stop the thread. True if it stopped within `timeout` seconds."""
        with self._lock:
            self._jobs.shut_locked()
            self._entries.clear()
            self._landed = 0
        return self._jobs.join(timeout)

    # -- inside --------------------------------------------------------------------------------

    def _start(self, request_id: str, tokens: Sequence[int]) -> _Lookup | None:
        with self._lock:
            if self._in_flight_locked() >= self.max_in_flight:
                self._counts["lookups_deferred"] += 1
                return None
            entry = _Lookup(request_id, tokens, len(tokens))
            self._entries[request_id] = entry
            if not self._jobs.put_locked(request_id, entry):  # shut, or no thread to be had: a miss
                self._log.warning("thread", "kvtier lookups: cannot queue a lookup (closed or no thread)")
                self._counts["lookup_failures"] += 1
                entry.hit = 0  # answered at the next ask: the request is computed, never left waiting
                self._landed += 1
                return entry
            self._counts["lookups_background"] += 1
            return entry

    def _forget_locked(self, entry: _Lookup) -> None:
        del self._entries[entry.request_id]
        if entry.hit is not None:
            self._landed -= 1
        else:
            self._jobs.take_locked(entry.request_id)  # queued: never starts (running: discarded)

    def _in_flight_locked(self) -> int:
        return self._jobs.queued_locked() + (self._jobs.current is not None)

    def _serve(self, entry: _Lookup) -> None:
        try:
            hit = self.engine.lookup(entry.tokens)
        except Exception:  # the storage raised (e.g. closed under us): a miss, the prompt computed
            self._log.warning("lookup", "kvtier lookup failed; its request is computed", exc_info=True)
            hit = None
        with self._lock:
            if hit is None:
                self._counts["lookup_failures"] += 1
            if self._entries.get(entry.request_id) is entry:  # not dropped or replaced meanwhile
                entry.hit = hit or 0
                self._landed += 1
