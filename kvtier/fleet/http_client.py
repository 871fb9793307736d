"""A small blocking JSON-over-HTTP client: the fleet's one way of making a request (the agent to the
controller, the controller to an instance's command server, the `kvtier` CLI to the controller).

One keep-alive connection, reopened after any failure; a request that finds the kept connection closed
by the peer (servers close idle ones: uvicorn after 5 s) is sent again once on a new one, or every
request after a quiet spell would fail (the agent's heartbeats at 5 s or more, sporadic commands);
every request has a deadline (connect, send
and each read); a reply body is read up to `max_reply_bytes` and no further; a bearer token when
given. Errors form two kinds: `Unreachable` (no answer: refused, reset, timed out, a reply that is not
HTTP or not JSON; retry later) and `HttpError` (an answer with a 4xx/5xx status and its detail).

Not thread-safe: one client per thread (the agent's thread, a request handler, the CLI); `abort`
from any thread.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any
from urllib.parse import urlsplit

from kvtier.errors import KvtierError

MAX_REPLY_BYTES = 64 << 20
# What a kept-alive connection the peer closed while idle fails with (not a timeout: never resent).
_STALE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, http.client.RemoteDisconnected)


class Unreachable(KvtierError):
    """No usable answer (connection refused or lost, timeout, garbage): retryable."""


class HttpError(KvtierError):
    """The peer answered with an error status."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class JsonClient:
    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 5.0,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {base_url!r}")
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token is not None:
            self._headers["Authorization"] = f"Bearer {token}"
        self.timeout_s = timeout_s
        self.max_reply_bytes = max_reply_bytes
        self._conn: http.client.HTTPConnection | None = None
        self._reused = False  # the connection has answered a request already
        self._aborted = False

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        """POST `body` (a pydantic model or plain JSON data) and return the decoded JSON reply."""
        if hasattr(body, "model_dump_json"):
            data = body.model_dump_json(by_alias=True).encode()
        else:
            data = json.dumps(body, separators=(",", ":")).encode()
        return self.request("POST", path, data)

    def request(self, method: str, path: str, data: bytes | None = None) -> Any:
        status, raw = self.raw_request(method, path, data)
        try:
            reply = json.loads(raw) if raw else None
        except ValueError as exc:
            raise Unreachable(f"{method} {path}: the reply is not JSON") from exc
        if status >= 400:
            detail = reply.get("detail") if isinstance(reply, dict) else None
            raise HttpError(status, detail if isinstance(detail, str) else json.dumps(detail)[:500])
        return reply

    def raw_request(self, method: str, path: str, data: bytes | None = None) -> tuple[int, bytes]:
        """(status, body bytes) of one request; Unreachable when there is no complete answer."""
        if self._conn is not None and self._reused:
            try:
                return self._exchange(method, path, data)
            except Unreachable as exc:
                if not isinstance(exc.__cause__, _STALE):
                    raise
        return self._exchange(method, path, data)

    def _exchange(self, method: str, path: str, data: bytes | None) -> tuple[int, bytes]:
        if self._aborted:
            raise Unreachable(f"{method} {path}: the client was aborted")
        try:
            conn = self._connection()
            conn.request(method, path, body=data, headers=self._headers)
            reply = conn.getresponse()
            length = reply.getheader("Content-Length")
            if length is not None and (not length.isdigit() or int(length) > self.max_reply_bytes):
                raise Unreachable(f"{method} {path}: reply of {length} bytes is over the limit")
            raw = reply.read(self.max_reply_bytes + 1)
            if len(raw) > self.max_reply_bytes:
                raise Unreachable(f"{method} {path}: reply over {self.max_reply_bytes} bytes")
            if reply.will_close:
                self.close()
            else:
                self._reused = True
            return reply.status, raw
        except (OSError, http.client.HTTPException) as exc:  # TimeoutError is an OSError
            self.close()
            raise Unreachable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        except Unreachable:
            self.close()
            raise

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout_s)
        return self._conn

    def abort(self) -> None:
        """From any thread: fail the request in flight now (its socket shut down; the owner's thread
        gets Unreachable) and every later one, so that an owner that is stopping need not wait out a
        stalled peer (nor a request sent again on a new connection)."""
        self._aborted = True
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed meanwhile by the owner's thread
                pass

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._reused = False
