"""BodyLimit: ASGI middleware that refuses request bodies over a byte bound with 413, early.

A body whose Content-Length is over the bound is refused before any of it is read. Any other body
(chunked, or a Content-Length that lies) is counted as the app receives it, and the app's next
`receive()` past the bound raises `BodyTooLarge` (an HTTPException: the app's handler answers 413).
So no more than `max_bytes` plus one ASGI message of a body is ever held, whatever the client sends;
uvicorn stops reading the socket while a message waits to be received.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvtier_engine.serving.openai_protocol import error_body

logger = logging.getLogger(__name__)


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int):
        # `Connection: close`: the rest of the body is never read, so the connection is not reused
        # (and uvicorn does not go on reading and dropping it).
        super().__init__(413, f"the request body is over the server's limit of {max_bytes} bytes",
                         headers={"Connection": "close"})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            logger.info("refused a %d-byte body (limit %d)", declared, self.max_bytes)
            refusal = BodyTooLarge(self.max_bytes)
            response = JSONResponse(error_body(refusal.detail, "invalid_request_error"), status_code=413,
                                    headers=refusal.headers)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            # uvicorn has already refused a malformed one; an unparsable value is left to counting.
            return int(value) if value.isdigit() else None
    return None
