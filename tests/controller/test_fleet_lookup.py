"""Tests for kvtier/controller/fleet_lookup.py over every FleetState: keys identical to the engines'
TokenDatabase, each instance's own chunk size (LMCache's controller hashes with a default and
answers wrongly), partial chunks, down instances left out, route's tie-breaks, servers, targets."""

from __future__ import annotations

import fleet_states
import numpy as np
import pytest
from fleet_states import MODEL, T0, TIMEOUT_S, namespace, registration, stored, usage

from kvtier.controller.fleet_lookup import lookup, prompt_keys, route, targets
from kvtier.controller.state import UnknownInstance
from kvtier.keys import TokenDatabase, tokens_to_u32

make_state, state = fleet_states.make_state, fleet_states.state  # fixtures: every FleetState

TOKENS = list(np.random.default_rng(7).integers(0, 2**32, 1000, dtype=np.uint64))


def db_of(reg) -> TokenDatabase:
    """The TokenDatabase an engine with this registration keys its chunks with."""
    ns = namespace(reg.model_id or MODEL)
    assert ns.digest().hex() == reg.namespace
    return TokenDatabase(ns, reg.chunk_size, reg.save_partial_chunks)


def hold(state, reg, tokens, chunks: int, tier: str = "cpu", seq: int = 1, now: float = T0) -> None:
    """Register `reg` and report the first `chunks` keys of `tokens` stored in `tier`."""
    state.register(reg, now)
    keys = db_of(reg).keys(tokens)[:chunks] if reg.kind == "engine" else []
    state.apply(reg.instance_id, state.session, seq, [stored(tier, keys)], now)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 256])
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("length", [0, 5, 16, 255, 1000])
def test_prompt_keys_equal_the_engines_token_database(chunk_size, partial, length):
    db = TokenDatabase(namespace(), chunk_size, partial)
    tokens = TOKENS[:length]
    expected = [bytes(k) for k in db.keys(tokens)]
    assert prompt_keys(tokens_to_u32(tokens), db.namespace_digest, chunk_size, partial) == expected
    assert all(len(k) == 24 for k in expected)


def test_each_instance_is_hashed_with_its_own_chunk_size(state):
    hold(state, registration("a", chunk_size=16), TOKENS, 10)
    hold(state, registration("b", chunk_size=64), TOKENS, 3)
    reply = lookup(state, MODEL, TOKENS, T0)
    assert [(h.instance_id, h.hit_tokens, h.chunk_size) for h in reply.instances] == [
        ("b", 192, 64), ("a", 160, 16)]
    assert reply.hit_tokens == 192 and reply.num_tokens == 1000
    # The bug this guards against: keys made with one default chunk size match neither instance.
    default = prompt_keys(tokens_to_u32(TOKENS), namespace().digest(), 256, False)
    assert state.holders(default) == [{}] * len(default)


def test_partial_last_chunk_counts_its_tokens(state):
    reg = registration("a", chunk_size=16, partial=True)
    tokens = TOKENS[:40]  # chunks end at 16, 32 and 40
    hold(state, reg, tokens, 3)
    assert lookup(state, MODEL, tokens, T0).instances[0].hit_tokens == 40
    # Without save_partial the same engine would have keyed two chunks only.
    assert len(db_of(registration("x", chunk_size=16)).keys(tokens)) == 2
    # A longer prompt: the partial key named the 40-token prefix, not the first 40 of 48.
    assert lookup(state, MODEL, TOKENS[:48], T0).instances[0].hit_tokens == 32


def test_hit_is_the_leading_run_and_tiers_name_the_fastest(state):
    reg = registration("a", chunk_size=16)
    state.register(reg, T0)
    keys = db_of(reg).keys(TOKENS)
    state.apply("a", state.session, 1, [stored("disk", keys[:4]), stored("cpu", keys[1:2]),
                                        stored("cpu", keys[5:8])], T0)  # chunk 4 missing
    [hit] = lookup(state, MODEL, TOKENS, T0).instances
    assert hit.hit_tokens == 64 and hit.tiers == ["disk", "cpu", "disk", "disk"]


