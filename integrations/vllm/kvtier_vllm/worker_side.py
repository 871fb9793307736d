"""The connector's worker side: vLLM's per-layer KV caches, layer names and load-error reporting
translated for kvtier's `KvtierWorkerConnector`, which moves the KV.

Translation only:
- `register_kv_caches` wraps vLLM's `{layer name: tensor}` in `VllmPagedKV` (checked against the
  geometry both sides agreed on), and layer names become layer indices;
- a load that falls short (a chunk missing, corrupt or unreadable) is reported the way vLLM asks:
  the ids of the blocks it did not fill (`get_block_ids_with_load_errors`), which vLLM recomputes;
  for an asynchronous load in the step `get_finished` reports it;
- how far each load got goes back to the scheduler side in `KvtierWorkerMeta`, so that chunks kvtier
  lost are saved again.

Where it runs: each worker process, on vLLM's forward thread (kvtier's loader and saver threads
behind it).
"""

from __future__ import annotations

import dataclasses
import logging

from kvtier.config import LoadsConfig
from kvtier.connector import ConnectorMetadata, KvtierWorkerConnector, LoadSpec
from kvtier.engine import CacheEngine
from kvtier_vllm.paged_kv import UnsupportedKVLayout, VllmPagedKV

logger = logging.getLogger(__name__)


def unfilled_blocks(spec: LoadSpec, reached: int, block_size: int) -> set[int]:
    """The blocks of `spec`'s load from the one holding token `reached` to the one holding its end."""
    if reached >= spec.end:
        return set()
    return set(spec.block_ids[reached // block_size:-(-spec.end // block_size)])


class WorkerSide:
    """`lease`: True where the scheduler side is another process: the loads it hands over hold no
    lease (one taken there holds nothing here), so each is leased here as it arrives."""

    def __init__(self, engine: CacheEngine, loads: LoadsConfig, lease: bool):
        self.engine, self.lease = engine, lease
        self.kv = KvtierWorkerConnector(engine, loads=loads)
        self.paged: VllmPagedKV | None = None
        self._layers: dict[str, int] = {}
        self._loads: dict[str, LoadSpec] = {}  # this step's synchronous loads
        self._async_loads: dict[str, LoadSpec] = {}  # handed over, not yet reported finished
        self._errors: set[int] = set()
        self._loaded: dict[str, int] = {}  # for the scheduler side, since the last report
        self._reported: dict[str, int] = {}  # the connector's counters at the last stats report

    def register_kv_caches(self, kv_caches) -> None:
        layout = self.engine.layout
        paged = VllmPagedKV(kv_caches, layout.num_kv_heads, layout.head_dim)
        got, want = (paged.num_layers, paged.dtype, paged.block_size), (layout.num_layers, layout.dtype,
                                                                         layout.block_size)
        if got != want:
            raise UnsupportedKVLayout(
                f"kvtier: vLLM allocated {paged.num_layers} layers of {paged.dtype} KV in blocks of "
                f"{paged.block_size}; the model config says {layout.num_layers} of {layout.dtype} in "
                f"{layout.block_size}")
        self.paged = paged
        self._layers = {name: i for i, name in enumerate(paged.layer_names)}
        self.kv.register_kv_caches(paged)
        logger.info("kvtier: %d KV layers registered, blocks of %d tokens on %s", paged.num_layers,
                    paged.block_size, paged.device)

    def bind_connector_metadata(self, meta: ConnectorMetadata) -> None:
        if self.lease and meta.loads:
            leased = [dataclasses.replace(spec, lease=self.engine.lease(spec.token_ids, spec.end))
                      for spec in meta.loads]
            meta = dataclasses.replace(meta, loads=leased)
        self.kv.bind_connector_metadata(meta)
        self._loads = {spec.request_id: spec for spec in meta.loads if not spec.asynchronous}
        self._async_loads.update((spec.request_id, spec) for spec in meta.loads if spec.asynchronous)

    def start_load_kv(self) -> None:
        self.kv.start_load_kv()
        reached = self.kv.get_loaded_tokens()
        for request_id, spec in self._loads.items():
            self._report(spec, reached.get(request_id, spec.start))

    def _report(self, spec: LoadSpec, reached: int) -> None:
        self._loaded[spec.request_id] = reached
        self._errors |= unfilled_blocks(spec, reached, self.paged.block_size)

    def wait_for_layer_load(self, layer_name: str) -> None:
        layer = self._layers.get(layer_name)
        if layer is not None:
            self.kv.wait_for_layer_load(layer)

    def wait_for_save(self) -> None:
        self.kv.wait_for_save()

    def clear_connector_metadata(self) -> None:
        self.kv.clear_connector_metadata()
        self._loads = {}

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        saved, received = self.kv.get_finished()
        for request_id, reached in self.kv.get_async_loaded().items():
            spec = self._async_loads.pop(request_id, None)
            if spec is not None:
                self._report(spec, reached)
        return saved or None, received or None

    def take_load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def take_loaded(self) -> dict[str, int]:
        loaded, self._loaded = self._loaded, {}
        return loaded

    def take_stats(self) -> dict[str, int]:
        """The connector's counters (loads, loaded and saved tokens, shortfalls, cancels, saves, save
        failures) gained since the last call, the ones that moved only: vLLM sums them over workers
        and logs them per interval (`KvtierStats`)."""
        now = dict(self.kv.stats)
        gained = {name: value - self._reported.get(name, 0) for name, value in now.items()}
        self._reported = now
        return {name: value for name, value in gained.items() if value}

    def close(self) -> None:
        self.kv.drain(timeout=30.0)
        self.kv.close()
