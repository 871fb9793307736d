"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, per-request seed.

`sample` takes one row of logits per sequence and returns one token per row. A request with a seed
draws from its own generator, so its output does not depend on what else is in the batch.

`SamplingParams` is the one place that decides which parameters are valid (the HTTP server maps its
`InvalidSamplingParams` to a 400 naming the parameter). The sampler does not rely on it: any finite
row of logits gives a token under any positive temperature, and a row that is not finite (a broken
forward pass for that sequence) gives None, so the caller fails that request and not the batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from kvtier.log_limit import LogLimiter

logger = logging.getLogger(__name__)
_failures = LogLimiter(logger)  # per row: one line a minute, whatever the batch rate

# Temperatures below this ask for greedy in all but name; 0 is greedy. OpenAI's own range ends at 2.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
# Stop strings are searched after every token of the request (and held back from streams), so
# their number and length bound work done on the engine's thread for everyone in the batch.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # torch.Generator.manual_seed's range
MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs: each costs a decode per token on the engine thread


class InvalidSamplingParams(ValueError):
    """A parameter out of its range; `param` names it (as the OpenAI field of the same name)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None  # keep the k most likely tokens; None = all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings, not included in the output text
    ignore_eos: bool = False
    # Return each sampled token's log-probability and the `logprobs` most likely tokens' (None: no
    # log-probabilities at all, and no work for them). Of the model's distribution, before
    # temperature, top-k and top-p, as OpenAI's and vLLM's are.
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        t = self.temperature
        _check(_is_number(t) and (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE), "temperature",
               f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t!r}")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "top_k",
               f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p",
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(self.seed is None or (_is_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX), "seed",
               "seed must be an integer that fits in 64 bits, or None")
        _check(isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOP_STRINGS
               and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop), "stop",
               f"stop must be at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} "
               "characters each")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", "ignore_eos must be true or false")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"logprobs must be an integer in [0, {MAX_LOGPROBS}] or None, "
               f"got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities of one finite row after temperature, top-k and top-p (the rest set to zero)."""
    logits = logits.float()
    # Shift the best logit to 0 before dividing: every scaled value is then <= 0 (or -inf), so no
    # temperature, however small, overflows exp, and the best token keeps a probability of 1 before
    # normalising (the sum is >= 1, never 0 or inf).
    logits = (logits - logits.max()) / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly above each token
        # The first token always stays, by position: a top_p below float32's range (1e-300) rounds
        # to 0, `before >= 0` holds for every token, and an all-zero row would make the sum NaN.
        drop = before >= params.top_p
        drop[0] = False
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return probs / probs.sum()


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | None]:
    """One token per row of `logits` ([B, vocab]) under each row's params. A row holding NaN or inf
    gives None: that sequence's forward pass went wrong, and only its request should fail."""
    finite = torch.isfinite(logits).all(dim=-1).tolist()
    out: list[int | None] = []
    for row, p, gen, ok in zip(logits, params, generators, finite, strict=True):
        if not ok:
            out.append(None)
        elif p.greedy:
            out.append(int(torch.argmax(row)))
        else:
            try:
                out.append(int(torch.multinomial(filtered_probs(row, p), 1, generator=gen)))
            except RuntimeError:  # not expected for a finite row; still only this request's failure
                _failures.error("sample", "sampling failed for a row under %s", p, exc_info=True)
                out.append(None)
    return out


@dataclass(frozen=True, slots=True)
class Logprob:
    token_id: int
    logprob: float
    text: str = ""  # the token decoded alone; filled in by the engine, which has the tokenizer


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """A sampled token's log-probability, and the most likely tokens' at its position (best first)."""

    chosen: Logprob
    top: tuple[Logprob, ...] = ()


def logprobs_of(logits: torch.Tensor, tokens: list[int], top_k: list[int]) -> list[TokenLogprobs]:
    """For each row of `logits` ([B, vocab], finite), the log-probability of `tokens[i]` and of the
    `top_k[i]` most likely tokens, under the model's own distribution (no temperature or filtering)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    k = max(top_k, default=0)
    values, ids = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprobs(Logprob(t, c), tuple(Logprob(i, v) for i, v in zip(ids[r][:n], values[r][:n])))
            for r, (t, c, n) in enumerate(zip(tokens, chosen, top_k))]


def generator_for(params: SamplingParams, device: str | torch.device = "cpu") -> torch.Generator | None:
    return None if params.seed is None else torch.Generator(device=device).manual_seed(params.seed)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidSamplingParams(param, message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
