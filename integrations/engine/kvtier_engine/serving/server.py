"""`kvtier_engine serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one EngineLoop.

    POST /v1/completions  OpenAI completions; `stream: true` answers with server-sent events, each
                          `data: {chunk}\\n\\n`, then `data: [DONE]\\n\\n`. A batch of prompts
                          and `n` choices each are one engine request per choice (`choices.py`).
    POST /v1/chat/completions  OpenAI chat: the messages rendered by the model's chat template
                          (`chat_template.py`; `--chat-template` replaces it), then as completions.
    GET  /v1/models       the served model, in OpenAI's list shape
    GET  /health          200 {"status": "ok"} while the engine loop runs, else 503
    GET  /metrics         Prometheus text: the engine's metrics, and kvtier's when it is on
    POST /tokenize        a prompt's or chat's token ids, as the routes above would run them
                          (`tokenize_route.py`: for `kvtier_engine proxy --controller`)
    POST /v1/kv/release   a prefill's KV held for a decode instance let go; GET /v1/kvtier/instance
                          this instance's fleet id, model id and --kv-role (`disagg_routes.py`)

Errors have OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for a body that is not
JSON or not a valid request (wire format and parameter ranges in `openai_protocol.py`) or a prompt
the model cannot take; 404 for another model's name or an unknown path; 408 for a body not received
within `read_timeout_s`; 413 for a body over `max_body_bytes` (refused before it is read:
`kvtier.body_limit`); 500 when the engine fails while running the request (only the requests it failed
for: `engine_loop.py`); 503 when the engine loop has stopped. A streamed request that fails after
its first chunk ends with a `data: {"error": ...}` event and `[DONE]` (the 200 has gone out by
then). A stream waits for its first output before answering, so failures up to then get their real
status.

Process life (`serve`): SIGINT or SIGTERM stops accepting connections, gives running requests
GRACEFUL_SHUTDOWN_S, then ends those still running with a 503 (a stream: an error event and
`[DONE]`), then closes the engine, which hands the remaining KV to kvtier and drains its queued
writes; the process then exits 0. If the engine becomes unusable, /health answers 503, the
server shuts down the same way and `serve` returns EXIT_ENGINE_FAILED, for a supervisor to restart.

Where it runs: handlers run on uvicorn's event loop and never touch the engine (text prompts are
tokenized on a worker thread: tokenizers are thread-safe); the EngineLoop's thread does. A client
that disconnects, streaming or not, has its request aborted in the engine.
A connection that sends no complete request head within `read_timeout_s` (of opening, or of its
previous response) is closed (`http_protocol.py`), so idle or trickling sockets cannot pile up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from kvtier.body_limit import BodyLimit, BodyTooLarge
from kvtier_engine.chat_template import InvalidChat, render_chat, without_double_bos
from kvtier_engine.llm_engine import EngineOptions, LLMEngine, RequestOutput
from kvtier_engine.serving.choices import abort_all, all_finished, first_outputs, merged, submit_choices
from kvtier_engine.serving.disagg_routes import add_transfer_routes
from kvtier_engine.serving.disconnect import ClientGone, unless_disconnected
from kvtier_engine.serving.engine_loop import EngineLoop, RequestFailed, RequestStream
from kvtier_engine.serving.http_protocol import HeadDeadlineProtocol
from kvtier_engine.serving.openai_chat import (
    ChatRequest,
    chat_body,
    chat_chunk,
    chat_role_chunks,
    chat_usage_chunk,
    parse_chat_request,
)
from kvtier_engine.serving.openai_protocol import (
    CompletionHead,
    CompletionRequest,
    InvalidRequest,
    check_prompt_length,
    completion_body,
    completion_chunk,
    error_body,
    parse_completion_request,
    usage_chunk,
)
from kvtier_engine.serving.tokenize_route import add_tokenize_route
from kvtier_engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# On SIGINT/SIGTERM, how long running requests get to finish before the engine ends them (503).
GRACEFUL_SHUTDOWN_S = 5.0
# Then how long their handlers get to send the 503s before uvicorn cancels them.
SHUTDOWN_ANSWER_S = 5.0
# The largest request body accepted (413 beyond). A prompt of 128K token ids is under 1 MiB of JSON;
# the rest is room for text prompts and escaped characters.
DEFAULT_MAX_BODY_BYTES = 8 << 20
# A request's head must arrive within this of the connection opening (or of the previous response),
# and its body within this of the head: a client that trickles bytes cannot hold a socket for good.
DEFAULT_READ_TIMEOUT_S = 30.0
# Requests accepted and not yet finished; beyond it a request gets 503 at once. Each holds its
# prompt and output in memory, so a flood of requests must not queue without end.
DEFAULT_MAX_REQUESTS = 512
EXIT_ENGINE_FAILED = 1  # serve's return value when the engine became unusable


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What one `kvtier_engine serve` process lets its clients cost (the `--max-*` flags)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    max_requests: int = DEFAULT_MAX_REQUESTS


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str  # what clients put in `model`
    max_model_len: int
    created: int  # unix seconds the server started
    chat_template: str | None = None  # jinja2 text; None: /v1/chat/completions answers 400


@dataclass(frozen=True, slots=True)
class _Wire:
    """How one endpoint writes what the engine produced: the whole body, or the stream's chunks."""

    body: Callable[[CompletionHead, list[RequestOutput]], dict[str, Any]]  # every choice's final output
    chunk: Callable[[CompletionHead, RequestOutput, int], dict[str, Any]]  # one output of choice i
    usage_chunk: Callable[[CompletionHead, list[RequestOutput]], dict[str, Any]]
    opening: Callable[[CompletionHead, int], list[dict[str, Any]]]  # chunks before the first outputs'


