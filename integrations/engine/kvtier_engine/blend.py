"""CacheBlend prefill: one sequence whose K/V were partly loaded from cache, with selective recompute.

Where it runs: the model runner (worker side), on the model's device, one sequence per call; pure
compute, no I/O, no locks. The caller owns every tensor; `blend_prefill` modifies none of its inputs
and returns new merged K/V. Not thread-safe beyond what the model itself is (it runs the model).

What it computes, for prompt rows 0..T-1 (row = true position):

    layers 0..c-1    every row recomputed (a full causal prefill of those layers; their K/V replace
                     the loaded ones)
    layer c          K of every row from the full hidden states; rows S = select(K_new, K_loaded,
                     cached, ratio) + every uncached row + the last row   (c = check_layer; V, or
                     K and V together, where `BlendInput.deviation` says so)
    layers c..L-1    only rows S carried: each layer computes q/k/v for S, writes their K/V over
                     the loaded ones, and S attends over the merged K/V by TRUE positions

The mask is by true positions (`causal_attention_at`): a recomputed row at position p sees keys
0..p (within the layer's sliding window), never a later one. The reference implementations align
the causal mask bottom-right for the selected queries, which lets an early selected row see almost
the whole prompt. Ratio 1.0 is a full prefill (S = every row); ratio 0 recomputes only the uncached
rows and the last one, trusting the loaded K/V for the rest.

The layers are the model's own (`DecoderLayer.forward`, `DecoderLayer.keys`): the blend only brings
an attention backend (`_MergedKV`) that writes the carried rows into the merged K/V and attends by
position, so blend and the normal forward share every projection, norm, rotary and MLP.

`self_test` checks at start-up that ratio 1.0 reproduces a full prefill for the loaded model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier.blend import selection
from kvtier_engine.layers.attention import ContiguousKVCache, causal_attention, causal_attention_at
from kvtier_engine.model_config import ModelConfig
from kvtier_engine.models.llama import CausalLM

logger = logging.getLogger(__name__)

# (k_new [T, Hkv, D], k_loaded [T, Hkv, D], cached bool [T], ratio) -> row indices [S]
Selector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

DEVIATIONS = ("k", "v", "kv")  # what the check layer may score (BlendInput.deviation)
SELF_TEST_TOKENS = 48
SELF_TEST_ATOL = 1e-4  # fp32 models: an absolute bound on every compared value
# 16-bit models: blend and full prefill round differently (their matmuls split the work differently),
# so the bound is this many units in the last place of the model's dtype at the compared tensor's
# largest magnitude: 8 ulp is ~0.06 on a bf16 logit of 2..4 and ~0.008 on an fp16 one (llama-small
# fp16 on a CPU: 5e-4 apart). A blend that recomputes the wrong rows is off by the values' own size.
SELF_TEST_ULPS_16BIT = 8


class BlendSelfTestFailed(RuntimeError):
    """Ratio 1.0 did not reproduce a full prefill for this model: blending would serve wrong logits."""


@dataclass(frozen=True, slots=True)
class BlendInput:
    """One sequence. `loaded_k` is post-RoPE at the tokens' true positions 0..T-1 (a segment's record
    shifted to where it now sits); rows whose `cached` is False hold anything and are recomputed."""

    token_ids: torch.Tensor  # [T] long
    loaded_k: torch.Tensor  # [L, T, Hkv, D]
    loaded_v: torch.Tensor  # [L, T, Hkv, D]
    cached: torch.Tensor  # [T] bool: True where loaded_k/v hold this token's cached KV
    ratio: float  # share of cached rows recomputed from check_layer on, in [0, 1]
    check_layer: int  # 1..L-1: the layer whose K deviation picks the rows
    select: Selector = selection.select_rows
    # What `select` scores at the check layer: "k" (CacheBlend's K deviation), "v" (V's), or "kv"
    # (both, each relative to its scale: `selection.joint_kv`); the selector gets (new, loaded) of it.
    deviation: str = "k"


@dataclass(frozen=True, slots=True)
class BlendOutput:
    k: torch.Tensor  # [L, T, Hkv, D] merged K to keep for decoding (loaded rows + recomputed rows)
    v: torch.Tensor  # [L, T, Hkv, D]
    last_logits: torch.Tensor  # [vocab] float32: the next-token logits after the prompt
    selected: torch.Tensor  # [S] long, ascending: rows recomputed in layers check_layer..L-1
    recomputed: int  # len(selected); every row is recomputed in layers 0..check_layer-1
    kv: torch.Tensor  # [2, L, T, Hkv, D]: `k` and `v` are its two halves (views, not copies)


class _MergedKV:
    """Attention backend over one sequence's merged K/V: the rows a forward call carries (`rows`, at
    those positions; None: every row 0..T-1) write their K/V over the loaded ones, then attend."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, config: ModelConfig):
        self.k, self.v, self.config = k, v, config
        self.rows: torch.Tensor | None = None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        window = self.config.window(layer)
        if self.rows is None:  # a full prefill of this layer, as ContiguousKVCache computes it
            self.k[layer], self.v[layer] = k, v
            return causal_attention(q, self.k[layer], self.v[layer], 0, window)
        self.k[layer].index_copy_(0, self.rows, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, self.rows, v.to(self.v.dtype))
        return causal_attention_at(q, self.k[layer], self.v[layer], self.rows, window)

    def advance(self, num_tokens: int) -> None:
        """Nothing to do: a blend is one call; decoding continues in the runner's own cache."""


