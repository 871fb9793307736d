"""Tests for kvtier/controller/redis_state.py beyond the shared FleetState contract (test_state.py),
against a real redis-server and a real 3-master cluster: Redis killed, hung, restarted empty; two
controllers on one Redis answering the same; an instance's index spread over the cluster's nodes;
one round trip per holders call. Back-off time runs on a FakeClock, never slept."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
from conftest import FakeClock
from fleet_states import MODEL, T0, TIMEOUT_S, namespace, registration, stored

from kvtier.controller.fleet_lookup import lookup, route
from kvtier.controller.redis_state import RedisState
from kvtier.controller.state import StateUnavailable
from kvtier.errors import ConfigError
from kvtier.keys import TokenDatabase

TIMEOUT = 0.5  # per round trip
TOKENS = list(range(1000, 1320))


@pytest.fixture
def make():
    """RedisStates on the standalone server or the cluster, one key prefix per test, a FakeClock."""
    prefix = f"kvtier:ctl:{uuid.uuid4().hex[:12]}:"
    built = []

    def build(url: str, cluster: bool = False, clock: FakeClock | None = None) -> RedisState:
        state = RedisState(url, cluster, TIMEOUT, TIMEOUT_S, key_prefix=prefix, clock=clock or FakeClock())
        built.append(state)
        return state

    yield build
    for state in built:
        state.close()


def hold(state, name: str, chunks: int, chunk_size: int = 16, now: float = T0) -> None:
    state.register(registration(name, chunk_size=chunk_size), now)
    keys = TokenDatabase(namespace(), chunk_size).keys(TOKENS)[:chunks]
    assert state.apply(name, state.session, 1, [stored("cpu", keys)], now).known


def test_redis_down_is_state_unavailable_with_the_url_hidden_then_back(make, redis_server):
    clock = FakeClock()
    url = redis_server.url.replace("redis://", "redis://user:s3cret@")
    state = make(redis_server.url, clock=clock)
    hold(state, "a", 3)
    redis_server.stop()
    with pytest.raises(StateUnavailable, match="unavailable") as failed:
        state.instances(T0)
    assert "s3cret" not in str(failed.value) and str(redis_server.port) in str(failed.value)
    started = time.monotonic()
    with pytest.raises(StateUnavailable):  # backing off: at once, no network
        state.holders([b"k" * 24])
    assert time.monotonic() - started < 0.1
    redis_server.start()  # without its data: see the restart test below
    clock.now += 10  # the back-off lets one probe through
    assert state.instances(T0) == []
    hidden = make(url)
    with pytest.raises((StateUnavailable, ConfigError)) as refused:
        hidden.instances(T0)
    assert "s3cret" not in str(refused.value)


def test_a_hung_redis_is_state_unavailable_within_the_timeout(make, redis_server):
    state = make(redis_server.url)
    hold(state, "a", 2)
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailable, match="Timeout"):
            state.heartbeat("a", state.session, [], T0 + 1)
        assert time.monotonic() - started < 2 * TIMEOUT + 0.5
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)


def test_a_controller_starts_while_redis_is_down(make, free_tcp_port):
    state = make(f"redis://127.0.0.1:{free_tcp_port}/0")  # nothing listens there
    with pytest.raises(StateUnavailable, match=str(free_tcp_port)):
        state.register(registration("a"), T0)


def test_a_bad_url_is_a_config_error():
    with pytest.raises(ConfigError, match="scheme"):
        RedisState("http://127.0.0.1:1", False, TIMEOUT, TIMEOUT_S)
    with pytest.raises(ConfigError, match="socket_timeout"):
        RedisState("redis://127.0.0.1:1/0?socket_timeout=abc", False, TIMEOUT, TIMEOUT_S)


def test_redis_restarted_empty_is_a_new_session_and_instances_register_again(make, redis_server):
    clock = FakeClock()
    state = make(redis_server.url, clock=clock)
    hold(state, "a", 3)
    old = state.session
    redis_server.stop()
    redis_server.start()
    clock.now += 10
    assert not state.heartbeat("a", old, [], T0 + 1)  # told to register again
    assert not state.apply("a", old, 2, [], T0 + 1).known
    state.register(registration("a"), T0 + 1)
    assert state.session != old
    assert state.heartbeat("a", state.session, [], T0 + 2)


def test_two_controllers_on_one_redis_answer_the_same(make, redis_server):
    one, two = make(redis_server.url), make(redis_server.url)
    hold(one, "a", 4)
    two.register(registration("b", chunk_size=32), T0)  # via the other controller
    keys = TokenDatabase(namespace(), 32).keys(TOKENS)[:3]
    assert one.apply("b", two.session, 1, [stored("cpu", keys)], T0).known
    assert two.heartbeat("a", one.session, [], T0 + 5)
    for now in (T0 + 5, T0 + TIMEOUT_S + 1):
        assert one.instances(now) == two.instances(now)
        assert lookup(one, MODEL, TOKENS, now) == lookup(two, MODEL, TOKENS, now)
        assert route(one, MODEL, TOKENS, now) == route(two, MODEL, TOKENS, now)
    assert [h.instance_id for h in lookup(two, MODEL, TOKENS, T0 + 5).instances] == ["b", "a"]
    assert [h.instance_id for h in lookup(two, MODEL, TOKENS, T0 + TIMEOUT_S + 1).instances] == ["a"]
    assert two.sweep(T0 + TIMEOUT_S + 1) == 3  # b's keys, swept by one, gone for both
    assert one.index_size() == two.index_size() == (4, 0)


def test_instances_spread_over_the_cluster_nodes_and_a_dead_node_is_unavailable(make, redis_cluster):
    clock = FakeClock()
    state = make(redis_cluster.url, cluster=True, clock=clock)
    names = [f"i{n}" for n in range(12)]
    for name in names:
        hold(state, name, 5)
    nodes = set()
    for node in redis_cluster.nodes:
        with node.client() as c:
            if any(c.cluster("countkeysinslot", c.cluster("keyslot", state._index(n))) for n in names):
                nodes.add(node.port)
    assert len(nodes) == 3  # 12 instances' index hashes on every node
    held = lookup(state, MODEL, TOKENS, T0)
    assert [h.hit_tokens for h in held.instances] == [80] * 12
    redis_cluster.nodes[1].stop()
    with pytest.raises(StateUnavailable):
        lookup(state, MODEL, TOKENS, T0)
    redis_cluster.ensure_running()
    clock.now += 10
    # The node came back without its data: the instances whose hashes lived there are told to
    # register again; the others' heartbeats put them back in the id set should it have lived there.
    alive = [name for name in names if state.heartbeat(name, state.session, [], T0 + 1)]
    assert 0 < len(alive) < 12
    held = lookup(state, MODEL, TOKENS, T0 + 1)
    assert [(h.instance_id, h.hit_tokens) for h in held.instances] == [(name, 80) for name in sorted(alive)]


@pytest.mark.parametrize("cluster", [False, True])
def test_holders_is_one_round_trip_for_512_keys(make, redis_server, redis_cluster, cluster, monkeypatch):
    state = make(redis_cluster.url if cluster else redis_server.url, cluster=cluster)
    keys = [os.urandom(24) for _ in range(512)]
    for name in ("a", "b", "c"):
        state.register(registration(name), T0)
        state.apply(name, state.session, 1, [stored("cpu", keys[::2]), stored("disk", keys)], T0)
    state.instances(T0)
    calls = []
    real = state._run
    monkeypatch.setattr(state, "_run", lambda commands: calls.append(len(commands)) or real(commands))
    held = state.holders(keys)
    assert calls == [3]  # one HMGET per instance, one pipeline
    assert held[0] == {"a": 3, "b": 3, "c": 3} and held[1] == {"a": 2, "b": 2, "c": 2}


def test_a_batch_larger_than_one_script_is_applied_whole(make, redis_server):
    state = make(redis_server.url)
    keys = [os.urandom(24) for _ in range(5000)]  # three scripts
    state.register(registration("a"), T0)
    assert state.apply("a", state.session, 1, [stored("cpu", keys)], T0).known
    assert state.index_size() == (5000, 0)
    assert all(h == {"a": 1} for h in state.holders(keys))
