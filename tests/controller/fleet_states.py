"""Helpers and fixtures for the controller's state tests: registrations, key events, and a `state`
fixture that runs a test against every FleetState (memory; Redis standalone and cluster, each test
under its own key prefix, so tests share the session's servers without seeing each other's keys).
Test modules import it (not a conftest: tests/conftest.py is the suite's one `conftest` module)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence

import pytest

from kvtier.controller.memory_state import MemoryState
from kvtier.fleet.messages import KeyEvent, Registration, TierUsage
from kvtier.keys import Namespace

TIMEOUT_S = 10.0  # heartbeat timeout of every state built here
T0 = 1_000_000.0  # the tests' `now` (wall-clock-like seconds)
MODEL = "model-a"


def namespace(model: str = MODEL, salt: str = "") -> Namespace:
    return Namespace(model, "L2xH2xD16 float16", salt=salt)


def registration(instance_id: str, *, kind: str = "engine", model: str | None = MODEL,
                 ns: Namespace | None = None, chunk_size: int = 16, partial: bool = False,
                 tiers: Sequence[str] = ("cpu", "disk"), capacity: int = 1 << 20,
                 used: int = 0) -> Registration:
    if ns is None and kind == "engine":
        ns = namespace(model or MODEL)
    return Registration(
        instance_id=instance_id, kind=kind, command_url="http://127.0.0.1:9", command_token="t" * 32,
        model_id=model if kind == "engine" else None,
        namespace=ns.digest().hex() if ns is not None else None, chunk_size=chunk_size,
        save_partial_chunks=partial, tiers=[usage(t, capacity, used) for t in tiers])


def usage(name: str, capacity: int = 1 << 20, used: int = 0) -> TierUsage:
    return TierUsage(name=name, chunks=0, bytes_used=used, capacity_bytes=capacity)


def stored(tier: str, keys: Sequence[bytes]) -> KeyEvent:
    return KeyEvent(op="stored", tier=tier, keys=[k.hex() for k in keys])


def evicted(tier: str, keys: Sequence[bytes]) -> KeyEvent:
    return KeyEvent(op="evicted", tier=tier, keys=[k.hex() for k in keys])


@pytest.fixture(params=["memory", "redis", "cluster"])
def make_state(request) -> Iterator[Callable[..., object]]:
    """Builds states of one kind; two built by one test share their data (one Redis, one prefix)."""
    prefix = f"kvtier:ctl:{uuid.uuid4().hex[:12]}:"
    built = []
    shared_memory: list[MemoryState] = []

    def make(timeout_s: float = TIMEOUT_S, **kwargs):
        if request.param == "memory":
            if not shared_memory:
                shared_memory.append(MemoryState(timeout_s, **kwargs))
            return shared_memory[0]
        from kvtier.controller.redis_state import RedisState

        servers = request.getfixturevalue("redis_cluster" if request.param == "cluster" else "redis_server")
        state = RedisState(servers.url, request.param == "cluster", 2.0, timeout_s, key_prefix=prefix,
                           **kwargs)
        built.append(state)
        return state

    yield make
    for state in built:
        state.close()


@pytest.fixture
def state(make_state):
    return make_state()
