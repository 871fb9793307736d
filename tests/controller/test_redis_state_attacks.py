"""A reviewer's attacks on RedisState (kvtier/controller/redis_state.py, redis_scripts.py): values in
Redis written by someone else (garbage numbers, wrong types, broken JSON) and a Redis that is gone.
A tampered instance reads as absent (it registers again and heals); it never fails the answers about
the others, nor the sweeper. Real redis-server; time injected."""

from __future__ import annotations

import os
import uuid

import pytest
from fastapi.testclient import TestClient
from fleet_states import MODEL, T0, TIMEOUT_S, registration, stored
from test_controller_app import TOKENS, keys_of

from kvtier.config import ControllerConfig
from kvtier.controller.app import build_app
from kvtier.controller.fleet_lookup import lookup
from kvtier.controller.redis_state import RedisState
from kvtier.controller.state import StateUnavailable


@pytest.fixture
def redis_state(redis_server):
    prefix = f"kvtier:ctl:{uuid.uuid4().hex[:12]}:"
    state = RedisState(redis_server.url, False, 1.0, TIMEOUT_S, key_prefix=prefix)
    raw = redis_server.client()
    yield state, raw, prefix
    state.close()
    raw.close()


def _fleet(state: RedisState) -> list[bytes]:
    """Instances a and b of MODEL, each holding the prompt's first 3 chunks in cpu."""
    keys = keys_of(TOKENS)[:3]
    for name in ("a", "b"):
        state.register(registration(name), T0)
        state.apply(name, state.session, 0, [stored("cpu", keys)], T0)
    return keys


def _hits(state: RedisState, now: float = T0 + 1) -> dict[str, int]:
    return {i.instance_id: i.hit_tokens for i in lookup(state, MODEL, TOKENS, now).instances}


META_TAMPERING = [
    lambda raw, meta: raw.hset(meta, "hb", "garbage"),
    lambda raw, meta: raw.hset(meta, "reg", "{not json"),
    lambda raw, meta: raw.hset(meta, "reg", '{"instance_id": 5}'),
    lambda raw, meta: raw.hset(meta, "usage", "[1, 2]"),
    lambda raw, meta: raw.hdel(meta, "usage"),
    lambda raw, meta: (raw.delete(meta), raw.set(meta, "a string")),
    lambda raw, meta: (raw.delete(meta), raw.rpush(meta, "a list")),
]


@pytest.mark.parametrize("tamper", META_TAMPERING)
def test_a_tampered_record_is_absent_and_the_rest_answer(redis_state, tamper):
    state, raw, prefix = redis_state
    _fleet(state)
    tamper(raw, f"{prefix}{{a}}:meta")
    assert [r.instance_id for r in state.instances(T0 + 1)] == ["b"]
    assert _hits(state) == {"b": 48}
    state.sweep(T0 + 1)  # forgets what it cannot read, so that the instance registers again
    assert raw.exists(f"{prefix}{{a}}:meta", f"{prefix}{{a}}:index") == 0
    assert raw.exists(f"{prefix}{{b}}:meta", f"{prefix}{{b}}:index") == 2
    assert state.heartbeat("a", state.session, [], T0 + 1) is False  # register again, not a 503
    assert state.apply("a", state.session, 1, [stored("cpu", [os.urandom(24)])], T0 + 1).known is False
    state.register(registration("a"), T0 + 2)  # which heals it
    assert state.heartbeat("a", state.session, [], T0 + 3) is True
    assert [r.instance_id for r in state.instances(T0 + 3)] == ["a", "b"]


@pytest.mark.parametrize("tamper", META_TAMPERING)
def test_a_tampered_record_does_not_stop_the_sweeper(redis_state, tamper):
    state, raw, prefix = redis_state
    _fleet(state)
    tamper(raw, f"{prefix}{{a}}:meta")
    state.sweep(T0 + TIMEOUT_S + 1)  # b is down: its keys leave, whatever a's record holds
    assert raw.hlen(f"{prefix}{{b}}:index") == 0
    assert _hits(state, T0 + TIMEOUT_S + 1) == {}


