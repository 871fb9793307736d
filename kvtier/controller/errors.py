"""How the controller's failures become HTTP answers, all with the body `ErrorReply` ({"detail": str}).

    StateUnavailable (Redis down or slow)      503   retry later
    UnknownInstance                            404
    InstanceDown (a command for it)           409   "instance X is down (last heartbeat N s ago)"
    CommandFailed                              its status: 400 / 502 / 504 (kvtier.controller.commands)
    BadBody, RequestValidationError            400 (not JSON) or 422 (not a valid request), naming the field
    ValueError (a request the logic refuses)   400
    pydantic's ValidationError in a handler     500 (a reply built wrong is our bug, not the caller's)
    HTTPException (401, 404 path, 405, 413)    its status
    anything else                              500 "internal error" (logged; never for bad input)

`error_responses(...)` documents these in the OpenAPI document, so schema checks (schemathesis) find
every status a route can answer with its body. Replacing FastAPI's 422 entry also replaces its
HTTPValidationError body (a list) with ErrorReply's string, which is what the handler sends.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from kvtier.controller.commands import CommandFailed
from kvtier.controller.prompt_body import BadBody
from kvtier.controller.state import StateUnavailable, UnknownInstance
from kvtier.errors import KvtierError
from kvtier.fleet.messages import ErrorReply

logger = logging.getLogger(__name__)

_DESCRIPTIONS = {
    400: "malformed JSON, or a request the controller or the instance refuses",
    401: "missing or wrong bearer token",
    404: "unknown instance",
    409: "the instance is down",
    413: "request body over max_body_bytes",
    422: "the body is not a valid request",
    429: "too many instances registered (max_instances)",
    500: "internal error",
    502: "an instance is unreachable or failed",
    503: "the fleet index is unavailable (Redis down)",
    504: "an instance did not answer within command_timeout_s",
}
COMMON = (401, 413, 500)  # any protected route


class InstanceDown(KvtierError):
    """A command for an instance that has missed its heartbeats: 409."""


def error_responses(*statuses: int) -> dict[int | str, dict]:
    return {status: {"model": ErrorReply, "description": _DESCRIPTIONS[status]}
            for status in sorted({*COMMON, *statuses})}


def _reply(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return 400, "the body is not valid JSON"
    parts = []
    for error in errors[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return 422, "; ".join(parts)[:2000] or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StateUnavailable)
    async def unavailable(_: Request, exc: StateUnavailable) -> JSONResponse:
        return _reply(503, f"the fleet index is unavailable: {exc}")

    @app.exception_handler(UnknownInstance)
    async def unknown(_: Request, exc: UnknownInstance) -> JSONResponse:
        # KeyError's str() quotes its argument: take the message itself.
        return _reply(404, str(exc.args[0]) if exc.args else "unknown instance")

    @app.exception_handler(InstanceDown)
    async def down(_: Request, exc: InstanceDown) -> JSONResponse:
        return _reply(409, str(exc))

    @app.exception_handler(CommandFailed)
    async def command_failed(_: Request, exc: CommandFailed) -> JSONResponse:
        return _reply(exc.status, exc.detail)

    @app.exception_handler(BadBody)
    async def bad_body(_: Request, exc: BadBody) -> JSONResponse:
        return _reply(exc.status, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _reply(*_validation_detail(exc))

    @app.exception_handler(ValueError)
    async def refused(_: Request, exc: ValueError) -> JSONResponse:
        return _reply(400, str(exc) or "invalid request")

    # A ValueError too, but the request was validated on arrival: one raised past that is a bug.
    @app.exception_handler(ValidationError)
    async def internal(request: Request, exc: ValidationError) -> JSONResponse:
        return await unexpected(request, exc)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _reply(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _reply(500, "internal error")
