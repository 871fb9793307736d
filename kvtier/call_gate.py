"""Calls in flight, and closing under them.

Where it runs: around the public calls of an object that owns threads and file descriptors (the
StorageManager), from any thread. `guarded` methods enter the gate (KvtierError once closing
began) and leave it when they return; the owner's close() shuts the gate and waits, bounded, for
the calls still inside, so that it never shuts its I/O queues or closes its tiers (whose
descriptor numbers the process then reuses for whatever it opens next) under a call in flight.

    gate.shut()             refuse new calls (KvtierError), once; then wake the owner's waits
    gate.wait_idle(t)       wait, at most t seconds, for the calls still inside
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

from kvtier.errors import KvtierError


class CallGate:
    def __init__(self, what: str):
        self.what = what
        self.closed = False  # read without the lock by waits that should stop early
        self._calls = 0
        self._idle = threading.Condition()

    def enter(self) -> None:
        with self._idle:
            if self.closed:
                raise KvtierError(f"{self.what} is closed")
            self._calls += 1

    def leave(self) -> None:
        with self._idle:
            self._calls -= 1
            if not self._calls:
                self._idle.notify_all()

    def shut(self) -> bool:
        """Refuse new calls from now on. False when the gate was shut already."""
        with self._idle:
            was, self.closed = self.closed, True
            return not was

    def wait_idle(self, timeout: float) -> int:
        """Wait up to `timeout` for the calls in flight to leave; how many are still inside."""
        with self._idle:
            self._idle.wait_for(lambda: not self._calls, timeout)
            return self._calls


def guarded(method: Callable) -> Callable:
    """A method of an object with a `_gate` (CallGate) that runs inside it."""

    @functools.wraps(method)
    def inside(self, *args, **kwargs):
        self._gate.enter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._gate.leave()

    return inside