@torch.no_grad()
def blend_prefill(model: CausalLM, inp: BlendInput) -> BlendOutput:
    """Prefill one sequence from partly loaded K/V (the module docstring has the method). ValueError
    for a check_layer outside 1..L-1, shapes that do not match the model, or rows out of range."""
    _check(model.config, inp)
    decoder, t = model.model, inp.token_ids.shape[0]
    device = inp.token_ids.device
    # The merged K/V, one tensor [2, L, T, Hkv, D] (one copy of the loaded KV; the caller's stays as
    # it is), so that a caller scattering K and V together needs no second copy (`BlendOutput.kv`).
    kv = torch.empty((2, *inp.loaded_k.shape), dtype=inp.loaded_k.dtype, device=device)
    kv[0].copy_(inp.loaded_k)
    kv[1].copy_(inp.loaded_v)
    merged = _MergedKV(kv[0], kv[1], model.config)
    x = decoder.embed_tokens(inp.token_ids)
    cos, sin = decoder.rotary(torch.arange(t, device=device))
    for layer in decoder.layers[:inp.check_layer]:
        x = layer(x, cos, sin, merged)
    cached = inp.cached.to(device)
    new, loaded = _scored(decoder.layers[inp.check_layer], x, cos, sin, merged, inp, cached)
    chosen = inp.select(new, loaded, cached, inp.ratio)
    rows = _rows_to_recompute(chosen, cached, t)
    merged.rows = rows
    x, cos, sin = x[rows], cos[rows], sin[rows]
    for layer in decoder.layers[inp.check_layer:]:
        x = layer(x, cos, sin, merged)
    last_logits = model.logits(decoder.norm(x[-1:]))[0]  # rows ascend and end with the last row
    return BlendOutput(merged.k, merged.v, last_logits, rows, len(rows), kv)


def _scored(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, merged: _MergedKV,
            inp: BlendInput, cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(recomputed, loaded) at the check layer, of what `inp.deviation` names; `merged` still holds
    the loaded K/V there."""
    c = inp.check_layer
    if inp.deviation == "k":
        return layer.keys(x, cos, sin), merged.k[c]
    k_new, v_new = layer.keys_values(x, cos, sin)
    if inp.deviation == "v":
        return v_new, merged.v[c]
    return selection.joint_kv(k_new, merged.k[c], v_new, merged.v[c], cached)


def _rows_to_recompute(chosen: torch.Tensor, cached: torch.Tensor, t: int) -> torch.Tensor:
    """The selector's rows plus every uncached row and the last row, ascending and unique."""
    chosen = chosen.to(device=cached.device, dtype=torch.long).flatten()
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= t):
        raise ValueError(f"the selector chose rows outside 0..{t - 1}")
    uncached = torch.nonzero(~cached).flatten()
    last = torch.tensor([t - 1], dtype=torch.long, device=cached.device)
    return torch.unique(torch.cat((chosen, uncached, last)))  # sorted


