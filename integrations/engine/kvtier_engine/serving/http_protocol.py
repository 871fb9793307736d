"""HeadDeadlineProtocol: uvicorn's h11 protocol, plus a deadline for every request head.

uvicorn closes a keep-alive connection that stays idle after a response, but it starts that timer
only after a response, and cancels it on any byte received. So a connection that never completes a
request head (nothing sent, or a header line every few seconds: slowloris) was held for good, each
one a file descriptor and a buffer, until the process ran out of them and refused every client.

Here a head must be complete within `head_timeout_s` of the connection opening, or of the previous
response completing; otherwise the connection is closed (no response: the client sent no request).
The body is bounded by the app (`server.py`: a 408 after `read_timeout_s`), and its size by
`kvtier.body_limit`. Runs on uvicorn's event loop, like the protocol it extends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class HeadDeadlineProtocol(H11Protocol):
    def __init__(self, *args: Any, head_timeout_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None
        self._waiting_after: object = None  # the cycle whose successor's head is awaited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_deadline is not None and self.cycle is not self._waiting_after:
            self._cancel_deadline()  # a new request's head arrived: the app has it now

    def on_response_complete(self) -> None:
        # The next request on this connection gets the same deadline. Armed first: uvicorn may start
        # a pipelined request at once, and its head, already here, must cancel it.
        if not self.transport.is_closing():
            self._await_head()
        super().on_response_complete()

    def _await_head(self) -> None:
        self._cancel_deadline()
        self._waiting_after = self.cycle
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            logger.info("closed a connection that sent no complete request head in %s s", self.head_timeout_s)
            self.transport.close()
