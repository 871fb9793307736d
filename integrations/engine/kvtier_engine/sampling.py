"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seed.

`sample` takes one row of logits per sequence and returns one token per row. A request with a seed
draws from its own generator, so its output does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens; None = all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, not included in the output text
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities of one row after temperature, top-k and top-p (the rest set to zero)."""
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs[before >= params.top_p] = 0.0  # the first token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum()


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of `logits` ([B, vocab]) under each row's params; returns [B] token ids."""
    out = torch.empty(logits.shape[0], dtype=torch.long)
    for i, (row, p, gen) in enumerate(zip(logits, params, generators, strict=True)):
        if p.greedy:
            out[i] = int(torch.argmax(row))
        else:
            out[i] = int(torch.multinomial(filtered_probs(row, p), 1, generator=gen))
    return out


def generator_for(params: SamplingParams, device: str | torch.device = "cpu") -> torch.Generator | None:
    return None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)
