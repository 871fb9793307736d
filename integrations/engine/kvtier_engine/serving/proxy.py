"""`kvtier_engine proxy`: a disaggregated-prefill router in front of `kvtier_engine serve` instances.

    POST /v1/completions, /v1/chat/completions  OpenAI-compatible, split as below
    GET  /v1/models   forwarded to a decode instance
    GET  /health      200 {"status": "ok", "prefill": [{"url", "in_flight"}], "decode": [...]}, and
                      with --controller, "controller": {"url", "backing_off", "decode_ids": {id: url}}

The flow of one request (`proxy_flow.py`; instances are picked by fewest calls in flight, ties
round robin: `proxy_backends.py`):
  1. A body over `max_body_bytes` gets 413; one that is not a JSON object, 400 (OpenAI's error body).
     A body that already has `kv_transfer_params`, asks for `n` > 1 or is a batch of prompts goes to
     a decode instance whole and unchanged (one transfer holds one sequence's KV).
  1b. With a controller (`proxy_prefix.py`): the decode instances holding the prompt's longest
     cached prefix are the only candidates for step 3; when that prefix covers the prompt but for
     its last chunk, the request goes to one of them as it is, without a prefill (`cached`). Any
     failure of that lookup: decode instances are chosen by load, as without a controller.
  2. Prefill: the body with `stream: false`, `max_tokens: 1` (and `max_completion_tokens: 1` when
     given), no `stream_options`, and `kv_transfer_params: {"do_remote_decode": true}`, to a prefill
     instance, whose 200 carries the `kv_transfer_params` (with a `transfer_id`) of the KV it holds.
  3. Decode: the client's body plus those `kv_transfer_params`, to a decode instance, which loads
     the KV and generates. Its status, content type and body go to the client: an SSE stream as it
     arrives (`proxy_relay.py`), a JSON body once read whole.
  4. Release: once the decode call has ended, whichever way, or was never made, a background
     `POST {prefill}/v1/kv/release {"transfer_id": ...}` (best effort, logged when it fails).
Every response the proxy relays has `x-kvtier-disagg: disaggregated`, `colocated` or `cached`.

Failures; nothing waits without a deadline (`proxy_upstream.py`: connect, send and each read; a
prefill call within --timeout in all):
  - prefill unreachable, slow, 5xx, or a 200 without usable `kv_transfer_params`: the request is
    served colocated (the original body to a decode instance). Its 4xx goes to the client unchanged.
  - decode unreachable, slow or 5xx before the client got a byte: once more, colocated, on another
    decode instance if there is one; when that fails too, 502 naming the instance and the reason.
  - decode failing mid-stream: the client's stream ends with an `data: {"error": ...}` event and
    `[DONE]`. A client that leaves, mid-stream or before its answer: the upstream call is closed
    (the engine aborts the request) and the transfer still released.
The in-flight counts go back down on every one of these paths.

Where it runs: everything on uvicorn's event loop; no model, no engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvtier.body_limit import BodyLimit, BodyTooLarge
from kvtier_engine.serving.disconnect import ClientGone, unless_disconnected
from kvtier_engine.serving.http_protocol import HeadDeadlineProtocol
from kvtier_engine.serving.proxy_backends import BackendAddress, BackendPool
from kvtier_engine.serving.proxy_bodies import CHAT, COMPLETIONS, BadBody, parse_body
from kvtier_engine.serving.proxy_flow import Router, error_response
from kvtier_engine.serving.proxy_prefix import ControllerLink, PrefixRouter
from kvtier_engine.serving.server import exit_on_signals

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
# As the engine: far more than any prompt it accepts needs, and a bound on what one request may hold.
MAX_BODY_BYTES = 1 << 20
# A request head must arrive within this (as `serve`'s --read-timeout): idle sockets cannot pile up.
HEAD_TIMEOUT_S = 30.0
SHUTDOWN_S = 5.0  # on SIGINT/SIGTERM, for the requests still running


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    prefill: tuple[BackendAddress, ...]
    decode: tuple[BackendAddress, ...]
    timeout_s: float = DEFAULT_TIMEOUT_S  # each upstream read, and a prefill call in all
    max_body_bytes: int = MAX_BODY_BYTES
    controller: ControllerLink | None = None  # None: decode instances are chosen by load only


def build_proxy_app(config: ProxyConfig) -> Starlette:
    decode = BackendPool("decode", config.decode)
    prefix = None if config.controller is None else \
        PrefixRouter(config.controller, decode.backends, config.timeout_s)
    router = Router(BackendPool("prefill", config.prefill), decode, config.timeout_s, prefix)

    async def completions(request: Request) -> Response:
        return await _proxied(request, router, COMPLETIONS, config.timeout_s)

    async def chat(request: Request) -> Response:
        return await _proxied(request, router, CHAT, config.timeout_s)

    async def health(_: Request) -> JSONResponse:
        body = {"status": "ok", "prefill": router.prefill.snapshot(), "decode": router.decode.snapshot()}
        if prefix is not None:
            body["controller"] = prefix.snapshot()
        return JSONResponse(body)

    async def models(_: Request) -> Response:
        return await router.models()

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await router.releaser.drain()  # releases sent by the last requests

    routes = [Route(COMPLETIONS, completions, methods=["POST"]), Route(CHAT, chat, methods=["POST"]),
              Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        BadBody: _bad_body, HTTPException: _http_error, Exception: _unexpected})
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, refusal=_refusal)
    return app


def run_proxy(config: ProxyConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve until SIGINT/SIGTERM. Blocking; call it from the main thread (uvicorn's signals)."""
    logger.info("prefill instances: %s; decode instances: %s; controller: %s",
                " ".join(a.url for a in config.prefill), " ".join(a.url for a in config.decode),
                config.controller.address.url if config.controller is not None else "none (load only)")
    server = uvicorn.Server(uvicorn.Config(
        build_proxy_app(config), host=host, port=port, log_level=log_level,
        timeout_graceful_shutdown=SHUTDOWN_S,
        http=functools.partial(HeadDeadlineProtocol, head_timeout_s=HEAD_TIMEOUT_S)))
    # serve's handlers: SIGINT/SIGTERM end the process with status 0 once uvicorn has shut down,
    # instead of uvicorn raising the signal again (-15, or a KeyboardInterrupt traceback).
    with exit_on_signals(server):
        server.run()
    return 0


async def _proxied(request: Request, router: Router, path: str, read_timeout_s: float) -> Response:
    try:
        raw = await asyncio.wait_for(request.body(), read_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {read_timeout_s} s",
                            headers={"Connection": "close"}) from None
    except ClientDisconnect:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    try:
        return await unless_disconnected(request, router.dispatch(path, raw, parse_body(raw)))
    except ClientGone:  # its upstream calls are closed (the engines abort), its release sent
        logger.info("%s: the client left before its answer; upstream calls closed", request.url.path)
        return Response(status_code=499)


async def _bad_body(_: Request, exc: Exception) -> JSONResponse:
    return error_response(400, str(exc))


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    response = error_response(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal server error")


def _refusal(exc: BodyTooLarge) -> JSONResponse:
    """The early 413 of kvtier.body_limit, in OpenAI's error shape."""
    response = error_response(413, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response
