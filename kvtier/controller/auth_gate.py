"""The controller's token, checked before anything of a request's body is read.

FastAPI reads and parses a route's JSON body before it solves the route's dependencies, so the
bearer check on a route (kvtier.fleet.bearer_auth, kept there: it declares the scheme in the OpenAPI
document) comes after a body of up to `max_body_bytes` was parsed, and a malformed one got a 400
instead of a 401. `AuthGate` is a pure ASGI middleware that runs the same checks on the headers
first: a caller without the token gets 401 having cost a header parse, on every path but the open
ones (/health), unknown paths included (which routes exist is not told either).

`authorized` is the check itself, also used by /health to decide whether to tell why the index is
unavailable. Where it runs: on the event loop, per request; no state.
"""

from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

_bearer = HTTPBearer(auto_error=False)


async def authorized(checks: list, scope: Scope) -> HTTPException | None:
    """None when the request passes `checks` (kvtier.fleet.bearer_auth.token_checks), else the
    refusal to send."""
    try:
        credentials = await _bearer(Request(scope))
        for check in checks:
            await check.dependency(credentials)
    except HTTPException as exc:
        return exc
    return None


class AuthGate:
    def __init__(self, app: ASGIApp, checks: list, open_paths: frozenset[str] = frozenset({"/health"})):
        self.app, self.checks, self.open_paths = app, checks, open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.checks and scope["path"] not in self.open_paths:
            refusal = await authorized(self.checks, scope)
            if refusal is not None:
                # `Connection: close`: the body is never read, so the connection is not reused.
                headers = {**(refusal.headers or {}), "Connection": "close"}
                response = JSONResponse({"detail": refusal.detail}, status_code=refusal.status_code,
                                        headers=headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
