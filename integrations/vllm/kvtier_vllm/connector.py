"""`KvtierConnector`: kvtier inside vLLM, as a `KVConnectorBase_V1`.

    LLM(model, kv_transfer_config=KVTransferConfig(
        kv_connector="KvtierConnector", kv_connector_module_path="kvtier_vllm", kv_role="kv_both",
        kv_connector_extra_config={"kvtier_config": "configs/cpu_disk.yaml"}))

vLLM builds it once per role: SCHEDULER in the engine core (`scheduler_side.SchedulerSide`) and WORKER
in each worker (`worker_side.WorkerSide`); each holds its process's CacheEngine (`setup_engine`). The
metadata vLLM carries between them each step is kvtier's own `ConnectorMetadata` (scheduler ->
workers) and `KvtierWorkerMeta` (workers -> scheduler: how far each load got). With vLLM's KV events
on, what kvtier's local tiers gain and lose joins vLLM's own events (`kv_events`).

Loads may be asynchronous (`loads.asynchronous` in the kvtier config, vLLM's `load_kv_async`): the
request waits for its KV outside the batch and `get_finished` reports it. A load that falls short is
reported as blocks with load errors, which vLLM recomputes. A request's final chunks are saved after
it finishes: `request_finished` holds its blocks until the worker has gathered them.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import vllm
from vllm.distributed.kv_events import (
    MEDIUM_CPU,
    MEDIUM_STORAGE,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvtier.connector import ConnectorMetadata
from kvtier.engine import CacheEngine
from kvtier_vllm import setup_engine
from kvtier_vllm.kv_events import MAX_PENDING, EventRecorder, TierChange
from kvtier_vllm.scheduler_side import SchedulerSide
from kvtier_vllm.worker_side import WorkerSide

logger = logging.getLogger(__name__)


@dataclass
class KvtierMetadata(KVConnectorMetadata):
    """One step's loads and saves, from the scheduler side to every worker."""

    kvtier: ConnectorMetadata


@dataclass
class KvtierWorkerMeta(KVConnectorWorkerMetadata):
    """Request id -> the token its load reached, from the workers (the least over ranks)."""

    loaded: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KvtierWorkerMeta:
        merged = dict(self.loaded)
        for request_id, reached in getattr(other, "loaded", {}).items():
            merged[request_id] = min(reached, merged.get(request_id, reached))
        return KvtierWorkerMeta(merged)


@dataclass
class KvtierStats(KVConnectorStats):
    """kvtier's load and save counters gained over an interval, summed over workers (vLLM logs them
    as "KV Transfer metrics")."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KvtierStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KvtierKVEvents(KVConnectorKVEvents):
    """A step's KV cache events from the workers, as vLLM carries them to the scheduler. Only rank 0
    reports (every rank stores the same chunks, of its own heads), so there is nothing to reconcile."""

    def __init__(self, events: list[KVCacheEvent] | None = None, workers: int = 1):
        self.events, self.workers = list(events or ()), workers

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self.events.extend(events)

    def aggregate(self) -> KvtierKVEvents:
        return self

    def increment_workers(self, count: int = 1) -> None:
        self.workers += count

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self.events)

    def get_number_of_workers(self) -> int:
        return self.workers

    def clear_events(self) -> None:
        self.events = []


def vllm_event(change: TierChange, chunk_size: int) -> KVCacheEvent:
    """A kvtier tier change as vLLM's event: host memory is medium CPU, a local disk STORAGE."""
    medium = MEDIUM_CPU if change.tier == "cpu" else MEDIUM_STORAGE
    if change.op == "evicted":
        return BlockRemoved(block_hashes=[change.digest], medium=medium, ownership="kvtier")
    return BlockStored(block_hashes=[change.digest], parent_block_hash=change.parent, token_ids=change.tokens,
                       block_size=chunk_size, lora_id=None, medium=medium, lora_name=None, ownership="kvtier")


def recompute_load_failures(kv_transfer_config) -> None:
    """A load that falls short is what a cache does (a chunk evicted, corrupt or unreachable): its
    blocks are recomputed, never the request failed, so vLLM's policy is set to "recompute" (its
    scheduler reads it after building this connector)."""
    if kv_transfer_config.kv_load_failure_policy != "recompute":
        logger.info("kvtier: KV load failures are recomputed (kv_load_failure_policy 'recompute', was %r)",
                    kv_transfer_config.kv_load_failure_policy)
        kv_transfer_config.kv_load_failure_policy = "recompute"


class KvtierConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        setup_engine.check_version(vllm.__version__)
        super().__init__(vllm_config, role, kv_cache_config)
        config = setup_engine.kvtier_config(vllm_config)
        layout = setup_engine.kv_layout(vllm_config)
        parallel = vllm_config.parallel_config
        one_process = parallel.distributed_executor_backend == "uni"
        worker = role == KVConnectorRole.WORKER
        rank = parallel.rank if worker else 0  # the scheduler asks rank 0's namespace
        if not (worker or one_process):  # a scheduler with no worker beside it: its memory holds nothing
            config = setup_engine.scheduler_config(config, layout)
        name = setup_engine.model_id(vllm_config)
        # One engine per process and rank: both sides share it where vLLM runs them in one process.
        self._engine_key = (name, rank, layout.describe(), worker or one_process)
        engine = setup_engine.shared_engine(self._engine_key, lambda: CacheEngine(
            config, layout, name, tp_rank=rank, tp_size=parallel.tensor_parallel_size))
        if not worker:
            recompute_load_failures(vllm_config.kv_transfer_config)
        self._scheduler = None if worker else SchedulerSide(engine, layout.block_size, config.loads,
                                                            lease=one_process)
        self._worker = WorkerSide(engine, config.loads, not one_process) if worker else None
        events_config = vllm_config.kv_events_config
        events_on = events_config is not None and bool(events_config.enable_kv_cache_events)
        # KV events: rank 0's worker hears its tiers; the scheduler passes them on to vLLM's publisher.
        self._recorder = EventRecorder(engine) if worker and rank == 0 and events_on else None
        self._events: deque = deque(maxlen=MAX_PENDING)  # scheduler side: the workers' events, untaken
        self.events_dropped = 0  # pushed out of `_events` before vLLM took them
        logger.info("kvtier connector (%s): model %s, rank %d, %s", role.name, name, rank, layout.describe())

    # -- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches) -> None:
        self._worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._recorder is not None:
            self._recorder.expect(connector_metadata.kvtier)
        self._worker.bind_connector_metadata(connector_metadata.kvtier)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        self._worker.clear_connector_metadata()

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        self._worker.start_load_kv()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        """Nothing per layer: a step's saves are one gather of all layers, in `wait_for_save`."""

    def wait_for_save(self) -> None:
        self._worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors()

    def get_kv_connector_stats(self) -> KvtierStats | None:
        if self._worker is None:
            return None
        gained = self._worker.take_stats()
        return KvtierStats(data=gained) if gained else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KvtierStats:
        return KvtierStats(data=dict(data or {}))

    def get_kv_connector_kv_cache_events(self) -> KvtierKVEvents | None:
        changes = [] if self._recorder is None else self._recorder.take()
        if not changes:
            return None
        return KvtierKVEvents([vllm_event(change, self._recorder.chunk_size) for change in changes])

    def build_connector_worker_meta(self) -> KvtierWorkerMeta | None:
        loaded = self._worker.take_loaded()
        return KvtierWorkerMeta(loaded) if loaded else None

    # -- scheduler side ------------------------------------------------------------------------

    def on_new_request(self, request) -> None:
        self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KvtierMetadata:
        return KvtierMetadata(self._scheduler.build_connector_meta(scheduler_output))

    def update_connector_output(self, connector_output) -> None:
        worker_meta = connector_output.kv_connector_worker_meta
        self._scheduler.update_connector_output(getattr(worker_meta, "loaded", None) or {})
        if connector_output.kv_cache_events is not None:
            events = connector_output.kv_cache_events.get_all_events()
            self.events_dropped += max(0, len(self._events) + len(events) - MAX_PENDING)
            self._events.extend(events)

    def take_events(self):
        while self._events:
            yield self._events.popleft()

    def request_finished(self, request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    def reset_cache(self) -> bool:
        """vLLM's `reset_prefix_cache(reset_connector=True)` (new weights, say): kvtier drops every
        chunk of this model it holds, so nothing computed before is served after
        (`KvtierSchedulerConnector.reset`; workers in other processes follow at the next step)."""
        self._scheduler.reset()
        return True

    # -- both ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        for side in (self._scheduler, self._worker):
            if side is not None:
                side.close()
        self._scheduler = self._worker = None
        setup_engine.release_engine(self._engine_key)
