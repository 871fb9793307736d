"""Model runner: runs one scheduler step on the model and the paged cache, and samples.

Where it runs: the worker (here the same process and thread as the scheduler). Per step:

    connector: bind metadata, start_load_kv      (kvtier reads; copies into blocks, maybe layer-wise)
    build the flat batch                         (a request whose load fell short starts earlier:
                                                  the missing tokens are computed in this same step)
    forward, with wait_for_layer_load / save_kv_layer around every layer's attention
    blend the requests planned as blends     (CacheBlend, `blend_step`: whole prompt after the head
                                              in one call; one whose passages or head load fell
                                              short ran in the batch above instead; one whose
                                              blend raised is computed normally right after)
    sample the requests whose last token ran
    connector: wait_for_save, get_finished (final saves gathered, asynchronous loads landed),
               clear metadata

A request whose logits are not finite is reported in `failed` (its KV of this step is not saved);
the others in the batch go on. A blend that raises (a bad passage record, a shape mismatch, anything)
costs only its own request a second forward: it is logged, counted (`blend_failures`) and computed as
a normal prefill from its head in the same step (`not_blended`).

If the step raises (the forward broke: nothing it computed is trusted), the connector still ends
the step, in `finally`: none of the step's KV is saved, final saves go out, leases are released and
no copy into the paged cache is left running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvtier.config import BlendConfig
from kvtier.connector.blend_io import BlendLoad
from kvtier.connector.worker import KvtierWorkerConnector
from kvtier.log_limit import LogLimiter
from kvtier_engine.blend_step import BlendStats, run_blend
from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers.attention import AttentionBackend, BatchMetadata
from kvtier_engine.layers.triton_attention import paged_attention_backend
from kvtier_engine.models.llama import CausalLM
from kvtier_engine.sampling import TokenLogprobs, logprobs_of, sample
from kvtier_engine.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> next token
    recomputed: dict[str, int] = field(default_factory=dict)  # tokens computed because a load fell short
    loaded: dict[str, int] = field(default_factory=dict)  # request id -> token its kvtier load reached
    async_loaded: dict[str, int] = field(default_factory=dict)  # the same, for asynchronous loads landed
    finished_sending: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)  # requests whose logits could not be sampled
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)  # for requests that asked
    blended: dict[str, BlendStats] = field(default_factory=dict)  # requests whose prompt was blended
    not_blended: set[str] = field(default_factory=set)  # planned as a blend, computed normally
    blend_failures: int = 0  # of those, blends that raised (`_fall_back`)


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
    def __init__(self, model: CausalLM, cache: PagedKVCache, connector: KvtierWorkerConnector | None = None,
                 blend: BlendConfig | None = None):
        self.model = model
        self.blend = blend
        self.cache = cache
        self.connector = connector
        self.device = cache.kv.device
        self.blend_failures = 0  # blends that raised, their requests computed normally (`_fall_back`)
        self._log = LogLimiter(logger)  # a broken passage record can fail every request that uses it
        if connector is not None:
            connector.register_kv_caches(cache)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        result = RunnerOutput()
        worker = self.connector if out.connector_meta is not None else None
        if worker is None:
            if out.scheduled:
                self._run(out.scheduled, [s.num_computed for s in out.scheduled], result)
            return result
        worker.bind_connector_metadata(out.connector_meta)
        ran = False
        try:
            worker.start_load_kv()
            loaded = result.loaded = worker.get_loaded_tokens()
            blends = self._blends(out, worker, result)
            batch = [s for s in out.scheduled if s.request.request_id not in blends]
            if batch:
                starts = []
                for s in batch:
                    reached = loaded.get(s.request.request_id, s.num_computed)
                    if reached < s.num_computed:
                        result.recomputed[s.request.request_id] = s.num_computed - reached
                    starts.append(min(reached, s.num_computed))
                self._run(batch, starts, result)
            if blends:
                self._run_blends([s for s in out.scheduled if s.request.request_id in blends], blends, result)
            ran = True
        finally:
            worker.wait_for_save(result.failed if ran else {s.request.request_id for s in out.scheduled})
            if ran:  # else the finished saves and loads stay with the worker until the next step asks
                result.finished_sending, _ = worker.get_finished()
                result.async_loaded = worker.get_async_loaded()
            worker.clear_connector_metadata()
        return result

    def wait_for_async_loads(self, timeout: float) -> bool:
        """Block (at most `timeout` s) until an asynchronous kvtier load has landed; for a step with
        nothing to run while requests wait for their KV. False at once without a connector."""
        return self.connector.wait_for_async_loads(timeout) if self.connector is not None else False

    def _blends(self, out: SchedulerOutput, worker: KvtierWorkerConnector,
                result: RunnerOutput) -> dict[str, BlendLoad]:
        """The step's planned blends that can run: passages all read and the head load complete.
        The others are computed in the normal batch (`result.not_blended`)."""
        planned = {spec.request_id for spec in out.connector_meta.blend_loads}
        if not planned:
            return {}
        got = worker.get_blend_loads() if self.blend is not None else {}
        blends = {s.request.request_id: got[s.request.request_id] for s in out.scheduled
                  if s.request.request_id in got and s.completes_sequence
                  and result.loaded.get(s.request.request_id, s.num_computed) >= s.num_computed}
        result.not_blended = planned - set(blends)
        return blends

    @torch.inference_mode()
    def _run_blends(self, scheduled: list[ScheduledRequest], loads: dict[str, BlendLoad],
                    result: RunnerOutput) -> None:
        for layer in range(self.cache.num_layers):  # each head's (layer-wise) load is in its blocks
            self.connector.wait_for_layer_load(layer)
        blended, logits, failed = [], [], []
        for s in scheduled:
            request_id = s.request.request_id
            try:
                last, stats = run_blend(self.model, self.cache, s, loads[request_id], self.blend)
            except Exception:
                self._log.error("blend", "request %s: blending failed; computing its prompt normally",
                                request_id, exc_info=True)
                failed.append(s)
                continue
            result.blended[request_id] = stats
            blended.append(s.request)
            logits.append(last)
        if blended:
            self._sample(blended, torch.stack(logits).cpu(), result)
        if failed:
            self._fall_back(failed, result)

    def _fall_back(self, failed: list[ScheduledRequest], result: RunnerOutput) -> None:
        """Compute blends that raised as a normal prefill from their head, in this step. What a failed
        blend may have written into its blocks past the head is never read: every layer writes the
        rows it computes into the cache before its attention reads them. Its KV is exact again, so
        `not_blended` has the connector save it as usual."""
        self.blend_failures += len(failed)
        result.blend_failures += len(failed)
        result.not_blended.update(s.request.request_id for s in failed)
        self._run(failed, [s.num_computed for s in failed], result)

    @torch.inference_mode()
    def _run(self, scheduled: list[ScheduledRequest], starts: list[int], result: RunnerOutput) -> None:
        ends = [s.num_computed + s.num_new for s in scheduled]
        ids = [t for s, a, b in zip(scheduled, starts, ends) for t in s.request.token_ids[a:b]]
        meta = BatchMetadata.build([s.block_ids for s in scheduled], starts,
                                   [b - a for a, b in zip(starts, ends)], self.cache.block_size, self.device)
        backend: AttentionBackend = paged_attention_backend(self.cache, meta, self.model.config)
        if self.connector is not None:
            backend = _ConnectorHooks(backend, self.connector)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(input_ids, meta.positions, backend)
        done = [i for i, s in enumerate(scheduled) if s.completes_sequence]
        if not done:
            return
        rows = torch.tensor([meta.query_starts[i + 1] - 1 for i in done], device=self.device)
        logits = self.model.logits(hidden.index_select(0, rows)).cpu()
        self._sample([scheduled[i].request for i in done], logits, result)

    def _sample(self, requests: list, logits: torch.Tensor, result: RunnerOutput) -> None:
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
