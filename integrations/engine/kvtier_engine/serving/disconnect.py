"""Work for one HTTP request that stops when its client leaves: the engine server's and the proxy's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer; the work was cancelled and has wound down."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, unless the client disconnects first: then cancel it, wait for its cleanup (its
    `finally` blocks: upstream connections closed, leases ended) and raise ClientGone. Once a
    streamed response is returned, Starlette watches for the client leaving instead."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        await asyncio.wait({task})
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (as Starlette's own
    # StreamingResponse listens for it).
    while (await request.receive())["type"] != "http.disconnect":
        pass
