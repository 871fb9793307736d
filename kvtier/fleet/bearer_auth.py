"""The fleet's shared-secret check, `Authorization: Bearer <token>`: on every controller endpoint but
/health (the controller's token) and on an instance's command server (its per-process secret).

Built once per app from the token. With no token every request passes (only the controller may
have none, and it then binds loopback only: `require_token_beyond_loopback`). The comparison is constant-time
(hmac.compare_digest over bytes), and a refusal is 401 with `WWW-Authenticate: Bearer`, whether the
header is missing, not a bearer, or the token is wrong. FastAPI's HTTPBearer only parses the header
(auto_error off) so that the OpenAPI document declares the scheme.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False, description="the controller's token, or an instance's command token")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def token_checks(token: str | None) -> list:
    """The dependencies to put on every protected route: none without a token."""
    if token is None:
        return []
    return [Depends(_require(token.encode()))]


def _require(expected: bytes) -> Callable[..., Awaitable[None]]:
    # async: a check this small must not cost a hop to the thread pool.
    async def require_token(credentials: _Credentials) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        # compare_digest even for a missing header: the answer's timing says nothing either way.
        if not hmac.compare_digest(given, expected) or credentials is None:
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return require_token
