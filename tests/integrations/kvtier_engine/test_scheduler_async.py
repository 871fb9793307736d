"""Tests for kvtier_engine/scheduler.py with asynchronous kvtier loads, told as stories on a BlockPool
of 4-token blocks with real Requests, no model, and a connector stub that says which requests load
how much, asynchronously: parked requests (WAITING_FOR_KV) take no slot and no budget but park only
while a seat is left for them to land in, a landed load is admitted before the waiting queue, aborts
wait for the load, prefetch only for requests left waiting.
"""

from __future__ import annotations

import random

from kvtier_engine.block_pool import BlockPool
from kvtier_engine.request import Request, RequestStatus
from kvtier_engine.sampling import SamplingParams
from kvtier_engine.scheduler import Scheduler

BLOCK = 4


class Stub:
    """A scheduler-side connector whose requests in `hits` load that many tokens asynchronously."""

    def __init__(self, hits: dict[str, int]):
        self.hits = hits
        self.arrived: list[str] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.outputs: list[dict[str, int]] = []
        self.committed: list[str] = []  # requests whose load was committed (`update_state_after_alloc`)
        self.lookups: list[str] = []  # every `get_num_new_matched_tokens`, by request id

    def request_arrived(self, request) -> None:
        self.arrived.append(request.request_id)

    def get_num_new_matched_tokens(self, request, num_computed: int) -> tuple[int, bool]:
        self.lookups.append(request.request_id)
        hit = self.hits.get(request.request_id, 0)
        return max(0, hit - num_computed), hit > num_computed

    def update_state_after_alloc(self, request, block_ids, num_external_tokens: int) -> None:
        self.committed.append(request.request_id)

    def build_connector_meta(self, step: int, scheduled) -> None:
        return None

    def update_connector_output(self, loaded: dict[str, int], not_blended=()) -> None:
        self.outputs.append(dict(loaded))

    def cancel_load(self, request_id: str) -> None:
        self.cancelled.append(request_id)

    def request_finished(self, request, block_ids, num_computed_tokens: int) -> tuple[bool, None]:
        self.finished.append(request.request_id)
        return False, None


def make_request(request_id: str, num_tokens: int) -> Request:
    tokens = random.Random(request_id).sample(range(1000), num_tokens)
    return Request(request_id, tokens, SamplingParams(max_tokens=4))


def scheduler_with(hits: dict[str, int], **options) -> tuple[Scheduler, Stub]:
    stub = Stub(hits)
    return Scheduler(BlockPool(32, BLOCK, False), connector=stub, **options), stub


def ids(out) -> list[tuple[str, int, int]]:
    return [(s.request.request_id, s.num_computed, s.num_new) for s in out.scheduled]


def parked_b(hit: int = 16) -> tuple[Scheduler, Stub, Request]:
    """A scheduler whose first step has parked request "b" (20 tokens, `hit` of them loading)."""
    scheduler, stub = scheduler_with({"b": hit})
    b = make_request("b", 20)
    scheduler.add(b)
    assert scheduler.schedule().scheduled == [] and list(scheduler.loading) == ["b"]
    return scheduler, stub, b


def test_a_parked_request_takes_no_slot_no_budget_and_is_admitted_first_once_landed():
    scheduler, stub = scheduler_with({"b": 16}, max_num_seqs=1, max_num_batched_tokens=8)
    b, a, c = make_request("b", 20), make_request("a", 6), make_request("c", 5)
    for r in (b, a, c):
        scheduler.add(r)

    out = scheduler.schedule()
    assert ids(out) == [("a", 0, 6)]  # b parked with its blocks, a runs in the one slot
    assert b.status is RequestStatus.WAITING_FOR_KV and b.num_computed_tokens == 0
    assert scheduler.pool.holds("b") and list(scheduler.loading) == ["b"]
    scheduler.update(out, {}, set())
    scheduler.finish(a, RequestStatus.FINISHED_LENGTH)

    out = scheduler.schedule()  # the load has not landed: c takes the free slot
    assert ids(out) == [("c", 0, 5)]
    scheduler.update(out, {}, set(), async_loaded={"b": 12})  # fell short of 16: the rest is computed
    assert b.status is RequestStatus.WAITING and list(scheduler.ready) == [b]
    assert (b.num_computed_tokens, b.metrics.tokens_loaded) == (12, 12)
    assert stub.outputs[-1] == {"b": 12}
    scheduler.finish(c, RequestStatus.FINISHED_LENGTH)

    scheduler.add(make_request("d", 5))
    out = scheduler.schedule()
    assert ids(out) == [("b", 12, 8)]  # ready before waiting, no second lookup or allocation
    assert b.status is RequestStatus.RUNNING and scheduler.waiting[0].request_id == "d"


def test_a_landed_load_never_computes_less_than_the_last_prompt_token_or_before_the_device_hit():
    scheduler, _, b = parked_b(40)
    scheduler.update(scheduler.schedule(), {}, set(), async_loaded={"b": 99})
    assert b.num_computed_tokens == 19 and b.metrics.tokens_loaded == 19


def test_an_aborted_parked_request_keeps_its_blocks_until_the_load_lands():
    scheduler, stub, b = parked_b()
    scheduler.finish(b, RequestStatus.FINISHED_ABORTED)

    assert stub.cancelled == ["b"] and stub.finished == []
    assert scheduler.pool.holds("b") and scheduler.has_work()
    out = scheduler.schedule()
    assert out.scheduled == []  # never scheduled
    scheduler.update(out, {}, set(), async_loaded={"b": 0})
    assert stub.finished == ["b"] and not scheduler.pool.holds("b") and not scheduler.has_work()
    assert scheduler.pool.num_free == len(scheduler.pool.blocks)