_COMPLETIONS = _Wire(completion_body, completion_chunk, usage_chunk, lambda head, n: [])
_CHAT = _Wire(chat_body, chat_chunk, chat_usage_chunk, chat_role_chunks)


class _ModelNotFound(Exception):
    pass


def build_app(engine_loop: EngineLoop, model: ServedModel, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The ASGI app. The caller owns `engine_loop`: it starts it before serving and closes it after."""
    app = FastAPI(title="kvtier_engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, refusal=_refusal)
    _install_error_handlers(app)
    _add_info_routes(app, engine_loop, model)
    _add_completions_route(app, engine_loop, model, limits.read_timeout_s)
    _add_chat_route(app, engine_loop, model, limits.read_timeout_s)
    add_transfer_routes(app, engine_loop.engine)
    add_tokenize_route(app, engine_loop.engine, model, lambda r: _read_body(r, limits.read_timeout_s))
    return app


def _add_info_routes(app: FastAPI, engine_loop: EngineLoop, model: ServedModel) -> None:
    """GET /health (liveness and readiness), /metrics (Prometheus text), /v1/models."""

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine_loop.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine_loop.prometheus_text(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": model.name, "object": "model", "created": model.created, "owned_by": "kvtier",
                "max_model_len": model.max_model_len}
        return JSONResponse({"object": "list", "data": [card]})


def _add_completions_route(app: FastAPI, engine_loop: EngineLoop, model: ServedModel,
                           read_timeout_s: float) -> None:
    """POST /v1/completions: read and check the request here, then hand it to `_respond`."""
    # Text is tokenized here, on a worker thread, and checked against the context before the engine
    # sees it: on the engine's thread, an 8 MiB prompt stalled every running stream for ~0.6 s
    # before its 400. Tokenizers are thread-safe (and hold no engine state).
    tokenizer = engine_loop.engine.tokenizer

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        read = await _read_request(request, read_timeout_s, parse_completion_request, model, "cmpl")
        if read is None:
            return Response(status_code=499)
        body, head = read
        prompts = [await _token_ids(prompt, tokenizer, model.max_model_len) for prompt in body.prompts]
        streams = submit_choices(engine_loop, prompts, body.params, body.n, head.id, body.kv_transfer_params)
        return await _respond(request, streams, head, body, _COMPLETIONS)


def _add_chat_route(app: FastAPI, engine_loop: EngineLoop, model: ServedModel, read_timeout_s: float) -> None:
    """POST /v1/chat/completions: the messages rendered by the chat template (on a worker thread, as
    tokenizing), then the completions path."""
    tokenizer = engine_loop.engine.tokenizer
    render = functools.partial(render_chat, template=model.chat_template,
                               bos_token=getattr(tokenizer, "bos_token", None),
                               eos_token=getattr(tokenizer, "eos_token", None))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        read = await _read_request(request, read_timeout_s, parse_chat_request, model, "chatcmpl")
        if read is None:
            return Response(status_code=499)
        body, head = read
        try:
            text = await asyncio.to_thread(render, body.messages)
        except InvalidChat as exc:
            raise InvalidRequest(exc.message, exc.param) from None
        prompt = without_double_bos(await _token_ids(text, tokenizer, model.max_model_len, "messages"),
                                    getattr(tokenizer, "bos_token_id", None))
        streams = submit_choices(engine_loop, [prompt], body.params, body.n, head.id, body.kv_transfer_params)
        return await _respond(request, streams, head, body, _CHAT)


async def _read_request(request: Request, read_timeout_s: float, parse: Callable[[object, int | None], Any],
                        model: ServedModel, id_prefix: str) -> tuple[Any, CompletionHead] | None:
    """The parsed, checked body of a completions or chat request and the head of its answer; None
    when the client left mid-body."""
    raw = await _read_body(request, read_timeout_s)
    if raw is None:
        return None
    body = parse(_decode_json(raw), model.max_model_len)
    _check_model(body.model, model)
    head = CompletionHead(f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), model.name,
                          body.params.logprobs is not None, body.n)
    return body, head


async def _read_body(request: Request, read_timeout_s: float) -> bytes | None:
    """The request's body, or None when the client left mid-body (nobody to answer)."""
    try:
        return await asyncio.wait_for(request.body(), read_timeout_s)
    except TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {read_timeout_s} s",
                            headers={"Connection": "close"}) from None
    except ClientDisconnect:  # it was 2 tracebacks at ERROR
        return None


