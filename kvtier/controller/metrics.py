"""The controller's Prometheus metrics, on a `CollectorRegistry` of its own (two apps in one process,
as in the tests, never mix numbers):

    kvtier_controller_instances{state="up"|"down"}      gauges, refreshed when /metrics is read
    kvtier_controller_index_entries / _index_bytes       (key, instance) entries and their memory
    kvtier_controller_requests_total{endpoint, status}  every answered request
    kvtier_controller_request_seconds{endpoint}         latency histogram (kvtier.metrics' buckets)

`RequestMetrics` is a pure ASGI middleware: it labels a request by its route's path template
(`/v1/instances/{instance_id}/heartbeat`, never the id itself, so the label set stays bounded) and
unmatched paths as "other". It is thread-safe as prometheus_client's metrics are.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvtier.metrics import LATENCY_BUCKETS

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ControllerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._instances = Gauge("kvtier_controller_instances", "registered instances", ["state"],
                                registry=reg)
        self._entries = Gauge("kvtier_controller_index_entries", "(key, instance) entries in the index",
                              registry=reg)
        self._bytes = Gauge("kvtier_controller_index_bytes", "memory of the index in this process",
                            registry=reg)
        self._requests = Counter("kvtier_controller_requests", "requests answered", ["endpoint", "status"],
                                 registry=reg)
        self._latency = Histogram("kvtier_controller_request_seconds", "request latency", ["endpoint"],
                                  buckets=LATENCY_BUCKETS, registry=reg)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint=endpoint, status=str(status)).inc()
        self._latency.labels(endpoint=endpoint).observe(seconds)

    def requests_by_endpoint(self) -> dict[str, int]:
        """Requests answered per endpoint, all statuses together (for /v1/stats)."""
        totals: dict[str, int] = {}
        for metric in self._requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    endpoint = sample.labels["endpoint"]
                    totals[endpoint] = totals.get(endpoint, 0) + int(sample.value)
        return totals

    def set_fleet(self, up: int, down: int, entries: int, nbytes: int) -> None:
        self._instances.labels(state="up").set(up)
        self._instances.labels(state="down").set(down)
        self._entries.set(entries)
        self._bytes.set(nbytes)

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: one `observe` per HTTP request, with the status the app sent."""

    def __init__(self, app: ASGIApp, metrics: ControllerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets when the app fails before it answers

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe(endpoint, status, time.perf_counter() - start)
