"""Lookups that are round trips to a shared store, through the engine: a request whose lookup runs in
the background (kvtier/connector/lookups.py) waits holding nothing while the running requests step
and the requests behind it are admitted; it is admitted with its hit once the lookup lands. A lookup
held on an Event (`HeldLookups` on the kvtier_server tier's `has`), one that raises, a server that
stalls (SIGSTOP) past the tier's timeout, an abort while the lookup runs.

Every test ends with greedy output token-identical to kvtier off, and nothing left behind: no lookup
kept or in flight, and the engine idle (`assert_idle`). No sleeps, no wall-clock asserts: steps are
counted (`step_log`). Setting: the tiny Llama checkpoint (fp32 on the CPU), 16-token chunks, kvtier
on CPU + the kvtier_server (the session's, each test under its own salt, or its own server).
"""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest
from connector.conftest import kvtier_config, prompt
from connector.held_lookups import HeldLookups

from kvtier.config import RemoteConfig
from kvtier_engine import LLM, SamplingParams

from .async_engine import ENGINE_OPTIONS, PARAMS, WAIT_S, add, assert_idle, drive, step_until, with_loads

# A request decoding while another's lookup waits: long enough to outlast the wait by many steps.
LONG = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)


@pytest.fixture(scope="module")
def baseline(model_dir):
    """`baseline(ids, max_tokens=PARAMS.max_tokens)`: what the engine generates for `ids` with kvtier off."""
    llm = LLM(model_dir, kvtier_config=None, **ENGINE_OPTIONS)
    yield lambda ids, max_tokens=PARAMS.max_tokens: llm.generate(
        ids, dataclasses.replace(PARAMS, max_tokens=max_tokens))[0].token_ids
    llm.close()


@pytest.fixture
def make_llm(model_dir, kvtier_server, request):
    """`make_llm(server=None, timeout_s=5.0)`: an LLM with kvtier on CPU + a kvtier_server (the
    session's unless given; this test's own salt), `loads:` as configured but no prefetch."""
    made: list[LLM] = []

    def make(server=None, timeout_s: float = 5.0) -> LLM:
        remote = RemoteConfig(url=(server or kvtier_server).url, timeout_s=timeout_s, retry_after_s=0.0)
        config = dataclasses.replace(kvtier_config(None), remote=remote, salt=f"lookups {request.node.name}")
        made.append(LLM(model_dir, kvtier_config=with_loads(config, prefetch=False), **ENGINE_OPTIONS))
        return made[-1]

    yield make
    for llm in made:
        llm.close()


@pytest.fixture
def hold(make_llm, monkeypatch):
    """`hold(engine, armed=True)`: its kvtier_server tier's lookups held (`HeldLookups`); opened at
    teardown, before the engines close (close waits for a lookup in flight)."""
    made: list[HeldLookups] = []

    def make(engine, armed: bool = True) -> HeldLookups:
        made.append(HeldLookups(engine.kvtier.storage.lower[-1], monkeypatch, armed))
        return made[-1]

    yield make
    for held in made:
        held.open()


def warm(engine, *prompts: list[int]) -> None:
    """Store the prompts' KV in kvtier, then leave it on the kvtier_server only."""
    for ids in prompts:
        engine.add_request(ids, PARAMS)
        drive(engine)
    assert engine.kvtier.flush(WAIT_S)
    engine.kvtier.clear("cpu")
    assert all(engine.kvtier.lookup(ids) >= 16 for ids in prompts)


def lookups(engine) -> dict[str, int]:
    return engine.scheduler.connector.stats()


def nothing_kept(engine) -> None:
    stats = lookups(engine)
    assert (stats["lookups_in_flight"], stats["lookups_kept"]) == (0, 0), stats
    assert_idle(engine)


def running(engine, request_id: str) -> bool:
    return any(r.request_id == request_id for r in engine.scheduler.running)


def test_a_held_lookup_delays_no_running_request_and_lands_with_its_hit(make_llm, hold, baseline):
    engine = make_llm().engine
    a, other = prompt(64, 70), prompt(40, 71)
    warm(engine, a)
    held = hold(engine, armed=False)
    outputs: dict = {}
    engine.add_request(other, LONG, request_id="other")
    step_until(engine, lambda: running(engine, "other"), "other to run", outputs)
    assert engine.wait_for_saves(WAIT_S)  # other's prompt chunks are in host memory: a copy is local
    assert engine.kvtier.storage.cpu_prefix(engine.kvtier.db.keys(other)) == 2
    held.arm()
    add(engine, {"a": a})
    engine.add_request(other, PARAMS, request_id="copy")  # behind a in the queue
    first = engine.scheduler.step + 1
    step_until(engine, held.entered.is_set, "a's lookup to reach the server", outputs)
    for _ in range(4):
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    during = [r for r in engine.step_log if r.step >= first]
    # other stepped at every step while a's lookup was held; the request behind a was admitted
    assert len(during) >= 5 and all("other" in r.request_ids for r in during)
    assert any("copy" in r.request_ids for r in during)
    assert all("a" not in r.request_ids and r.num_loading == 0 for r in during)
    a_request = engine.scheduler.waiting[0]
    assert a_request.request_id == "a" and not engine.scheduler.pool.holds("a")  # holds nothing
    assert lookups(engine)["lookups_in_flight"] == 1

    held.open()
    drive(engine, outputs)
    assert outputs["a"].token_ids == baseline(a)
    assert outputs["other"].token_ids == baseline(other, LONG.max_tokens)
    assert outputs["copy"].token_ids == baseline(other)
    assert (outputs["a"].metrics.tokens_loaded, outputs["a"].metrics.prefill_tokens_computed) == (63, 1)
    assert held.calls == 1
    nothing_kept(engine)


