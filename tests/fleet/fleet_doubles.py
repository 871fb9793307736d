"""Test doubles for the fleet protocol's instance side: `FakeMember` (a FleetMember holding keys per
tier in memory) and `StandInController` (the controller's agent endpoints on uvicorn in a thread,
recording what it gets, keeping each instance's key set from the events, and misbehaving on demand).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi import FastAPI, HTTPException, Request

from kvtier.fleet.messages import (
    Command,
    CommandReply,
    EventBatch,
    EventsReply,
    Heartbeat,
    HeartbeatReply,
    RegisterReply,
    Registration,
    TierUsage,
)
from kvtier.fleet.serve_thread import ServerThread, bind_socket

NAMESPACE = "0123456789abcdef"


def key(i: int) -> bytes:
    return bytes.fromhex(NAMESPACE) + i.to_bytes(16, "big")


@dataclass
class FakeDescription:
    kind: str = "engine"
    model_id: str | None = "test-model"
    namespace: str | None = NAMESPACE
    chunk_size: int = 16
    save_partial_chunks: bool = False
    layout: str = "fake layout"
    p2p_url: str | None = None


class FakeMember:
    def __init__(self, tiers: tuple[str, ...] = ("cpu", "disk")):
        self.tiers = {name: {} for name in tiers}  # name -> dict used as an ordered set
        self.listener = None
        self.commands: list[Command] = []
        self.fail_with: Exception | None = None
        self._lock = threading.Lock()

    def describe(self) -> FakeDescription:
        return FakeDescription()

    def tier_usage(self) -> list[TierUsage]:
        with self._lock:
            return [TierUsage(name=n, chunks=len(k), bytes_used=100 * len(k), capacity_bytes=10**6)
                    for n, k in self.tiers.items()]

    def key_snapshot(self) -> dict[str, list[bytes]]:
        with self._lock:
            return {n: list(k) for n, k in self.tiers.items()}

    def set_key_listener(self, listener) -> None:
        self.listener = listener

    def store(self, tier: str, *keys: bytes) -> None:
        self._change("stored", tier, keys)

    def evict(self, tier: str, *keys: bytes) -> None:
        self._change("evicted", tier, keys)

    def _change(self, op: str, tier: str, keys) -> None:
        with self._lock:  # as a tier does: the listener runs under the tier's lock
            for k in keys:
                if op == "stored":
                    self.tiers[tier][k] = None
                else:
                    self.tiers[tier].pop(k, None)
                if self.listener is not None:
                    self.listener(op, tier, k)

    def hex_keys(self) -> dict[str, set[str]]:
        return {n: {k.hex() for k in keys} for n, keys in self.key_snapshot().items() if keys}

    def run(self, command: Command) -> CommandReply:
        self.commands.append(command)
        if self.fail_with is not None:
            raise self.fail_with
        if command.tier is not None and command.tier not in self.tiers:
            raise ValueError(f"unknown tier {command.tier!r}")
        return CommandReply(chunks=len(command.keys), tiers=self.tier_usage())


class StandInController:
    """`mode`: "ok"; "503" (every request); "stall" (every request waits for `release`);
    "unknown" (heartbeats and events answer known=False); "resync_once" (the next events batch not
    beginning with a reset answers resync=True)."""

    def __init__(self, token: str | None = None):
        self.token = token
        self.mode = "ok"
        self.session = "session-1"
        self.heartbeat_timeout_s = 10.0
        self.registrations: list[Registration] = []
        self.heartbeats: list[Heartbeat] = []
        self.batches: list[EventBatch] = []
        self.received: list[str] = []  # "register", "heartbeat", "events", in the order they came
        self.index: dict[str, dict[str, set[str]]] = {}  # instance -> tier -> key hex
        self.stalled = threading.Event()  # a request is waiting in "stall" mode
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server: ServerThread | None = None
        self.app = self._build()

    def start(self, sock=None) -> str:
        sock = sock if sock is not None else bind_socket("127.0.0.1", 0)
        self._server = ServerThread(self.app, sock, name="stand-in-controller", grace_s=0.5)
        self._server.start()
        return self.url

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.stop()

    def restart(self) -> None:
        """As a controller that lost its state: a new session, nothing known."""
        with self._lock:
            self.session += "+"
            self.index.clear()

    def keys(self, instance_id: str) -> dict[str, set[str]]:
        with self._lock:
            return {t: set(k) for t, k in self.index.get(instance_id, {}).items() if k}

    def _gate(self, request: Request) -> None:
        if self.token is not None and request.headers.get("authorization") != f"Bearer {self.token}":
            raise HTTPException(401, "missing or wrong bearer token")
        if self.mode == "stall":
            self.stalled.set()
            self.release.wait(30)
        if self.mode == "503":
            raise HTTPException(503, "the fleet index is unavailable")

    def _known(self, instance_id: str, session: str) -> bool:
        return self.mode != "unknown" and session == self.session and instance_id in self.index

    def _apply(self, instance_id: str, batch: EventBatch) -> EventsReply:
        with self._lock:
            if not self._known(instance_id, batch.session):
                return EventsReply(known=False)
            self.batches.append(batch)
            self.received.append("events")
            tiers = self.index[instance_id]
            for event in batch.events:
                if event.op == "reset":
                    tiers.clear()
                elif event.op == "stored":
                    tiers.setdefault(event.tier, set()).update(event.keys)
                elif event.op == "evicted":
                    tiers.get(event.tier, set()).difference_update(event.keys)
            resync = self.mode == "resync_once" and batch.events[0].op != "reset"
            if resync:
                self.mode = "ok"
            return EventsReply(known=True, resync=resync)

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/instances/register")
        def register(registration: Registration, request: Request) -> RegisterReply:
            self._gate(request)
            with self._lock:
                self.registrations.append(registration)
                self.received.append("register")
                self.index[registration.instance_id] = {}
                return RegisterReply(heartbeat_timeout_s=self.heartbeat_timeout_s, session=self.session)

        @app.post("/v1/instances/{instance_id}/heartbeat")
        def heartbeat(instance_id: str, beat: Heartbeat, request: Request) -> HeartbeatReply:
            self._gate(request)
            with self._lock:
                self.heartbeats.append(beat)
                self.received.append("heartbeat")
                return HeartbeatReply(known=self._known(instance_id, beat.session))

        @app.post("/v1/instances/{instance_id}/events")
        def events(instance_id: str, batch: EventBatch, request: Request) -> EventsReply:
            self._gate(request)
            return self._apply(instance_id, batch)

        return app


@pytest.fixture
def controller() -> Iterator[StandInController]:
    """A started StandInController, stopped at the test's end. A test module takes it with
    `controller = fleet_doubles.controller`."""
    c = StandInController()
    c.start()
    yield c
    c.stop()