def _check_model(asked: str | None, model: ServedModel) -> None:
    if asked is not None and asked != model.name:
        raise _ModelNotFound(asked)


async def _respond(request: Request, streams: list[RequestStream], head: CompletionHead,
                   body: CompletionRequest | ChatRequest, wire: _Wire) -> Response:
    """The response to submitted requests (one per choice): an SSE stream or one JSON body. Whatever
    happens, they are aborted (a no-op once done) unless a streaming response has taken them over."""
    streaming = False
    try:
        if body.stream:
            firsts = await unless_disconnected(request, first_outputs(streams))
            # From here the response's iterator, and its background task should the iterator
            # never start, abort the requests if the client leaves.
            streaming = True
            return StreamingResponse(_sse(streams, firsts, head, body, wire), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(abort_all, streams))
        finals = await unless_disconnected(request, all_finished(streams))
        return JSONResponse(wire.body(head, finals))
    except ClientGone:
        logger.info("%s: client disconnected; request aborted", head.id)
        return Response(status_code=499)  # nobody reads it; the status is nginx's "client closed"
    finally:
        # A no-op once the requests are done; otherwise the client left or we were cancelled.
        if not streaming:
            abort_all(streams)


def serve(options: EngineOptions, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None, log_level: str = "info",
          limits: ServerLimits = ServerLimits(), chat_template: str | None = None) -> int:
    """Load the model, then serve until SIGINT/SIGTERM (returns 0) or until the engine becomes
    unusable (returns EXIT_ENGINE_FAILED); either way the engine is closed and kvtier drained first.
    `chat_template` (jinja2 text) replaces the model's own.

    Blocking; it handles SIGINT and SIGTERM while serving, so call it from the main thread."""
    engine = LLMEngine(options)
    template = chat_template or getattr(engine.tokenizer, "chat_template", None)
    model = ServedModel(served_model_name or options.model, engine.max_model_len, int(time.time()), template)
    return run_server(engine, model, host, port, log_level, limits)