def test_a_request_aborted_while_its_lookup_runs_leaves_nothing(make_llm, hold, baseline):
    engine = make_llm().engine
    a = prompt(64, 72)
    warm(engine, a)
    held = hold(engine)
    add(engine, {"a": a})
    step_until(engine, held.entered.is_set, "a's lookup to reach the server")
    engine.abort("a")
    assert not engine.has_unfinished()
    stats = lookups(engine)
    assert (stats["lookups_dropped"], stats["lookups_kept"]) == (1, 0)
    held.open()
    assert not engine.scheduler.connector.wait_for_lookups(WAIT_S)  # idle: its answer thrown away
    nothing_kept(engine)
    add(engine, {"a": a})  # the id again: a lookup of its own, and the hit
    out = drive(engine)["a"]
    assert out.token_ids == baseline(a) and out.metrics.tokens_loaded == 63
    nothing_kept(engine)


def test_a_lookup_that_raises_is_recomputed_token_identical(make_llm, baseline, monkeypatch):
    engine = make_llm().engine
    a = prompt(64, 73)
    warm(engine, a)

    def broken(keys):
        raise RuntimeError("the store's client broke")

    monkeypatch.setattr(engine.kvtier.storage.lower[-1], "has", broken)
    add(engine, {"a": a})
    out = drive(engine)["a"]
    assert out.token_ids == baseline(a)
    assert (out.metrics.tokens_loaded, out.metrics.prefill_tokens_computed) == (0, 64)
    assert lookups(engine)["lookup_failures"] == 1
    nothing_kept(engine)


def test_a_server_stalled_past_the_tier_timeout_is_a_miss_while_the_others_step(make_llm, start_kvtier_server,
                                                                               baseline):
    server = start_kvtier_server()
    engine = make_llm(server, timeout_s=0.5).engine
    a, other = prompt(64, 74), prompt(40, 75)
    warm(engine, a)
    outputs: dict = {}
    engine.add_request(other, LONG, request_id="other")
    step_until(engine, lambda: running(engine, "other"), "other to run", outputs)
    os.kill(server.pid, signal.SIGSTOP)  # accepts, never answers: a's lookup waits for the timeout
    try:
        add(engine, {"a": a})
        stepped = 0  # steps that ran other while a's lookup was in flight
        while engine.has_unfinished() and len(outputs) < 2:
            in_flight = lookups(engine)["lookups_in_flight"]
            ran = {o.request_id: o for o in engine.step()}
            stepped += bool(in_flight) and "other" in ran
            outputs.update({rid: o for rid, o in ran.items() if o.finished})
    finally:
        os.kill(server.pid, signal.SIGCONT)
    drive(engine, outputs)
    assert stepped >= 1
    assert outputs["a"].token_ids == baseline(a) and outputs["a"].metrics.tokens_loaded == 0
    assert outputs["other"].token_ids == baseline(other, LONG.max_tokens)
    nothing_kept(engine)


def test_each_waiting_request_is_looked_up_once_and_answers_as_with_kvtier_off(make_llm, baseline,
                                                                                monkeypatch):
    engine = make_llm().engine
    warmed = {f"w{i}": prompt(48 + 8 * i, 80 + i) for i in range(3)}
    fresh = {f"f{i}": prompt(30 + 8 * i, 90 + i) for i in range(2)}
    warm(engine, *warmed.values())
    looked_up, lookup, started = [], engine.kvtier.lookup, lookups(engine)["lookups_background"]

    def counted(ids, only=None):  # the full lookups (not the local probe before each)
        if only is None:
            looked_up.append(list(ids))
        return lookup(ids, only=only)

    monkeypatch.setattr(engine.kvtier, "lookup", counted)
    add(engine, {**warmed, **fresh})
    outputs = drive(engine)
    assert sorted(looked_up) == sorted([*warmed.values(), *fresh.values()])  # once each
    assert {rid: o.token_ids for rid, o in outputs.items()} == \
        {rid: baseline(ids) for rid, ids in {**warmed, **fresh}.items()}
    # whole chunks of 16, and never the last prompt token
    assert [outputs[rid].metrics.tokens_loaded for rid in warmed] == [47, 48, 63]
    assert lookups(engine)["lookups_background"] - started == 5
    nothing_kept(engine)