@pytest.mark.parametrize("value", [b"garbage", b"", b"-1", b"1e400", b"99999999999999999999999"])
def test_a_tampered_mask_is_an_absent_chunk(redis_state, value):
    state, raw, prefix = redis_state
    keys = _fleet(state)
    raw.hset(f"{prefix}{{a}}:index", keys[1], value)
    assert _hits(state) == {"a": 16, "b": 48}
    # A new event on that key heals it.
    assert state.apply("a", state.session, 1, [stored("disk", [keys[1]])], T0 + 1).known is True
    assert state.apply("a", state.session, 2, [stored("cpu", [keys[1]])], T0 + 1).known is True
    assert _hits(state) == {"a": 48, "b": 48}


@pytest.mark.parametrize("tamper", [lambda raw, index: raw.set(index, "a string"),
                                    lambda raw, index: raw.sadd(index, "a set")])
def test_an_index_of_the_wrong_type_is_an_empty_one(redis_state, tamper):
    state, raw, prefix = redis_state
    keys = _fleet(state)
    index = f"{prefix}{{a}}:index"
    raw.delete(index)
    tamper(raw, index)
    assert _hits(state) == {"a": 0, "b": 48}
    assert {r.instance_id: r.chunks_indexed for r in state.instances(T0 + 1)} == {"a": 0, "b": 3}
    assert state.apply("a", state.session, 1, [stored("cpu", keys)], T0 + 1).known is True  # heals
    assert _hits(state) == {"a": 48, "b": 48}
    assert state.index_size()[0] == 6


def test_a_redis_that_is_gone_is_503_everywhere_never_500():
    state = RedisState("redis://127.0.0.1:1", False, 0.2, TIMEOUT_S)
    app = build_app(ControllerConfig(token="t" * 16, heartbeat_timeout_s=TIMEOUT_S), state)
    prompt = {"model_id": MODEL, "tokens": [1, 2, 3]}
    with TestClient(app, headers={"Authorization": "Bearer " + "t" * 16}) as client:
        for method, path, body in [
                ("POST", "/v1/instances/register", registration("a").model_dump(by_alias=True)),
                ("POST", "/v1/instances/a/heartbeat", {"session": "s", "tiers": []}),
                ("POST", "/v1/instances/a/events", {"session": "s", "seq": 0, "events": []}),
                ("POST", "/v1/lookup", prompt), ("POST", "/v1/route", prompt), ("POST", "/v1/pin", prompt),
                ("POST", "/v1/pin", {**prompt, "instance_id": "a"}), ("POST", "/v1/clear", {}),
                ("GET", "/v1/instances", None), ("GET", "/v1/stats", None), ("GET", "/health", None)]:
            reply = client.request(method, path, json=body)
            assert reply.status_code == 503, (path, reply.text)
        assert client.get("/metrics").status_code == 200
    with pytest.raises(StateUnavailable):
        state.sweep(T0)
    state.close()


@pytest.mark.parametrize("tamper", [META_TAMPERING[0], META_TAMPERING[5], META_TAMPERING[6]])
def test_a_record_with_no_hb_to_read_refuses_its_agent_at_once(redis_state, tamper):
    state, raw, prefix = redis_state
    _fleet(state)
    tamper(raw, f"{prefix}{{a}}:meta")
    assert state.heartbeat("a", state.session, [], T0 + 1) is False  # not a script error, not a 503
    assert state.apply("a", state.session, 1, [], T0 + 1).known is False


def test_holders_of_many_keys_slices_its_hmgets_in_one_round_trip(redis_state, monkeypatch):
    state, _, _ = redis_state
    keys = [os.urandom(24) for _ in range(20_000)]
    for name in ("a", "b"):
        state.register(registration(name), T0)
        state.apply(name, state.session, 0, [stored("cpu", keys[:3]), stored("disk", keys[-2:])], T0)
    state.instances(T0)
    calls = []
    real = state._run
    monkeypatch.setattr(state, "_run", lambda commands: calls.append([len(c) - 2 for c in commands])
                        or real(commands))
    held = state.holders(keys)
    assert calls == [[8192, 8192, 20_000 - 2 * 8192] * 2]  # one round trip, no command over 8192 keys
    assert held[0] == {"a": 1, "b": 1} and held[-1] == {"a": 2, "b": 2} and held[5000] == {}