def test_tokens_as_list_or_array_and_bad_tokens_rejected(state):
    hold(state, registration("a"), TOKENS, 2)
    as_list = lookup(state, MODEL, [int(t) for t in TOKENS], T0)
    assert as_list == lookup(state, MODEL, np.array(TOKENS, dtype=np.int64), T0)
    assert as_list.hit_tokens == 32
    for bad in ([-1], [2**32], [1.5], [[1, 2]], ["a"]):
        with pytest.raises(ValueError, match="token"):
            lookup(state, MODEL, bad, T0)
    empty = lookup(state, MODEL, [], T0)
    assert empty.num_tokens == 0 and empty.hit_tokens == 0 and empty.instances[0].hit_tokens == 0


def test_down_instances_and_other_models_left_out(state):
    hold(state, registration("a"), TOKENS, 5)
    hold(state, registration("b"), TOKENS, 2, now=T0 + 5)
    hold(state, registration("c", model="model-b"), TOKENS, 9)
    assert [h.instance_id for h in lookup(state, MODEL, TOKENS, T0 + 5).instances] == ["a", "b"]
    later = T0 + TIMEOUT_S + 1  # a is silent past the timeout, b is not
    assert [h.instance_id for h in lookup(state, MODEL, TOKENS, later).instances] == ["b"]
    assert [e.instance_id for e in route(state, MODEL, TOKENS, later).instances] == ["b"]
    assert lookup(state, "model-x", TOKENS, T0).instances == []


def test_route_ranks_by_hit_then_free_bytes_then_id(state):
    for name, chunks, used in [("e", 2, 0), ("d", 4, 900), ("c", 4, 100), ("b", 4, 100), ("a", 0, 0)]:
        hold(state, registration(name, capacity=1000), TOKENS, chunks)
        assert state.heartbeat(name, state.session, [usage("cpu", 1000, used), usage("disk")], T0)
    reply = route(state, MODEL, TOKENS, T0)
    assert [(e.instance_id, e.hit_tokens, e.free_bytes) for e in reply.instances] == [
        ("b", 64, 900), ("c", 64, 900), ("d", 64, 100), ("e", 32, 1000), ("a", 0, 1000)]


def test_a_server_appears_when_it_holds_leading_keys(state):
    engine = registration("a", chunk_size=16)
    hold(state, engine, TOKENS, 1)
    keys = db_of(engine).keys(TOKENS)
    for name in ("srv", "empty"):
        state.register(registration(name, kind="server", tiers=("cpu",)), T0)
    state.apply("srv", state.session, 1, [stored("cpu", keys[:6])], T0)
    reply = lookup(state, MODEL, TOKENS, T0)
    assert [(h.instance_id, h.hit_tokens) for h in reply.instances] == [("srv", 96), ("a", 16)]
    assert reply.hit_tokens == 96
    assert [e.instance_id for e in route(state, MODEL, TOKENS, T0).instances] == ["a"]  # engines only
    found = {r.instance_id: k for r, k in targets(state, MODEL, TOKENS, None, T0)}
    assert found == {"a": keys, "srv": keys}
    assert targets(state, MODEL, TOKENS, "empty", T0)[0][1] == []


def test_targets_named_unknown_down_or_of_another_model(state):
    reg = registration("a", chunk_size=32, partial=True)
    hold(state, reg, TOKENS, 1)
    hold(state, registration("other", model="model-b"), TOKENS, 1)
    [(record, keys)] = targets(state, MODEL, TOKENS[:50], "a", T0 + TIMEOUT_S + 1)
    assert not record.up and keys == db_of(reg).keys(TOKENS[:50])  # down, named: still a target
    assert targets(state, MODEL, TOKENS, None, T0 + TIMEOUT_S + 1) == []  # nobody up
    with pytest.raises(UnknownInstance):
        targets(state, MODEL, TOKENS, "nobody", T0)
    with pytest.raises(ValueError, match="model-b"):
        targets(state, MODEL, TOKENS, "other", T0)
