"""How a CacheEngine wires P2P in (kvtier/engine.py, kvtier/p2p/setup.py), with recording stand-ins
for the P2P parts (the parts have their own tests under tests/p2p): the transport chosen, the build
order (endpoint over the pool's arena -> bound server -> directory -> tier, the last tier below ->
storage -> server started -> fleet joined with p2p_url, the directory told the instance id), the
close order (fleet -> server -> storage and its tiers -> directory -> endpoint), a failure part-way
closing what was built, and the engine's read-only P2P tier (no moves to it, not reported)."""

from __future__ import annotations

import sys
import types

import fleet_doubles
import pytest
from conftest import CHUNK, seeded_kv, seeded_tokens
from waiting import wait_until

from kvtier.errors import ConfigError
from kvtier.fleet.agent import FleetHandle
from kvtier.fleet.engine_member import EngineMember
from kvtier.tiers.base import TierUsage

URL = "kvtier://127.0.0.1:7999"


class Parts:
    """The stand-in modules, recording every call in `events` (in order)."""

    def __init__(self):
        self.events: list[str] = []
        self.nixl_status: str | None = None
        self.fail: str | None = None  # the event name whose call raises
        self.endpoint_args: tuple = ()
        self.directory = None

    def record(self, event: str) -> None:
        self.events.append(event)
        if event == self.fail:
            raise RuntimeError(f"{event} failed")

    def modules(self) -> dict[str, types.ModuleType]:
        parts = self

        class TransportError(Exception):
            pass

        class NixlEndpoint:
            def __init__(self, name, arena, slot_stride, slot_bytes, num_slots):
                parts.endpoint_args = (name, arena.data_ptr(), arena.numel(), slot_stride, slot_bytes,
                                       num_slots)
                parts.record("endpoint")

            def close(self):
                parts.record("endpoint.close")

        class PeerServer:
            def __init__(self, config, namespace, metrics, endpoint):
                self.url, self.endpoint = URL, endpoint
                parts.record("server")

            def start(self, storage):
                parts.record("server.start")

            def stop(self):
                parts.record("server.stop")

        class PeerDirectory:
            def __init__(self, fleet, ttl_s, metrics):
                self.instance_id = None
                parts.directory = self
                parts.record("directory")

            def close(self):
                parts.record("directory.close")

        class P2PTier:
            name, writable, fans_out = "p2p", False, False

            def __init__(self, config, directory, namespace, metrics, endpoint, own_url):
                assert directory is parts.directory and own_url == URL
                self.endpoint = endpoint
                parts.record("tier")

            def has(self, keys):
                return [False] * len(keys)

            def get(self, keys, dests):
                return [None] * len(keys)

            def put(self, items):
                parts.record("tier.put")
                return [False] * len(items)

            def remove(self, keys):
                return 0

            def clear(self):
                pass

            def usage(self):
                return TierUsage(0, 0, 0)

            def close(self):
                parts.record("tier.close")

        def module(name: str, **attrs) -> types.ModuleType:
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            return m

        return {
            "kvtier.p2p.nixl_transport": module("kvtier.p2p.nixl_transport", NixlEndpoint=NixlEndpoint,
                                                TransportError=TransportError,
                                                nixl_status=lambda: parts.nixl_status),
            "kvtier.p2p.peer_server": module("kvtier.p2p.peer_server", PeerServer=PeerServer),
            "kvtier.p2p.directory": module("kvtier.p2p.directory", PeerDirectory=PeerDirectory),
            "kvtier.tiers.p2p": module("kvtier.tiers.p2p", P2PTier=P2PTier),
        }


@pytest.fixture
def parts(monkeypatch) -> Parts:
    parts = Parts()
    monkeypatch.delitem(sys.modules, "kvtier.p2p.setup", raising=False)  # imported again, over these
    for name, module in parts.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    original = FleetHandle.close

    def close(handle):
        parts.events.append("fleet.close")
        original(handle)

    monkeypatch.setattr(FleetHandle, "close", close)
    yield parts
    sys.modules.pop("kvtier.p2p.setup", None)  # not kept bound to the stand-ins


controller = fleet_doubles.controller  # a started StandInController


