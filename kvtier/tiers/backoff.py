"""Back-off for a tier whose medium failed: skip it for a while, then let one call probe it.

Where it runs: shared by every thread that calls one tier (I/O threads and the lookup path), so it
is thread-safe. Lifecycle, per call to the medium::

    if not backoff.ready():      # backing off: answer a miss at once, touch nothing
        return miss
    try: round trip
    except retryable error:
        if backoff.failed(): log "down" once
    else:
        if backoff.succeeded(): log "back" once

The delay starts at `initial_s`, doubles with each further failure up to `max_s`, and resets on the
first success. While backing off, `ready()` is False until the delay has passed; then it lets
exactly one caller through (the probe) and restarts the delay, so a dead medium costs one attempt
per period however many threads ask, and a probe that never reports cannot wedge the tier.
No sleeping and no timers: the state only moves when callers ask. `clock` is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Backoff:
    def __init__(self, initial_s: float, max_s: float, clock: Callable[[], float] = time.monotonic):
        if initial_s < 0 or max_s < 0:
            raise ValueError(f"back-off delays must be >= 0, got {initial_s}, {max_s}")
        self.initial_s = initial_s
        self.max_s = max(max_s, initial_s)  # a cap below the first delay means: never grow
        self._clock = clock
        self._lock = threading.Lock()
        self._down = False
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

    def succeeded(self) -> bool:
        """Record a successful attempt. True when it brought the medium back from down."""
        if not self._down:
            return False
        with self._lock:
            came_back, self._down, self._delay = self._down, False, self.initial_s
            return came_back
