"""Attention for a CPU paged cache that reads each sequence's keys where they lie.

`PagedAttention` (attention.py) runs its CPU sequences through here; gathering every block and running
`causal_attention` stays for what this does not cover (CUDA caches, a sliding window that masks part
of a multi-token query, a torch without the flash kernel below). Three things make a step cheaper:

- Grouped-query heads folded into query rows: the G query heads that share a KV head become G rows
  each of one [Hkv, T*G, D] problem, so the kernel reads each key once and nothing expands K/V to
  the query heads as SDPA's `enable_gqa` does.
- No mask: keys every query sees (the cached prefix; a decode step's whole context or window) go to
  torch's CPU flash kernel unmasked, the T new keys with the kernel's own causal mask (a square),
  and the parts merge exactly by the log-sum-exps the kernel returns. Any mask makes SDPA leave its
  flash kernel.
- No gather: a run of consecutive block ids is one range of the layer's flat slot axis, attended as a
  view; runs merge by log-sum-exp too. The short runs of a fragmented table are gathered into one
  part instead: a kernel call per short run costs more than the copy.

benchmarks/paged_attention.py (llama-small's 8 query heads on 2 KV heads, dim 64, fp32, 1 thread, 16K
keys, CPU ms per layer, gathering path -> this one, on the 2 shared cores of the machine it was written
on): decode 5.1 -> 1.7 (2.8-3.6x over runs; a fragmented table 1.6-2.6x), 16-token question
9.5 -> 6.9 (1.4x; fragmented 1.1-1.3x).

Scores and softmax are fp32 as in `causal_attention`: a bf16/fp16 cache is read as fp32 (that copy
replaces the gather). Where it runs: the model runner's thread, inside `PagedAttention.attend`; the
plans are built once per step and read-only afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def _flash_kernel() -> Callable | None:
    """torch's CPU flash-attention op, which returns the log-sum-exp beside the output (the public SDPA
    does not). It is private: a torch without it gets None and the gathering path."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


FLASH = _flash_kernel()

# A run shorter than this is gathered (with the other short runs, in one copy) rather than attended as
# a view: one more kernel call and merge costs 17-34 us, copying a key and its value ~0.08 us, so the
# break-even is 200-400 keys (decode, 16-token question; benchmarks/paged_attention.py's shape).
MIN_RUN_TOKENS = 256

# A query of several tokens after fewer cached tokens than this takes the gathering path: there one
# fused call beats two kernel calls and a merge (0.7-0.9x at 0-512 cached tokens, 1.0-1.2x at 1K,
# whatever the query's length; a decode step, one call either way, is at least even from 64 on).
MIN_PREFIX_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class SharedKeys:
    """Where the keys every query of one sequence sees lie in a layer's cache, as slots of its flat
    slot axis (block_id * block_size + offset): `ranges` each attended as a view, and `gathered`, the
    slots of the short runs, copied into one part. Their order does not matter: no mask applies."""

    ranges: tuple[tuple[int, int], ...] = ()
    gathered: torch.Tensor | None = None

    def views(self, k_blocks: torch.Tensor,
              v_blocks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K and V [N, Hkv, D] of each part from a layer's [num_blocks, block_size, Hkv, D] blocks."""
        k_flat, v_flat = k_blocks.flatten(0, 1), v_blocks.flatten(0, 1)
        parts = [(k_flat[lo:hi], v_flat[lo:hi]) for lo, hi in self.ranges]
        if self.gathered is not None:
            parts.append((k_flat.index_select(0, self.gathered), v_flat.index_select(0, self.gathered)))
        return parts


@dataclass(frozen=True, slots=True)
class SequencePlan:
    """One sequence's attention in a step: its queries see every key in `shared`, and, when
    `causal_new`, the step's new keys (their own rows of k, v) causally."""

    shared: SharedKeys
    causal_new: bool


def plan_sequence(table: list[int], num_new: int, context_len: int, window: int | None, block_size: int,
                  device: torch.device) -> SequencePlan | None:
    """The plan for a sequence whose `num_new` (> 0) new tokens end at `context_len`, or None for the
    gathering path: a multi-token query after under MIN_PREFIX_TOKENS cached tokens, or one that a
    sliding window masks in part (the gathering path's masked row blocks). A decode step sees its
    whole window or context, itself included (written before attending), with no mask; a longer
    query sees the cached prefix whole and its own tokens causally."""
    if num_new == 1:
        first = 0 if window is None else max(0, context_len - window)
        return SequencePlan(shared_keys(table, first, context_len, block_size, device), False)
    if context_len - num_new < MIN_PREFIX_TOKENS or (window is not None and context_len > window):
        return None
    return SequencePlan(shared_keys(table, 0, context_len - num_new, block_size, device), True)


def shared_keys(table: list[int], first: int, end: int, block_size: int, device: torch.device) -> SharedKeys:
    """Token positions first..end-1 of a sequence with block table `table`: runs of slots that merge
    whenever the next block id follows the last; runs under MIN_RUN_TOKENS go to one gather (unless
    the run is the only one)."""
    if end <= first:
        return SharedKeys()
    j0, j1 = first // block_size, -(-end // block_size)
    # Runs break where a block id does not follow the one before: found in one vector pass, not a
    # Python step per block or run (a fragmented 128K-token table of 16-token blocks: 7.5 ms a step).
    blocks = np.asarray(table[j0:j1], dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(blocks) != 1) + 1))
    lo = blocks[starts] * block_size
    hi = blocks[np.append(starts[1:], len(blocks)) - 1] * block_size + block_size
    lo[0] += first - j0 * block_size  # the first block from `first`, the last up to `end`
    hi[-1] -= j1 * block_size - end
    long = (hi - lo >= MIN_RUN_TOKENS) | (len(lo) == 1)
    ranges = tuple(zip(lo[long].tolist(), hi[long].tolist()))
    if long.all():
        return SharedKeys(ranges=ranges)
    return SharedKeys(ranges=ranges, gathered=_slots(lo[~long], hi[~long], device))


