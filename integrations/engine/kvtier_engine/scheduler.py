"""Continuous-batching scheduler: which requests run in the next step, and how many tokens each.

Each step (`schedule`), with a budget of `max_num_batched_tokens`:
  1. running requests first, in admission order: a decode takes one token, an unfinished prefill
     the rest of its prompt up to the budget (chunked prefill). A request that cannot grow because
     no block is free preempts the most recently admitted running request (its blocks are freed and
     it goes back to the head of the queue, to be recomputed), or itself when it is the last;
  2. then, if nothing was preempted, requests whose asynchronous kvtier load landed (`ready`: they
     hold their blocks), then waiting requests in arrival order, while budget and `max_num_seqs`
     allow: blocks for the whole prompt, the device prefix-cache hit, and, through the kvtier
     connector, the tokens kvtier can load beyond it. Only the rest is computed. A request whose
     load is asynchronous (the connector says so) is parked in `loading` (WAITING_FOR_KV) with its
     blocks: no batch slot, no budget, in no step, until `update` is told its load landed
     (`async_loaded`: the token it reached; the rest is recomputed). A request whose kvtier lookup
     runs in the background (the connector answers None: a round trip to a shared store) is skipped
     for this step holding nothing, and the ones behind it are still considered; asked again next
     step. A step that would run nothing waits (at most LOOKUP_WAIT_S) for such a lookup to land.

Seats: `max_num_seqs` bounds `running`. A parked request takes no seat, but wants one once its load
lands (`ready`), so a request parks only while `running + loading + ready` is below `max_num_seqs`;
else it stays at the head of the queue holding nothing (no blocks, no lease) and admission stops
there, as when blocks are short. So a burst of hits never ties up more than `max_num_seqs` requests'
blocks, and one waiting to park is not starved: nothing new is admitted behind it, so the sum falls
as running requests finish, and landed requests are admitted before any waiting one.

Every `SchedulerOutput` carries `step`, a counter that starts at 1 and never resets; the connector
metadata of that step (its loads and saves) carries the same number. `update` then advances each
scheduled request by what ran; requests finish through `finish`, which lets the connector hold a
request's blocks until its last save is gathered (reported back through `finished_sending`). A
parked request that is aborted stays in `loading` until its load lands (its blocks are being
written), then its blocks are freed.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from kvtier.connector.metadata import ConnectorMetadata
from kvtier.connector.scheduler import KvtierSchedulerConnector, ScheduledWork
from kvtier_engine.block_pool import BlockPool
from kvtier_engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)

LOOKUP_WAIT_S = 0.05  # a step with nothing to run waits at most this long for a kvtier lookup to land
# Requests skipped for their lookup in one step before admission stops: each costs a prefix match and
# a probe, so a long queue of them would slow every running request's step (their lookups still start
# at arrival: `request_arrived`).
MAX_LOOKUP_SKIPS = 16


class _Skip(enum.Enum):
    """Why `_allocate` admitted nothing."""

    BLOCKED = "blocked"  # no blocks or no seat to park in now: admission stops here
    LOOKING_UP = "looking_up"  # kvtier's lookup has not landed: the requests behind go first
    LOOKING_UP_FIRST = "looking_up_first"  # the same for one that waited for a seat: admission stops


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request: Request
    num_computed: int  # tokens already in the cache (device hit + kvtier load planned) before this step
    num_new: int  # tokens this step computes
    block_ids: list[int]
    loaded: int = 0  # of num_computed, tokens planned to come from kvtier in this step

    @property
    def completes_sequence(self) -> bool:
        """True when this step reaches the request's last token: its logits give the next token."""
        return self.num_computed + self.num_new == len(self.request.token_ids)


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    step: int
    scheduled: list[ScheduledRequest]
    preempted: list[str] = field(default_factory=list)
    connector_meta: ConnectorMetadata | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


