"""Tests for kvtier/connector/scheduler.py: lookups, leases, loads and saves as the scheduler side plans
them, first against a CacheEngine alone (a request is anything with `request_id` and `all_token_ids`),
then inside the engine: leases all returned, final partial saves, nothing saved twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import CHUNK, seeded_kv

from kvtier.connector import KvtierSchedulerConnector, LoadSpec, SaveSpec
from kvtier.connector.scheduler import ScheduledWork
from kvtier_engine import SamplingParams

from .conftest import GREEDY, prompt

BLOCK = 4  # engine block size in the stories below: four per chunk
BLOCKS = list(range(100, 116))  # a request's block table (its values only pass through)


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]


def leased(engine) -> int:
    return engine.stats()["pool"]["leased_chunks"]


def stored(make_engine, num_stored: int, num_tokens: int, **overrides):
    """(engine, connector, request): `num_tokens` tokens whose first `num_stored` are in kvtier."""
    engine = make_engine("cpu", **overrides)
    tokens = prompt(num_tokens, seed=num_tokens)
    if num_stored:
        engine.store(tokens[:num_stored], seeded_kv(engine.layout, num_stored, 0))
    return engine, KvtierSchedulerConnector(engine, BLOCK), Req("r", tokens)


def saves(meta) -> list[tuple[str, int, int, bool]]:
    return [(s.request_id, s.start, s.end, s.final) for s in meta.saves]


# -- lookup and load -----------------------------------------------------------------------------


def test_lookup_counts_the_hit_beyond_the_device_and_has_no_side_effects(make_engine):
    engine, connector, request = stored(make_engine, 3 * CHUNK, 60)
    before = engine.stats()["tiers"]["cpu"]

    assert connector.get_num_new_matched_tokens(request, 0) == (3 * CHUNK, False)
    assert connector.get_num_new_matched_tokens(request, CHUNK) == (2 * CHUNK, False)
    assert connector.get_num_new_matched_tokens(request, 3 * CHUNK) == (0, False)

    after = engine.stats()["tiers"]["cpu"]
    assert (after["hits"], after["bytes_read"]) == (before["hits"], before["bytes_read"])  # no payload I/O
    assert leased(engine) == 0


def test_lookup_leaves_the_last_prompt_token_to_compute(make_engine):
    _, connector, request = stored(make_engine, 3 * CHUNK, 3 * CHUNK)
    assert connector.get_num_new_matched_tokens(request, 0) == (3 * CHUNK - 1, False)
    assert connector.get_num_new_matched_tokens(request, 2 * CHUNK) == (CHUNK - 1, False)


def test_a_committed_load_is_leased_and_handed_to_the_worker_once_with_the_step(make_engine):
    engine, connector, request = stored(make_engine, 3 * CHUNK, 60)
    n, _ = connector.get_num_new_matched_tokens(request, CHUNK)

    connector.update_state_after_alloc(request, BLOCKS, n)
    assert leased(engine) == 3

    meta = connector.build_connector_meta(7, [ScheduledWork(request, BLOCKS, 60)])
    keys = engine.db.keys(request.all_token_ids)[:3]
    assert meta.step == 7
    assert meta.loads == [LoadSpec("r", request.all_token_ids[:48], BLOCKS, CHUNK, 48, keys)]
    assert connector.build_connector_meta(8, [ScheduledWork(request, BLOCKS, 61)]).loads == []
    assert leased(engine) == 3  # the worker's to release, once it has read the chunks
    engine.release(meta.loads[0].lease)
    assert leased(engine) == 0


def test_no_load_is_planned_when_nothing_is_committed(make_engine):
    engine, connector, request = stored(make_engine, 3 * CHUNK, 60)
    connector.get_num_new_matched_tokens(request, 3 * CHUNK)
    connector.update_state_after_alloc(request, BLOCKS, 0)
    assert leased(engine) == 0
    assert connector.build_connector_meta(1, [ScheduledWork(request, BLOCKS, 60)]).loads == []


def test_a_request_aborted_before_its_load_was_handed_over_releases_its_lease(make_engine):
    engine, connector, request = stored(make_engine, 2 * CHUNK, 40)
    n, _ = connector.get_num_new_matched_tokens(request, 0)
    connector.update_state_after_alloc(request, BLOCKS, n)
    assert leased(engine) == 2

    assert connector.request_finished(request, BLOCKS, 0) == (False, None)

    assert leased(engine) == 0
    assert connector.build_connector_meta(1, [ScheduledWork(request, BLOCKS, 0)]).loads == []


def test_a_prompt_that_is_all_hits_loads_its_last_chunk_whole(make_engine):
    """Regression: the load spec carried the prompt cut one token short of the hit, which turned the
    last chunk into a partial one kvtier never stored: every fully cached prompt fell short."""
    engine, connector, request = stored(make_engine, 3 * CHUNK, 3 * CHUNK)
    n, _ = connector.get_num_new_matched_tokens(request, 0)
    connector.update_state_after_alloc(request, BLOCKS, n)
    (load,) = connector.build_connector_meta(1, [ScheduledWork(request, BLOCKS, 3 * CHUNK)]).loads

    assert (load.start, load.end) == (0, 3 * CHUNK - 1)
    assert engine.retrieve(load.token_ids)[1] >= load.end


# -- saves ---------------------------------------------------------------------------------------


def test_saves_follow_the_computation_whole_chunk_by_whole_chunk(make_engine):
    _, connector, request = stored(make_engine, 0, 50)
    connector.get_num_new_matched_tokens(request, 0)
    work = [ScheduledWork(request, BLOCKS, after) for after in (10, 20, 40, 41, 48)]

    metas = [connector.build_connector_meta(step, [w]) for step, w in enumerate(work, start=1)]

    assert [saves(m) for m in metas] == [[], [("r", 0, 16, False)], [("r", 16, 32, False)], [],
                                         [("r", 32, 48, False)]]
    save = metas[2].saves[0]
    assert save.token_ids == request.all_token_ids[:32] and list(save.block_ids) == BLOCKS


def test_a_chunk_kvtier_had_at_lookup_is_never_saved(make_engine):
    _, connector, request = stored(make_engine, 2 * CHUNK, 64)
    n, _ = connector.get_num_new_matched_tokens(request, 0)
    connector.update_state_after_alloc(request, BLOCKS, n)

    meta = connector.build_connector_meta(1, [ScheduledWork(request, BLOCKS, 64)])

    assert saves(meta) == [("r", 2 * CHUNK, 64, False)]


def test_with_partial_chunks_a_finished_request_gets_a_final_save_in_the_next_meta(make_engine):
    _, connector, request = stored(make_engine, 0, 40, save_partial_chunks=True)
    connector.get_num_new_matched_tokens(request, 0)
    connector.build_connector_meta(1, [ScheduledWork(request, BLOCKS, 40)])  # saves [0, 32)

    assert connector.request_finished(request, BLOCKS, 40) == (True, None)

    meta = connector.build_connector_meta(2, [])
    assert meta.saves == [SaveSpec("r", request.all_token_ids[:40], BLOCKS, 32, 40, final=True)]
    assert connector.build_connector_meta(3, []).saves == []


@pytest.mark.parametrize(("save_partial", "computed"), [(False, 40), (True, 32)])
def test_no_final_save_without_partial_chunks_or_a_partial_tail(make_engine, save_partial, computed):
    _, connector, request = stored(make_engine, 0, 40, save_partial_chunks=save_partial)
    connector.get_num_new_matched_tokens(request, 0)
    connector.build_connector_meta(1, [ScheduledWork(request, BLOCKS, computed)])
    assert connector.request_finished(request, BLOCKS, computed) == (False, None)
    assert connector.build_connector_meta(2, []).saves == []


def test_finishing_an_unknown_request_asks_for_nothing(make_engine):
    _, connector, request = stored(make_engine, 0, 8)
    assert connector.request_finished(request, BLOCKS, 8) == (False, None)


def test_chunk_size_must_be_a_multiple_of_the_block_size(make_engine):
    with pytest.raises(ValueError, match="multiple of the block size 5"):
        KvtierSchedulerConnector(make_engine("cpu"), 5)


# -- inside the engine ---------------------------------------------------------------------------


def record_leases(llm) -> list[int]:
    """Leased chunks right after each schedule (when the scheduler side has just taken them)."""
    counts, schedule, kvtier = [], llm.engine.scheduler.schedule, llm.engine.kvtier

    def recording():
        out = schedule()
        counts.append(leased(kvtier))
        return out

    llm.engine.scheduler.schedule = recording
    return counts


def test_leases_are_released_when_requests_finish_and_when_they_are_aborted(make_llm):
    llm = make_llm("cpu", enable_prefix_caching=False, max_num_batched_tokens=16)
    shared = prompt(48, seed=1)
    llm.generate(shared, GREEDY)
    counts = record_leases(llm)

    llm.generate([shared, shared[:40] + prompt(8, seed=2)], GREEDY)
    # Both loads leased in the first step (3 chunks, 2 of them twice), and all released after.
    assert counts[0] == 3 and leased(llm.engine.kvtier) == 0

    engine = llm.engine
    request_id = engine.add_request(shared[:40] + prompt(30, seed=3), SamplingParams(max_tokens=20))
    engine.step()  # loads 32 tokens, computes 16 of the rest
    assert counts[-1] == 2 and engine.scheduler.running
    engine.abort(request_id)
    assert leased(engine.kvtier) == 0 and not engine.has_unfinished()


def test_generate_returns_after_the_final_partial_save_is_stored(make_llm):
    """Regression: `LLM.generate` returned as soon as the last request finished, while its blocks
    were still held for the final partial save, which no step had gathered yet: the tail was not in
    kvtier (nor on disk for another process) and the blocks stayed taken."""
    llm = make_llm("cpu", save_partial=True)
    out = llm.generate(prompt(20, seed=4), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]

    assert not llm.engine.scheduler.held
    assert llm.engine.kvtier.lookup(out.prompt_token_ids + out.token_ids[:-1]) == 24


def test_a_final_partial_save_holds_the_blocks_for_one_step(make_llm):
    engine = make_llm("cpu", save_partial=True).engine
    pool, connector = engine.scheduler.pool, engine.connector
    request_id = engine.add_request(prompt(20, seed=5), SamplingParams(temperature=0, max_tokens=5,
                                                                       ignore_eos=True))
    while not any(o.finished for o in engine.step()):
        pass
    assert request_id in engine.scheduler.held and pool.holds(request_id)
    saved = [(e.start, e.end) for e in connector.events if e.kind == "save"]
    assert saved == [(0, 16)]

    engine.step()

    last = connector.events[-1]
    assert (last.step, last.kind, last.request_id, last.start, last.end) == (
        engine.scheduler.step, "save", request_id, 16, 24)
    assert not pool.holds(request_id) and not engine.has_unfinished()


def test_a_second_request_never_saves_what_kvtier_had_at_lookup(make_llm):
    llm = make_llm("cpu", enable_prefix_caching=False)
    shared = prompt(48, seed=6)
    llm.generate(shared, GREEDY)

    out = llm.generate(shared[:40] + prompt(20, seed=7), GREEDY)[0]

    assert out.metrics.tokens_loaded == 32
    saved = [(e.start, e.end) for e in llm.engine.connector.events if e.kind == "save"
             and e.request_id == out.request_id]
    assert saved == [(32, 48), (48, 64)]
    assert llm.engine.kvtier.stats()["deduplicated_chunks"] == 0


def test_a_lookup_not_followed_by_an_allocation_commits_no_saved_chunks(make_engine):
    """Regression: the lookup marked the hit's chunks as saved. A request looked up and then not
    allocated (no seat to park its asynchronous load in) whose chunks kvtier lost meanwhile was
    then never saved from 0, though its next lookup found nothing."""
    engine, connector, request = stored(make_engine, 2 * CHUNK, 64)
    assert connector.get_num_new_matched_tokens(request, 0)[0] == 2 * CHUNK  # not allocated after it
    engine.clear()  # kvtier loses the two chunks meanwhile
    n, _ = connector.get_num_new_matched_tokens(request, 0)
    assert n == 0
    connector.update_state_after_alloc(request, BLOCKS, n)
    meta = connector.build_connector_meta(1, [ScheduledWork(request, BLOCKS, 64)])
    assert saves(meta) == [("r", 0, 64, False)]
