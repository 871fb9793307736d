"""Tests for kvtier_engine/scheduler.py when the connector's lookup is not known yet (vLLM's
`get_num_new_matched_tokens` -> (None, False)), told as stories on a BlockPool of 4-token blocks with
real Requests, no model, and a connector stub whose lookups land when the test says: the request is
skipped holding nothing (no blocks, no seat, no budget), the requests behind it are admitted, it keeps
its place and is asked again next step; a step with nothing else to run waits for a lookup to land.
"""

from __future__ import annotations

import random

from kvtier_engine.block_pool import BlockPool
from kvtier_engine.request import Request, RequestStatus
from kvtier_engine.sampling import SamplingParams
from kvtier_engine.scheduler import LOOKUP_WAIT_S, MAX_LOOKUP_SKIPS, Scheduler

BLOCK = 4


class Stub:
    """A scheduler-side connector whose lookups of the requests in `pending` have not landed; the
    others answer `hits` (asynchronous loads). `wait_for_lookups` lands the ones in `lands_on_wait`."""

    def __init__(self, pending: set[str], hits: dict[str, int] | None = None):
        self.pending, self.hits = pending, hits or {}
        self.lands_on_wait: set[str] = set()
        self.lookups: list[str] = []
        self.waits: list[float] = []
        self.committed: list[str] = []

    def request_arrived(self, request) -> None:
        pass

    def get_num_new_matched_tokens(self, request, num_computed: int):
        self.lookups.append(request.request_id)
        if request.request_id in self.pending:
            return None, False
        hit = self.hits.get(request.request_id, 0)
        return max(0, hit - num_computed), hit > num_computed

    def wait_for_lookups(self, timeout: float) -> bool:
        self.waits.append(timeout)
        landed, self.lands_on_wait = self.lands_on_wait, set()
        self.pending -= landed
        return bool(landed)

    def update_state_after_alloc(self, request, block_ids, num_external_tokens: int) -> None:
        self.committed.append(request.request_id)

    def build_connector_meta(self, step: int, scheduled) -> None:
        return None

    def update_connector_output(self, loaded, not_blended=()) -> None:
        pass

    def cancel_load(self, request_id: str) -> None:
        pass

    def request_finished(self, request, block_ids, num_computed_tokens: int) -> tuple[bool, None]:
        return False, None


def make_request(request_id: str, num_tokens: int) -> Request:
    tokens = random.Random(request_id).sample(range(1000), num_tokens)
    return Request(request_id, tokens, SamplingParams(max_tokens=4))


def ids(out) -> list[tuple[str, int, int]]:
    return [(s.request.request_id, s.num_computed, s.num_new) for s in out.scheduled]


def test_a_request_whose_lookup_has_not_landed_is_skipped_holding_nothing_and_keeps_its_place():
    stub = Stub({"a"})
    scheduler = Scheduler(BlockPool(32, BLOCK, False), connector=stub, max_num_seqs=2)
    a, b, c = make_request("a", 20), make_request("b", 6), make_request("c", 6)
    for r in (a, b, c):
        scheduler.add(r)
    out = scheduler.schedule()
    # a takes no seat and no blocks: b and c, behind it, fill both seats
    assert ids(out) == [("b", 0, 6), ("c", 0, 6)]
    assert list(scheduler.waiting) == [a] and a.status is RequestStatus.WAITING
    assert not scheduler.pool.holds("a") and stub.committed == ["b", "c"] and stub.waits == []
    scheduler.update(out, {}, set())
    scheduler.finish(b, RequestStatus.FINISHED_LENGTH)
    c.token_ids.append(1)  # c's sampled token: it decodes
    out = scheduler.schedule()  # a asked again, still not landed; a seat is free but it takes none
    assert ids(out) == [("c", 6, 1)] and len(scheduler.running) == 1
    assert stub.lookups.count("a") == 2 and list(scheduler.waiting) == [a] and stub.waits == []
    scheduler.update(out, {}, set())
    stub.pending.clear()
    out = scheduler.schedule()
    assert ("a", 0, 20) in ids(out) and scheduler.running[-1] is a and stub.lookups.count("a") == 3
    assert stub.committed == ["b", "c", "a"]


def test_skipped_requests_keep_their_order_ahead_of_those_that_could_not_be_admitted():
    stub = Stub({"a", "c"})
    scheduler = Scheduler(BlockPool(32, BLOCK, False), connector=stub, max_num_seqs=1)
    a, b, c, d = (make_request(rid, 6) for rid in "abcd")
    for r in (a, b, c, d):
        scheduler.add(r)
    out = scheduler.schedule()
    assert ids(out) == [("b", 0, 6)]
    assert list(scheduler.waiting) == [a, c, d]  # d never reached: the only seat is b's