def _check(config: ModelConfig, inp: BlendInput) -> None:
    layers = config.num_layers
    if not 1 <= inp.check_layer < layers:
        raise ValueError(f"check_layer {inp.check_layer} is outside 1..{layers - 1} "
                         f"(the model has {layers} layers)")
    if inp.deviation not in DEVIATIONS:
        raise ValueError(f"deviation {inp.deviation!r} is not one of {', '.join(DEVIATIONS)}")
    if inp.token_ids.dim() != 1 or inp.token_ids.shape[0] == 0:
        raise ValueError(f"token_ids must be one non-empty sequence [T], not {tuple(inp.token_ids.shape)}")
    t = inp.token_ids.shape[0]
    shape = (layers, t, config.num_kv_heads, config.head_dim)
    for name, kv in (("loaded_k", inp.loaded_k), ("loaded_v", inp.loaded_v)):
        if tuple(kv.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(kv.shape)}; the model needs {shape}")
    if tuple(inp.cached.shape) != (t,) or inp.cached.dtype != torch.bool:
        raise ValueError(f"cached must be a bool tensor [{t}], not {inp.cached.dtype} "
                         f"{tuple(inp.cached.shape)}")


def self_test(model: CausalLM, check_layer: int = 1, num_tokens: int = SELF_TEST_TOKENS,
              atol: float | None = None) -> float:
    """Blend at ratio 1.0 against a full prefill (ContiguousKVCache) of a short deterministic prompt:
    the last logits and the merged K/V must agree within `atol` (None: `self_test_tolerance` for the
    model's dtype and each tensor's magnitude). The
    loaded K/V given to the blend are the full prefill's shifted by one row, wrong everywhere, and a
    quarter of the rows are marked uncached, so only a blend that recomputes every row passes.
    Returns the largest difference; raises BlendSelfTestFailed naming it otherwise."""
    config, weight = model.config, model.lm_head.weight
    t = min(num_tokens, config.max_position_embeddings)
    ids = (torch.arange(t, device=weight.device) * 7919 + 11) % config.vocab_size
    full = ContiguousKVCache(config, t, weight.dtype, weight.device)
    with torch.no_grad():
        expected = model(ids, torch.arange(t, device=weight.device), full)[-1]
    cached = torch.arange(t, device=weight.device) % 4 != 3
    out = blend_prefill(model, BlendInput(ids, full.k.roll(1, dims=1), full.v.roll(1, dims=1), cached,
                                          1.0, check_layer))
    worst = 0.0
    pairs = {"last logits": (out.last_logits, expected), "K": (out.k, full.k), "V": (out.v, full.v)}
    for name, (got, want) in pairs.items():
        diff = (got.float() - want.float()).abs().max().item()
        bound = self_test_tolerance(weight.dtype, want) if atol is None else atol
        if not diff <= bound:  # NaN fails too
            raise BlendSelfTestFailed(f"blend at ratio 1.0 differs from a full prefill: max |{name} "
                                      f"difference| {diff:.3g} > {bound:.3g} over {t} tokens")
        worst = max(worst, diff)
    logger.info("blend self-test passed: max difference %.3g over %d tokens", worst, t)
    return worst


def self_test_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """The self-test's bound for a model in `dtype` on values like `reference` (see the constants)."""
    if dtype == torch.float32 or not dtype.is_floating_point:
        return SELF_TEST_ATOL
    scale = max(1.0, reference.float().abs().max().item())
    return SELF_TEST_ULPS_16BIT * torch.finfo(dtype).eps * scale
