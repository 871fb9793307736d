"""Model runner: runs one scheduler step on the model and the paged cache, and samples.

Where it runs: the worker (here the same process and thread as the scheduler). Per step:

    connector: bind metadata, start_load_kv      (kvtier reads; copies into blocks, maybe layer-wise)
    build the flat batch                         (a request whose load fell short starts earlier:
                                                  the missing tokens are computed in this same step)
    forward, with wait_for_layer_load / save_kv_layer around every layer's attention
    sample the requests whose last token ran
    connector: wait_for_save, get_finished, clear metadata

A request whose logits are not finite is reported in `failed` (its KV of this step is not saved);
the others in the batch go on. If the step raises (the forward broke: nothing it computed is
trusted), the connector still ends the step, in `finally`: none of the step's KV is saved, final
saves go out, leases are released and no copy into the paged cache is left running.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtier.connector.worker import KvtierWorkerConnector
from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers.attention import AttentionBackend, BatchMetadata
from kvtier_engine.layers.triton_attention import paged_attention_backend
from kvtier_engine.models.llama import CausalLM
from kvtier_engine.sampling import TokenLogprobs, logprobs_of, sample
from kvtier_engine.scheduler import SchedulerOutput


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> next token
    recomputed: dict[str, int] = field(default_factory=dict)  # tokens computed because a load fell short
    loaded: dict[str, int] = field(default_factory=dict)  # request id -> token its kvtier load reached
    finished_sending: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)  # requests whose logits could not be sampled
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # for requests that asked


class _ConnectorHooks:
    """An attention backend that lets the connector in around every layer."""

    def __init__(self, backend: AttentionBackend, worker: KvtierWorkerConnector):
        self.backend, self.worker = backend, worker

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.worker.wait_for_layer_load(layer)
        out = self.backend.attend(layer, q, k, v)
        self.worker.save_kv_layer(layer)
        return out

    def advance(self, num_tokens: int) -> None:
        self.backend.advance(num_tokens)


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, connector: KvtierWorkerConnector | None = None):
        self.model = model
        self.cache = cache
        self.connector = connector
        self.device = cache.kv.device
        if connector is not None:
            connector.register_kv_caches(cache)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        result = RunnerOutput()
        worker = self.connector if out.connector_meta is not None else None
        if worker is None:
            if out.scheduled:
                self._run(out, [s.num_computed for s in out.scheduled], result)
            return result
        worker.bind_connector_metadata(out.connector_meta)
        ran = False
        try:
            worker.start_load_kv()
            loaded = result.loaded = worker.get_loaded_tokens()
            if out.scheduled:
                starts = []
                for s in out.scheduled:
                    reached = loaded.get(s.request.request_id, s.num_computed)
                    if reached < s.num_computed:
                        result.recomputed[s.request.request_id] = s.num_computed - reached
                    starts.append(min(reached, s.num_computed))
                self._run(out, starts, result)
            ran = True
        finally:
            worker.wait_for_save(result.failed if ran else {s.request.request_id for s in out.scheduled})
            if ran:  # else the finished saves stay with the worker until the next step asks
                result.finished_sending, _ = worker.get_finished()
            worker.clear_connector_metadata()
        return result

    @torch.inference_mode()
    def _run(self, out: SchedulerOutput, starts: list[int], result: RunnerOutput) -> None:
        ends = [s.num_computed + s.num_new for s in out.scheduled]
        ids = [t for s, a, b in zip(out.scheduled, starts, ends) for t in s.request.token_ids[a:b]]
        meta = BatchMetadata.build([s.block_ids for s in out.scheduled], starts,
                                   [b - a for a, b in zip(starts, ends)], self.cache.block_size, self.device)
        backend: AttentionBackend = paged_attention_backend(self.cache, meta, self.model.config)
        if self.connector is not None:
            backend = _ConnectorHooks(backend, self.connector)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(input_ids, meta.positions, backend)
        done = [i for i, s in enumerate(out.scheduled) if s.completes_sequence]
        if not done:
            return
        rows = torch.tensor([meta.query_starts[i + 1] - 1 for i in done], device=self.device)
        logits = self.model.logits(hidden.index_select(0, rows)).cpu()
        requests = [out.scheduled[i].request for i in done]
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        for request, token in zip(requests, tokens):
            if token is None:
                result.failed.add(request.request_id)
            else:
                result.sampled[request.request_id] = token
        # Only for requests that asked: most steps pay one pass over the batch's params, no more.
        asked = [i for i, (r, t) in enumerate(zip(requests, tokens)) if r.params.logprobs is not None
                 and t is not None]
        if asked:
            found = logprobs_of(logits[asked], [tokens[i] for i in asked],
                                [requests[i].params.logprobs for i in asked])
            result.logprobs.update((requests[i].request_id, lp) for i, lp in zip(asked, found))
