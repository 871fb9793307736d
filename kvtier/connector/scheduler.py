"""Scheduler side of the connector: what kvtier can load for a request, and what to save each step.

Where it runs: in the engine's scheduler, on its thread; it holds no KV, only a CacheEngine for
index lookups and leases. Per request, in order:

    request_arrived(req)                       prefetch its hit's chunks below the CPU tier (`loads:`)
    get_num_new_matched_tokens(req, n_device)  side-effect free: index lookup only, no payload I/O;
                                               (n, asynchronous), or (None, False), see below
    update_state_after_alloc(req, blocks, n)   the scheduler committed to loading n tokens: lease them
    build_connector_meta(step, scheduled)      once per step: the loads and saves for the worker
    update_connector_output(loaded)            after the step: how far each load really got
    request_finished(req, blocks, n)           (hold, kv_transfer_params): hold the blocks until the
                                               worker reports the final save gathered (`get_finished`);
                                               the parameters a decode instance needs, for a request
                                               that asked for a remote decode (kvtier.connector.handoffs)

Asynchronous loads (`loads.asynchronous`, as vLLM's): a load is asynchronous when some chunk of it is
not in the CPU tier, or it is at least `async_min_bytes` (auto), always (on) or never (off). Its
request is parked by the engine, in no step, until the worker reports the load finished; its
`LoadSpec` goes into the next `build_connector_meta` all the same. An engine that aborts a parked
request calls `cancel_load` (a load not started yet is dropped) and `request_finished` once it landed.

Lookups that are round trips (Redis, kvtier_server, a peer below; loads not "off") run in the
background (`kvtier.connector.lookups`): until one lands the answer is (None, False), a skipped step.

With a `trace_log:` file (kvtier.connector.trace_log), a request's first contact (`request_arrived` or
`get_num_new_matched_tokens`, before it generated anything) notes its arrival time and its prompt's
chunk ids (the lookup's only side effect then), and `request_finished` logs its line.

A request is anything with `request_id` and `all_token_ids`. Saves follow the computation: every
step, the whole chunks a request completed are saved (prompt chunks during prefill, generated ones
during decode); at the end, the partial tail when the config stores partial chunks. Chunks kvtier
already holds (found at lookup) are never saved again.

With `blend:` (a `BlendPlanner`), the lookup also asks which of the prompt's passages kvtier holds
(`kvtier.connector.blend_plan`). A request with held passages after its head is planned as a blend:
its head (rounded down to a block) loads as usual and, if this step computes the whole rest of the
prompt, the worker blends it (`BlendLoadSpec`); otherwise the plan is dropped and the request is
computed normally. A blended request's KV past its head is approximate, so none of it is ever saved
under prefix keys (a later exact prefix hit would serve it), during decode either; the runner
reports a planned blend that fell back (`update_connector_output`), whose KV is exact and saved as
usual. Every prompt's passages that kvtier does not hold are saved under their segment keys once the
prompt is computed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from kvtier.config import LoadsConfig
from kvtier.connector.blend_plan import BlendPlanner
from kvtier.connector.handoffs import Handoffs, wants_remote_decode
from kvtier.connector.lookups import Lookups, remote_tiers
from kvtier.connector.metadata import (
    BlendLoadSpec,
    ConnectorMetadata,
    LoadSpec,
    PassageSpans,
    SaveSpec,
    SegmentSaveSpec,
)
from kvtier.connector.prefetch import Prefetcher
from kvtier.connector.trace_log import TraceLog
from kvtier.engine import CacheEngine
from kvtier.keys import ChunkKey

logger = logging.getLogger(__name__)

# Without a `loads:` config (a connector built in code), loads finish within their step and lookups
# answer at once, as before asynchronous loads existed; the engine passes its kvtier config's `loads:`.
SYNCHRONOUS = LoadsConfig(asynchronous="off", prefetch=False)


@dataclass(slots=True)
class _RequestState:
    hit_tokens: int = 0  # kvtier's prefix hit at the last lookup (chunk aligned, uncapped)
    hit_new: bool = False  # looked up since the last allocation: the hit not yet counted as saved
    load_to: int = 0  # where the prefix load ends: the hit, capped (a blend's head is block aligned)
    saved_upto: int = 0  # chunks before this token are in kvtier
    load: LoadSpec | None = None  # committed, not yet handed to the worker
    asynchronous: bool = False  # the load planned at the last lookup runs across steps
    loading_to: int = 0  # the end of the load last handed to the worker
    awaited: bool = False  # an asynchronous load handed to the worker, not reported yet
    lease: list[ChunkKey] = field(default_factory=list)
    blend: BlendLoadSpec | None = None  # planned (passages leased), not yet handed to the worker
    blended: bool = False  # KV past `saved_upto` is approximate: no prefix saves
    segment_saves: list[PassageSpans] = field(default_factory=list)  # once the prompt is computed


@dataclass(frozen=True, slots=True)
class ScheduledWork:
    """One request in a step, as the connector needs to see it."""

    request: object
    block_ids: Sequence[int]
    num_computed_after: int  # tokens whose KV is in the paged cache once this step has run


class KvtierSchedulerConnector:
    def __init__(self, engine: CacheEngine, block_size: int, blend: BlendPlanner | None = None,
                 loads: LoadsConfig | None = None, lease: bool = True):
        chunk = engine.db.chunk_size
        if chunk % block_size:
            raise ValueError(f"kvtier chunk_size {chunk} must be a multiple of the block size {block_size}")
        self.engine, self.chunk_size, self.block_size, self.blend = engine, chunk, block_size, blend
        # False where the worker runs in another process with its own CacheEngine (vLLM on CPU, or
        # with several ranks): a lease taken here would hold nothing there; the worker leases instead.
        self.lease_loads = lease
        self.save_partial = engine.db.save_partial
        self._states: dict[str, _RequestState] = {}
        self._finals: list[SaveSpec] = []
        self.loads = loads or SYNCHRONOUS
        self.prefetcher = Prefetcher(engine.storage, engine.layout, self.loads.prefetch_max_bytes_in_flight) \
            if self.loads.prefetch else None
        self.lookups = Lookups(engine, self.loads.lookup_max_in_flight) \
            if self.loads.asynchronous != "off" and remote_tiers(engine.storage.lower) else None
        self._async_pending: list[str] = []  # requests whose asynchronous load is not handed over yet
        self._cancels: list[str] = []  # parked requests aborted since the last step
        self._orphans: list[LoadSpec] = []  # loads of requests finished before they were handed over
        self._reset = False  # `reset` ran since the last step: workers with engines of their own follow
        self.handoffs = Handoffs(engine)  # KV held for decode instances (disaggregated prefill)
        self._notify: list[str] = []  # finished requests whose saves the worker reports stored
        self.trace = TraceLog.from_config(engine.config.trace_log, engine.db)  # None: off (the default)

    def reset(self) -> None:
        """Drop every chunk kvtier holds for this model (an engine's prefix-cache reset, e.g. after new
        weights: nothing computed before may be served after). This engine's tiers are cleared now
        (host memory, the local records it knows, the namespace in Redis / kvtier_server); a worker
        with an engine of its own clears it when the next step's metadata reaches it. Live requests
        save their chunks again."""
        self.engine.clear()
        for state in self._states.values():
            state.saved_upto = 0
        self._reset = not self.lease_loads

    def request_arrived(self, request) -> None:
        """Start moving the chunks of the request's hit that sit below the CPU tier up into it, so
        that they are in host memory by the time it is scheduled (no lease: LRU may evict them).
        With background lookups, its lookup starts (if not under way) and the prefetch follows it."""
        if self.trace is not None:
            self.trace.arrived(request)
        if self.lookups is not None:
            self.lookups.arrived(request.request_id, request.all_token_ids, self.prefetcher is not None)
        elif self.prefetcher is not None:
            spans = self.engine.db.spans(request.all_token_ids)
            self.prefetcher.submit_below(request.request_id, spans[:self.engine.storage.contains_prefix(
                [s.key for s in spans])])

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond the `num_computed_tokens` the device holds that kvtier can load, and whether
        the load is asynchronous across steps (`loads.asynchronous`; a blend's head never is: it
        loads in the step that blends). At least one prompt token is always left to compute.
        (None, False) while a background lookup has not landed: ask again at the next step."""
        if self.trace is not None:
            self.trace.arrived(request)
        tokens = request.all_token_ids
        hit = self.engine.lookup(tokens) if self.lookups is None else \
            self.lookups.answer(request.request_id, tokens)
        if hit is None:
            return None, False
        state = self._states.setdefault(request.request_id, _RequestState())
        state.hit_tokens, state.hit_new = hit, True
        state.load_to = min(hit, len(tokens) - 1)
        if self.blend is not None:
            self._plan_blend(request, state, num_computed_tokens)
        state.asynchronous = self._asynchronous(tokens, state, num_computed_tokens)
        return max(0, state.load_to - num_computed_tokens), state.asynchronous

    def _asynchronous(self, tokens, state: _RequestState, num_computed_tokens: int) -> bool:
        mode = self.loads.asynchronous
        if mode == "off" or state.blend is not None or state.load_to <= num_computed_tokens:
            return False
        if mode == "on" or self.engine.layout.chunk_bytes(state.load_to - num_computed_tokens) \
                >= self.loads.async_min_bytes:
            return True
        first, last = num_computed_tokens // self.chunk_size, -(-state.load_to // self.chunk_size)
        keys = self.engine.db.keys(tokens[:last * self.chunk_size])[first:]  # no hashing past the hit
        return self.engine.storage.cpu_prefix(keys) < len(keys)  # some chunk needs a tier below

    def _plan_blend(self, request, state: _RequestState, num_computed_tokens: int) -> None:
        """Plan a blend of the prompt after its head when kvtier holds passages there (not yet
        leased). The head (device hit and prefix load) is rounded down to the block size: a hit that
        ends inside a block (a stored partial chunk, a prompt that is all hits) loads only up to the
        rounded head, and the blend computes the rows between like any uncached row. Loading them
        instead would leave the head's last block part loaded, part blended: the blend writes its
        KV by whole blocks from the head on, and fewer than a block of rows costs little to compute."""
        if state.blend is not None:
            self.engine.release(state.blend.lease)
        tokens = request.all_token_ids
        head = max(num_computed_tokens, state.load_to)
        head -= head % self.block_size  # the device's hit is block aligned: never below it
        plan = self.blend.plan(tokens, head)
        state.blend, state.blended, state.segment_saves = None, False, plan.missing
        if plan.held:
            state.blend = BlendLoadSpec(request.request_id, list(tokens), head, plan.held)
            state.load_to = min(state.load_to, head)

    def update_state_after_alloc(self, request, block_ids: Sequence[int], num_external_tokens: int) -> None:
        if self.prefetcher is not None:  # seated: its own load reads what the prefetch has not moved
            self.prefetcher.cancel(request.request_id)
        state = self._states[request.request_id]
        # Committed now: the hit's chunks need no save. (Not at the lookup: a request that is not
        # allocated after it may find fewer chunks at its next lookup, and must save those again.)
        # Once per lookup: vLLM allocates again, with no lookup, when a request comes back from its
        # asynchronous load, and a load that fell short has lowered `saved_upto` since.
        if state.hit_new:
            state.saved_upto = max(state.saved_upto, state.hit_tokens - state.hit_tokens % self.chunk_size)
            state.hit_new = False
        if state.blend is not None and not state.blend.lease:
            lease = [s.key for passage in state.blend.passages for s in passage.spans]
            self.engine.storage.lease(lease)
            state.blend = dataclasses.replace(state.blend, lease=lease)
        if num_external_tokens <= 0:
            return
        tokens = request.all_token_ids
        end = state.load_to
        start = end - num_external_tokens
        state.lease = self.engine.lease(tokens, end) if self.lease_loads else []
        # The tokens up to the whole hit, not just `end`: a prompt that is all hits stops one token
        # short, and cutting there would turn its last chunk into a partial one kvtier never stored.
        state.load = LoadSpec(request.request_id, list(tokens[:state.hit_tokens]), list(block_ids), start,
                              end, state.lease, state.asynchronous)
        if state.asynchronous:
            self._async_pending.append(request.request_id)

    def build_connector_meta(self, step: int, scheduled: Sequence[ScheduledWork]) -> ConnectorMetadata:
        meta = ConnectorMetadata(step, saves=self._finals, cancel_loads=self._cancels, loads=self._orphans,
                                 reset=self._reset, notify_stored=self._notify)
        self._finals, self._cancels, self._orphans, self._reset, self._notify = [], [], [], False, []
        self.handoffs.sweep()
        if self.lookups is not None and self.prefetcher is not None:
            for request_id, spans in self.lookups.landed_for_prefetch():
                self.prefetcher.submit_below(request_id, spans)
        for request_id in self._async_pending:  # their requests are in no step until the load lands
            if (state := self._states.get(request_id)) is not None:
                self._hand_over(state, meta)
        self._async_pending = []
        for work in scheduled:
            state = self._states.setdefault(work.request.request_id, _RequestState())
            self._hand_over(state, meta)
            if state.blend is not None or state.segment_saves:
                self._blend_meta(work, state, meta)
            full = work.num_computed_after - work.num_computed_after % self.chunk_size
            if full > state.saved_upto and not state.blended:
                meta.saves.append(self._save(work.request, work.block_ids, state.saved_upto, full, False))
                state.saved_upto = full
        return meta

    def _hand_over(self, state: _RequestState, meta: ConnectorMetadata) -> None:
        if state.load is not None:
            meta.loads.append(state.load)
            state.loading_to = state.load.end
            state.awaited = state.load.asynchronous
            state.load, state.lease = None, []  # the worker releases the lease after loading

    def _blend_meta(self, work: ScheduledWork, state: _RequestState, meta: ConnectorMetadata) -> None:
        """Hand a planned blend to the worker if this step computes the whole prompt (else drop it:
        the request is computed normally), and the passages to save once the prompt is computed."""
        complete = work.num_computed_after >= len(work.request.all_token_ids)
        if state.blend is not None:
            if complete:
                meta.blend_loads.append(state.blend)  # the worker releases the lease after reading
                state.blended = True
            else:
                logger.debug("request %s: the rest of its prompt takes more than one step; not blended",
                             work.request.request_id)
                self.engine.release(state.blend.lease)
            state.blend = None
        if state.segment_saves and work.num_computed_after >= state.segment_saves[-1].end:
            meta.segment_saves.append(SegmentSaveSpec(work.request.request_id, list(work.block_ids),
                                                      state.segment_saves))
            state.segment_saves = []

    def _save(self, request, block_ids: Sequence[int], start: int, end: int, final: bool) -> SaveSpec:
        return SaveSpec(request.request_id, list(request.all_token_ids[:end]), list(block_ids), start, end,
                        final)

    def request_finished(self, request, block_ids: Sequence[int],
                         num_computed_tokens: int) -> tuple[bool, dict | None]:
        """The request is done (finished or aborted). Returns (hold, kv_transfer_params): hold is True
        when its blocks must stay allocated until the worker reports its final save in
        `get_finished`; kv_transfer_params, for a request that asked for a remote decode, is what the
        decode instance needs (kvtier.connector.handoffs), and the worker reports the request in
        `pop_kv_stored` once every save of it is in kvtier."""
        hold = self._finish(request, block_ids, num_computed_tokens)
        params = None
        if wants_remote_decode(request) and num_computed_tokens > 0:
            params = self.handoffs.hold(request.all_token_ids, num_computed_tokens)
            if params is not None:
                self._notify.append(request.request_id)
        return hold, params

    def _finish(self, request, block_ids: Sequence[int], num_computed_tokens: int) -> bool:
        if self.trace is not None:
            self.trace.finished(request)
        if self.prefetcher is not None:
            self.prefetcher.cancel(request.request_id)
        if self.lookups is not None:
            self.lookups.drop(request.request_id)
        state = self._states.pop(request.request_id, None)
        if state is None:
            return False
        if state.load is not None and state.load.asynchronous:
            # Aborted while its load waits to be handed over (vLLM finishes a request waiting for its
            # KV at once, and holds its blocks until the worker reports the load): handed over with
            # its cancel, so the worker drops it, releases its lease and reports it.
            self._orphans.append(state.load)
            self._cancels.append(request.request_id)
            state.lease = []
        elif state.awaited:  # aborted while its load is queued or read: one not started never starts
            self._cancels.append(request.request_id)
        if state.lease:  # committed to a load that never reached a worker (aborted)
            self.engine.release(state.lease)
        if state.blend is not None:
            self.engine.release(state.blend.lease)
        if state.blended:  # its KV past the head is approximate: never saved under prefix keys
            return False
        end = num_computed_tokens
        if not self.save_partial:
            end -= end % self.chunk_size
        if end > state.saved_upto and block_ids:
            self._finals.append(self._save(request, block_ids, state.saved_upto, end, True))
            return True
        return False

    def cancel_load(self, request_id: str) -> None:
        """A parked request was aborted: its asynchronous load, if not started yet, never starts (the
        worker still reports it finished, at its start). `request_finished` follows, at once (it
        cancels such a load itself: vLLM) or once the load has landed (the bundled engine)."""
        self._cancels.append(request_id)

    def wait_for_lookups(self, timeout: float) -> bool:
        """Block (at most `timeout` s) until a background lookup has landed: for an engine whose step
        has nothing else to run. True if one has."""
        return self.lookups is not None and self.lookups.wait_landed(timeout)

    def stats(self) -> dict[str, int]:
        """The prefetcher's counters, the background lookups' (`Lookups.stats`) and the trace log's
        (`TraceLog.stats`); empty with none of them."""
        return {**(self.prefetcher.stats() if self.prefetcher is not None else {}),
                **(self.lookups.stats() if self.lookups is not None else {}),
                **(self.trace.stats() if self.trace is not None else {})}

    def close(self, timeout: float | None = None) -> bool:
        """Stop the lookups and the prefetcher (queued ones dropped), and write out the trace log. True
        if both threads stopped within one `timeout` (a lookup and a read stuck at once must not take
        twice as long)."""
        if self.trace is not None:
            self.trace.close()
        self.handoffs.close()
        end = None if timeout is None else time.monotonic() + timeout
        stopped = self.lookups.close(timeout) if self.lookups is not None else True
        rest = None if end is None else max(0.0, end - time.monotonic())
        return (self.prefetcher.close(rest) if self.prefetcher is not None else True) and stopped

    def update_connector_output(self, loaded: dict[str, int], not_blended: Collection[str] = ()) -> set[str]:
        """The worker's report of how far this step's loads got (request id -> token reached). A
        load that fell short was recomputed; the chunks from there on are saved again, so a chunk
        kvtier lost (a corrupt record is dropped when found) is back for the next request.
        `not_blended`: requests planned as a blend that were computed normally (exact KV: saved).
        Returns the requests whose load fell short."""
        for request_id in not_blended:
            if (state := self._states.get(request_id)) is not None:
                state.blended = False
        short = set()
        for request_id, reached in loaded.items():
            state = self._states.get(request_id)
            if state is None:
                continue
            state.awaited = False
            if reached < state.loading_to:
                state.saved_upto = min(state.saved_upto, reached - reached % self.chunk_size)
                short.add(request_id)
        return short
