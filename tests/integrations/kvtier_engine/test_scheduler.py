"""Tests for kvtier_engine/scheduler.py: continuous batching told as stories on a BlockPool of a few
4-token blocks, with real Requests and no model.

`step(scheduler)` is what the engine does around the model: schedule, advance what ran, and append a
token to every request whose last token ran. The connector stories use a real
KvtierSchedulerConnector over a CPU-only CacheEngine (16-token chunks, partial chunks saved).
"""

from __future__ import annotations

import random

import pytest

from kvtier.connector import KvtierSchedulerConnector
from kvtier_engine.block_pool import BlockPool
from kvtier_engine.request import Request, RequestStatus
from kvtier_engine.sampling import SamplingParams
from kvtier_engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

BLOCK = 4
SAMPLED = 7  # the token every "model" step appends


def make_request(request_id: str, num_tokens: int, max_tokens: int = 8, seed: int | None = None) -> Request:
    tokens = random.Random(request_id if seed is None else seed).sample(range(1000), num_tokens)
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens))


def step(scheduler: Scheduler, finished_sending: frozenset[str] = frozenset()) -> SchedulerOutput:
    out = scheduler.schedule()
    scheduler.update(out, {}, set(finished_sending))
    for s in out.scheduled:
        if s.completes_sequence:
            s.request.token_ids.append(SAMPLED)
    return out


def plan(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    """(request id, tokens already computed, tokens computed this step) per scheduled request."""
    return [(s.request.request_id, s.num_computed, s.num_new) for s in out.scheduled]


# -- budget and order ----------------------------------------------------------------------------


def test_token_budget_is_respected_every_step_and_every_token_is_computed_once():
    scheduler = Scheduler(BlockPool(64, BLOCK), max_num_batched_tokens=10)
    requests = [make_request(rid, n) for rid, n in [("a", 7), ("b", 9), ("c", 6)]]
    for r in requests:
        scheduler.add(r)

    outs = []
    while len(outs) < 20:
        outs.append(step(scheduler))
        for r in requests:  # the engine's job, done here: a request with 3 output tokens is finished
            if r.num_output_tokens == 3 and not r.status.finished:
                scheduler.finish(r, RequestStatus.FINISHED_LENGTH)
        if not scheduler.has_work():
            break

    assert all(out.num_tokens <= 10 for out in outs)
    assert plan(outs[0]) == [("a", 0, 7), ("b", 0, 3)]  # b's prefill is cut at the budget
    assert plan(outs[1]) == [("a", 7, 1), ("b", 3, 6), ("c", 0, 3)]
    # Each request computed its prompt and the tokens fed back, each token exactly once.
    for r in requests:
        assert sum(s.num_new for out in outs for s in out.scheduled if s.request is r) == len(r.token_ids) - 1
    assert not scheduler.has_work()


def test_running_requests_are_scheduled_before_waiting_ones():
    scheduler = Scheduler(BlockPool(64, BLOCK))
    first, second = make_request("first", 5), make_request("second", 5)
    scheduler.add(first)
    step(scheduler)
    scheduler.add(second)

    out = step(scheduler)

    assert plan(out) == [("first", 5, 1), ("second", 0, 5)]


def test_waiting_requests_are_admitted_in_arrival_order_up_to_max_num_seqs():
    scheduler = Scheduler(BlockPool(64, BLOCK), max_num_seqs=2)
    for rid in "abc":
        scheduler.add(make_request(rid, 3))

    out = step(scheduler)

    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in scheduler.waiting] == ["c"]


def test_chunked_prefill_continues_across_steps_and_samples_only_at_the_end():
    scheduler = Scheduler(BlockPool(64, BLOCK), max_num_batched_tokens=4)
    request = make_request("long", 10)
    scheduler.add(request)

    outs, lengths = [], []
    for _ in range(4):
        outs.append(step(scheduler))
        lengths.append(len(request.token_ids))

    assert [plan(o) for o in outs] == [[("long", 0, 4)], [("long", 4, 4)], [("long", 8, 2)],
                                       [("long", 10, 1)]]
    assert lengths == [10, 10, 11, 12]  # a token is sampled once the prompt's last token has run
    assert request.metrics.prefill_tokens_computed == 10