def _slots(lo: np.ndarray, hi: np.ndarray, device: torch.device) -> torch.Tensor:
    """Every slot of the runs [lo, hi), in order, as one index (no Python loop per run or slot)."""
    starts, lengths = torch.from_numpy(lo), torch.from_numpy(hi - lo)
    before = torch.cumsum(lengths, 0) - lengths  # where each run starts in the index
    return (torch.repeat_interleave(starts - before, lengths) + torch.arange(int(lengths.sum()))).to(device)


def attend_planned(plan: SequencePlan, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                   k_blocks: torch.Tensor, v_blocks: torch.Tensor) -> torch.Tensor:
    """Attention of one sequence's queries q [T, Hq, D] by `plan`; k_new, v_new [T, Hkv, D] are its
    new keys as the cache holds them. Returns [T, Hq, D] in q's dtype."""
    t, num_heads, dim = q.shape
    kv_heads = k_blocks.shape[2]
    group = num_heads // kv_heads
    # [T, Hkv, G, D] -> [1, Hkv, T*G, D]: row t*G + g of KV head h is query head h*G + g at token t.
    rows = q.float().view(t, kv_heads, group, dim).permute(1, 0, 2, 3).reshape(1, kv_heads, t * group, dim)
    parts = [FLASH(rows, _heads(k), _heads(v), 0.0, False) for k, v in plan.shared.views(k_blocks, v_blocks)]
    if plan.causal_new:
        parts.append(_causal_square(q, k_new, v_new, group))
    out = merge_parts(parts)  # [1, Hkv, T*G, D]
    return out[0].view(kv_heads, t, group, dim).permute(1, 0, 2, 3).reshape(t, num_heads, dim).to(q.dtype)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """[N, Hkv, D] -> the kernel's [1, Hkv, N, D] (a view when x is already fp32)."""
    return x.float().permute(1, 0, 2)[None]


def _causal_square(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The T new queries over their own T keys with the kernel's causal mask (row i sees keys <= i),
    returned in the grouped-row layout. The kernel's mask needs one row per query, so here the query
    heads stay heads and K/V are expanded to them (T keys: a small copy)."""
    t, num_heads, dim = q.shape
    kv_heads = num_heads // group
    heads = [x.float().transpose(0, 1)[None] for x in (q, k.repeat_interleave(group, 1),
                                                       v.repeat_interleave(group, 1))]
    out, lse = FLASH(*heads, 0.0, True)  # [1, Hq, T, D], [1, Hq, T]
    out = out[0].view(kv_heads, group, t, dim).transpose(1, 2).reshape(1, kv_heads, t * group, dim)
    return out, lse[0].view(kv_heads, group, t).transpose(1, 2).reshape(1, kv_heads, t * group)


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Attention over the union of disjoint key sets from the attention over each, [..., R, D] with
    its log-sum-exp [..., R]: each part weighs exp(lse_i - lse_total), exactly softmax's split."""
    if len(parts) == 1:
        return parts[0][0]
    weights = torch.softmax(torch.stack([lse for _, lse in parts]), dim=0).unsqueeze(-1)  # (small)
    merged = parts[0][0] * weights[0]  # then each other part added in place: no stack of outputs
    for (out, _), weight in zip(parts[1:], weights[1:]):
        merged.addcmul_(out, weight)
    return merged
