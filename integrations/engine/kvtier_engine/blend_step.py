"""CacheBlend in the engine: the start-up checks, and one blended request's prefill in a step.

Where it runs: `prepare_blend` once in `LLMEngine.__init__` (before kvtier starts); `run_blend` in
the model runner (worker side), on the forward pass's thread, after the step's normal batch.
Not thread-safe beyond the model and the paged cache it uses.

A blended request computes its whole prompt after the head in this one step:

    rows 0..head-1      from its paged blocks (device prefix cache + kvtier's prefix load): exact
    passage rows        the connector's `BlendLoad` (segment chunks moved to where they now sit)
    every other row     no cached KV (separators, short passages, the suffix): recomputed

`kvtier_engine.blend.blend_prefill` merges them; the merged K/V of rows head.. go into the
request's blocks, and its next token is sampled from `last_logits`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kvtier.blend import selection
from kvtier.blend.rope_shift import UnshiftableRope, check_shiftable
from kvtier.config import BlendConfig
from kvtier.connector.blend_io import BlendLoad
from kvtier.metrics import Metrics
from kvtier_engine.blend import BlendInput, BlendSelfTestFailed, Selector, blend_prefill, self_test
from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.models.llama import CausalLM
from kvtier_engine.request import Request
from kvtier_engine.scheduler import ScheduledRequest
from kvtier_engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class BlendUnavailable(ValueError):
    """`blend:` is configured but cannot work for this model; the engine refuses to start."""


@dataclass(frozen=True, slots=True)
class BlendStats:
    """One blended request: passages loaded, rows after the head that kept their loaded KV, rows
    after the head computed through every layer (the two add up to the prompt after the head).
    Layers 0..check_layer-1 still see every row, reused ones included; `tokens_recomputed` is what
    the request's `prefill_tokens_computed` counts for this step."""

    segments_hit: int
    tokens_reused: int
    tokens_recomputed: int


def prepare_blend(model: CausalLM, tokenizer: Tokenizer, config: BlendConfig) -> list[int]:
    """The separator ids, after checking that blending works for `model` (BlendUnavailable naming
    `blend` otherwise): its RoPE can be shifted, check_layer is inside it, the self-test passes."""
    try:
        check_shiftable(model.config.rope_scaling)
    except UnshiftableRope as exc:
        raise BlendUnavailable(f"kvtier `blend:` is configured, but this model cannot blend: {exc}") from exc
    layers = model.config.num_layers
    if config.check_layer >= layers:
        raise BlendUnavailable(f"kvtier `blend.check_layer` is {config.check_layer}; the model has {layers} "
                               f"layers (it must be 1..{layers - 1})")
    if config.separator_ids is not None:
        ids = list(config.separator_ids)
    else:
        ids = _encode_alone(tokenizer, config.separator)
    if not ids:
        raise BlendUnavailable(f"kvtier `blend.separator` {config.separator!r} tokenises to no ids")
    vocab = model.config.vocab_size
    if outside := [t for t in ids if not 0 <= t < vocab]:  # no prompt could ever hold the separator
        raise BlendUnavailable(f"kvtier `blend.separator_ids` {outside} are outside the model's "
                               f"{vocab}-token vocabulary: no prompt can hold the separator")
    try:
        self_test(model, config.check_layer)  # its tolerance follows the model's dtype
    except BlendSelfTestFailed as exc:
        raise BlendUnavailable(f"kvtier `blend:` self-test failed for this model: {exc}") from exc
    logger.info("blend: separator ids %s, ratio %g, check layer %d, passages of %d+ tokens", ids,
                config.ratio, config.check_layer, config.min_tokens)
    return ids


def _encode_alone(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text` tokenised alone, without the BOS some tokenizers add to every encode."""
    ids = list(tokenizer.encode(text))
    bos, bos_text = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if ids and bos is not None and ids[0] == bos and not (bos_text and text.startswith(bos_text)):
        ids = ids[1:]
    return ids


def run_blend(model: CausalLM, cache: PagedKVCache, s: ScheduledRequest, load: BlendLoad,
              config: BlendConfig) -> tuple[torch.Tensor, BlendStats]:
    """Blend request `s` (its rows `s.num_computed`.. in this step; the rows before are in its
    blocks): writes the merged K/V into its blocks; returns its last logits [vocab] and the stats.
    `config.ratio` is of the cached rows after the head (`select_after`)."""
    tokens, head = s.request.token_ids, s.num_computed
    device, c = cache.kv.device, model.config
    kv = load.kv.to(device, cache.kv.dtype)
    cached = load.cached.clone()
    if head:
        kv[:, :, :head] = cache.gather(s.block_ids, head)
        cached[:head] = True
    shape = (c.num_layers, len(tokens), c.num_kv_heads, c.head_dim)
    out = blend_prefill(model, BlendInput(torch.tensor(tokens, dtype=torch.long, device=device),
                                          kv[0].reshape(shape), kv[1].reshape(shape), cached.to(device),
                                          config.ratio, config.check_layer, select_after(head)))
    merged = out.kv.flatten(3)[:, :, head:]  # [2, L, T - head, H*D], no copy
    cache.scatter(list(s.block_ids[head // cache.block_size:]), merged)
    # Prompt rows only: a preempted request blends its generated tokens too (as its suffix).
    prompt = s.request.num_prompt_tokens
    recomputed = int(((out.selected >= head) & (out.selected < prompt)).sum())
    return out.last_logits, BlendStats(load.segments_hit, max(0, prompt - head) - recomputed, recomputed)


def select_after(head: int) -> Selector:
    """`select_rows` over the rows after the head only. The head's rows are exact (the request's own
    blocks) and marked cached, so over the whole prompt they would count toward `ratio` (a long head
    inflating the passages' recompute) and their near-zero deviation could never earn them a place."""
    def select(new: torch.Tensor, loaded: torch.Tensor, cached: torch.Tensor, ratio: float) -> torch.Tensor:
        return selection.select_rows(new[head:], loaded[head:], cached[head:], ratio) + head
    return select


def record_blend(request: Request, stats: BlendStats, metrics: Metrics | None) -> None:
    """The stats on the request's metrics (its RequestOutput) and kvtier's engine counters."""
    m = request.metrics
    m.blend_segments_hit += stats.segments_hit
    m.blend_tokens_reused += stats.tokens_reused
    m.blend_tokens_recomputed += stats.tokens_recomputed
    if metrics is not None:
        metrics.inc("blend_requests", 1)
        metrics.inc("blend_segments_hit", stats.segments_hit)
        metrics.inc("blend_tokens_reused", stats.tokens_reused)
        metrics.inc("blend_tokens_recomputed", stats.tokens_recomputed)
