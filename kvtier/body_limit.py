"""BodyLimit: ASGI middleware that refuses a request body over a byte bound with 413, early.

A body whose Content-Length is over the bound is refused before any of it is read. Any other body
(chunked, or a Content-Length that lies) is counted as the app receives it, and the app's next
`receive()` past the bound raises `BodyTooLarge` (an HTTPException, so the app's handler answers
413 in its own error shape). No more than the bound plus one ASGI message of a body is ever held;
uvicorn stops reading the socket while a message waits to be received.

A refused body is read on and dropped, up to DRAIN_FACTOR times the bound, before the 413 goes
out: a client still sending when the socket closes gets a connection reset instead of the answer
(it writes the whole body before it reads). A larger rest is not drained: the connection is closed.

`refusal(exc)` builds the early 413 response, in the app's error shape (kvtier_controller's
`{"detail": ...}` by default). Used by kvtier_controller; any FastAPI/Starlette app can mount it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

DRAIN_FACTOR = 4


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int):
        # `Connection: close`: the rest of the body is never read, so the connection is not reused.
        super().__init__(413, f"the request body is over the limit of {max_bytes} bytes",
                         headers={"Connection": "close"})


def detail_refusal(exc: BodyTooLarge) -> Response:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int,
                 refusal: Callable[[BodyTooLarge], Response] = detail_refusal):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app, self.max_bytes, self.refusal = app, max_bytes, refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        drain_limit = DRAIN_FACTOR * self.max_bytes
        if declared is not None and declared > self.max_bytes:
            logger.info("refused a %d-byte body (limit %d)", declared, self.max_bytes)
            if declared <= drain_limit and not _expects_continue(scope):
                await _drain(receive, drain_limit)
            await self.refusal(BodyTooLarge(self.max_bytes))(scope, receive, send)
            return
        counted = 0

        async def counting_receive() -> Message:
            nonlocal counted
            message = await receive()
            if message["type"] == "http.request":
                counted += len(message.get("body", b""))
                if counted > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive, drain_limit)
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counting_receive, send)


async def _drain(receive: Receive, limit: int) -> None:
    """Read and drop the rest of a body, until it ends or `limit` bytes have gone."""
    drained = 0
    while drained <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        drained += len(message.get("body", b""))


def _expects_continue(scope: Scope) -> bool:
    # The client waits for a go-ahead before sending the body: it gets the 413 instead, unread.
    return any(name == b"expect" for name, _ in scope["headers"])


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            # uvicorn refuses a malformed one itself; anything else unparsable is left to counting.
            return int(value) if value.isdigit() else None
    return None
