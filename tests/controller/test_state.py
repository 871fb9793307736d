"""The FleetState contract (kvtier/controller/state.py), run against every implementation: memory,
Redis and a 3-node Redis Cluster (the `state` fixture). Time is injected (`now`), never slept."""

from __future__ import annotations

import os

import fleet_states
import pytest
from fleet_states import T0, TIMEOUT_S, evicted, registration, stored, usage

from kvtier.controller.state import UnknownInstance
from kvtier.fleet.messages import KeyEvent

make_state, state = fleet_states.make_state, fleet_states.state  # fixtures: every FleetState


def keys(n: int) -> list[bytes]:
    return [os.urandom(24) for _ in range(n)]


def join(state, instance_id: str = "a", now: float = T0, **kwargs) -> str:
    state.register(registration(instance_id, **kwargs), now)
    return state.session


def test_register_then_heartbeat_and_instances(state):
    session = join(state, "a")
    assert state.heartbeat("a", session, [usage("cpu", 100, 40), usage("disk")], T0 + 5)
    [record] = state.instances(T0 + 5)
    assert record.instance_id == "a" and record.up and record.chunks_indexed == 0
    assert record.last_heartbeat == T0 + 5
    assert record.tiers[0].bytes_used == 40 and record.tier_names() == ["cpu", "disk"]
    assert state.instance("a", T0 + 5) == record


def test_heartbeat_refused_for_unknown_id_wrong_session_and_down_instance(state):
    session = join(state, "a")
    assert not state.heartbeat("nobody", session, [], T0)
    assert not state.heartbeat("a", session + "x", [], T0)
    # Silent past the timeout: down, whether or not a sweep ran, and it stays down until it registers.
    assert not state.heartbeat("a", session, [], T0 + TIMEOUT_S + 0.5)
    assert not state.instance("a", T0 + TIMEOUT_S + 0.5).up
    join(state, "a", now=T0 + TIMEOUT_S + 1)
    assert state.heartbeat("a", state.session, [], T0 + TIMEOUT_S + 2)


def test_unknown_instance_raises(state):
    with pytest.raises(UnknownInstance, match="nobody"):
        state.instance("nobody", T0)


def test_events_set_tier_masks_and_holders_reports_them(state):
    session = join(state, "a")
    ks = keys(4)
    reply = state.apply("a", session, 1, [stored("cpu", ks[:3]), stored("disk", ks[1:])], T0)
    assert reply.known and not reply.resync
    assert state.holders(ks) == [{"a": 1}, {"a": 3}, {"a": 3}, {"a": 2}]
    state.apply("a", session, 2, [evicted("cpu", ks[1:2]), evicted("disk", ks[3:]),
                                  KeyEvent(op="stored", tier="nvme", keys=[ks[3].hex()])], T0)
    assert state.holders(ks) == [{"a": 1}, {"a": 2}, {"a": 3}, {}]  # unknown tier "nvme" ignored
    assert state.instance("a", T0).chunks_indexed == 3
    state.apply("a", session, 3, [KeyEvent(op="cleared", tier="disk")], T0)
    assert state.holders(ks) == [{"a": 1}, {}, {"a": 1}, {}]
    state.apply("a", session, 4, [KeyEvent(op="reset"), stored("disk", ks[3:])], T0)
    assert state.holders(ks) == [{}, {}, {}, {"a": 2}]
    assert state.index_size()[0] == 1


def test_cleared_without_tier_clears_every_tier(state):
    session = join(state, "a")
    ks = keys(3)
    state.apply("a", session, 1, [stored("cpu", ks), stored("disk", ks)], T0)
    state.apply("a", session, 2, [KeyEvent(op="cleared")], T0)
    assert state.holders(ks) == [{}, {}, {}]


def test_events_refused_for_unknown_wrong_session_or_down(state):
    session = join(state, "a")
    ks = keys(2)
    assert not state.apply("b", session, 1, [stored("cpu", ks)], T0).known
    assert not state.apply("a", "other", 1, [stored("cpu", ks)], T0).known
    assert not state.apply("a", session, 1, [stored("cpu", ks)], T0 + TIMEOUT_S + 1).known
    assert state.holders(ks) == [{}, {}]


def test_sequence_gap_asks_for_resync_but_applies_the_batch(state):
    session = join(state, "a")
    ks = keys(3)
    assert not state.apply("a", session, 7, [stored("cpu", ks[:1])], T0).resync  # the first sets the base
    assert not state.apply("a", session, 8, [stored("cpu", ks[1:2])], T0).resync
    reply = state.apply("a", session, 10, [stored("cpu", ks[2:])], T0)
    assert reply.known and reply.resync
    assert state.holders(ks) == [{"a": 1}] * 3
    assert not state.apply("a", session, 11, [], T0).resync


def test_reregistering_drops_the_old_keys(state):
    session = join(state, "a")
    ks = keys(2)
    state.apply("a", session, 1, [stored("cpu", ks)], T0)
    join(state, "a", now=T0 + 1)
    assert state.holders(ks) == [{}, {}]
    assert state.instance("a", T0 + 1).chunks_indexed == 0
    # A new registration starts a new sequence: any first seq is accepted.
    assert not state.apply("a", state.session, 1, [stored("cpu", ks)], T0 + 1).resync


def test_several_holders_and_down_ones_left_out(state):
    ks = keys(2)
    for name in ("a", "b"):
        session = join(state, name)
        state.apply(name, session, 1, [stored("cpu", ks)], T0)
    state.heartbeat("b", state.session, [], T0 + TIMEOUT_S)  # b stays up, a goes silent
    state.instances(T0 + TIMEOUT_S + 1)  # the state's present moves on
    assert state.holders(ks) == [{"b": 1}, {"b": 1}]
    assert [r.up for r in state.instances(T0 + TIMEOUT_S + 1)] == [False, True]


def test_sweep_drops_a_down_instance_keys_then_forgets_it(make_state):
    state = make_state(forget_after_s=100.0)
    ks = keys(5)
    for name in ("a", "b"):
        session = join(state, name)
        state.apply(name, session, 1, [stored("cpu", ks)], T0)
    assert state.sweep(T0 + 1) == 0
    assert state.heartbeat("b", state.session, [], T0 + 5)
    assert state.sweep(T0 + TIMEOUT_S + 1) == 5  # a is down
    assert state.holders(ks) == [{"b": 1}] * 5
    assert state.index_size()[0] == 5
    record = state.instance("a", T0 + TIMEOUT_S + 1)
    assert not record.up and record.chunks_indexed == 0
    assert state.sweep(T0 + 101) == 5  # b is down now: its keys go, its record stays
    assert [r.instance_id for r in state.instances(T0 + 101)] == ["b"]
    assert state.holders(ks) == [{}] * 5
    with pytest.raises(UnknownInstance):
        state.instance("a", T0 + 101)


def test_empty_holders_and_empty_batches(state):
    assert state.holders([]) == []
    session = join(state, "a")
    assert state.apply("a", session, 1, [], T0).known
    assert state.holders(keys(3)) == [{}, {}, {}]
