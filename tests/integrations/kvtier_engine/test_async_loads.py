"""Asynchronous kvtier loads through the engine (kvtier_engine/scheduler.py, model_runner.py,
llm_engine.py with the connector's `loads:`): a request whose KV is read in the background waits
outside the batch (WAITING_FOR_KV) while the others keep stepping, aborts free everything once the
load lands, a load that fails part-way is recomputed from there, and greedy output never changes.

The model is the tiny Llama checkpoint whose attention is peaked (conftest.py): KV that is wrong or
misplaced changes the tokens. A slow tier is the disk tier with its reads held on an Event the test
sets (`Gate`): steps are counted, never timed, and nothing sleeps.
"""

from __future__ import annotations

import os

import pytest
from connector.conftest import flip_payload_byte, kvtier_config, prompt

from kvtier_engine import SamplingParams
from kvtier_engine.llm_engine import EngineOptions, LLMEngine
from kvtier_engine.request import RequestStatus

from .async_engine import ENGINE_OPTIONS, MAX_STEPS, WAIT_S, Gate, add, assert_idle, drive, warm, with_loads

CHUNK = 16
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def make_engine(model_dir, tmp_path):
    """`make_engine(asynchronous="auto", kvtier=True, **options)`: an engine on the tiny checkpoint,
    kvtier on CPU + a disk tier in tmp_path (16-token chunks, `loads:` of configs/cpu_disk.yaml but
    `asynchronous`), no device prefix cache (every hit is kvtier's). Closed at teardown."""
    made: list[LLMEngine] = []

    def make(asynchronous: str = "auto", kvtier: bool = True, **options) -> LLMEngine:
        config = with_loads(kvtier_config(tmp_path / "disk"), asynchronous=asynchronous) if kvtier else None
        engine = LLMEngine(EngineOptions(model_dir, kvtier_config=config, **{**ENGINE_OPTIONS, **options}))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def baseline(make_engine):
    """`baseline(prompt)`: the engine's greedy tokens for `prompt` without kvtier."""
    engine = make_engine(kvtier=False)
    return lambda tokens: run(engine, [tokens])["r0"].token_ids


def run(engine: LLMEngine, prompts: list[list[int]], prefix: str = "r") -> dict:
    """Add every prompt (ids r0, r1, ...) and step until all finished: request id -> last output."""
    requests = {f"{prefix}{i}": p for i, p in enumerate(prompts)}
    add(engine, requests, GREEDY)
    outputs = drive(engine)
    return {rid: outputs[rid] for rid in requests}


@pytest.fixture
def gate(gates):
    """`gate(engine)`: the engine's disk tier (a `Gate`: conftest.py's `gates`), its next read held
    until `open()`."""
    def hold(engine: LLMEngine) -> Gate:
        disk = engine.kvtier.storage.lower[0]
        assert disk in gates
        disk.arm()
        return disk

    return hold


def park_behind(gate, engine: LLMEngine, tokens: list[int]) -> Gate:
    """`tokens` on disk only, then request "b" for them parked, its load's read held at the gate."""
    warm(engine, tokens)
    held = gate(engine)
    engine.add_request(tokens, GREEDY, request_id="b")
    engine.step()
    assert held.entered.wait(WAIT_S)
    return held


# -- a slow tier does not slow the others --------------------------------------------------------


def test_a_request_waiting_for_its_kv_lets_the_others_step_and_holds_no_batch_slot(make_engine, gate,
                                                                                   baseline):
    engine = make_engine(max_num_seqs=1)  # one batch slot: the decoding request's
    loading, decoding = prompt(64, seed=1), prompt(20, seed=2)
    warm(engine, loading)
    held = gate(engine)
    engine.add_request(loading, GREEDY, request_id="b")
    engine.add_request(decoding, GREEDY, request_id="a")
    b = engine.scheduler.waiting[0]

    tokens_of_a = []
    for _ in range(MAX_STEPS):
        outputs = {o.request_id: o for o in engine.step()}
        assert b.status is RequestStatus.WAITING_FOR_KV and "b" in engine.scheduler.loading
        tokens_of_a.append(len(outputs["a"].token_ids))
        if outputs["a"].finished:
            break
    assert held.entered.is_set()  # b's load was reading from the disk all along

    # One token of a per step, eight steps, while b waited for its KV in every one of them.
    assert tokens_of_a == list(range(1, 9))
    during = list(engine.step_log)[-8:]
    assert [r.request_ids for r in during] == [("a",)] * 8
    assert all(r.num_loading == 1 and r.num_running == 1 for r in during)

    held.open()
    assert run(engine, []) == {}  # step until b is done
    b_steps = [r for r in engine.step_log if "b" in r.request_ids]
    assert b_steps and b_steps[0].step > during[-1].step
    m = b.metrics
    assert (m.tokens_loaded, m.prefill_tokens_computed, m.tokens_cached_on_device) == (63, 1, 0)
    assert b.output_token_ids == baseline(loading)
    assert_idle(engine)


