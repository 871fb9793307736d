"""CommandServer: where an instance that joined a fleet takes the controller's commands.

    POST /v1/command   Command -> CommandReply   (Authorization: Bearer <token>)

The token is a per-process secret (`secrets.token_urlsafe(32)`) that the agent sends to the
controller only inside its Registration, so commands are authenticated even in a fleet without a
controller token: nobody else on the host can pin or clear this instance. The check is the
controller's own (kvtier.fleet.bearer_auth: constant time, 401 with `WWW-Authenticate: Bearer`), and
comes before any of the body is read. The body is bounded by kvtier.body_limit (413 over
MAX_COMMAND_BYTES), then validated (422 naming the field); a command the member cannot do (it
raises ValueError: an unknown tier, a move on a server) is a 400 with its message.

Where it runs: uvicorn on a daemon thread (kvtier.fleet.serve_thread); the handler on its event loop,
the body's validation (a 1M-key command takes ~0.3 s) and `member.run` on the loop's thread pool (it
may move KV between tiers: blocking I/O), so concurrent commands run concurrently, as the member's own
locks allow, and a huge one holds no other. The counters are touched only on the event loop.

Stopping: `stop()` refuses new commands (503) and waits, at most its timeout, for those running to
finish before it stops the server, so that the owner (a CacheEngine closing its storage) never
closes what a command still uses; uvicorn's own grace would cancel the request and leave `member.run`
running in the pool.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from kvtier.body_limit import BodyLimit
from kvtier.call_gate import CallGate
from kvtier.errors import KvtierError
from kvtier.fleet.bearer_auth import token_checks
from kvtier.fleet.member import FleetMember
from kvtier.fleet.messages import MAX_TOKENS, Command, CommandReply
from kvtier.fleet.serve_thread import ServerThread, bind_socket, url_host
from kvtier.log_limit import LogLimiter

logger = logging.getLogger(__name__)
_log = LogLimiter(logger)

# The largest Command: MAX_TOKENS keys of 48 hex characters, quoted, comma-separated, plus the rest.
MAX_COMMAND_BYTES = MAX_TOKENS * 51 + 4096
COMMAND_DRAIN_S = 30.0  # how long stopping waits for commands still running (a move of many chunks)


@dataclass(slots=True)
class CommandStats:
    commands: int = 0  # run to completion
    refused: int = 0  # 401: no or a wrong token
    failed: int = 0  # any other error answer (400, 404, 413, 422, 500)


def build_app(member: FleetMember, token: str, stats: CommandStats, gate: CallGate | None = None) -> FastAPI:
    """The command server's FastAPI app (no docs pages: its only client is the controller); `gate`
    counts the commands running (503 once it is shut)."""
    gate = gate if gate is not None else CallGate("the instance's command server")
    app = FastAPI(title="kvtier instance commands", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=MAX_COMMAND_BYTES)

    # The handler reads the body itself, so that the token check (a dependency) comes first.
    @app.post("/v1/command", response_model=CommandReply, dependencies=token_checks(token),
              openapi_extra=_body_schema())
    async def command(request: Request) -> CommandReply:
        body = await request.body()
        try:
            gate.enter()
        except KvtierError:
            raise HTTPException(503, "the instance is shutting down") from None
        try:
            reply = await run_in_threadpool(_run, member, body)
        finally:
            gate.leave()
        stats.commands += 1
        return reply

    @app.exception_handler(HTTPException)
    async def count_refusal(request: Request, exc: HTTPException):
        if exc.status_code == 401:
            stats.refused += 1
        else:
            stats.failed += 1
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def count_invalid(request: Request, exc: RequestValidationError):
        stats.failed += 1
        return await request_validation_exception_handler(request, exc)

    return app


def _run(member: FleetMember, body: bytes) -> CommandReply:
    """Validate and run one command (in the thread pool); the HTTP error for what fails."""
    try:
        cmd = Command.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(_errors(exc)) from None
    try:
        return member.run(cmd)
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None
    except Exception as exc:
        _log.error("run", "command %s failed", cmd.op, exc_info=True)
        raise HTTPException(500, f"command {cmd.op} failed: {type(exc).__name__}") from None


def _errors(exc: ValidationError) -> list[dict]:
    # As FastAPI reports a body: located under "body", and without the input (it may be the whole body).
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    return [{**error, "loc": ("body", *error["loc"])} for error in errors]


def _body_schema() -> dict:
    # The handler reads the body itself (bounded, after the token check); the schema still shows it.
    schema = {"content": {"application/json": {"schema": Command.model_json_schema(by_alias=True)}}}
    return {"requestBody": {**schema, "required": True}}


class CommandServer:
    """The app on (host, port), port 0 = any free one; `url` is what the controller is told to call
    (`advertise_host` when set: the address others reach this host at). Raises OSError when it
    cannot listen."""

    def __init__(self, member: FleetMember, host: str, port: int, advertise_host: str | None = None):
        self.token = secrets.token_urlsafe(32)
        self.stats = CommandStats()
        self._gate = CallGate("the instance's command server")
        self._thread = ServerThread(build_app(member, self.token, self.stats, self._gate),
                                    bind_socket(host, port), name="kvtier-commands")
        self.url = f"http://{url_host(advertise_host or host)}:{self._thread.port}"
        if advertise_host is None and host in ("0.0.0.0", "::"):
            logger.warning("commands listen on %s, and the controller is told %s; set "
                           "controller.advertise_host to an address it can reach", host, self.url)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Refuse new commands, wait up to `timeout_s` for those running, stop the server."""
        self._gate.shut()
        if left := self._gate.wait_idle(timeout_s):
            logger.warning("stopping the command server with %d commands still running after %g s",
                           left, timeout_s)
        self._thread.stop(timeout_s)
