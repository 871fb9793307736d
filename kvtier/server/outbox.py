"""One connection's queued reply bytes: views sent in order and never joined, charged to the
server's reply budget (`kvtier.server.budget`) from when they are queued until the kernel takes
them, with the clock of the send-stall timeout (how long since the kernel last took any).

Where it runs: the server's event-loop thread, owned by one `Connection`.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable

from kvtier.server.budget import ByteBudget
from kvtier.wire.sockets import send_some


class Outbox:
    def __init__(self, budget: ByteBudget, clock: Callable[[], float]):
        self._budget = budget
        self._clock = clock
        self._views: deque[memoryview] = deque()
        self.queued = 0  # bytes not yet sent (charged to the budget)
        self.sent_at = clock()  # while bytes are queued: when the kernel last took some of them

    def __bool__(self) -> bool:
        return bool(self._views)

    def add(self, buffers: list) -> None:
        """Queue a reply's buffers (as views, never copied) and charge them to the budget."""
        if not self.queued:  # (the send-stall clock starts with the first queued byte)
            self.sent_at = self._clock()
        for b in buffers:
            view = memoryview(b).cast("B")
            self._views.append(view)
            self.queued += view.nbytes
            self._budget.charge(view.nbytes)

    def send(self, sock: socket.socket) -> int:
        """One `sendmsg` from the head of the queue; the bytes the kernel took. They are still
        charged to the budget: the caller releases them once its own state is whole (a release may
        wake other connections, and through them this one). Raises what `sendmsg` raises."""
        sent = send_some(sock, self._views)
        self.queued -= sent
        self.sent_at = self._clock()
        return sent

    def stalled(self, now: float, timeout_s: float) -> bool:
        """Bytes queued, and none of them taken by the kernel for `timeout_s`."""
        return bool(self.queued) and now - self.sent_at >= timeout_s

    def drop(self) -> int:
        """Forget everything queued (the connection closed); the bytes still charged to the budget."""
        self._views.clear()
        queued, self.queued = self.queued, 0
        return queued