def test_a_skipped_request_takes_no_budget():
    stub = Stub({"a"})
    scheduler = Scheduler(BlockPool(32, BLOCK, False), connector=stub, max_num_batched_tokens=8)
    a, b = make_request("a", 8), make_request("b", 8)
    scheduler.add(a)
    scheduler.add(b)
    assert ids(scheduler.schedule()) == [("b", 0, 8)]


def test_a_step_with_nothing_else_to_run_waits_for_a_lookup_and_admits_it_if_it_landed():
    stub = Stub({"a"})
    scheduler = Scheduler(BlockPool(32, BLOCK, False), connector=stub)
    a = make_request("a", 8)
    scheduler.add(a)
    out = scheduler.schedule()  # nothing landed while it waited
    assert out.scheduled == [] and stub.waits == [LOOKUP_WAIT_S] and list(scheduler.waiting) == [a]
    stub.lands_on_wait = {"a"}
    out = scheduler.schedule()
    assert ids(out) == [("a", 0, 8)] and stub.waits == [LOOKUP_WAIT_S] * 2
    assert stub.lookups == ["a", "a", "a"]  # each step, and once more after the lookup landed


def test_a_step_that_runs_something_never_waits_for_a_lookup():
    stub = Stub({"a"})
    scheduler = Scheduler(BlockPool(32, BLOCK, False), connector=stub)
    scheduler.add(make_request("a", 8))
    scheduler.add(make_request("b", 8))
    assert ids(scheduler.schedule()) == [("b", 0, 8)] and stub.waits == []


def test_a_landed_lookup_with_an_asynchronous_hit_parks_the_request():
    stub = Stub({"a"}, {"a": 16})
    scheduler = Scheduler(BlockPool(32, BLOCK, False), connector=stub)
    a = make_request("a", 20)
    scheduler.add(a)
    scheduler.schedule()
    assert not scheduler.pool.holds("a")
    stub.pending.clear()
    assert scheduler.schedule().scheduled == [] and list(scheduler.loading) == ["a"]
    assert a.status is RequestStatus.WAITING_FOR_KV and scheduler.pool.holds("a")


def test_a_step_skips_at_most_max_lookup_skips_requests_then_stops_admitting():
    """Each skip costs a prefix match and a probe: a long queue of pending lookups must not slow every
    step. The ones past the limit are not asked this step and keep their places."""
    pending = {f"p{i}" for i in range(MAX_LOOKUP_SKIPS + 4)}
    stub = Stub(set(pending))
    scheduler = Scheduler(BlockPool(512, BLOCK, False), connector=stub, max_num_seqs=64)
    queue = [make_request(f"p{i}", 6) for i in range(MAX_LOOKUP_SKIPS + 4)] + [make_request("b", 6)]
    for r in queue:
        scheduler.add(r)
    out = scheduler.schedule()
    assert out.scheduled == [] and len(stub.lookups) == MAX_LOOKUP_SKIPS
    assert list(scheduler.waiting) == queue  # every one in its place, b not reached


def test_a_request_waiting_for_a_seat_to_park_is_not_passed_while_it_is_looked_up_again():
    """a's landed answer is an asynchronous load with no seat to park in (x runs, p is parked: two of
    two): nothing behind it is admitted. When x's seat frees, a's new lookup runs, and still nothing
    passes it; once it lands, a parks and b follows."""
    stub = Stub(set(), {"p": 16, "a": 16})
    scheduler = Scheduler(BlockPool(64, BLOCK, False), connector=stub, max_num_seqs=2)
    x, p, a, b = make_request("x", 6), make_request("p", 20), make_request("a", 20), make_request("b", 6)
    scheduler.add(x)
    scheduler.add(p)
    out = scheduler.schedule()
    assert ids(out) == [("x", 0, 6)] and list(scheduler.loading) == ["p"]
    scheduler.update(out, {}, set())
    scheduler.add(a)
    scheduler.add(b)
    x.token_ids.append(1)
    out = scheduler.schedule()  # a cannot park (running + loading = 2): b waits behind it
    assert ids(out) == [("x", 6, 1)] and a.wants_seat_to_park and list(scheduler.waiting) == [a, b]
    scheduler.update(out, {}, set())
    scheduler.finish(x, RequestStatus.FINISHED_LENGTH)
    stub.pending.add("a")  # a seat is free: a is looked up again, not landed yet
    out = scheduler.schedule()
    assert out.scheduled == [] and list(scheduler.waiting) == [a, b] and not scheduler.pool.holds("b")
    # Review: with nothing to run, the step waits for a's lookup rather than coming back at once
    # (the engine loop spun until it landed).
    assert stub.waits == [LOOKUP_WAIT_S]
    stub.pending.clear()
    out = scheduler.schedule()
    assert list(scheduler.loading) == ["p", "a"] and ids(out) == [("b", 0, 6)]
