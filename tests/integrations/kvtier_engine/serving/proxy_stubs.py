"""Doubles for the proxy's tests: engine instances that follow a script, and the proxy itself, each a
real HTTP server (Starlette on uvicorn, in a daemon thread, on a port the kernel picks).

`Stub` stands for a `kvtier_engine serve` instance of either role. It records every request body it
gets (`calls`: path and decoded JSON, recorded before it answers) and every release, and answers as
its `script` says:
    "transfer"       200, a one-token completion with kv_transfer_params {"transfer_id": "t<k>", ...}
    "no_params"      200, a completion without kv_transfer_params
    "status:<code>"  that status with an OpenAI error body
    "hang"           waits for `hold` (set at teardown, or by the test), then answers as "transfer"
    "json"           200, a decode's completion (`DECODED`, plus `served_by`)
    "sse"            200, SSE_EVENTS, the last cut across two writes
    "die_mid_stream" 200, the first SSE event and half of the next, then the connection is cut
    "one_then_hold"  200, the first SSE event, then nothing until the client leaves (`stream_closed`)
Every stub also answers the routes the proxy reads with --controller: `GET /v1/kvtier/instance`
(its `instance_id`, MODEL_ID; counted in `cards`) and `POST /tokenize` (`stub_ids`, recorded in
`tokenized`). `StubController` stands for kvtier_controller's /v1/route: it records each body and
Authorization header, and answers its `hits` (instance id -> hit_tokens), or as its script says
("route", "status:<code>", "hang", "garbage").
`Proxy` runs `build_proxy_app` the same way, and reads its /health. `Fleet` holds one test's servers.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from waiting import wait_until

from kvtier_engine.serving.proxy import ProxyConfig, build_proxy_app
from kvtier_engine.serving.proxy_backends import parse_backend_url
from kvtier_engine.serving.proxy_prefix import ControllerLink

HOLD_S = 20.0  # the longest a "hang" or "one_then_hold" stub waits: far beyond any test, bounded still
SSE_EVENTS = [b'data: {"choices": [{"index": 0, "text": "' + text + b'"}]}\n\n'
              for text in (b"a", b"b", b"c")]
SSE_BODY = b"".join(SSE_EVENTS) + b"data: [DONE]\n\n"
MODEL_ID = "m@seed0"  # the model id every stub's card names
DECODED = {"object": "text_completion",
           "choices": [{"index": 0, "text": " decoded", "finish_reason": "length"}]}
_transfer_ids = itertools.count(1)


class StubCut(Exception):
    """Raised in a stub's stream: uvicorn then closes the connection mid-body."""


def stub_ids(query: dict[str, Any]) -> list[int]:
    """A stub's token ids for a /tokenize body: the bytes of the prompt, or of the messages' JSON."""
    text = query["prompt"] if "prompt" in query else json.dumps(query["messages"])
    return list(text.encode())


