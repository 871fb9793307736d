"""The end of a disaggregated request: the decode's stream relayed to the client, and the prefill's
held KV released.

`Relay` passes a decode's server-sent events on as they arrive, byte for byte, but only whole
events: should the decode fail mid-stream, the client's stream ends with an error event and
`[DONE]` (as the engine's own streams end) instead of half an event. `Relay.close` (idempotent)
closes the decode's connection, which aborts its request in the engine, ends its lease and
releases the transfer; the stream calls it when it ends or is cancelled (the client left).

`Releaser` sends `POST {prefill}/v1/kv/release {"transfer_id": ...}` in the background, once per
transfer: best effort (a failure is logged; the prefill instance frees what nobody claims on its
own), and never on a client's path.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from kvtier_engine.serving.proxy_backends import BackendAddress, Lease
from kvtier_engine.serving.proxy_bodies import TRANSFER_ID, error_event
from kvtier_engine.serving.proxy_upstream import Timeouts, Upstream, UpstreamError, fetch

logger = logging.getLogger(__name__)

RELEASE_PATH = "/v1/kv/release"
RELEASE_TIMEOUT_S = 5.0  # the whole release call
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Transfer:
    """KV a prefill instance holds for a decode instance to load."""

    prefill: BackendAddress
    params: dict[str, Any]  # the prefill's kv_transfer_params, opaque but for TRANSFER_ID

    @property
    def transfer_id(self) -> str:
        return self.params[TRANSFER_ID]


class Releaser:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()  # held, or the loop could collect them mid-call

    def once(self, transfer: Transfer) -> Callable[[], None]:
        """A callback that releases `transfer` the first time it is called, and does nothing after."""
        sent = False

        def release() -> None:
            nonlocal sent
            if not sent:
                sent = True
                self._spawn(transfer)

        return release

    async def drain(self, timeout_s: float = RELEASE_TIMEOUT_S) -> None:
        """Wait for the releases under way (at shutdown), at most `timeout_s`."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    def _spawn(self, transfer: Transfer) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self._post(transfer))
        except RuntimeError:  # no loop: the proxy is gone, and the prefill frees the KV on its own
            logger.warning("transfer %s on %s not released: no event loop", transfer.transfer_id,
                           transfer.prefill.url)
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, transfer: Transfer) -> None:
        body = json.dumps({TRANSFER_ID: transfer.transfer_id}).encode()
        timeouts = Timeouts(RELEASE_TIMEOUT_S, RELEASE_TIMEOUT_S)
        try:
            status, _, reply = await asyncio.wait_for(
                fetch(transfer.prefill, "POST", RELEASE_PATH, body, timeouts, 64 << 10), RELEASE_TIMEOUT_S)
        except (UpstreamError, asyncio.TimeoutError) as exc:
            logger.warning("release of transfer %s on %s failed: %s", transfer.transfer_id,
                           transfer.prefill.url, exc or "timed out")
            return
        if status != 200:
            logger.warning("release of transfer %s on %s: HTTP %d %s", transfer.transfer_id,
                           transfer.prefill.url, status, reply[:200].decode("utf-8", "replace"))


class Relay:
    """A decode's SSE reply, relayed. Owns `call` and `lease`, and calls `on_end` once, from `close`."""

    def __init__(self, call: Upstream, lease: Lease, on_end: Callable[[], None], first: bytes | None):
        self._call, self._lease, self._on_end = call, lease, on_end
        self._first = first  # the piece read before the response was committed; None: the body ended

    async def body(self) -> AsyncIterator[bytes]:
        chunk, tail, done = self._first, b"", False
        try:
            while chunk is not None:
                data = tail + chunk if tail else chunk
                cut = _events_end(data)
                if cut:
                    events = data if cut == len(data) else data[:cut]
                    done = events.endswith(_DONE)
                    yield events
                tail = data[cut:]
                chunk = await self._call.next_chunk()
            if tail:  # the decode ended its body mid-event: pass on what it sent
                yield tail
        except UpstreamError as exc:
            logger.warning("decode %s failed mid-stream: %s", exc.url, exc.reason)
            if not done:  # after [DONE] the client has its whole answer
                yield error_event(f"decode instance {exc.url} failed mid-stream: {exc.reason}")
        finally:
            self.close()

    def close(self) -> None:
        self._call.close()
        self._lease.end()
        self._on_end()


def _events_end(data: bytes) -> int:
    """Where the last whole event in `data` ends (0: none does). SSE ends an event with a blank line."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