@pytest.fixture
def p2p_engine(make_engine, controller):
    def make(transport: str = "tcp", **overrides):
        return make_engine("cpu_disk", controller__url=controller.url, controller__instance_id="node-p2p",
                           controller__heartbeat_s="0.05", p2p__transport=transport, **overrides)

    return make


def test_the_build_and_close_orders(parts, p2p_engine, controller):
    parts.nixl_status = None
    engine = p2p_engine("auto")
    assert parts.events == ["endpoint", "server", "directory", "tier", "server.start"]
    pool = engine.storage.pool
    assert parts.endpoint_args[0].startswith("kvtier-")
    assert parts.endpoint_args[1:] == (pool.arena.data_ptr(), pool.num_slabs * pool.slab_stride,
                                       pool.slab_stride, pool.slab_bytes, pool.num_slabs)
    assert [t.name for t in engine.storage.lower] == ["disk", "p2p"] and engine.storage.lower[1].endpoint
    assert engine.metrics.tiers == ["cpu", "disk", "p2p"]
    wait_until(lambda: controller.registrations, "registered")
    assert controller.registrations[0].p2p_url == URL == engine.p2p_url
    assert parts.directory.instance_id == "node-p2p"
    engine.close()
    assert parts.events[5:] == ["fleet.close", "server.stop", "tier.close", "directory.close",
                                "endpoint.close"]


def test_tcp_never_imports_nixl(parts, p2p_engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvtier.p2p.nixl_transport", None)  # an import would raise
    engine = p2p_engine("tcp")
    assert parts.events[:1] == ["server"] and engine.storage.lower[1].endpoint is None


def test_auto_serves_over_tcp_when_nixl_cannot_be_used(parts, p2p_engine, caplog):
    parts.nixl_status = "UCX has no usable transport"
    caplog.set_level("INFO", logger="kvtier.p2p.setup")
    engine = p2p_engine("auto")
    assert "endpoint" not in parts.events and engine.storage.lower[1].endpoint is None
    assert "UCX has no usable transport" in caplog.text


def test_transport_nixl_without_a_usable_nixl_is_a_config_error(parts, p2p_engine):
    parts.nixl_status = "nixl is not installed"
    with pytest.raises(ConfigError, match="p2p.transport: nixl cannot be used here: nixl is not installed"):
        p2p_engine("nixl")
    assert parts.events == []


@pytest.mark.parametrize("fail,closed", [
    ("tier", ["server.stop", "directory.close", "endpoint.close"]),
    ("directory", ["server.stop", "endpoint.close"]),
    ("server.start", ["server.stop", "tier.close", "directory.close", "endpoint.close"]),
])
def test_a_failure_part_way_closes_what_was_built(parts, p2p_engine, fail, closed):
    parts.nixl_status, parts.fail = None, fail
    with pytest.raises(RuntimeError, match=f"{fail} failed"):
        p2p_engine("nixl")
    assert parts.events[parts.events.index(fail) + 1:] == closed


def test_the_p2p_tier_is_read_only_for_the_engine_and_the_fleet(parts, p2p_engine):
    engine = p2p_engine("tcp")
    tokens, kv = seeded_tokens(2 * CHUNK, 3), seeded_kv(engine.layout, 2 * CHUNK, 3)
    assert engine.store(tokens, kv) == 2 and engine.flush(timeout=10)
    assert "tier.put" not in parts.events
    with pytest.raises(ValueError, match="'p2p' serves reads only"):
        engine.move(tokens, "p2p")
    member = EngineMember(engine)
    with pytest.raises(ValueError, match="'p2p' is not one this storage may clear"):
        engine.clear("p2p")
    assert [t.name for t in member.tier_usage()] == ["cpu", "disk"]
    assert list(member.key_snapshot()) == ["cpu", "disk"]
    assert member.describe().p2p_url == URL


def test_an_engine_without_p2p_imports_none_of_it_and_registers_no_p2p_url(make_engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvtier.p2p.setup", None)  # an import would raise
    engine = make_engine("cpu_disk")
    assert engine.p2p_url is None and EngineMember(engine).describe().p2p_url is None
    assert "p2p" not in engine.metrics.tiers
