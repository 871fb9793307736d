"""The connector's scheduler side: vLLM's requests, block lists and SchedulerOutput translated for
kvtier's `KvtierSchedulerConnector`, which decides every load and save.

Translation only:
- a vLLM `Request` is seen through `_Seen` (its id and its live token list: generated tokens appear
  as vLLM appends them);
- a request's blocks are tracked from the SchedulerOutput (new requests' block ids, cached requests'
  new block ids, a resumed request's whole new list), one KV cache group (the model's attention);
- a step's `ScheduledWork` is each scheduled request with the tokens its KV reaches once the step has
  run (computed before it + scheduled in it);
- how far each load got comes back from the workers in `KvtierWorkerMeta` (update_connector_output).

Where it runs: vLLM's scheduler thread, in the engine core process. Not thread-safe (vLLM calls it
from one thread).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvtier.config import LoadsConfig
from kvtier.connector import ConnectorMetadata, KvtierSchedulerConnector
from kvtier.connector.scheduler import ScheduledWork
from kvtier.engine import CacheEngine

logger = logging.getLogger(__name__)


class _Seen:
    """What kvtier's scheduler connector reads of a vLLM Request."""

    __slots__ = ("request_id", "all_token_ids")

    def __init__(self, request):
        self.request_id = request.request_id
        # The live list behind vLLM's read-only view (ConstantList): sliced without a copy of the view.
        live = getattr(request.all_token_ids, "_x", None)
        self.all_token_ids = live if isinstance(live, list) else list(request.all_token_ids)


def first_group(block_ids: Sequence[Sequence[int]] | None) -> list[int]:
    """The block ids of the first (the only) KV cache group, from vLLM's tuple of per-group lists."""
    return list(block_ids[0]) if block_ids else []


class SchedulerSide:
    """`lease`: False where the workers are other processes (they lease what they load)."""

    def __init__(self, engine: CacheEngine, block_size: int, loads: LoadsConfig, lease: bool):
        self.kv = KvtierSchedulerConnector(engine, block_size, None, loads, lease=lease)
        self._seen: dict[str, _Seen] = {}
        self._blocks: dict[str, list[int]] = {}
        self._short: set[str] = set()  # requests whose load fell short: recomputed, never loaded again
        self._step = 0

    def _view(self, request) -> _Seen:
        seen = self._seen.get(request.request_id)
        if seen is None:
            seen = self._seen[request.request_id] = _Seen(request)
        return seen

    def on_new_request(self, request) -> None:
        self.kv.request_arrived(self._view(request))

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """kvtier's answer, except for a request whose load fell short: vLLM recomputes its failed
        blocks and asks again, and a chunk that fails every time (a tier that cannot read it) must
        not be loaded again and again."""
        if request.request_id in self._short:
            return 0, False
        return self.kv.get_num_new_matched_tokens(self._view(request), num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        block_ids = first_group(blocks.get_block_ids()) if blocks is not None else []
        self.kv.update_state_after_alloc(self._view(request), block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> ConnectorMetadata:
        scheduled, counts = [], scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            seen = self._seen.get(new.req_id)
            if seen is None:  # (vLLM asks about every new request first; never seen: no kvtier state)
                continue
            self._blocks[new.req_id] = blocks = first_group(new.block_ids)
            scheduled.append(ScheduledWork(seen, blocks, new.num_computed_tokens + counts.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        for i, request_id in enumerate(cached.req_ids):
            seen = self._seen.get(request_id)
            if seen is None:
                continue
            added = first_group(cached.new_block_ids[i])
            if request_id in resumed:  # preempted and back: its blocks are all new
                self._blocks[request_id] = added
            else:
                self._blocks.setdefault(request_id, []).extend(added)
            computed = cached.num_computed_tokens[i] + counts.get(request_id, 0)
            scheduled.append(ScheduledWork(seen, self._blocks[request_id], computed))
        meta = self.kv.build_connector_meta(self._step, scheduled)
        self._step += 1
        return meta

    def update_connector_output(self, loaded: dict[str, int]) -> None:
        if loaded:
            self._short |= self.kv.update_connector_output(loaded)

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict | None]:
        """(hold, kv_transfer_params), vLLM's shape. hold: vLLM keeps the blocks until a worker
        reports the request's final save gathered. (A request aborted while it waits for its KV:
        kvtier cancels the load, and vLLM holds its blocks until the worker reports it.)"""
        seen = self._seen.pop(request.request_id, None) or _Seen(request)
        self._blocks.pop(request.request_id, None)
        self._short.discard(request.request_id)
        return self.kv.request_finished(seen, block_ids, request.num_computed_tokens)

    def reset(self) -> None:
        self.kv.reset()

    def close(self) -> None:
        self.kv.close(timeout=5.0)
