"""Scheduler side of the connector: what kvtier can load for a request, and what to save each step.

Where it runs: in the engine's scheduler, on its thread; it holds no KV, only a CacheEngine for
index lookups and leases. Per request, in order:

    get_num_new_matched_tokens(req, n_device)  side-effect free: index lookup only, no payload I/O
    update_state_after_alloc(req, blocks, n)   the scheduler committed to loading n tokens: lease them
    build_connector_meta(step, scheduled)      once per step: the loads and saves for the worker
    update_connector_output(loaded)            after the step: how far each load really got
    request_finished(req, blocks) -> bool      True: hold the blocks until the worker reports the
                                               final save gathered (`get_finished`)

A request is anything with `request_id` and `all_token_ids`. Saves follow the computation: every
step, the whole chunks a request completed are saved (prompt chunks during prefill, generated ones
during decode); at the end, the partial tail when the config stores partial chunks. Chunks kvtier
already holds (found at lookup) are never saved again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.connector.metadata import ConnectorMetadata, LoadSpec, SaveSpec
from kvtier.engine import CacheEngine
from kvtier.keys import ChunkKey

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _RequestState:
    hit_tokens: int = 0  # kvtier's prefix hit at the last lookup (chunk aligned, uncapped)
    saved_upto: int = 0  # chunks before this token are in kvtier
    load: LoadSpec | None = None  # committed, not yet handed to the worker
    loading_to: int = 0  # the end of the load last handed to the worker
    lease: list[ChunkKey] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ScheduledWork:
    """One request in a step, as the connector needs to see it."""

    request: object
    block_ids: Sequence[int]
    num_computed_after: int  # tokens whose KV is in the paged cache once this step has run


class KvtierSchedulerConnector:
    def __init__(self, engine: CacheEngine, block_size: int):
        chunk = engine.db.chunk_size
        if chunk % block_size:
            raise ValueError(f"kvtier chunk_size {chunk} must be a multiple of the block size {block_size}")
        self.engine = engine
        self.chunk_size = chunk
        self.block_size = block_size
        self.save_partial = engine.db.save_partial
        self._states: dict[str, _RequestState] = {}
        self._finals: list[SaveSpec] = []

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond the `num_computed_tokens` the device holds that kvtier can load, and whether
        the load is asynchronous across steps (never here: loads finish within the step that
        schedules them, layer by layer). At least one prompt token is always left to compute."""
        tokens = request.all_token_ids
        hit = self.engine.lookup(tokens)
        state = self._states.setdefault(request.request_id, _RequestState())
        state.hit_tokens = hit
        state.saved_upto = max(state.saved_upto, hit - hit % self.chunk_size)
        return max(0, min(hit, len(tokens) - 1) - num_computed_tokens), False

    def update_state_after_alloc(self, request, block_ids: Sequence[int], num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        state = self._states[request.request_id]
        tokens = request.all_token_ids
        end = min(state.hit_tokens, len(tokens) - 1)
        start = end - num_external_tokens
        state.lease = self.engine.lease(tokens, end)
        # The tokens up to the whole hit, not just `end`: a prompt that is all hits stops one token
        # short, and cutting there would turn its last chunk into a partial one kvtier never stored.
        state.load = LoadSpec(request.request_id, list(tokens[:state.hit_tokens]), list(block_ids), start,
                              end, state.lease)

    def build_connector_meta(self, step: int, scheduled: Sequence[ScheduledWork]) -> ConnectorMetadata:
        loads, saves = [], self._finals
        self._finals = []
        for work in scheduled:
            state = self._states.setdefault(work.request.request_id, _RequestState())
            if state.load is not None:
                loads.append(state.load)
                state.loading_to = state.load.end
                state.load, state.lease = None, []  # the worker releases the lease after loading
            full = work.num_computed_after - work.num_computed_after % self.chunk_size
            if full > state.saved_upto:
                saves.append(self._save(work.request, work.block_ids, state.saved_upto, full, False))
                state.saved_upto = full
        return ConnectorMetadata(step, loads, saves)

    def _save(self, request, block_ids: Sequence[int], start: int, end: int, final: bool) -> SaveSpec:
        return SaveSpec(request.request_id, list(request.all_token_ids[:end]), list(block_ids), start, end,
                        final)

    def request_finished(self, request, block_ids: Sequence[int], num_computed_tokens: int) -> bool:
        """The request is done (finished or aborted). Returns True when its blocks must stay
        allocated until the worker reports its final save in `get_finished`."""
        state = self._states.pop(request.request_id, None)
        if state is None:
            return False
        if state.lease:  # committed to a load that never reached a worker (aborted)
            self.engine.release(state.lease)
        end = num_computed_tokens
        if not self.save_partial:
            end -= end % self.chunk_size
        if end > state.saved_upto and block_ids:
            self._finals.append(self._save(request, block_ids, state.saved_upto, end, True))
            return True
        return False

    def update_connector_output(self, loaded: dict[str, int]) -> None:
        """The worker's report of how far this step's loads got (request id -> token reached). A
        load that fell short was recomputed; the chunks from there on are saved again, so a chunk
        kvtier lost (a corrupt record is dropped when found) is back for the next request."""
        for request_id, reached in loaded.items():
            state = self._states.get(request_id)
            if state is not None and reached < state.loading_to:
                state.saved_upto = min(state.saved_upto, reached - reached % self.chunk_size)