class Stub:
    def __init__(self, name: str, script: str, instance_id: str | None = None):
        self.name, self.script, self.instance_id = name, script, instance_id
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.tokenized: list[dict[str, Any]] = []
        self.cards = 0
        self.releases: list[dict[str, Any]] = []
        self.transfers: list[dict[str, Any]] = []  # the kv_transfer_params it handed out
        self.hold = threading.Event()
        self.stream_closed = threading.Event()
        self.url = ""
        routes = [Route(path, self._complete, methods=["POST"])
                  for path in ("/v1/completions", "/v1/chat/completions")]
        routes += [Route("/v1/kv/release", self._release, methods=["POST"]),
                   Route("/v1/models", self._models, methods=["GET"]),
                   Route("/v1/kvtier/instance", self._card, methods=["GET"]),
                   Route("/tokenize", self._tokenize, methods=["POST"])]
        self.app = Starlette(routes=routes)

    def bodies(self) -> list[dict[str, Any]]:
        return [body for _, body in self.calls]

    async def _complete(self, request: Request) -> Response:
        self.calls.append((request.url.path, json.loads(await request.body())))
        script = self.script
        if script == "hang":
            await asyncio.to_thread(self.hold.wait, HOLD_S)
            script = "transfer"
        if script.startswith("status:"):
            status = int(script.split(":")[1])
            return JSONResponse({"error": {"message": f"{self.name} says {status}", "type": "x",
                                           "param": None, "code": None}}, status_code=status)
        if script in ("transfer", "no_params"):
            reply: dict[str, Any] = {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}
            if script == "transfer":
                params = {"transfer_id": f"t{next(_transfer_ids)}", "remote": self.url, "blocks": [3, 1]}
                self.transfers.append(params)
                reply["kv_transfer_params"] = params
            return JSONResponse(reply)
        if script == "json":
            return JSONResponse(dict(DECODED, served_by=self.name))
        return StreamingResponse(self._stream(script), media_type="text/event-stream")

    async def _stream(self, script: str) -> AsyncIterator[bytes]:
        try:
            yield SSE_EVENTS[0]
            if script == "sse":
                yield SSE_EVENTS[1] + SSE_EVENTS[2][:10]  # an event cut across two writes
                yield SSE_EVENTS[2][10:] + b"data: [DONE]\n\n"
            elif script == "die_mid_stream":
                yield SSE_EVENTS[1][:10]
                raise StubCut("cut the connection mid-event")
            else:  # one_then_hold: until the proxy closes the connection (Starlette cancels us)
                await asyncio.to_thread(self.hold.wait, HOLD_S)
        finally:
            self.stream_closed.set()

    async def _release(self, request: Request) -> JSONResponse:
        self.releases.append(json.loads(await request.body()))
        return JSONResponse({"released": True})

    async def _models(self, _: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model"}]})

    async def _card(self, _: Request) -> JSONResponse:
        self.cards += 1
        return JSONResponse({"instance_id": self.instance_id, "model_id": MODEL_ID, "role": "decode"})

    async def _tokenize(self, request: Request) -> JSONResponse:
        query = json.loads(await request.body())
        self.tokenized.append(query)
        ids = stub_ids(query)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": 4096})


class StubController:
    def __init__(self, script: str, hits: dict[str, int]):
        self.script, self.hits = script, hits
        self.routes: list[tuple[str | None, dict[str, Any]]] = []  # (Authorization, body)
        self.hold = threading.Event()
        self.url = ""
        self.app = Starlette(routes=[Route("/v1/route", self._route, methods=["POST"])])

    async def _route(self, request: Request) -> Response:
        self.routes.append((request.headers.get("authorization"), json.loads(await request.body())))
        if self.script == "hang":
            await asyncio.to_thread(self.hold.wait, HOLD_S)
        if self.script.startswith("status:"):
            return JSONResponse({"detail": "scripted"}, status_code=int(self.script.split(":")[1]))
        if self.script == "garbage":
            return Response(b"<html>not a route</html>", media_type="text/html")
        ranked = sorted(self.hits.items(), key=lambda item: -item[1])
        return JSONResponse({"instances": [{"instance_id": i, "hit_tokens": hit, "free_bytes": 1 << 30}
                                           for i, hit in ranked]})


# Every test server started, so that a test's teardown tells them all to stop before waiting for
# any: each takes a few tenths of a second to wind down, one after the other they added up.
_SERVERS: list[uvicorn.Server] = []


def stop_all_servers() -> None:
    for server in _SERVERS:
        server.should_exit = True


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` on uvicorn in a daemon thread; yields its URL, and stops it on the way out."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical",
                                           timeout_graceful_shutdown=1))
    _SERVERS.append(server)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "a test server listens")
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        _SERVERS.remove(server)


class Proxy:
    def __init__(self, url: str):
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])

    def health(self) -> dict[str, Any]:
        status, _, body = request(self.port, "GET", "/health")
        assert status == 200
        return json.loads(body)

    def in_flight(self) -> list[int]:
        health = self.health()
        return [b["in_flight"] for b in health["prefill"] + health["decode"]]

    def wait_idle(self) -> None:
        """Every instance's in-flight count back to 0 (the last stream's end is not the client's)."""
        wait_until(lambda: not any(self.in_flight()), "every in-flight count back to 0", timeout_s=5)


@contextmanager
def running_proxy(prefill: list[str], decode: list[str], timeout_s: float = 5.0,
                  controller: ControllerLink | None = None) -> Iterator[Proxy]:
    config = ProxyConfig(tuple(map(parse_backend_url, prefill)), tuple(map(parse_backend_url, decode)),
                         timeout_s=timeout_s, controller=controller)
    with serving(build_proxy_app(config)) as url:
        yield Proxy(url)


def request(port: int, method: str, path: str, body: bytes | dict | list | None = None,
            timeout_s: float = 10) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One whole request: status, headers and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


class Fleet:
    """The stubs and proxies of one test; `close` lets every held stub go, then stops them all."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._stubs: list[Stub | StubController] = []

    def stub(self, name: str, script: str, instance_id: str | None = None) -> Stub:
        stub = Stub(name, script, instance_id)
        self._stubs.append(stub)
        stub.url = self._stack.enter_context(serving(stub.app))
        return stub

    def controller(self, script: str, hits: dict[str, int] | None = None) -> StubController:
        controller = StubController(script, hits or {})
        self._stubs.append(controller)
        controller.url = self._stack.enter_context(serving(controller.app))
        return controller

    def proxy(self, prefill: list[str], decode: list[str], timeout_s: float = 5.0,
              controller: str | None = None, token: str | None = None) -> Proxy:
        link = None if controller is None else ControllerLink(parse_backend_url(controller), token)
        return self._stack.enter_context(running_proxy(prefill, decode, timeout_s, link))

    def close(self) -> None:
        for stub in self._stubs:
            stub.hold.set()  # a handler still waiting would hold its server's shutdown
        stop_all_servers()
        self._stack.close()