# -- aborts --------------------------------------------------------------------------------------


def test_a_request_aborted_while_its_load_is_read_frees_everything_once_it_lands(make_engine, gate):
    engine = make_engine()
    held = park_behind(gate, engine, prompt(64, seed=3))

    engine.abort("b")
    for _ in range(3):  # its blocks are being written: they stay allocated until the load lands
        assert engine.step() == []
        assert "b" in engine.scheduler.loading and engine.has_unfinished() and not engine.has_requests()
    assert engine.scheduler.pool.num_free < len(engine.scheduler.pool.blocks)

    held.open()
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished():
            break
        assert engine.step() == []  # never scheduled
    assert_idle(engine)
    assert 'kvtier_engine_requests_total{finish_reason="abort"} 1.0' in engine.prometheus_text()


def test_a_request_aborted_before_its_load_starts_is_freed_at_once(make_engine, gate):
    engine = make_engine()
    first, second = prompt(64, seed=4), prompt(48, seed=5)
    warm(engine, first)
    warm(engine, second)
    held = gate(engine)
    engine.add_request(first, GREEDY, request_id="first")
    engine.add_request(second, GREEDY, request_id="second")
    engine.step()  # both parked; "first" is read first, "second" queued behind it
    assert held.entered.wait(WAIT_S) and set(engine.scheduler.loading) == {"first", "second"}

    engine.abort("second")
    for _ in range(MAX_STEPS):  # the next step cancels it; the one after retires it
        engine.step()
        if "second" not in engine.scheduler.loading:
            break
    assert set(engine.scheduler.loading) == {"first"}  # still held at the gate
    assert engine.connector.async_stats()["async_cancelled"] == 1
    held.open()
    out = run(engine, [])
    assert out == {} and engine.step_log[-1].num_loading == 0
    assert_idle(engine)


def test_the_id_of_a_request_aborted_mid_load_is_refused_until_its_blocks_are_freed(make_engine, gate):
    # Regression: the id was taken again at once, and the next schedule raised "already holds blocks".
    engine = make_engine()
    tokens = prompt(64, seed=11)
    held = park_behind(gate, engine, tokens)
    engine.abort("b")

    with pytest.raises(ValueError, match="'b' is already in use"):
        engine.add_request(tokens, GREEDY, request_id="b")
    held.open()
    assert run(engine, []) == {}
    assert_idle(engine)
    engine.add_request(tokens, GREEDY, request_id="b")  # free again


# -- a load that fails part-way ------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["corrupt", "missing"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_a_load_failing_midway_recomputes_exactly_the_rest(make_engine, baseline, fault, chunk):
    engine = make_engine()
    tokens = prompt(64, seed=6)
    warm(engine, tokens)
    path = engine.kvtier.storage.lower[0].path_for(engine.kvtier.db.keys(tokens)[chunk])
    flip_payload_byte(path) if fault == "corrupt" else os.remove(path)

    out = run(engine, [tokens])["r0"]

    m = out.metrics
    assert (m.tokens_loaded, m.prefill_tokens_computed) == (chunk * CHUNK, len(tokens) - chunk * CHUNK)
    assert engine.connector.async_stats()["async_loads"] == 1
    assert engine.connector.stats["load_shortfalls"] == 1
    assert out.token_ids == baseline(tokens)
    assert_idle(engine)


# -- output ------------------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", ["on", "auto", "off"])
def test_greedy_output_is_token_identical_to_kvtier_off(make_engine, baseline, asynchronous):
    shared = prompt(40, seed=7)
    prompts = [shared + prompt(n, seed=8 + n) for n in (5, 17, 30)] + [prompt(33, seed=9)]
    engine = make_engine(asynchronous, max_num_seqs=2)
    first = run(engine, prompts)
    assert engine.kvtier.flush(WAIT_S)
    engine.kvtier.clear("cpu")  # the second round's hits are on disk: auto loads them asynchronously
    again = prompts + [shared + prompt(9, seed=10)]
    second = run(engine, again, prefix="again-")

    expected = [baseline(p) for p in again]
    assert [o.token_ids for o in first.values()] == expected[:len(prompts)]
    assert [o.token_ids for o in second.values()] == expected
    assert sum(o.metrics.tokens_loaded for o in second.values()) > 0
    async_loads = engine.connector.async_stats()["async_loads"]
    assert async_loads > 0 if asynchronous != "off" else async_loads == 0
    assert_idle(engine)

