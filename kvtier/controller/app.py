"""kvtier_controller's FastAPI app: the fleet's REST API over one `FleetState`.

    GET  /health                       200 {"status": "ok"}, 503 {"status": "unavailable", "detail"}
    GET  /metrics                      Prometheus text (kvtier.controller.metrics)
    GET  /v1/instances, /v1/stats      the registry; counts
    POST /v1/lookup, /v1/route         where a prompt's KV lives (kvtier.controller.fleet_lookup)
    POST /v1/pin, /unpin, /move, /compress, /decompress, /clear   commands to instances (admin_routes)
    POST /v1/instances/register, /{id}/heartbeat, /{id}/events   the agents (agent_routes)
    POST /v1/peers                     which peers hold given keys, for P2P reads (agent_routes)

Every endpoint but /health requires the bearer token when one is set (kvtier.fleet.bearer_auth),
checked before any body is read (kvtier.controller.auth_gate);
/health tells why the index is unavailable (its address, the error) only to a caller with the token.
Bodies over `max_body_bytes` get 413 before they are read whole (kvtier.body_limit). Errors are
`ErrorReply` with the statuses in kvtier.controller.errors; bad input is always a 4xx.

Where it runs: on uvicorn. Handlers that touch the state (which may wait on Redis) are plain `def`
(FastAPI's thread pool) or hand over to it, so the event loop never blocks on the index; the one
exception is a lookup or route of up to INLINE_BODY_BYTES against an in-process state, answered on the
loop (a few ms of CPU, no I/O: the thread hop was a sixth of its time). `clock`
gives `now` for the state (wall-clock seconds: controllers sharing Redis must agree on it).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from kvtier.body_limit import BodyLimit
from kvtier.config import ControllerConfig
from kvtier.controller import fleet_lookup
from kvtier.controller.admin_routes import admin_router
from kvtier.controller.agent_routes import agent_router
from kvtier.controller.auth_gate import AuthGate, authorized
from kvtier.controller.commands import CommandSender
from kvtier.controller.errors import error_responses, install_error_handlers
from kvtier.controller.metrics import PROMETHEUS_CONTENT_TYPE, ControllerMetrics, RequestMetrics
from kvtier.controller.prompt_body import parse_prompt
from kvtier.controller.state import FleetState, InstanceRecord, StateUnavailable
from kvtier.fleet.bearer_auth import token_checks
from kvtier.fleet.messages import (
    InstancesReply,
    InstanceView,
    LookupReply,
    PromptRequest,
    RouteReply,
    StatsReply,
)

Clock = Callable[[], float]


class HealthReply(BaseModel):
    status: str  # "ok" or "unavailable"
    detail: str | None = None


def build_app(config: ControllerConfig, state: FleetState, clock: Clock = time.time) -> FastAPI:
    """The ASGI app. The caller owns `state` (and closes it); the app closes its command pool when
    its lifespan ends."""
    metrics = ControllerMetrics()
    sender = CommandSender(config.command_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        sender.close()

    # openapi_url None: the document is served below, behind the token like everything but /health.
    app = FastAPI(title="kvtier_controller", version="1", lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)
    protected = token_checks(config.token)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(AuthGate, checks=protected)  # before any body is read (kvtier.controller.auth_gate)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: it sees every answer, 413s too
    install_error_handlers(app)
    app.include_router(_health_router(state, protected))
    app.include_router(_info_router(state, metrics, clock), dependencies=protected)
    app.include_router(_query_router(state, clock), dependencies=protected)
    app.include_router(admin_router(state, sender, clock), dependencies=protected)
    agents = agent_router(state, config.heartbeat_timeout_s, clock, config.max_instances)
    app.include_router(agents, dependencies=protected)

    @app.get("/openapi.json", include_in_schema=False, dependencies=protected)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app


def _health_router(state: FleetState, protected: list) -> APIRouter:
    """/health answers anyone; why the index is unavailable (its address, the error) only those
    with the token: the same checks as the protected routes, asked instead of required."""
    router = APIRouter()

    @router.get("/health", response_model=HealthReply, responses={503: {"model": HealthReply}})
    async def health(request: Request) -> Response:
        try:
            await run_in_threadpool(state.index_size)  # one round trip: is the index there?
        except StateUnavailable as exc:
            trusted = await authorized(protected, request.scope) is None
            why = str(exc) if trusted else "the fleet index is unavailable"
            return JSONResponse({"status": "unavailable", "detail": why}, status_code=503)
        return JSONResponse({"status": "ok"})

    return router


def _info_router(state: FleetState, metrics: ControllerMetrics, clock: Clock) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", response_class=Response, responses={
        200: {"content": {PROMETHEUS_CONTENT_TYPE: {"schema": {"type": "string"}}}}, **error_responses()})
    def prometheus() -> Response:
        try:
            records = state.instances(clock())
            up = sum(record.up for record in records)
            metrics.set_fleet(up, len(records) - up, *state.index_size())
        except StateUnavailable:  # serve the last numbers: a scrape that fails marks us down
            pass
        return Response(metrics.prometheus_text(), media_type=PROMETHEUS_CONTENT_TYPE)

    @router.get("/v1/instances", response_model=InstancesReply, responses=error_responses(503))
    def instances() -> InstancesReply:
        now = clock()
        return InstancesReply(instances=[_view(record, now) for record in state.instances(now)])

    @router.get("/v1/stats", response_model=StatsReply, responses=error_responses(503))
    def stats() -> StatsReply:
        records = state.instances(clock())
        entries, nbytes = state.index_size()
        up = sum(record.up for record in records)
        return StatsReply(instances_up=up, instances_down=len(records) - up, index_chunks=entries,
                          index_bytes=nbytes, requests=metrics.requests_by_endpoint())

    return router


def _view(record: InstanceRecord, now: float) -> InstanceView:
    registration = record.registration  # its command_token stays here: never shown
    return InstanceView(instance_id=registration.instance_id, kind=registration.kind,
                        address=registration.command_url, p2p_url=registration.p2p_url,
                        model_id=registration.model_id,
                        namespace=registration.namespace, chunk_size=registration.chunk_size,
                        layout=registration.layout, tiers=list(record.tiers),
                        last_heartbeat_s=max(0.0, now - record.last_heartbeat), up=record.up,
                        chunks_indexed=record.chunks_indexed)


# The lookup and route bodies are read by prompt_body (pydantic's int-list validation is most of a
# 32K-token lookup's time); the OpenAPI document still shows PromptRequest as their body.
_PROMPT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PromptRequest.model_json_schema()}}}}


def _query_router(state: FleetState, clock: Clock) -> APIRouter:
    router = APIRouter()
    for path, answer, reply in (("/v1/lookup", fleet_lookup.lookup, LookupReply),
                                ("/v1/route", fleet_lookup.route, RouteReply)):
        router.add_api_route(path, _prompt_endpoint(state, clock, answer), methods=["POST"],
                             response_model=reply, openapi_extra=_PROMPT_BODY, name=answer.__name__,
                             responses=error_responses(400, 422, 503))
    return router


Answer = Callable[[FleetState, str, np.ndarray, float], BaseModel]  # fleet_lookup.lookup or .route


# A body up to this size (~64K tokens: ~2 ms of parsing, ~1 ms of hashing and probing) is answered
# on the event loop when the state is in this process's memory: the hop to the thread pool and back
# cost ~0.3 ms of a ~2 ms lookup (more on a busy machine: two threads to wake), and MemoryState
# holds its lock for dict operations only. Larger bodies, and any state that may wait on the
# network (Redis), are parsed and answered in the thread pool, so the loop never stalls long.
INLINE_BODY_BYTES = 512 * 1024


def _prompt_endpoint(state: FleetState, clock: Clock,
                     answer: Answer) -> Callable[[Request], Awaitable[Response]]:
    in_memory = state.in_process

    def answer_body(raw: bytes) -> BaseModel:
        model_id, tokens = parse_prompt(raw)
        return answer(state, model_id, tokens, clock())

    async def endpoint(request: Request) -> Response:
        raw = await request.body()
        if in_memory and len(raw) <= INLINE_BODY_BYTES:
            return _json(answer_body(raw))
        return _json(await run_in_threadpool(answer_body, raw))

    return endpoint


def _json(reply: BaseModel) -> Response:
    # Serialized once here: returning the model would have FastAPI validate it again.
    return Response(reply.model_dump_json(), media_type="application/json")

