"""The proxy's HTTP/1.1 client to engine instances (and to the controller): h11 (sans-IO) over asyncio
streams.

One connection per call (`Connection: close`): a call is cancelled by closing its connection, which
is how the engine learns that its client left and aborts the request. No pool: on the loopback or a
LAN a connect costs far less than the prefill it starts.

Every wait has a deadline, so no call can hang: the connect within `connect_s`, then sending the
request and each read (the reply head, each piece of the body) within `read_s` each. A call that
misses one, is refused or reset, or answers with something that is not HTTP raises `UpstreamError`
and its connection is closed. Whole-call deadlines, where one applies, are the caller's.

Runs on the proxy's event loop; an `Upstream` belongs to one task at a time. Its caller closes it
(`close()` is idempotent and never blocks).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h11

from kvtier_engine.serving.proxy_backends import BackendAddress

CHUNK_BYTES = 64 << 10  # one socket read, and so at most one piece of a relayed body


class UpstreamError(Exception):
    """No usable answer from an instance: refused, reset, timed out, not HTTP, or over a size bound
    (and from `fetch_json`: another status than 200, or a body that is not JSON)."""

    def __init__(self, url: str, reason: str, status: int | None = None):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason
        self.status = status  # the reply's status, for a reply that came with an unusable one


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float
    read_s: float  # each read, and sending the request


class Upstream:
    """One call: its reply's status and headers once `open_call` has returned, then its body."""

    def __init__(self, address: BackendAddress, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 read_s: float):
        self.url = address.url
        self.status = 0
        self.headers: dict[str, str] = {}  # lower-case names
        self._conn = h11.Connection(h11.CLIENT)
        self._reader, self._writer = reader, writer
        self._read_s = read_s

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "application/octet-stream")

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body as it arrives (at most CHUNK_BYTES); None at its end."""
        event = await self._next_event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise UpstreamError(self.url, f"unexpected {type(event).__name__} in the reply body")

    async def read_all(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        while (chunk := await self.next_chunk()) is not None:
            size += len(chunk)
            if size > limit:
                raise UpstreamError(self.url, f"reply body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        self._writer.close()

    async def _send(self, method: str, path: str, body: bytes, extra: Sequence[tuple[str, str]]) -> None:
        host = self.url.removeprefix("http://")
        headers = [("Host", host), ("Connection", "close"), ("Accept", "*/*"), *extra]
        if method == "POST":
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        self._writer.write(self._conn.send(h11.Request(method=method, target=path, headers=headers)))
        if body:
            self._writer.write(self._conn.send(h11.Data(data=body)))
        self._writer.write(self._conn.send(h11.EndOfMessage()))
        try:
            await asyncio.wait_for(self._writer.drain(), self._read_s)
        except asyncio.TimeoutError:
            raise UpstreamError(self.url, f"request not taken within {self._read_s} s") from None
        except OSError as exc:
            raise UpstreamError(self.url, f"connection lost while sending: {exc}") from None

    async def _read_head(self) -> None:
        event = await self._next_event()
        while isinstance(event, h11.InformationalResponse):  # 100 Continue and the like
            event = await self._next_event()
        if not isinstance(event, h11.Response):
            raise UpstreamError(self.url, f"unexpected {type(event).__name__} instead of a reply")
        self.status = event.status_code
        self.headers = {name.decode("latin-1").lower(): value.decode("latin-1")
                        for name, value in event.headers}

    async def _next_event(self) -> h11.Event:
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:  # also: the connection closed mid-reply
                raise UpstreamError(self.url, f"broken reply: {exc}") from None
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamError(self.url, "connection closed before the reply ended")
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await asyncio.wait_for(self._reader.read(CHUNK_BYTES), self._read_s)
            except asyncio.TimeoutError:
                raise UpstreamError(self.url, f"no reply within {self._read_s} s") from None
            except OSError as exc:
                raise UpstreamError(self.url, f"connection lost: {exc}") from None
            self._conn.receive_data(data)  # b"": end of stream, which h11 checks against the framing


async def open_call(address: BackendAddress, method: str, path: str, body: bytes,
                    timeouts: Timeouts, headers: Sequence[tuple[str, str]] = ()) -> Upstream:
    """Send `method path` with a JSON `body` (and `headers` besides the framing ones) and read the
    reply's head; the body is left to read."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port),
                                                timeouts.connect_s)
    except asyncio.TimeoutError:
        raise UpstreamError(address.url, f"no connection within {timeouts.connect_s} s") from None
    except OSError as exc:
        raise UpstreamError(address.url, f"unreachable: {exc.strerror or exc}") from None
    call = Upstream(address, reader, writer, timeouts.read_s)
    try:
        await call._send(method, path, body, headers)
        await call._read_head()
    except BaseException:  # cancelled too: the connection must not outlive the call
        call.close()
        raise
    return call


async def fetch(address: BackendAddress, method: str, path: str, body: bytes, timeouts: Timeouts,
                limit: int, headers: Sequence[tuple[str, str]] = ()) -> tuple[int, str, bytes]:
    """A whole call: the reply's status, content type and body (at most `limit` bytes)."""
    call = await open_call(address, method, path, body, timeouts, headers)
    try:
        return call.status, call.content_type, await call.read_all(limit)
    finally:
        call.close()


async def fetch_json(address: BackendAddress, method: str, path: str, payload: Any, timeout_s: float,
                     limit: int, headers: Sequence[tuple[str, str]] = ()) -> Any:
    """A small JSON call within `timeout_s` in all: the decoded body of its 200 reply. UpstreamError
    for anything else (another status included, with `status` set)."""
    body = b"" if payload is None else json.dumps(payload).encode()
    try:
        status, _, reply = await asyncio.wait_for(
            fetch(address, method, path, body, Timeouts(timeout_s, timeout_s), limit, headers), timeout_s)
    except asyncio.TimeoutError:
        raise UpstreamError(address.url, f"no whole reply within {timeout_s} s") from None
    if status != 200:
        raise UpstreamError(address.url, f"HTTP {status}: {reply[:200].decode('utf-8', 'replace')}", status)
    try:
        return json.loads(reply)
    except (ValueError, RecursionError):
        raise UpstreamError(address.url, "the reply is not JSON") from None
