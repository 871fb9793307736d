"""Byte budgets of `kvtier_server`, each a bound over all its connections: one on payload bytes
being received (`receive_bytes`), one on reply bytes queued to send (`reply_bytes`).

Where it runs: the server's event-loop thread only (no locks).

Receiving: a connection reserves a frame's payload bytes when the frame's header has been decoded,
before its buffers are allocated (`FrameDecoder(admit=...)`), and releases them when the frame has
been handed to its handler (a PUT's records then count against the store's capacity instead) or
when the connection closes.

Replying: a reply cannot wait once it exists (its buffers are already held), so a connection asks
for room *before* it answers a request (`wait_for_room`), charges the reply's bytes when it queues
them (`charge`) and releases them as the kernel takes them or when it closes. So the bound is
`reply_bytes` plus one reply (a GET reply carries at most HIGH_WATER of payload).

A request that does not fit is not an error: the connection joins a FIFO queue and stops reading,
so its client feels back-pressure through TCP; each release wakes waiters in order while they fit.
FIFO rather than "whoever fits" so that a large frame is not starved by small ones. One frame alone
is always admitted (`used == 0`), so a limit below `max_frame_bytes` delays but never deadlocks:
the real bound is max(limit, max_frame_bytes). What stops a peer from holding a budget for good is
the server's timeouts (a minimum receive rate, `ReceiveRate`; a send-stall timeout), not the budget.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Waiter(Protocol):
    def resume(self) -> None:
        """Ask again (calls `reserve` or `wait_for_room`); leaves the queue's head when admitted."""


class ByteBudget:
    def __init__(self, limit: int):
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        self.limit = limit
        self.used = 0
        self.waits = 0  # requests that had to wait (a counter for STATS)
        self._queue: deque[Waiter] = deque()
        self._waking = False

    def reserve(self, n: int, waiter: Waiter) -> bool:
        """Take `n` bytes for `waiter`'s next frame, or queue it (False) until they fit."""
        if self._admits(waiter, self.used + n <= self.limit):
            self.used += n
            return True
        return False

    def wait_for_room(self, waiter: Waiter) -> bool:
        """True when `waiter` may add bytes now (the budget is not full and no one waits ahead of
        it); else queue it (False) until it may."""
        return self._admits(waiter, self.used < self.limit)

    def charge(self, n: int) -> None:
        """Count `n` bytes that exist already (a reply admitted by `wait_for_room`)."""
        self.used += n

    def _admits(self, waiter: Waiter, fits: bool) -> bool:
        first = not self._queue or self._queue[0] is waiter
        if first and (fits or self.used == 0):
            if self._queue:
                self._queue.popleft()
            return True
        if waiter not in self._queue:
            self._queue.append(waiter)
            self.waits += 1
        return False

    def release(self, n: int) -> None:
        if n > self.used:
            raise RuntimeError(f"releasing {n} bytes of {self.used} reserved")
        self.used -= n
        if self._waking:  # (a woken connection answered frames: the outer loop goes on)
            return
        self._waking = True
        try:
            while self._queue:
                head = self._queue[0]
                head.resume()
                if self._queue and self._queue[0] is head:  # still does not fit
                    break
        finally:
            self._waking = False

    def cancel(self, waiter: Waiter) -> None:
        """Forget a queued waiter (its connection closed)."""
        if waiter in self._queue:
            was_head = self._queue[0] is waiter
            self._queue.remove(waiter)
            if was_head:
                self.release(0)  # the next one may fit now

    def holds(self, waiter: Waiter) -> bool:
        """`waiter` is queued."""
        return waiter in self._queue

    @property
    def waiting(self) -> int:
        return len(self._queue)


class ReceiveRate:
    """The minimum rate at which a connection holding receive-budget bytes must receive, averaged
    over windows of `window_s`. Without it a client that announces a large PUT and then sends a
    byte now and then (never idle) would hold the budget, and keep every other client's PUT
    waiting, for as long as it likes. The owner `restart`s the window when the connection starts
    holding bytes, and whenever a budget holds the connection (it reads nothing then through no
    fault of its client: a PUT half-received when the reply budget filled up was closed as a
    trickler once the budget stayed full for a window, busy readers elsewhere, not this client)."""

    def __init__(self, rate: float, window_s: float):
        self.rate = rate
        self.window_s = window_s
        self._start = 0.0
        self._bytes = 0

    def restart(self, now: float) -> None:
        self._start, self._bytes = now, 0

    def received(self, n: int) -> None:
        self._bytes += n

    def too_slow(self, now: float) -> bool:
        """True when the current window is over and received less than `rate` over it; a window
        that kept the rate ends here and the next one starts."""
        elapsed = now - self._start
        if elapsed < self.window_s:
            return False
        if self._bytes < self.rate * elapsed:
            return True
        self.restart(now)
        return False
