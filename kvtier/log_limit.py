"""Rate-limited log lines for failure paths that can repeat once per request, record or I/O.

A full or broken disk fails every write, a peer can send a bad record per request, a dead medium
fails every call: a warning per event would let a broken disk or an attacker drive the log volume
(onto the same full disk, often). Counters (kvtier.metrics, server stats) count every event; the
log only needs to say that it is happening, and how often.

    limiter = LogLimiter(logger)
    limiter.warning("write", "disk tier: write %s failed: %s", path, exc)

Per key (a short, fixed name for the kind of failure: "write", "corrupt", never a record key),
the first event is logged at once; later ones within `period_s` of the last line are counted
only, and the first event after the period is logged with the count of those it stood for:
"... (41 more since the last report)". So a key costs at most one line per period, and a burst
followed by silence reports its count with the next event of that key (the counters have it at
once). No timers and no threads: the state only moves when events arrive; `clock` is injectable,
as in kvtier.tiers.backoff, so tests need no sleeps.

Bounded memory: at most `max_keys` keys are remembered. A key whose last line is older than the
period is forgotten to make room (a later event of it logs at once, as it would anyway, and the
count it held is dropped); when every remembered key is still within its period, new keys share
one overflow key. So the volume stays bounded (about `max_keys + 1` lines per period) whatever
keys callers pass.

Thread-safe: one lock around the bookkeeping; the line itself is logged outside it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

LOG_PERIOD_S = 60.0  # at most one line per key per this many seconds
MAX_KEYS = 64  # keys remembered per limiter; beyond them new keys share one

_OVERFLOW = object()  # the key that new keys share while the table is full


class LogLimiter:
    def __init__(self, logger: logging.Logger, period_s: float = LOG_PERIOD_S, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic):
        if period_s < 0 or max_keys < 1:
            raise ValueError(f"period_s must be >= 0 and max_keys >= 1, got {period_s}, {max_keys}")
        self.logger = logger
        self.period_s = period_s
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [time of its last line, events suppressed since], oldest line first
        self._keys: OrderedDict[Hashable, list] = OrderedDict()

    def warning(self, key: Hashable, msg: str, *args, exc_info=None) -> bool:
        return self._emit(logging.WARNING, key, msg, args, exc_info)

    def error(self, key: Hashable, msg: str, *args, exc_info=None) -> bool:
        return self._emit(logging.ERROR, key, msg, args, exc_info)

    def log(self, level: int, key: Hashable, msg: str, *args, exc_info=None) -> bool:
        """Log `msg % args` for `key` unless a line for it went out within the period; True when
        logged. `exc_info` as in `logging` (True inside an `except` block: the traceback)."""
        return self._emit(level, key, msg, args, exc_info)

    def _emit(self, level: int, key: Hashable, msg: str, args: tuple, exc_info) -> bool:
        suppressed = self._admit(key)
        if suppressed is None:
            return False
        if suppressed:
            msg = (msg if args else msg.replace("%", "%%")) + " (%d more since the last report)"
            args = (*args, suppressed)
        # stacklevel: the record names the caller's file and line, not this module's.
        self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=3)
        return True

    def _admit(self, key: Hashable) -> int | None:
        """None to suppress this event (counted), else how many were suppressed since the last line."""
        with self._lock:
            now = self._clock()
            state = self._keys.get(key)
            if state is None:
                key = self._make_room(key, now)
                state = self._keys.get(key)
            if state is None:
                self._keys[key] = [now, 0]
                return 0
            logged_at, suppressed = state
            if now - logged_at < self.period_s:
                state[1] += 1
                return None
            state[0], state[1] = now, 0
            self._keys.move_to_end(key)  # kept in order of last line: the front expires first
            return suppressed

    def _make_room(self, key: Hashable, now: float) -> Hashable:
        """The key a new `key` is kept under: itself, once there is room, or the overflow key."""
        if len(self._keys) < self.max_keys:
            return key
        oldest, (logged_at, _) = next(iter(self._keys.items()))
        if now - logged_at >= self.period_s:
            del self._keys[oldest]
            return key
        return _OVERFLOW