def test_step_counter_starts_at_one_and_counts_every_schedule_even_an_empty_one():
    scheduler = Scheduler(BlockPool(8, BLOCK))
    assert [scheduler.schedule().step for _ in range(2)] == [1, 2]  # nothing to do: still a step
    scheduler.add(make_request("a", 3))
    assert [step(scheduler).step for _ in range(3)] == [3, 4, 5]


# -- preemption ----------------------------------------------------------------------------------


def test_preemption_picks_the_most_recently_admitted_and_requeues_it_at_the_head():
    pool = BlockPool(6, BLOCK)
    scheduler = Scheduler(pool)
    a, b, c, d = (make_request(rid, 8) for rid in "abcd")
    for r in (a, b, c):
        scheduler.add(r)
    step(scheduler)  # three 2-block prompts fill the pool
    scheduler.add(d)
    assert pool.num_free == 0 and [r.num_computed_tokens for r in (a, b, c)] == [8, 8, 8]

    out = step(scheduler)  # a and b each need a third block for their 9th token

    assert out.preempted == ["c"]
    assert plan(out) == [("a", 8, 1), ("b", 8, 1)]  # and nothing admitted in a step that preempted
    assert [r.request_id for r in scheduler.waiting] == ["c", "d"]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0
    assert c.metrics.num_preemptions == 1 and a.metrics.num_preemptions == 0
    assert not pool.holds("c") and pool.num_free == 0


def test_the_newest_running_request_preempts_itself_when_it_is_last():
    pool = BlockPool(5, BLOCK)
    scheduler = Scheduler(pool)
    old, new = make_request("old", 8), make_request("new", 8)
    scheduler.add(old)
    scheduler.add(new)
    step(scheduler)  # 4 blocks used, 1 free

    out = step(scheduler)  # old takes the free block; new has nobody after it to preempt

    assert out.preempted == ["new"] and plan(out) == [("old", 8, 1)]
    assert scheduler.running == [old] and list(scheduler.waiting) == [new]


def test_a_preempted_request_is_recomputed_with_its_generated_tokens():
    pool = BlockPool(6, BLOCK, enable_caching=False)
    scheduler = Scheduler(pool)
    a, b, c = (make_request(rid, 8) for rid in "abc")
    for r in (a, b, c):
        scheduler.add(r)
    step(scheduler)
    step(scheduler)  # c preempted, holding prompt + 1 generated token
    for r in (a, b):
        scheduler.finish(r, RequestStatus.FINISHED_STOPPED)

    out = step(scheduler)

    assert plan(out) == [("c", 0, 9)]  # the whole sequence, the generated token included
    assert c.metrics.prefill_tokens_computed == 8 + 8  # the prompt, twice; the generated token is no prompt


# -- admission limits, finish and abort ----------------------------------------------------------


def test_add_rejects_a_request_that_can_never_fit():
    scheduler = Scheduler(BlockPool(4, BLOCK))
    with pytest.raises(ValueError, match="needs 5 KV blocks; the cache has 4"):
        scheduler.add(make_request("big", 10, max_tokens=7))  # 17 tokens
    assert not scheduler.has_work()
    scheduler.add(make_request("fits", 10, max_tokens=6))  # 16 tokens: exactly the cache
    assert len(scheduler.waiting) == 1


def test_finish_frees_the_blocks():
    pool = BlockPool(8, BLOCK)
    scheduler = Scheduler(pool)
    request = make_request("a", 9)
    scheduler.add(request)
    step(scheduler)
    assert pool.num_free == 5

    scheduler.finish(request, RequestStatus.FINISHED_STOPPED)

    assert pool.num_free == 8 and not pool.holds("a")
    assert request.status is RequestStatus.FINISHED_STOPPED and request.metrics.finished_time is not None
    assert not scheduler.has_work()


