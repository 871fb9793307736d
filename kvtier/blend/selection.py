"""Which rows (tokens) a blended prefill recomputes from the check layer on.

A reused passage's KV was computed without the text now before it, so its later layers are off
where the passage attends to that text. CacheBlend measures how far off at one check layer: the
squared deviation of each reused token's recomputed K from its loaded K (fp32, summed over heads and
dims); the tokens that deviate most are recomputed in every later layer, the rest keep their loaded
KV. Tokens with no cached KV are always recomputed.

    select_rows(k_new, k_loaded, cached, ratio)   every uncached row + the top ceil(ratio * n_cached)
                                                  cached rows by deviation (ties: lower index first)
    random_rows(cached, ratio, generator)          the same count, chosen at random among cached rows
                                                  (the benchmark's baseline)
    select_by_score(score, cached, ratio)          the same count, the cached rows of highest `score`
                                                  (any per-row score: a study's oracle, a sink rule)
    joint_kv(k_new, k_loaded, v_new, v_loaded, cached)
                                                  K and V of the check layer as one pair for
                                                  select_rows: the "kv" deviation of the blend

Both return sorted LongTensor row indices. Ratio 0 keeps the uncached rows only, ratio 1 every row.
The blended prefill adds the last row itself (it yields the next-token logits).

Pure functions, side-effect free, safe from any thread; `random_rows` advances its generator (share
one between threads only under a lock). Run by the engine's blend prefill on the KV's device.
"""

from __future__ import annotations

import math
import numbers

import torch

# A decimal ratio is not exact in binary: 0.15 * 20 is 3.0000000000000004, whose ceiling would add a
# whole row. The product is first pulled down by this relative margin, far above float64 rounding and
# far below one row of any prompt shorter than 10**9 tokens.
_RATIO_SLACK = 1e-12


def select_rows(k_new: torch.Tensor, k_loaded: torch.Tensor, cached: torch.Tensor,
                ratio: float) -> torch.Tensor:
    """Rows to recompute: every row with `cached` False, plus the cached rows whose K deviates most.
    k_new, k_loaded: [T, H, D] (K of the check layer; any [T, ...] of 2+ dims); cached: bool [T]."""
    count = _selected_count(cached, ratio)
    if k_new.shape != k_loaded.shape or k_new.dim() < 2 or k_new.shape[0] != cached.shape[0]:
        raise ValueError(f"k_new {tuple(k_new.shape)} and k_loaded {tuple(k_loaded.shape)} must have the "
                         f"same shape [T, ...] with T = {cached.shape[0]} rows of cached")
    reused = torch.nonzero(cached.to(k_new.device), as_tuple=True)[0]
    diff = k_new[reused].float() - k_loaded[reused].to(k_new.device).float()
    return _top(diff.square().flatten(1).sum(dim=1), reused, count, cached.to(k_new.device))


def select_by_score(score: torch.Tensor, cached: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rows to recompute: every row with `cached` False, plus the ceil(ratio * n_cached) cached rows
    of highest `score` ([T], one number per row; uncached rows' scores are ignored)."""
    count = _selected_count(cached, ratio)
    if score.dim() != 1 or score.shape[0] != cached.shape[0]:
        raise ValueError(f"score must have shape [{cached.shape[0]}] (one per row), got {tuple(score.shape)}")
    cached = cached.to(score.device)
    reused = torch.nonzero(cached, as_tuple=True)[0]
    return _top(score[reused].float(), reused, count, cached)


def joint_kv(k_new: torch.Tensor, k_loaded: torch.Tensor, v_new: torch.Tensor, v_loaded: torch.Tensor,
             cached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(new, loaded) [T, H, 2D]: K and V side by side, each divided by the root of its loaded cached
    rows' mean squared norm, so that select_rows scores a row by dK / |K|^2 + dV / |V|^2. Why the
    division: K and V differ in scale (SmolLM2-135M's layer-1 K rows carry ~40x V's squared norm:
    benchmarks/rag_blend_study.py), and a raw sum would be K's ranking; divided, each counts as a
    relative deviation. fp32."""
    if not k_new.shape == k_loaded.shape == v_new.shape == v_loaded.shape:
        raise ValueError(f"K and V, new and loaded, must have one shape: {tuple(k_new.shape)}, "
                         f"{tuple(k_loaded.shape)}, {tuple(v_new.shape)}, {tuple(v_loaded.shape)}")
    reused = torch.nonzero(cached.to(k_new.device), as_tuple=True)[0]
    pairs = []
    for new, loaded in ((k_new, k_loaded), (v_new, v_loaded)):
        loaded = loaded.to(new.device).float()
        norm = loaded[reused].square().flatten(1).sum(dim=1).mean() if len(reused) else torch.tensor(1.0)
        scale = norm.clamp_min(torch.finfo(torch.float32).tiny).rsqrt()
        pairs.append((new.float() * scale, loaded * scale))
    return (torch.cat((pairs[0][0], pairs[1][0]), dim=-1), torch.cat((pairs[0][1], pairs[1][1]), dim=-1))


def random_rows(cached: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rows to recompute: every row with `cached` False, plus ceil(ratio * n_cached) cached rows drawn
    uniformly without replacement from `generator` (the default generator if None)."""
    count = _selected_count(cached, ratio)
    reused = torch.nonzero(cached, as_tuple=True)[0]
    device = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randperm(len(reused), generator=generator, device=device)[:count]
    return _with_uncached(cached, reused[pick.to(reused.device)])


def _selected_count(cached: torch.Tensor, ratio: float) -> int:
    """ceil(ratio * the number of cached rows), after checking both arguments."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    if not isinstance(cached, torch.Tensor) or cached.dtype != torch.bool or cached.dim() != 1:
        shape = tuple(cached.shape) if isinstance(cached, torch.Tensor) else type(cached).__name__
        raise ValueError(f"cached must be a 1-D bool tensor [T], got {getattr(cached, 'dtype', '')} {shape}")
    n_cached = int(cached.sum())
    return min(n_cached, math.ceil(ratio * n_cached * (1 - _RATIO_SLACK)))


def _top(score: torch.Tensor, reused: torch.Tensor, count: int, cached: torch.Tensor) -> torch.Tensor:
    """The uncached rows plus the `count` rows of `reused` whose `score` (one per reused row) is highest."""
    # A stable descending sort keeps equal scores in index order: the same rows on every run and
    # device, where topk's choice among ties is unspecified. (A NaN sorts first: recomputed.)
    order = torch.sort(score, descending=True, stable=True).indices[:count]
    return _with_uncached(cached, reused[order])


def _with_uncached(cached: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The sorted union of the uncached rows and `chosen` (cached rows, so the two are disjoint)."""
    uncached = torch.nonzero(~cached, as_tuple=True)[0]
    return torch.sort(torch.cat((uncached, chosen.to(uncached.device)))).values
