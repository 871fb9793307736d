"""Failure handling for network tiers: `Backoff` (skip a failed medium for a while, then let one call
probe it) and `FailureGuard` (one guarded round trip: a failure is a miss, an `errors` count, a
back-off and one log line per outage). `RedisTier` and `RemoteTier` both call their medium only
through a `FailureGuard`; the P2P tier's transport will too.

Where it runs: shared by every thread that calls one tier (I/O threads and the lookup path), so both
classes are thread-safe. A guarded call::

    result = guard.call(chunks, round_trip)   # None: backing off, or the round trip failed

    if not backoff.ready():      # backing off: answer a miss at once, touch nothing
        return None
    try: round_trip()
    except error: count `chunks` errors, then by `classify(error)`:
        OUTAGE         backoff.failed(); the first failure logs "unavailable" (a warning) once
        REFUSED        the server answered but refused this command (an ACL, OOM): the medium is
                       up, so no back-off; a warning at most once a minute (LogLimiter)
        MISCONFIGURED  the server refuses this client as configured (a wrong token, a request shape
                       it does not take): backoff.hold(), so the tier misses without a round trip
                       and asks again once per `max_s` (a fix on the server is picked up); one ERROR
                       line saying what to fix, not one per retry
        BUG            an exception the tier did not expect: its traceback at most once a minute,
                       then as OUTAGE
        None           not a medium failure: raised to the caller
    else: backoff.succeeded(); the first success after an outage logs "is back" once

`errors` counts chunks: a failed round trip for n chunks adds n (a call that names no chunks, like
a usage query, adds 1), the unit of the `hits`, `misses` and `corrupt` counters beside it.

The back-off delay starts at `initial_s`, doubles with each further failure up to `max_s`, and
resets on the first success. While backing off, `ready()` is False until the delay has passed; then
it lets exactly one caller through (the probe) and restarts the delay, so a dead medium costs one
attempt per period however many threads ask, and a probe that never reports cannot wedge the tier.
No sleeping and no timers: the state only moves when callers ask. `clock` is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import TypeVar

from kvtier.log_limit import LogLimiter

T = TypeVar("T")


class Backoff:
    def __init__(self, initial_s: float, max_s: float, clock: Callable[[], float] = time.monotonic):
        if initial_s < 0 or max_s < 0:
            raise ValueError(f"back-off delays must be >= 0, got {initial_s}, {max_s}")
        self.initial_s = initial_s
        self.max_s = max(max_s, initial_s)  # a cap below the first delay means: never grow
        self._clock = clock
        self._lock = threading.Lock()
        self._down = False
        self._held = False  # down by hold(): a refusal, not an outage
        self._delay = initial_s
        self._retry_at = 0.0

    def ready(self) -> bool:
        """May the caller use the medium now? Always while it is up; while it is down, True for one
        caller once the delay has passed (that caller must then report `failed` or `succeeded`)."""
        if not self._down:  # the hot path: no lock while the medium is healthy
            return True
        with self._lock:
            if not self._down:
                return True
            now = self._clock()
            if now < self._retry_at:
                return False
            self._retry_at = now + self._delay  # the other callers keep missing during the probe
            return True

    def failed(self) -> bool:
        """Record a failed attempt and start (or lengthen) the back-off. True when this failure
        took the medium from up to down (the moment to log once)."""
        with self._lock:
            went_down = not self._down
            self._delay = self.initial_s if went_down else min(2 * self._delay, self.max_s)
            self._down = True
            self._retry_at = self._clock() + self._delay
            return went_down

    def hold(self) -> bool:
        """Back off for `max_s` at once, and after each probe: for a refusal that no quick retry
        fixes. True when this began the hold (the moment to log once); `succeeded` ends it."""
        with self._lock:
            began = not self._held
            self._down = self._held = True
            self._delay = self.max_s
            self._retry_at = self._clock() + self.max_s
            return began

    def succeeded(self) -> bool:
        """Record a successful attempt. True when it brought the medium back from down."""
        if not self._down:
            return False
        with self._lock:
            came_back, self._down, self._held, self._delay = self._down, False, False, self.initial_s
            return came_back


class Failure(Enum):
    """What a failed round trip says about the medium (see the module docstring)."""

    OUTAGE = "outage"
    REFUSED = "refused"
    MISCONFIGURED = "misconfigured"
    BUG = "bug"


class FailureGuard:
    """Runs a tier's round trips under one `Backoff`. `label` names the medium in log lines
    ("redis tier: host:port"); `count_errors(n)` adds n to the tier's `errors` counter; `log` is
    the tier's LogLimiter (its logger gets the once-per-outage lines); `classify` maps an exception
    of the round trip to a `Failure`, or None to let it propagate."""

    def __init__(self, label: str, backoff: Backoff, count_errors: Callable[[int], None], log: LogLimiter,
                 classify: Callable[[Exception], Failure | None]):
        self.label = label
        self.backoff = backoff
        self._count_errors = count_errors
        self._log = log
        self._classify = classify

    def call(self, chunks: int, round_trip: Callable[[], T]) -> T | None:
        """`round_trip()`, or None when backing off or when it failed (counted as `chunks` errors,
        at least 1)."""
        if not self.backoff.ready():
            return None
        try:
            result = round_trip()
        except Exception as exc:
            failure = self._classify(exc)
            if failure is None:
                raise
            self._count_errors(max(chunks, 1))
            self._failed(failure, exc)
            return None
        self._up()
        return result

    def _failed(self, failure: Failure, exc: Exception) -> None:
        logger, what = self._log.logger, f"{type(exc).__name__}: {exc}"
        if failure is Failure.REFUSED:
            self._log.warning("refused", "%s refused a command (%s)", self.label, what)
            self._up()  # a probe that got an answer: the medium is up
        elif failure is Failure.MISCONFIGURED:
            if self.backoff.hold():
                logger.error("%s refuses this client as configured (%s): fix the configuration (the "
                             "token, the server's limits); serving misses, asking again every %g s",
                             self.label, what, self.backoff.max_s)
        else:
            if failure is Failure.BUG:
                self._log.error("unexpected", "%s: unexpected failure", self.label, exc_info=True)
            if self.backoff.failed():
                logger.warning("%s unavailable (%s); serving misses, retrying after %g s", self.label,
                               what, self.backoff.initial_s)

    def _up(self) -> None:
        if self.backoff.succeeded():
            self._log.logger.info("%s is back", self.label)