def test_abort_of_a_waiting_and_of_a_running_request():
    pool = BlockPool(8, BLOCK)
    scheduler = Scheduler(pool, max_num_seqs=1)
    running, waiting = make_request("running", 5), make_request("waiting", 5)
    scheduler.add(running)
    scheduler.add(waiting)
    step(scheduler)

    scheduler.finish(waiting, RequestStatus.FINISHED_ABORTED)
    assert not scheduler.waiting and waiting.status is RequestStatus.FINISHED_ABORTED
    scheduler.finish(running, RequestStatus.FINISHED_ABORTED)

    assert not scheduler.running and pool.num_free == 8
    assert running.status.finished and not scheduler.has_work()
    assert step(scheduler).scheduled == []


def test_update_counts_tokens_recomputed_after_a_short_load_as_prefill_not_loaded():
    pool = BlockPool(8, BLOCK)
    scheduler = Scheduler(pool)
    request = make_request("a", 10)
    pool.allocate("a", request.token_ids)
    request.metrics.tokens_loaded = 8  # admitted with 8 tokens planned from kvtier ...
    out = SchedulerOutput(1, [ScheduledRequest(request, 8, 2, pool.block_table("a"), loaded=8)])

    scheduler.update(out, {"a": 4}, set())  # ... of which only 4 arrived: 4 more were computed

    assert request.num_computed_tokens == 10
    assert request.metrics.tokens_loaded == 4
    assert request.metrics.prefill_tokens_computed == 6


# -- the connector holds blocks for a final save -------------------------------------------------


@pytest.fixture
def saving_scheduler(make_engine):
    """A scheduler on 4 blocks whose connector saves partial chunks at finish (so it holds blocks)."""
    connector = KvtierSchedulerConnector(make_engine("cpu", save_partial_chunks=True), BLOCK)
    return Scheduler(BlockPool(4, BLOCK), connector=connector)


def test_finish_holds_the_blocks_for_the_final_save_until_finished_sending(saving_scheduler):
    scheduler, pool = saving_scheduler, saving_scheduler.pool
    request = make_request("a", 10, max_tokens=4)
    scheduler.add(request)
    step(scheduler)

    scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
    assert scheduler.held == {"a": request} and pool.holds("a") and pool.num_free == 1
    assert scheduler.has_work()

    out = step(scheduler)  # the final save goes to the worker; not gathered yet
    assert [(s.request_id, s.start, s.end, s.final) for s in out.connector_meta.saves] == [("a", 0, 10, True)]
    assert out.connector_meta.step == out.step
    assert pool.holds("a")

    step(scheduler, finished_sending=frozenset({"a"}))  # the worker reports it gathered
    assert not scheduler.held and not pool.holds("a") and pool.num_free == 4
    assert not scheduler.has_work()


def test_a_request_waits_for_blocks_held_for_a_final_save(saving_scheduler):
    """Regression: with nothing running, a request that did not fit raised "does not fit the empty
    KV cache" although the blocks it needed were only held for a final save, free a step later."""
    scheduler = saving_scheduler
    first, second = make_request("first", 10, max_tokens=4), make_request("second", 10, max_tokens=4)
    scheduler.add(first)
    scheduler.add(second)
    step(scheduler)  # first takes 3 of the 4 blocks; second waits
    scheduler.finish(first, RequestStatus.FINISHED_STOPPED)

    # The step that hands the final save to the worker, which reports it gathered.
    out = step(scheduler, finished_sending=frozenset({"first"}))

    assert out.scheduled == [] and list(scheduler.waiting) == [second]
    assert [s.request_id for s in out.connector_meta.saves] == ["first"]
    assert plan(step(scheduler)) == [("second", 0, 10)]


def test_an_empty_cache_that_cannot_hold_a_request_is_an_error():
    scheduler = Scheduler(BlockPool(4, BLOCK))
    request = make_request("a", 10, max_tokens=2)
    scheduler.add(request)
    request.token_ids.extend(range(8))  # grown behind the scheduler's back: 18 tokens, 5 blocks
    with pytest.raises(RuntimeError, match="does not fit the empty KV cache"):
        scheduler.schedule()
