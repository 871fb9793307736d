"""Attention backends: where a layer's K/V go and how a query attends over them.

The model hands each layer's new q, k, v (already rotated) to a backend and gets the attention
output back; the backend owns the KV memory. Contract, per forward call of T new tokens:

    for layer in 0..L-1:  out = backend.attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D])
    backend.advance(T)    # the new tokens now count as cached for the next call

`ContiguousKVCache` is the reference: one sequence, K/V in contiguous tensors, plain torch math.
It is the ground truth that paged backends are tested against. `PagedAttention` serves a batch of
sequences whose KV lives in a `PagedKVCache`, described by a `BatchMetadata` the scheduler builds;
on CPU it reads each sequence's keys in place through torch's flash kernel (cpu_attention.py), and
elsewhere gathers the blocks and runs the reference math (the Triton kernel serves CUDA caches:
triton_attention.py). `causal_attention_at` is the same math for queries at arbitrary ascending
positions (CacheBlend's selected rows), masked by their true positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers import cpu_attention
from kvtier_engine.layers.cpu_attention import SequencePlan, attend_planned, plan_sequence
from kvtier_engine.model_config import ModelConfig

# Query rows per block of `causal_attention` when a mask is needed: a 512 x 8192 boolean mask is 4 MiB.
QUERY_BLOCK = 512


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...
    def advance(self, num_tokens: int) -> None: ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                     window: int | None) -> torch.Tensor:
    """q: [T, Hq, D] for positions start..start+T-1; k, v: [start+T, Hkv, D] for positions 0..
    Grouped-query attention with a causal (and optional sliding-window) mask. Returns [T, Hq, D].

    torch's fused attention does the math (on CPU a flash kernel: 5-7x faster than a masked score
    product for a decode step over 3-6K tokens, which spends most of its time materialising scores).
    Scores and softmax are fp32 whatever the cache dtype, as the reference always computed them.
    A whole prompt with no window is one call with the kernel's own causal mask; a query that starts
    later (a chunk after cached tokens) runs in row blocks, each against only the keys it can see, with
    a mask that stays small."""
    t = q.shape[0]
    if start == 0 and window is None:
        return _fused(q, k, v, None, causal=True)
    if t == 1 and (window is None or start < window):  # a decode step that sees every key
        return _fused(q, k, v, None, causal=False)
    out = torch.empty_like(q)
    for lo in range(0, t, QUERY_BLOCK):
        hi = min(lo + QUERY_BLOCK, t)
        q_pos = torch.arange(start + lo, start + hi, device=q.device)
        out[lo:hi] = _rows_at(q[lo:hi], k, v, q_pos, start + lo, start + hi - 1, window)
    return out


def causal_attention_at(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        window: int | None) -> torch.Tensor:
    """q: [S, Hq, D] for the ascending, not necessarily contiguous `positions` [S]; k, v: [N, Hkv, D]
    for positions 0..N-1 (N > positions[-1]). Each query sees the keys at positions <= its own (and
    within `window`): the mask is by TRUE positions, never aligned bottom-right, so a query at position
    p never sees a key after p however many keys follow it. Returns [S, Hq, D].

    CacheBlend's selected rows attend this way over the merged K/V (kvtier_engine/blend.py). Row blocks
    of QUERY_BLOCK queries, each against the key range its rows can see, keep the mask small."""
    out = torch.empty_like(q)
    for lo in range(0, q.shape[0], QUERY_BLOCK):
        hi = min(lo + QUERY_BLOCK, q.shape[0])
        q_pos = positions[lo:hi]
        out[lo:hi] = _rows_at(q[lo:hi], k, v, q_pos, int(q_pos[0]), int(q_pos[-1]), window)
    return out


def _rows_at(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, lowest: int,
             highest: int, window: int | None) -> torch.Tensor:
    """One row block: queries at `q_pos` (lowest..highest) over the keys they can see, masked by
    position (key position <= query position, and within the window)."""
    first = 0 if window is None else max(0, lowest - window + 1)
    k_pos = torch.arange(first, highest + 1, device=q.device)[None, :]
    visible = k_pos <= q_pos[:, None]
    if window is not None:
        visible &= k_pos > q_pos[:, None] - window
    return _fused(q, k[first:highest + 1], v[first:highest + 1], visible, causal=False)


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
           causal: bool) -> torch.Tensor:
    """One `scaled_dot_product_attention` call on [T, H, D] tensors, in fp32; `visible` [T, N] is
    True where a query may attend a key (None: all, or the kernel's causal mask when `causal`)."""
    heads = [x.float().transpose(0, 1)[None] for x in (q, k, v)]  # [1, H, T, D]
    out = F.scaled_dot_product_attention(*heads, attn_mask=visible, is_causal=causal, enable_gqa=True)
    return out[0].transpose(0, 1).to(q.dtype)


class ContiguousKVCache:
    """One sequence's KV in `[layers, max_tokens, kv_heads, head_dim]` tensors (reference backend)."""

    def __init__(self, config: ModelConfig, max_tokens: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        shape = (config.num_layers, max_tokens, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.config = config
        self.num_tokens = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, end = self.num_tokens, self.num_tokens + q.shape[0]
        if end > self.k.shape[1]:
            raise ValueError(f"cache holds {self.k.shape[1]} tokens; {end} requested")
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        return causal_attention(q, self.k[layer, :end], self.v[layer, :end], start, self.config.window(layer))

    def advance(self, num_tokens: int) -> None:
        self.num_tokens += num_tokens


@dataclass(frozen=True, slots=True)
class BatchMetadata:
    """Where one forward step's tokens go: sequence i contributes `num_new[i]` tokens at positions
    `num_computed[i] ..`, flattened in sequence order."""

    block_tables: list[list[int]]
    query_starts: list[int]  # len n+1: sequence i's new tokens are rows query_starts[i]:query_starts[i+1]
    context_lens: list[int]  # tokens in the cache after this step: computed + new
    positions: torch.Tensor  # [sum(num_new)]
    slot_mapping: torch.Tensor  # [sum(num_new)] cache slot of every new token

    @classmethod
    def build(cls, block_tables: list[list[int]], num_computed: list[int], num_new: list[int],
              block_size: int, device: str | torch.device = "cpu") -> BatchMetadata:
        if not len(block_tables) == len(num_computed) == len(num_new):
            raise ValueError("block_tables, num_computed and num_new must have one entry per sequence")
        positions, slots, starts = [], [], [0]
        for table, done, new in zip(block_tables, num_computed, num_new):
            if done + new > len(table) * block_size:
                raise ValueError(f"{done + new} tokens do not fit a table of {len(table)} blocks")
            for pos in range(done, done + new):
                positions.append(pos)
                slots.append(table[pos // block_size] * block_size + pos % block_size)
            starts.append(starts[-1] + new)
        return cls([list(t) for t in block_tables], starts, [d + n for d, n in zip(num_computed, num_new)],
                   torch.tensor(positions, dtype=torch.long, device=device),
                   torch.tensor(slots, dtype=torch.long, device=device))


class PagedAttention:
    """Attention over a batch whose KV lives in a `PagedKVCache` (torch path).

    On a CPU cache each sequence goes through cpu_attention.py where it can (grouped-query rows, the
    flash kernel unmasked over its cached keys in place, merged by log-sum-exp); the rest, and every
    sequence when `read_in_place` is False (the old path, kept for benchmarks/paged_attention.py),
    gathers its blocks and runs `causal_attention`."""

    def __init__(self, cache: PagedKVCache, meta: BatchMetadata, config: ModelConfig,
                 read_in_place: bool = True):
        self.cache = cache
        self.meta = meta
        self.config = config
        self._in_place = read_in_place and cpu_attention.FLASH is not None and cache.kv.device.type == "cpu"
        self._plans: dict[int | None, list[SequencePlan | None]] = {}  # per window: layers share them
        # The blocks each sequence attends over are the same in every layer: indexed once, when a
        # sequence without an in-place plan first needs them (one with a plan never does).
        self._used: dict[int, torch.Tensor] = {}

    def _used_blocks(self, i: int) -> torch.Tensor:
        if (used := self._used.get(i)) is None:
            bs, ctx = self.cache.block_size, self.meta.context_lens[i]
            used = torch.tensor(self.meta.block_tables[i][:(ctx + bs - 1) // bs], dtype=torch.long,
                                device=self.cache.kv.device)
            self._used[i] = used
        return used

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.meta.slot_mapping, k, v)
        k_blocks, v_blocks = self.cache.layer_blocks(layer)
        out = torch.empty_like(q)
        window = self.config.window(layer)
        # The new keys as the cache holds them (its dtype), for the queries' causal square.
        k_new, v_new = k.to(k_blocks.dtype), v.to(v_blocks.dtype)
        for i, plan in enumerate(self._plans_for(window)):
            lo, hi = self.meta.query_starts[i], self.meta.query_starts[i + 1]
            if lo == hi:
                continue
            if plan is not None:
                out[lo:hi] = attend_planned(plan, q[lo:hi], k_new[lo:hi], v_new[lo:hi], k_blocks, v_blocks)
                continue
            ctx = self.meta.context_lens[i]
            used = self._used_blocks(i)
            keys = k_blocks.index_select(0, used).flatten(0, 1)[:ctx]
            values = v_blocks.index_select(0, used).flatten(0, 1)[:ctx]
            out[lo:hi] = causal_attention(q[lo:hi], keys, values, ctx - (hi - lo), window)
        return out

    def _plans_for(self, window: int | None) -> list[SequencePlan | None]:
        """Each sequence's in-place plan for layers with `window` (None: gather), built on first use."""
        if window not in self._plans:
            m, bs, device = self.meta, self.cache.block_size, self.cache.kv.device
            new = [hi - lo for lo, hi in zip(m.query_starts, m.query_starts[1:])]
            self._plans[window] = [
                plan_sequence(table, n, ctx, window, bs, device) if self._in_place and n else None
                for table, n, ctx in zip(m.block_tables, new, m.context_lens)]
        return self._plans[window]

    def advance(self, num_tokens: int) -> None:
        """Nothing to do: the scheduler tracks how many tokens each sequence has computed."""
