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
        REFUSED        the server answered but refused this command (an ACL, OOM, a frame over its
                       size limit): the medium is up, so no back-off; a warning at most once a
                       minute (LogLimiter)
        MISCONFIGURED  the server refuses this client as configured (a wrong token or password, a
                       protocol version it does not speak): backoff.hold(), so the tier misses
                       without a round trip and asks again once per `max_s` (a fix on the server
                       is picked up); one ERROR line saying what to fix (once per hold and at most
                       once a minute), not one per retry
        BUG            an exception the tier did not expect: its traceback at most once a minute,
                       then as OUTAGE
        None           not a medium failure: raised to the caller
    else: backoff.succeeded(); the first success after an outage logs "is back" once

`errors` counts chunks: a failed round trip for n chunks adds n (a call that names no chunks, like
a usage query, adds 1), the unit of the `hits`, `misses` and `corrupt` counters beside it.

The back-off delay starts at `initial_s`, doubles with each failed probe up to `max_s`, and resets
on the first success (the calls that were in flight when the medium failed fail too, and are
counted, but do not lengthen the delay: eight I/O threads must not turn a 1 s blip into `max_s`).
While backing off, `ready()` is False until the delay has passed; then it lets exactly one caller
through (the probe) and restarts the delay, so a dead medium costs one attempt per period however
many threads ask, and a probe that never reports cannot wedge the tier.
A call that was let through while the medium was up but must first wait its turn (for one of the
tier's connections) checks `superseded()` when its turn comes and raises BackedOff if the medium
went down meanwhile: the threads queued behind a hung server cost one timeout, not one each.
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
        self._outages = 0  # times it went down (or began a hold): tells a call what it waited past
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

    @property
    def down(self) -> bool:
        return self._down

    @property
    def outages(self) -> int:
        return self._outages

    def failed(self, probe: bool = True) -> bool:
        """Record a failed attempt and start (or lengthen) the back-off. True when this failure
        took the medium from up to down (the moment to log once). `probe=False`: the attempt began
        before the medium went down (it was in flight when another call failed), so its failure
        says nothing new and leaves the delay alone; only a failed probe lengthens it."""
        with self._lock:
            went_down = not self._down
            if not went_down and not probe:
                return False
            self._outages += went_down
            self._delay = self.initial_s if went_down else min(2 * self._delay, self.max_s)
            self._down = True
            self._retry_at = self._clock() + self._delay
            return went_down

    def hold(self) -> bool:
        """Back off for `max_s` at once, and after each probe: for a refusal that no quick retry
        fixes. True when this began the hold (the moment to log once); `succeeded` ends it."""
        with self._lock:
            began = not self._held
            self._outages += began
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


class BackedOff(Exception):
    """Raised by a round trip that, when its turn came (a free connection), found the medium had
    gone down after the guard let it through (`FailureGuard.superseded`): it is answered like a
    call the back-off answers, a miss not counted, instead of adding one more timeout."""


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
    of the round trip to a `Failure`, or None to let it propagate; `meanwhile` says in log lines
    what callers get while the medium is down."""

    def __init__(self, label: str, backoff: Backoff, count_errors: Callable[[int], None], log: LogLimiter,
                 classify: Callable[[Exception], Failure | None], meanwhile: str = "serving misses"):
        self.label = label
        self.meanwhile = meanwhile
        self.backoff = backoff
        self._count_errors = count_errors
        self._log = log
        self._classify = classify
        self._local = threading.local()  # the outage count each thread's call was let through at

    def call(self, chunks: int, round_trip: Callable[[], T]) -> T | None:
        """`round_trip()`, or None when backing off or when it failed (counted as `chunks` errors,
        at least 1)."""
        probe = self.backoff.down  # (read before ready(): let through while down = a probe)
        self._local.outages = self.backoff.outages
        if not self.backoff.ready():
            return None
        try:
            result = round_trip()
        except BackedOff:
            return None
        except Exception as exc:
            failure = self._classify(exc)
            if failure is None:
                raise
            self._count_errors(max(chunks, 1))
            self._failed(failure, exc, probe)
            return None
        self._up()
        return result

    def superseded(self) -> bool:
        """From inside a round trip, on its thread: has the medium gone down since this call was
        let through? (A call that waited for a connection then raises BackedOff.)"""
        return self.backoff.outages != getattr(self._local, "outages", self.backoff.outages)

    def _failed(self, failure: Failure, exc: Exception, probe: bool) -> None:
        logger, what = self._log.logger, f"{type(exc).__name__}: {exc}"
        if failure is Failure.REFUSED:
            self._log.warning("refused", "%s refused a command (%s)", self.label, what)
            self._up()  # a probe that got an answer: the medium is up
        elif failure is Failure.MISCONFIGURED:
            # Once per hold, and at most once a minute: a call in flight on a connection the server
            # accepted earlier ends a hold when it succeeds, so a server refusing only some clients
            # (one replica with another token) would otherwise log a line per flap.
            if self.backoff.hold():
                self._log.error("misconfigured", "%s refuses this client as configured (%s): fix the "
                                "configuration (the token or password, the protocol version); %s, asking "
                                "again every %g s", self.label, what, self.meanwhile, self.backoff.max_s)
        else:
            if failure is Failure.BUG:
                self._log.error("unexpected", "%s: unexpected failure", self.label, exc_info=True)
            if self.backoff.failed(probe):
                logger.warning("%s unavailable (%s); %s, retrying after %g s", self.label, what,
                               self.meanwhile, self.backoff.initial_s)

    def _up(self) -> None:
        if self.backoff.succeeded():
            self._log.logger.info("%s is back", self.label)
