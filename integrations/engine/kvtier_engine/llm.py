"""Offline batch generation: `LLM(model=..., kvtier_config=...).generate(prompts, params)`.

    from kvtier_engine import LLM, SamplingParams
    llm = LLM(model="random:llama-small", kvtier_config="configs/cpu_disk.yaml")
    for out in llm.generate(["a prompt", "another"], SamplingParams(max_tokens=16, temperature=0)):
        print(out.text, out.metrics.ttft_s, out.metrics.prefill_tokens_computed, out.metrics.tokens_loaded)

`generate` returns once every request has finished and its KV has been handed to kvtier and stored,
so a following `generate` (or another process reading the same disk tier) finds it.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier_engine.llm_engine import EngineOptions, LLMEngine, RequestOutput
from kvtier_engine.progress import request_progress
from kvtier_engine.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str, kvtier_config=None, **options):
        self.engine = LLMEngine(EngineOptions(model=model, kvtier_config=kvtier_config, **options))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. A list of ints is one tokenised prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        done: dict[str, RequestOutput] = {}
        with request_progress(len(ids), enabled=use_tqdm) as progress:
            # Also until no finished request holds blocks: its final save is gathered a step later.
            while len(done) < len(ids) or self.engine.scheduler.held:
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        progress.advance()
        self.engine.wait_for_saves()
        return [done[i] for i in ids]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
