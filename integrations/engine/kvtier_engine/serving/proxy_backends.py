"""The proxy's engine instances of one role (prefill or decode), and which one gets the next call.

`BackendPool.lease()` picks the instance with the fewest calls in flight (ties: round robin, so idle
instances share the work), among all or among those it is given (the ones holding a prompt's longest
cached prefix: `proxy_prefix.py`), and counts the call until `Lease.end()`, which is idempotent: the
paths that can end one call (its reply read, its stream closed, its response abandoned, its handler
cancelled) may all end it, and the count goes back down exactly once.

Runs on the proxy's event loop only: the counts are plain integers, no locks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class BackendAddress:
    url: str  # normalised: http://host:port, no trailing slash
    host: str
    port: int


def parse_backend_url(text: str) -> BackendAddress:
    """`http://host:port` of a `kvtier_engine serve` instance; ValueError for anything else (no https,
    no path: the proxy adds the API paths itself)."""
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected http://host:port, got {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"expected http://host:port with no path, query or user, got {text!r}")
    try:
        port = parts.port or 80
    except ValueError:  # urlsplit checks the port only when asked
        raise ValueError(f"bad port in {text!r}") from None
    host = parts.hostname
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return BackendAddress(f"http://{netloc}", host, port)


@dataclass(slots=True, eq=False)
class Backend:
    role: str  # "prefill" or "decode": for messages
    address: BackendAddress
    in_flight: int = 0

    @property
    def url(self) -> str:
        return self.address.url


class Lease:
    """One call counted against `backend` until `end()` (a no-op after the first)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._held = True
        backend.in_flight += 1

    def end(self) -> None:
        if self._held:
            self._held = False
            self.backend.in_flight -= 1

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.end()


class BackendPool:
    def __init__(self, role: str, addresses: Sequence[BackendAddress]):
        if not addresses:
            raise ValueError(f"no {role} instance given")
        self.role = role
        self.backends = [Backend(role, address) for address in addresses]
        self._turn = 0

    def lease(self, avoid: Backend | None = None, among: Sequence[Backend] | None = None) -> Lease:
        """A lease on the least loaded instance (of `among`, when given: those holding a prompt's
        longest cached prefix), other than `avoid` when there is another."""
        pool = among or self.backends
        candidates = [b for b in pool if b is not avoid] or pool
        start = self._turn % len(candidates)
        self._turn += 1
        # min() keeps the first of equals: rotating the start is what makes ties round robin.
        chosen = min(candidates[start:] + candidates[:start], key=lambda b: b.in_flight)
        return Lease(chosen)

    def snapshot(self) -> list[dict[str, Any]]:
        return [{"url": b.url, "in_flight": b.in_flight} for b in self.backends]