def test_an_aborted_ready_request_is_freed_at_once():
    scheduler, stub, b = parked_b()
    scheduler.update(scheduler.schedule(), {}, set(), async_loaded={"b": 16})
    scheduler.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not scheduler.ready and not scheduler.pool.holds("b") and stub.finished == ["b"]
    assert stub.cancelled == [] and not scheduler.has_work()


def test_loads_holding_blocks_make_a_request_wait_instead_of_failing():
    scheduler, _ = scheduler_with({"b": 100})
    b, big = make_request("b", 104), make_request("big", 40)  # 26 of 32 blocks, then 10 more
    scheduler.add(b)
    scheduler.add(big)
    out = scheduler.schedule()  # b parked; big does not fit beside it: it waits, no RuntimeError
    assert out.scheduled == [] and list(scheduler.waiting) == [big]


def test_only_requests_left_waiting_are_prefetched():
    scheduler, stub = scheduler_with({}, max_num_seqs=1)
    first, second = make_request("first", 6), make_request("second", 6)
    scheduler.add(first)
    scheduler.add(second)
    assert stub.arrived == []  # not at add: the step decides
    scheduler.schedule()
    assert stub.arrived == ["second"]  # `first` was admitted at once: its load reads them anyway
    scheduler.schedule()
    assert stub.arrived == ["second"]  # once per arrival


def test_a_request_parks_only_while_running_loading_and_ready_leave_it_a_seat():
    # Regression: every asynchronous hit parked at once, whatever max_num_seqs, each holding its blocks.
    scheduler, stub = scheduler_with({"a": 16, "b": 16, "c": 16}, max_num_seqs=2)
    a, b, c, d = [make_request(rid, 20) for rid in "abc"] + [make_request("d", 6)]
    for r in (a, b, c, d):
        scheduler.add(r)

    def seats() -> tuple[int, int, int]:
        return len(scheduler.running), len(scheduler.loading), len(scheduler.ready)

    out = scheduler.schedule()
    assert out.scheduled == [] and list(scheduler.loading) == ["a", "b"] and seats() == (0, 2, 0)
    # c waits at the head holding nothing (no blocks, no committed load); d waits behind it
    assert list(scheduler.waiting) == [c, d] and c.status is RequestStatus.WAITING
    assert not scheduler.pool.holds("c") and stub.committed == ["a", "b"]
    assert scheduler.pool.num_free == len(scheduler.pool.blocks) - 10  # a's and b's 5 blocks each

    scheduler.update(out, {}, set(), async_loaded={"a": 16})
    out = scheduler.schedule()
    assert ids(out) == [("a", 16, 4)] and seats() == (1, 1, 0)  # still no seat for c to park in
    assert list(scheduler.waiting) == [c, d]
    scheduler.update(out, {}, set())
    scheduler.finish(a, RequestStatus.FINISHED_LENGTH)

    out = scheduler.schedule()  # a's seat is free: c parks, and d takes a seat to run
    assert ids(out) == [("d", 0, 6)] and list(scheduler.loading) == ["b", "c"] and seats() == (1, 2, 0)
    scheduler.update(out, {}, set(), async_loaded={"b": 16, "c": 12})
    out = scheduler.schedule()  # b takes the last seat (d has no token to run); c, landed, waits for one
    assert ids(out) == [("b", 16, 4)]
    assert list(scheduler.ready) == [c] and seats() == (2, 0, 1)
    scheduler.update(out, {}, set())
    scheduler.finish(d, RequestStatus.FINISHED_LENGTH)
    out = scheduler.schedule()
    assert ("c", 12, 8) in ids(out) and seats() == (2, 0, 0)
    assert stub.committed == ["a", "b", "c", "d"]  # once each: c's refused turn committed nothing


def test_a_request_with_no_seat_to_park_in_keeps_the_device_cache_and_is_looked_up_once_a_seat_frees():
    # Regression: it allocated its blocks before finding out it could not park, which recycled cached
    # free blocks (another prompt's device hit shrank), and it was looked up again at every step.
    stub = Stub({"b": 16, "c": 16})
    scheduler = Scheduler(BlockPool(14, BLOCK, True), connector=stub, max_num_seqs=2)
    x = make_request("x", 20)
    scheduler.add(x)
    out = scheduler.schedule()
    scheduler.update(out, {}, set())
    scheduler.finish(x, RequestStatus.FINISHED_LENGTH)  # its 4 full blocks stay cached, free
    cached = len(scheduler.pool.match(x.token_ids)) * BLOCK  # tokens allocate would find cached
    r, b, c = make_request("r", 8), make_request("b", 20), make_request("c", 20)
    for request in (r, b):
        scheduler.add(request)
    out = scheduler.schedule()
    scheduler.update(out, {}, set())
    assert list(scheduler.loading) == ["b"] and r in scheduler.running  # both seats taken
    scheduler.add(c)
    for _ in range(5):
        out = scheduler.schedule()
        scheduler.update(out, {}, set())
    assert cached == 16 and len(scheduler.pool.match(x.token_ids)) * BLOCK == cached
    assert stub.lookups.count("c") == 1 and not scheduler.pool.holds("c") and "c" not in stub.committed
    scheduler.update(scheduler.schedule(), {}, set(), async_loaded={"b": 16})
    scheduler.finish(r, RequestStatus.FINISHED_LENGTH)
    scheduler.schedule()  # a seat is free: c is looked up again, and parks
    assert stub.lookups.count("c") == 2 and "c" in scheduler.loading
