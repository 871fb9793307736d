"""LLMEngine: requests in, tokens out, one step at a time; kvtier plugged in through its connector.

    engine = LLMEngine(EngineOptions(model="random:llama-small", kvtier_config="configs/cpu_disk.yaml"))
    engine.add_request("Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step(): ...            # RequestOutput per request that moved

A step reads in one sitting: schedule -> run the model (loads, forward, saves) -> append tokens,
detect stops, retire finished requests. A request whose kvtier load is asynchronous (`loads:` in the
kvtier config) waits for its KV outside the batch while the others step; a step with nothing to run
but such requests waits (bounded) for a load to land instead of spinning. `step_log` records each
step (`StepRecord`). Not thread-safe: one thread drives an engine (the server
runs it on a thread of its own and talks to it through queues); `prometheus_text` alone may be
called from any thread.

Failures, narrowest first. A request whose logits are not finite, or whose token cannot be decoded,
finishes with `finish_reason` "error"; the rest of the batch goes on. A forward that raises fails
every request of that step's batch: they finish with "error" and `step` raises `StepFailed` naming
them; requests outside the batch go on. Anything else `step` raises leaves the engine's state
unknown: the caller should abort everything (`has_requests` then says whether that worked).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch

from kvtier import CacheEngine, KVLayout, load_config
from kvtier.config import KvtierConfig
from kvtier.connector import KvtierSchedulerConnector, KvtierWorkerConnector
from kvtier.connector.blend_plan import BlendPlanner
from kvtier.log_limit import LogLimiter
from kvtier.platforms import current_platform
from kvtier_engine.blend_step import prepare_blend, record_blend
from kvtier_engine.block_pool import BlockPool
from kvtier_engine.detokenize import append_token, stream_delta
from kvtier_engine.disagg import KV_ROLES, Disaggregation, check_role
from kvtier_engine.engine_metrics import STEP_LOG, EngineMetrics, StepRecord
from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers.rotary import inverse_frequencies
from kvtier_engine.model_runner import ModelRunner
from kvtier_engine.models.loader import load_model, model_identity
from kvtier_engine.request import Request, RequestMetrics, RequestStatus
from kvtier_engine.sampling import Logprob, SamplingParams, TokenLogprobs, generator_for
from kvtier_engine.scheduler import Scheduler
from kvtier_engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

ASYNC_WAIT_S = 0.05  # a step with nothing to run waits at most this long for a kvtier load to land
CLOSE_WAIT_S = 30.0  # close waits at most this long for a prefetch read in flight
__all__ = ["KV_ROLES", "EngineOptions", "LLMEngine", "RequestOutput", "StepFailed"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class EngineOptions:
    model: str
    kvtier_config: str | KvtierConfig | None = None  # None: no kvtier (the baseline)
    device: str = "auto"  # kvtier's platform's (kvtier.platforms): cuda when present, else cpu
    dtype: str = "auto"  # bfloat16 on cuda, float32 on cpu
    seed: int = 0  # random presets' weights
    kv_cache_bytes: int = 1 << 30  # the paged cache
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True  # the device prefix cache (independent of kvtier)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    kv_role: str = "both"  # disaggregated prefill (KV_ROLES): kvtier_engine.disagg
    kv_peers: tuple[str, ...] = ()  # P2P URLs of prefill instances a decode may load from


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    new_text: str = ""  # text since this request's previous output (streaming)
    new_token_ids: tuple[int, ...] = ()
    # Only when the request's params ask for `logprobs`: one per generated token, and those new.
    logprobs: tuple[TokenLogprobs, ...] = ()
    new_logprobs: tuple[TokenLogprobs, ...] = ()
    # A prefill's last output: what a decode instance needs to load its KV (kvtier_engine.disagg).
    kv_transfer_params: dict | None = None


class StepFailed(RuntimeError):
    """A step's forward pass failed; `request_ids` (its batch) have finished with "error"."""

    def __init__(self, request_ids: list[str]):
        super().__init__(f"the forward pass failed for a batch of {len(request_ids)} requests")
        self.request_ids = request_ids