def run_server(engine: LLMEngine, model: ServedModel, host: str, port: int, log_level: str = "info",
               limits: ServerLimits = ServerLimits()) -> int:
    """`serve` for an engine already built (it is closed on the way out)."""
    broken = threading.Event()

    def on_broken() -> None:  # the engine thread, once the loop has stopped for good
        broken.set()
        server.should_exit = True  # uvicorn's main loop polls it; a graceful shutdown follows

    engine_loop = EngineLoop(engine, on_broken, limits.max_requests)
    config = uvicorn.Config(build_app(engine_loop, model, limits), host=host,
                            port=port, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S + SHUTDOWN_ANSWER_S,
                            http=functools.partial(HeadDeadlineProtocol,
                                                   head_timeout_s=limits.read_timeout_s))
    server = _Server(config, engine_loop)
    with exit_on_signals(server):
        engine_loop.start()
        try:
            server.run()
        finally:
            engine_loop.close()
    if broken.is_set():
        logger.error("the engine became unusable; exiting with status %d for a supervisor to restart it",
                     EXIT_ENGINE_FAILED)
        return EXIT_ENGINE_FAILED
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown ends the requests still running after
    GRACEFUL_SHUTDOWN_S through the engine loop (their handlers answer 503) instead of leaving
    uvicorn to cancel the handlers: that cut streams short without an error or `[DONE]`, and
    answered the others with a plain-text 500."""

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop):
        super().__init__(config)
        self._engine_loop = engine_loop

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        stop = asyncio.get_running_loop().call_later(GRACEFUL_SHUTDOWN_S, self._engine_loop.stop)
        try:
            await super().shutdown(sockets)
        finally:
            stop.cancel()


@contextlib.contextmanager
def exit_on_signals(server: uvicorn.Server) -> Iterator[None]:
    """While uvicorn serves, SIGINT/SIGTERM start its graceful shutdown; once it is done it restores
    the handlers it found and raises the signal again, which under Python's defaults kills the
    process (-15, or KeyboardInterrupt) before the engine is closed and kvtier's queued writes land.
    Under these handlers that signal, or one during the drain, only asks the server to exit (a
    no-op by then), and so does one that comes before uvicorn has put its own handlers in."""

    def stop(signum: int, _frame: object) -> None:
        logger.info("%s: closing the engine and draining kvtier before exit", signal.Signals(signum).name)
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- completions ---------------------------------------------------------------------------------


async def _token_ids(prompt: str | tuple[int, ...], tokenizer: Tokenizer, max_model_len: int,
                     param: str = "prompt") -> list[int]:
    if not isinstance(prompt, str):
        return list(prompt)
    try:
        ids = await asyncio.to_thread(tokenizer.encode, prompt)
    except ValueError as exc:  # e.g. a lone surrogate (JSON's "\ud800") cannot be encoded
        raise InvalidRequest(f"the prompt cannot be tokenized: {exc}", param) from None
    check_prompt_length(len(ids), max_model_len, param)
    return ids


async def _sse(streams: list[RequestStream], firsts: list[RequestOutput], head: CompletionHead,
               body: CompletionRequest | ChatRequest, wire: _Wire) -> AsyncIterator[bytes]:
    finals = list(firsts)
    try:
        for chunk in wire.opening(head, len(streams)):
            yield _event(chunk)
        async with contextlib.aclosing(merged(streams, firsts)) as outputs:
            async for index, output in outputs:
                # A token with no text of its own yet still brings its log-probabilities.
                if output.new_text or output.finished or output.new_logprobs:
                    yield _event(wire.chunk(head, output, index))
                finals[index] = output
        if body.include_usage:
            yield _event(wire.usage_chunk(head, finals))
    except RequestFailed as exc:
        yield _event(error_body(exc.message, _error_type(exc.status)))
    finally:
        # Reached with the stream cancelled when the client disconnects: abort the requests then.
        abort_all(streams)
    yield b"data: [DONE]\n\n"


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _decode_json(raw: bytes) -> object:
    def reject_constant(name: str) -> None:  # NaN and Infinity are not JSON
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=reject_constant)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # arrays nested thousands deep: no request has them
        raise InvalidRequest("the request body is nested too deeply") from None


# -- errors --------------------------------------------------------------------------------------


def _error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, _error_type(status), param, code), status_code=status)


def _refusal(exc: BodyTooLarge) -> JSONResponse:
    """The early 413 of kvtier.body_limit, in OpenAI's error shape."""
    return JSONResponse(error_body(exc.detail, _error_type(413)), status_code=413, headers=exc.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidRequest)
    async def invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return _error(400, exc.message, exc.param)

    @app.exception_handler(_ModelNotFound)
    async def unknown_model(_: Request, exc: _ModelNotFound) -> JSONResponse:
        return _error(404, f"The model `{exc}` does not exist.", "model", "model_not_found")

    @app.exception_handler(RequestFailed)
    async def failed(_: Request, exc: RequestFailed) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return _error(500, "internal server error")
