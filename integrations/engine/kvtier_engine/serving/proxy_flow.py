"""One proxied request, from its body to its response: prefill, decode, release (see `proxy.py` for
the contract). Runs on the proxy's event loop; every call it makes is bounded (`proxy_upstream.py`).

Who ends what: a decode call's `Lease` and its release callback are ended by `_attempt` itself
unless it hands them to a `Relay`, which ends them when its stream ends, when the client leaves, or
when its response is dropped unsent (`Relay.close`, Starlette's background task). A cancelled
handler (the client left before the answer) ends them through the same `finally` blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from kvtier_engine.serving.proxy_backends import Backend, BackendPool, Lease
from kvtier_engine.serving.proxy_bodies import (
    colocated_reason,
    decode_body,
    error_body,
    prefill_body,
    transfer_params,
)
from kvtier_engine.serving.proxy_prefix import PrefixRouter
from kvtier_engine.serving.proxy_relay import Relay, Releaser, Transfer
from kvtier_engine.serving.proxy_upstream import Timeouts, Upstream, UpstreamError, fetch, open_call

logger = logging.getLogger(__name__)

DISAGG_HEADER = "x-kvtier-disagg"
DISAGGREGATED, COLOCATED = "disaggregated", "colocated"
CACHED = "cached"  # straight to the decode instance that holds the prompt's KV: no prefill
# A decode's JSON reply is held whole before it goes out (so a failure half-way can still be retried):
# n choices with logprobs stay far below this.
MAX_REPLY_BYTES = 64 << 20
MAX_SMALL_REPLY_BYTES = 4 << 20  # a prefill's one-token reply with its transfer's parameters; models
MAX_CONNECT_S = 10.0  # a connect on a LAN takes milliseconds; a lost host need not cost --timeout


class Router:
    def __init__(self, prefill: BackendPool, decode: BackendPool, timeout_s: float,
                 prefix: PrefixRouter | None = None):
        self.prefill, self.decode = prefill, decode
        self.timeouts = Timeouts(min(MAX_CONNECT_S, timeout_s), timeout_s)
        self.releaser = Releaser()
        self.prefix = prefix  # None: decode instances are chosen by load only

    async def dispatch(self, path: str, raw: bytes, body: dict[str, Any]) -> Response:
        """The response to a parsed request; `raw` is its body as the client sent it."""
        reason = colocated_reason(body, path)
        if reason is not None:
            logger.debug("%s to a decode instance whole: %s", path, reason)
            return await self._decode(path, raw, raw, COLOCATED, _nothing)
        hit = await self.prefix.best(path, body) if self.prefix is not None else None
        among = hit.backends if hit is not None else None
        if hit is not None and hit.whole:
            logger.debug("%s: %d of %d prompt tokens cached on a decode instance; no prefill", path,
                         hit.hit_tokens, hit.num_tokens)
            return await self._decode(path, raw, raw, CACHED, _nothing, among)
        outcome = await self._prefill(path, body)
        if isinstance(outcome, Response):
            return outcome
        if outcome is None:
            return await self._decode(path, raw, raw, COLOCATED, _nothing, among)
        release = self.releaser.once(outcome)
        try:
            return await self._decode(path, decode_body(body, outcome.params), raw, DISAGGREGATED, release,
                                      among)
        except BaseException:  # cancelled before the decode was sent: the KV is still held
            release()
            raise

    async def models(self) -> Response:
        with self.decode.lease() as lease:
            try:
                status, content_type, reply = await self._whole(lease.backend, "GET", "/v1/models", b"")
            except UpstreamError as exc:
                return error_response(502, f"decode instance {exc.url} failed: {exc.reason}")
        return Response(reply, status, headers={"content-type": content_type})

    async def _prefill(self, path: str, body: dict[str, Any]) -> Transfer | Response | None:
        """The transfer a prefill instance holds for this request; a Response for the client when the
        prefill refused the request (4xx, the client's fault); None to serve it colocated."""
        with self.prefill.lease() as lease:
            try:
                status, content_type, reply = await self._whole(lease.backend, "POST", path,
                                                                prefill_body(body, path))
            except UpstreamError as exc:
                logger.warning("prefill %s failed (%s); serving colocated", exc.url, exc.reason)
                return None
        if 400 <= status < 500:
            return Response(reply, status, headers={"content-type": content_type})
        params = transfer_params(reply) if status == 200 else None
        if params is None:
            logger.warning("prefill %s answered HTTP %d without usable kv_transfer_params; serving colocated",
                           lease.backend.url, status)
            return None
        return Transfer(lease.backend.address, params)

    async def _decode(self, path: str, body: bytes, retry_body: bytes, mode: str,
                      on_end: Callable[[], None], among: Sequence[Backend] | None = None) -> Response:
        """A decode instance's response (the first try on one of `among`, when given); once more,
        colocated, on another when the first fails before answering; a 502 naming the instance when
        that fails too."""
        first = self.decode.lease(among=among)
        try:
            return await self._attempt(first, path, body, mode, on_end)
        except UpstreamError as exc:
            failed = exc
        logger.warning("decode %s failed before answering (%s); retrying colocated", failed.url,
                       failed.reason)
        second = self.decode.lease(avoid=first.backend)
        try:
            return await self._attempt(second, path, retry_body, COLOCATED, _nothing)
        except UpstreamError as exc:
            logger.error("decode %s failed before answering (%s); answering 502", exc.url, exc.reason)
            message = f"decode instance {exc.url} failed: {exc.reason}"
            if exc.url != failed.url:
                message += f" (and before it, decode instance {failed.url}: {failed.reason})"
            return error_response(502, message)

    async def _attempt(self, lease: Lease, path: str, body: bytes, mode: str,
                       on_end: Callable[[], None]) -> Response:
        """One decode call. A JSON reply is read whole; an SSE one is relayed once its first piece is
        here. UpstreamError when it fails before that: nothing has gone to the client yet."""
        call, relay = None, None
        try:
            call = await open_call(lease.backend.address, "POST", path, body, self.timeouts)
            if call.status >= 500:
                raise UpstreamError(call.url, await _failure(call))
            headers = {"content-type": call.content_type, DISAGG_HEADER: mode}
            if not call.content_type.startswith("text/event-stream"):
                return Response(await call.read_all(MAX_REPLY_BYTES), call.status, headers=headers)
            relay = Relay(call, lease, on_end, await call.next_chunk())
            headers["cache-control"] = "no-cache"
            # The background task runs when the response was never streamed (the client had gone).
            return StreamingResponse(relay.body(), call.status, headers=headers,
                                     background=BackgroundTask(relay.close))
        finally:
            if relay is None:  # answered already, failed or cancelled: this call is over
                if call is not None:
                    call.close()
                lease.end()
                on_end()

    async def _whole(self, backend: Backend, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        """A small reply read whole within one --timeout in all (each read is bounded; this bounds
        their sum)."""
        try:
            return await asyncio.wait_for(fetch(backend.address, method, path, body, self.timeouts,
                                                MAX_SMALL_REPLY_BYTES), self.timeouts.read_s)
        except asyncio.TimeoutError:
            raise UpstreamError(backend.url, f"no whole reply within {self.timeouts.read_s} s") from None


async def _failure(call: Upstream) -> str:
    """What a 5xx reply says, for the log and for a 502's message."""
    try:
        text = (await call.read_all(64 << 10)).decode("utf-8", "replace").strip()
    except UpstreamError:
        text = ""
    return f"HTTP {call.status}: {text[:300]}" if text else f"HTTP {call.status}"


def _nothing() -> None:
    pass


def error_response(status: int, message: str) -> JSONResponse:
    error_type = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(error_body(message, error_type), status_code=status)