class LLMEngine:
    def __init__(self, options: EngineOptions):
        self.options = options
        self._log = LogLimiter(logger)  # a broken model fails every request: one line a minute
        kv_config = None
        if options.kvtier_config is not None:
            kv_config = options.kvtier_config if isinstance(options.kvtier_config, KvtierConfig) \
                else load_config(options.kvtier_config)
        check_role(options.kv_role, kv_config)  # before the model loads: a wrong setup fails at once
        # auto: the device of kvtier's platform (kvtier.platforms: cuda with a GPU, a plugin's, or cpu).
        device = torch.device(options.device if options.device != "auto" else current_platform().device_type)
        dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if options.dtype == "auto" \
            else _dtype(options.dtype)
        self.model = load_model(options.model, dtype, device, options.seed)
        config = self.model.config
        self.model_name = options.model
        self.tokenizer = load_tokenizer(options.model)
        self.max_model_len = options.max_model_len or config.max_position_embeddings
        block_bytes = 2 * config.num_layers * options.block_size * config.num_kv_heads * config.head_dim \
            * dtype.itemsize
        num_blocks = options.kv_cache_bytes // block_bytes
        self.cache = PagedKVCache(config, num_blocks, options.block_size, dtype, device)
        self.kvtier: CacheEngine | None = None
        scheduler_side = worker_side = blend = None
        if kv_config is not None:
            blend = kv_config.blend
            scheduler_side, worker_side = self._connectors(kv_config, dtype)
        self.connector = worker_side
        self.disagg = Disaggregation(options.kv_role, options.kv_peers, self.kvtier)
        if worker_side is not None:
            worker_side.on_stored = self.disagg.stored
        pool = BlockPool(num_blocks, options.block_size, options.enable_prefix_caching)
        self.scheduler = Scheduler(pool, options.max_num_seqs, options.max_num_batched_tokens, scheduler_side)
        self.runner = ModelRunner(self.model, self.cache, worker_side, blend)
        self.metrics = EngineMetrics()
        self.step_log: deque[StepRecord] = deque(maxlen=STEP_LOG)
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        logger.info("engine: %s on %s (%s), %d KV blocks of %d tokens, kvtier %s", options.model, device,
                    dtype, num_blocks, options.block_size, "on" if self.kvtier else "off")

    def _connectors(self, kv_config: KvtierConfig, dtype: torch.dtype
                    ) -> tuple[KvtierSchedulerConnector, KvtierWorkerConnector]:
        """kvtier's CacheEngine (`self.kvtier`) and the connector's two sides, blending if configured."""
        config, options, blend = self.model.config, self.options, kv_config.blend
        # Checked before kvtier starts: a model that cannot blend refuses to start, holding nothing.
        separator = prepare_blend(self.model, self.tokenizer, blend) if blend is not None else None
        layout = KVLayout(config.num_layers, config.num_kv_heads, config.head_dim, dtype, options.block_size)
        self.kvtier = CacheEngine(kv_config, layout, model_identity(options.model, options.seed))
        planner = BlendPlanner(self.kvtier, blend, separator) if blend is not None else None
        worker_side = KvtierWorkerConnector(self.kvtier, loads=kv_config.loads)
        if blend is not None:
            worker_side.enable_blend(inverse_frequencies(config))
        scheduler_side = KvtierSchedulerConnector(self.kvtier, options.block_size, planner, kv_config.loads)
        return scheduler_side, worker_side

    # -- requests ------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, kv_transfer_params: dict | None = None) -> str:
        """Queue a request; its id. ValueError for a prompt, id or `kv_transfer_params` (disaggregated
        prefill: kvtier_engine.disagg) this engine cannot take."""
        params = params or SamplingParams()
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        # The length first: a prompt far over the context is refused without a pass over its ids.
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the "
                             f"{self.max_model_len}-token context")
        ids = [int(t) for t in ids]
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        # A retired request can still hold its blocks (its load lands, or its final save is gathered).
        if request_id in self._requests or self.scheduler.pool.holds(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        transfer = self.disagg.admit(ids, kv_transfer_params)
        request = Request(request_id, ids, params, generator_for(params), text, kv_transfer_params=transfer)
        self.scheduler.add(request)
        self._requests[request_id] = request
        return request_id

    def abort(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is not None:
            self._retire(request, RequestStatus.FINISHED_ABORTED)
        self.disagg.drop(request_id)

    def has_unfinished(self) -> bool:
        """Whether `step` has work: requests to run, finished ones whose final save is due, or a
        prefill's last outputs waiting for their KV to be stored."""
        return self.scheduler.has_work() or self.disagg.waiting

    def has_requests(self) -> bool:
        """Whether any request has not finished (a finished one waiting for its save does not count)."""
        return bool(self._requests)

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        try:
            result = self.runner.execute(plan)
        except Exception as exc:
            failed = [s.request for s in plan.scheduled]
            for request in failed:
                self._retire(request, RequestStatus.FINISHED_ERROR)
            raise StepFailed([r.request_id for r in failed]) from exc
        self.scheduler.update(plan, result.recomputed, result.finished_sending, result.loaded,
                              result.not_blended, {r: b.tokens_recomputed for r, b in result.blended.items()},
                              result.async_loaded)
        for request_id, stats in result.blended.items():
            record_blend(self._requests[request_id], stats, self.kvtier.metrics)
        if result.blend_failures:
            self.kvtier.metrics.inc("blend_failures", result.blend_failures)
        self.metrics.steps.inc()
        outputs = []
        for s in plan.scheduled:
            request = s.request
            if request.request_id in result.failed:
                self._log.error("logits", "request %s: its logits are not finite; failing it",
                                request.request_id)
                self._retire(request, RequestStatus.FINISHED_ERROR)
                outputs.append(_output(request, ()))
                continue
            token = result.sampled.get(request.request_id)
            if token is not None:
                outputs.append(self._append(request, token, result.logprobs.get(request.request_id)))
        self.step_log.append(StepRecord(plan.step, tuple(s.request.request_id for s in plan.scheduled),
                                        plan.num_tokens, len(self.scheduler.loading),
                                        time.perf_counter() - started))
        if not plan.scheduled and self.scheduler.loading and not result.async_loaded:
            self.runner.wait_for_async_loads(ASYNC_WAIT_S)  # nothing to run until a load lands
        if not self.disagg.waiting and not any(o.kv_transfer_params for o in outputs):
            if self.connector is not None:
                self.connector.pop_kv_stored()  # (sent by the serving loop's sink already: forget them)
            return outputs
        outputs = self.disagg.hold_back(outputs)
        if not self.scheduler.has_work():  # nothing else to do until a prefill's KV is stored
            self.connector.wait_for_kv_stored(ASYNC_WAIT_S)
        return outputs + self.disagg.ready(self.connector.pop_kv_stored())

    def _append(self, request: Request, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput:
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = time.perf_counter()
        if logprobs is not None:
            logprobs = self._with_text(logprobs)
            request.output_logprobs.append(logprobs)
        try:
            status = append_token(request, token, self.tokenizer, self.max_model_len)
        except Exception:  # e.g. a token the tokenizer cannot decode: this request's failure only
            self._log.error("append", "request %s: token %d could not be added; failing it",
                            request.request_id, token, exc_info=True)
            status = RequestStatus.FINISHED_ERROR
        if status is not None:
            self._retire(request, status)
        return _output(request, (token,), () if logprobs is None else (logprobs,))

    def _with_text(self, logprobs: TokenLogprobs) -> TokenLogprobs:
        def named(lp: Logprob) -> Logprob:
            return Logprob(lp.token_id, lp.logprob, self.tokenizer.decode([lp.token_id]))

        return TokenLogprobs(named(logprobs.chosen), tuple(named(lp) for lp in logprobs.top))

    def _retire(self, request: Request, status: RequestStatus) -> None:
        if not request.status.finished:
            self.scheduler.finish(request, status)
            self.metrics.finished(request)
        self._requests.pop(request.request_id, None)

    # -- kvtier and metrics --------------------------------------------------------------------

    def wait_for_saves(self, timeout: float | None = None) -> bool:
        """Block until the KV saved so far is in kvtier (a later request will find it)."""
        return self.connector.drain(timeout) if self.connector is not None else True

    def prometheus_text(self) -> str:
        # Gauges are read at scrape time, not set by steps: right before the first step, and after
        # an abort that left the engine idle (no step follows). Plain len() reads, safe from any thread.
        scheduler = self.scheduler
        self.metrics.observe(len(scheduler.running), len(scheduler.waiting) + len(scheduler.ready),
                             scheduler.pool.num_free, len(scheduler.loading))
        text = self.metrics.prometheus_text()
        return text + (self.kvtier.prometheus_text() if self.kvtier is not None else "")

    def close(self) -> None:
        # Its prefetcher and background lookups: queued ones dropped; a read or lookup stuck in a tier
        # without a timeout (a local disk) must not hold close forever: the threads are daemons, left
        # to finish on their own.
        if self.scheduler.connector is not None and not self.scheduler.connector.close(CLOSE_WAIT_S):
            logger.warning("kvtier's prefetch or lookup thread did not stop within %g s; not waiting for it",
                           CLOSE_WAIT_S)
        if self.connector is not None:
            self.connector.close()
        if self.kvtier is not None:
            self.kvtier.close()


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {name!r}")
    return _DTYPES[name]


def _output(request: Request, new_tokens: tuple[int, ...],
            new_logprobs: tuple[TokenLogprobs, ...] = ()) -> RequestOutput:
    status = request.status
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, request.output_text,
                         request.output_token_ids, status.finished,
                         status.value if status.finished else None, request.metrics, stream_delta(request),
                         new_tokens, tuple(request.output_logprobs), new_logprobs,
                         request.transfer_reply if status.finished else None)
