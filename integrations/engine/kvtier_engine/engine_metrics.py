"""The engine's own Prometheus metrics (requests, tokens, latency, the KV cache's use of kvtier).

One `CollectorRegistry` per engine, like kvtier's: two engines in one process never mix numbers.
Counters move once per finished request and once per step, never per token; the gauges are set
when scraped (`observe`). `StepRecord`s, one per step in a bounded ring (`LLMEngine.step_log`), say
which requests each step ran and for how long: what a request waiting for its KV let the others do.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvtier_engine.request import Request

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_LOG = 4096  # steps kept in `LLMEngine.step_log`


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step: its number, the requests it ran (ids, in batch order) and their tokens, the
    requests waiting for their KV meanwhile, and how long the step took (schedule, model, outputs)."""

    step: int
    request_ids: tuple[str, ...]
    num_tokens: int
    num_loading: int
    duration_s: float

    @property
    def num_running(self) -> int:
        return len(self.request_ids)


class EngineMetrics:
    def __init__(self) -> None:
        reg = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("kvtier_engine_requests", "finished requests", ["finish_reason"],
                                registry=reg)
        self.prompt_tokens = Counter("kvtier_engine_prompt_tokens", "prompt tokens of finished requests",
                                     registry=reg)
        self.generation_tokens = Counter("kvtier_engine_generation_tokens", "tokens generated", registry=reg)
        self.prefill_computed = Counter("kvtier_engine_prefill_tokens_computed",
                                        "prompt tokens run through every layer of the model (a "
                                        "blend's reused rows are not)", registry=reg)
        self.device_cached = Counter("kvtier_engine_prefix_cache_tokens",
                                     "prompt tokens found in the device prefix cache", registry=reg)
        self.loaded = Counter("kvtier_engine_kvtier_loaded_tokens", "prompt tokens loaded from kvtier",
                              registry=reg)
        self.preemptions = Counter("kvtier_engine_preemptions", "requests preempted", registry=reg)
        self.steps = Counter("kvtier_engine_steps", "scheduler steps run", registry=reg)
        self.ttft = Histogram("kvtier_engine_time_to_first_token_seconds", "time to first token",
                              buckets=TTFT_BUCKETS, registry=reg)
        self.e2e = Histogram("kvtier_engine_request_latency_seconds", "arrival to finish",
                             buckets=TTFT_BUCKETS, registry=reg)
        self.running = Gauge("kvtier_engine_running_requests", "requests in the running batch", registry=reg)
        self.waiting = Gauge("kvtier_engine_waiting_requests", "requests queued", registry=reg)
        self.loading = Gauge("kvtier_engine_waiting_for_kv_requests",
                             "requests waiting for an asynchronous kvtier load", registry=reg)
        self.free_blocks = Gauge("kvtier_engine_free_kv_blocks", "free paged-cache blocks", registry=reg)

    def finished(self, request: Request) -> None:
        m = request.metrics
        self.requests.labels(finish_reason=request.status.value).inc()
        self.prompt_tokens.inc(request.num_prompt_tokens)
        self.generation_tokens.inc(request.num_output_tokens)
        self.prefill_computed.inc(m.prefill_tokens_computed)
        self.device_cached.inc(m.tokens_cached_on_device)
        self.loaded.inc(m.tokens_loaded)
        self.preemptions.inc(m.num_preemptions)
        if m.ttft_s is not None:
            self.ttft.observe(m.ttft_s)
        if m.e2e_s is not None:
            self.e2e.observe(m.e2e_s)

    def observe(self, running: int, waiting: int, free_blocks: int, loading: int = 0) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.loading.set(loading)
        self.free_blocks.set(free_blocks)

    def prometheus_text(self) -> str:
        return generate_latest(self.registry).decode()