class Scheduler:
    def __init__(self, block_pool: BlockPool, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 connector: KvtierSchedulerConnector | None = None):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.pool = block_pool
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.connector = connector
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: dict[str, Request] = {}  # finished, blocks kept for the connector's final save
        self.loading: dict[str, Request] = {}  # WAITING_FOR_KV: blocks held, kvtier load in flight
        self.ready: deque[Request] = deque()  # load landed, blocks held: admitted before `waiting`
        self._arrived: list[Request] = []  # added since the last `schedule` (see `_prefetch_arrivals`)
        self.step = 0

    def add(self, request: Request) -> None:
        need = -(-(request.num_prompt_tokens + request.params.max_tokens) // self.pool.block_size)
        if need > len(self.pool.blocks):
            raise ValueError(f"request {request.request_id}: prompt plus max_tokens needs {need} KV blocks; "
                             f"the cache has {len(self.pool.blocks)}")
        self.waiting.append(request)
        self._arrived.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.held or self.loading or self.ready)

    def _holds_blocks(self) -> bool:
        """Some request other than the waiting ones holds blocks it will give back."""
        return bool(self.running or self.held or self.loading or self.ready)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self.step += 1
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        queue = list(self.running)
        self.running = []
        while queue:
            request = queue.pop(0)
            n = min(len(request.token_ids) - request.num_computed_tokens, budget)
            if n <= 0:
                self.running.append(request)
                continue
            while not self.pool.append_slot(request.request_id, request.num_computed_tokens + n):
                victim = queue.pop() if queue else request
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, request.num_computed_tokens, n,
                                                  self.pool.block_table(request.request_id)))
                budget -= n
                self.running.append(request)
        if not preempted and self._admit(budget, scheduled) and not scheduled \
                and self.connector.wait_for_lookups(LOOKUP_WAIT_S):
            self._admit(budget, scheduled)  # nothing else to run: a lookup that landed meanwhile
        self._prefetch_arrivals()
        return SchedulerOutput(self.step, scheduled, preempted, self._connector_meta(scheduled))

    def _prefetch_arrivals(self) -> None:
        """The requests that arrived since the last step and still wait: the connector starts moving
        their hits' chunks below the CPU tier up now, so that they are in host memory when admitted.
        One admitted at once is not prefetched: its load reads those chunks in this very step."""
        if self.connector is not None:
            for request in self._arrived:
                if request.status is RequestStatus.WAITING:
                    self.connector.request_arrived(request)
        self._arrived = []

    def _admit(self, budget: int, scheduled: list[ScheduledRequest]) -> bool:
        """Admit ready, then waiting requests into `scheduled`. True if some request was skipped or
        stopped admission because its kvtier lookup has not landed (it keeps its place in the queue)."""
        skipped: list[Request] = []
        stopped = False
        try:
            while (self.ready or self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
                if self.ready:  # its KV loaded: no second lookup, no second allocation
                    request, loaded = self.ready.popleft(), 0
                else:
                    request = self.waiting[0]
                    if (loaded := self._allocate(request)) in (_Skip.BLOCKED, _Skip.LOOKING_UP_FIRST):
                        stopped = loaded is _Skip.LOOKING_UP_FIRST
                        break
                    self.waiting.popleft()
                    if loaded is _Skip.LOOKING_UP:
                        skipped.append(request)
                        if len(skipped) == MAX_LOOKUP_SKIPS:
                            break
                        continue
                    if request.status is RequestStatus.WAITING_FOR_KV:
                        continue
                request.status = RequestStatus.RUNNING
                n = min(len(request.token_ids) - request.num_computed_tokens, budget)
                scheduled.append(ScheduledRequest(request, request.num_computed_tokens, n,
                                                  self.pool.block_table(request.request_id), loaded))
                self.running.append(request)
                budget -= n
        finally:
            self.waiting.extendleft(reversed(skipped))
        return bool(skipped) or stopped

    def _allocate(self, request: Request) -> int | _Skip:
        """Blocks for a waiting request, its device hit and the tokens kvtier loads in this step;
        BLOCKED when the blocks are not free now, or its load is asynchronous and no seat is left to
        park in (`_may_park`); LOOKING_UP (LOOKING_UP_FIRST for one that waited for a seat: nothing
        passes it), with nothing allocated, while kvtier's lookup runs. A request
        whose load is asynchronous is parked in `loading` (WAITING_FOR_KV, its device hit computed for
        now) and loads nothing in this step."""
        hits = self.pool.match(request.token_ids)  # once: the pool does not change until `allocate`
        if not self.pool.can_allocate(request.token_ids, hits):
            # Blocks held for a final save or a load come back later: only an idle cache is final.
            if not self._holds_blocks():
                raise RuntimeError(f"request {request.request_id} does not fit the empty KV cache")
            return _Skip.BLOCKED
        loaded, asynchronous = 0, False
        if self.connector is not None:
            # A request that found no seat to park in is not looked up again until one is free: a
            # lookup per step would ask the tiers each time and count its hit again and again.
            if request.wants_seat_to_park and not self._may_park():
                return _Skip.BLOCKED
            # Looked up before anything is allocated: a request that cannot park must leave the
            # device prefix cache as it found it (allocating recycles cached free blocks).
            loaded, asynchronous = self.connector.get_num_new_matched_tokens(
                request, len(hits) * self.pool.block_size)
            if loaded is None:  # one that waited for a seat keeps its place: nothing passes it
                return _Skip.LOOKING_UP_FIRST if request.wants_seat_to_park else _Skip.LOOKING_UP
            asynchronous = asynchronous and loaded > 0
            request.wants_seat_to_park = asynchronous and not self._may_park()
            if request.wants_seat_to_park:
                return _Skip.BLOCKED  # nothing allocated, nothing leased: looked up again once a seat is free
        device_hit = self.pool.allocate(request.request_id, request.token_ids, hits)
        if self.connector is not None:
            blocks = self.pool.block_table(request.request_id)
            self.connector.update_state_after_alloc(request, blocks, loaded)
        m = request.metrics
        if m.first_scheduled_time is None:
            m.first_scheduled_time = time.perf_counter()
            m.tokens_cached_on_device = device_hit
        if asynchronous:
            request.num_computed_tokens = device_hit
            request.status = RequestStatus.WAITING_FOR_KV
            self.loading[request.request_id] = request
            return 0
        request.num_computed_tokens = device_hit + loaded
        m.tokens_loaded += loaded
        return loaded

    def _may_park(self) -> bool:
        """Room for one more request to wait for its KV: every parked one keeps a seat to land in."""
        return len(self.running) + len(self.loading) + len(self.ready) < self.max_num_seqs

    def _preempt(self, request: Request) -> None:
        self.pool.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.metrics.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("step %d: preempted %s", self.step, request.request_id)

    def _connector_meta(self, scheduled: list[ScheduledRequest]) -> ConnectorMetadata | None:
        if self.connector is None:
            return None
        return self.connector.build_connector_meta(self.step, [
            ScheduledWork(s.request, s.block_ids, s.num_computed + s.num_new) for s in scheduled])

    # -- after the step ------------------------------------------------------------------------

    def update(self, output: SchedulerOutput, recomputed: dict[str, int],
               finished_sending: set[str], loaded: dict[str, int] | None = None,
               not_blended: set[str] | None = None, blended: dict[str, int] | None = None,
               async_loaded: dict[str, int] | None = None) -> None:
        """Advance each scheduled request past the tokens that ran. `recomputed`: tokens a request
        computed beyond plan because its kvtier load fell short; `loaded`: how far each load got;
        `not_blended`: requests planned as a blend that were computed normally; `blended`: requests
        whose prompt after the head was blended -> the rows of it computed through every layer (the
        blend runs layers 0..check_layer-1 over every row, but the rows it reused count as reused,
        `blend_tokens_reused`, not computed). A blended request's blocks past its head are never
        published to the device prefix cache: their KV is approximate. `async_loaded`: requests whose
        asynchronous load finished -> the token it reached (`_landed`)."""
        async_loaded = async_loaded or {}
        if self.connector is not None and (loaded or not_blended or async_loaded):
            self.connector.update_connector_output({**(loaded or {}), **async_loaded}, not_blended or ())
        blended = blended or {}
        for s in output.scheduled:
            request = s.request
            extra = recomputed.get(request.request_id, 0)
            request.num_computed_tokens = s.num_computed + s.num_new
            prompt_left = max(0, request.num_prompt_tokens - (s.num_computed - extra))
            ran = blended.get(request.request_id, s.num_new + extra)
            request.metrics.prefill_tokens_computed += min(ran, prompt_left)
            request.metrics.tokens_loaded -= extra
            if request.request_id in blended:
                self.pool.cache_only_upto(request.request_id, s.num_computed)
            self.pool.publish(request.request_id, request.token_ids, request.num_computed_tokens)
        for request_id in finished_sending:
            request = self.held.pop(request_id, None)
            if request is not None:
                self.pool.free(request_id)
        self._landed(async_loaded)

    def _landed(self, async_loaded: dict[str, int]) -> None:
        """Parked requests whose load finished: their KV reaches `reached` (at least the device hit;
        the rest, and always the last prompt token, is computed): ready to run. One aborted while
        it loaded is retired now that nothing writes its blocks."""
        for request_id, reached in async_loaded.items():
            request = self.loading.pop(request_id, None)
            if request is None:
                continue
            if request.status.finished:
                self._release(request)
                continue
            device_hit = request.num_computed_tokens
            reached = min(max(reached, device_hit), len(request.token_ids) - 1)
            request.num_computed_tokens = reached
            request.metrics.tokens_loaded += reached - device_hit
            request.status = RequestStatus.WAITING
            self.ready.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Retire a request (stopped, out of length, or aborted), wherever it is. One whose load is in
        flight keeps its blocks until the load lands (`_landed`); its load is cancelled if not started."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.ready:
            self.ready.remove(request)
        parked = request.request_id in self.loading
        request.status = status
        request.metrics.finished_time = time.perf_counter()
        if parked:
            if self.connector is not None:
                self.connector.cancel_load(request.request_id)
            return
        self._release(request)

    def _release(self, request: Request) -> None:
        """Free a retired request's blocks, or hold them for the connector's final save."""
        # A request that failed has no final save: the KV of its last step is not trusted.
        computed = 0 if request.status is RequestStatus.FINISHED_ERROR else request.num_computed_tokens
        if not self.pool.holds(request.request_id):
            if self.connector is not None:
                request.transfer_reply = self.connector.request_finished(request, [], computed)[1]
            return
        blocks = self.pool.block_table(request.request_id)
        hold = False
        if self.connector is not None:
            hold, request.transfer_reply = self.connector.request_finished(request, blocks, computed)
        if hold:
            self.held[request.request_id] = request
        else:
            self.pool.free(request.request_id)
