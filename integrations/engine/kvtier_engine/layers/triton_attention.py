"""Paged attention as one Triton kernel: the GPU path of `PagedAttention` (attention.py).

Same contract as `PagedAttention`, per forward call of T new tokens:

    backend = paged_attention_backend(cache, meta, config)   # once per step, by the model runner
    for layer: out = backend.attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D])
    backend.advance(T)                                        # no-op: the scheduler tracks progress

`attend` writes the new K/V into the cache (a torch index write) and launches one kernel for the whole
mixed batch: every sequence's new tokens (a prefill chunk or a single decode token) attend over its
context through its block table, causally by absolute position, with the layer's sliding window if
it has one. The kernel writes only the returned tensor; the caller owns q, k, v and that tensor.

Grid: (sequence, tile of TOKENS new tokens, kv head). One program puts the G = Hq / Hkv query heads
that share a kv head into the rows of one tile, so each K/V tile is loaded once for the whole group:

    row r  ->  token  first + r // G,   query head  kv_head * G + r % G       (ROWS >= TOKENS * G)

Keys are walked BLOCK_N positions at a time; each position finds its physical slot through the block
table (block = table[pos // block_size], offset pos % block_size), so any block size works and a
tile may straddle blocks. Scores and the softmax are fp32 (online softmax, exp2), whatever the cache
dtype (fp16, bf16 or fp32). head_dim may be anything up to 256; it is padded to a power of two.
"""

from __future__ import annotations

import torch

from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers.attention import AttentionBackend, BatchMetadata, PagedAttention
from kvtier_engine.model_config import ModelConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships for Linux x86_64 only; elsewhere the torch path serves
    triton = None

# Tile sizes keep one program's q, acc, K/V tiles and per-key pointers in registers. Compiled offline
# for sm_80/sm_90 (head_dim 64-256, groups 1-7), cuobjdump shows no stack for fp16/bf16 and at most
# 16 bytes for fp32; BLOCK_N 32 or 64 rows at head_dim 256 spilled hundreds of bytes.
MAX_HEAD_DIM = 256
BLOCK_N = 16  # key positions per inner-loop step
LOG2E = 1.4426950408889634


def _rows_target(block_d: int) -> int:
    """Query rows (tokens x group) per program: halved for the widest heads."""
    return 64 if block_d <= 128 else 32


def triton_supports(config: ModelConfig) -> bool:
    """Whether the kernel can serve this model (Triton installed, head_dim within its limit)."""
    return triton is not None and config.head_dim <= MAX_HEAD_DIM


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
            out_ptr, q_ptr, k_ptr, v_ptr, table_ptr, query_starts_ptr, context_lens_ptr,
            qk_scale, window, block_size,
            stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, TOKENS: tl.constexpr,
            ROWS: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr):
        seq = tl.program_id(0)
        first = tl.program_id(1) * TOKENS  # this tile's first new token, counted within the sequence
        kv_head = tl.program_id(2)
        q_lo = tl.load(query_starts_ptr + seq)
        q_len = tl.load(query_starts_ptr + seq + 1) - q_lo
        if first >= q_len:  # the grid is sized for the longest query; shorter ones end early
            return
        ctx = tl.load(context_lens_ptr + seq)
        start_pos = ctx - q_len  # absolute position of the sequence's first new token

        rows = tl.arange(0, ROWS)
        tok = first + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_ok = (rows < TOKENS * GROUP) & (tok < q_len)
        q_pos = start_pos + tok
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + (q_lo + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(k_ptr.dtype.element_ty)

        # Keys past the tile's last query are masked for every row; with a window, so are keys
        # before the first query's window.
        hi = start_pos + tl.minimum(first + TOKENS, q_len)
        lo = 0
        if USE_WINDOW:
            lo = tl.maximum(start_pos + first - window + 1, 0)
        # A finite floor keeps alpha = exp2(m_i - m_new) a number (1) while a row has seen only
        # masked keys; -inf would give exp2(-inf + inf) = NaN.
        m_i = tl.full([ROWS], -1.0e30, tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for k_start in range(lo, hi, BLOCK_N):
            k_pos = k_start + n
            k_ok = k_pos < hi
            block = tl.load(table_ptr + seq * stride_table + k_pos // block_size, mask=k_ok, other=0)
            block = block.to(tl.int64)  # block * stride overflows int32 in a large cache
            slot = k_pos % block_size
            k_off = block * stride_kb + slot * stride_ks + kv_head * stride_kh
            v_off = block * stride_vb + slot * stride_vs + kv_head * stride_vh
            kt = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            # ieee: on GPUs, fp32 dots default to tf32 (~1e-3 off); fp16/bf16 dots are unaffected.
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # [ROWS, BLOCK_N], log2 units
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            if USE_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision="ieee")
            m_i = m_new
        l_i = tl.where(row_ok, l_i, 1.0)  # rows past the tile saw no key; they are not stored
        out = acc / l_i[:, None]
        tl.store(out_ptr + (q_lo + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class TritonPagedAttention:
    """Attention over a batch whose KV lives in a `PagedKVCache`, by the Triton kernel above.

    Raises ValueError if Triton is missing or head_dim exceeds MAX_HEAD_DIM (use
    `paged_attention_backend`, which falls back to the torch path instead)."""

    def __init__(self, cache: PagedKVCache, meta: BatchMetadata, config: ModelConfig):
        if not triton_supports(config):
            raise ValueError(f"the Triton paged-attention kernel needs triton and head_dim <= {MAX_HEAD_DIM}"
                             f" (head_dim is {config.head_dim})")
        self.cache = cache
        self.meta = meta
        self.config = config
        device = cache.kv.device
        # Per-step tensors, shared by every layer. Table rows are padded with block 0: the kernel
        # never reads a table entry at or past a sequence's context length.
        width = max((len(t) for t in meta.block_tables), default=0) or 1
        self._tables = torch.tensor([t + [0] * (width - len(t)) for t in meta.block_tables] or [[0]],
                                    dtype=torch.int32, device=device)
        self._query_starts = torch.tensor(meta.query_starts, dtype=torch.int32, device=device)
        self._context_lens = torch.tensor(meta.context_lens or [0], dtype=torch.int32, device=device)
        self._num_seqs = len(meta.block_tables)
        max_query = max((b - a for a, b in zip(meta.query_starts, meta.query_starts[1:])), default=0)
        group = config.num_heads // config.num_kv_heads
        # Tile sizes are powers of two or depend on the model only, so a model compiles a handful of
        # kernel variants (decode steps use TOKENS = 1), never one per batch shape.
        self._block_d = max(16, _next_power_of_2(config.head_dim))  # tl.dot needs K >= 16
        self._tokens = min(max(1, _rows_target(self._block_d) // group), _next_power_of_2(max_query))
        self._rows = max(16, _next_power_of_2(self._tokens * group))  # tl.dot needs M >= 16
        self._tiles = -(-max_query // self._tokens)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.write(layer, self.meta.slot_mapping, k, v)
        if q.stride(-1) != 1:  # the kernel addresses head_dim with unit stride
            q = q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if self._tiles == 0:
            return out
        k_cache, v_cache = self.cache.layer_blocks(layer)  # [num_blocks, block_size, Hkv, D], D contiguous
        window = self.config.window(layer)
        c = self.config
        grid = (self._num_seqs, self._tiles, c.num_kv_heads)
        _paged_attention_kernel[grid](
            out, q, k_cache, v_cache, self._tables, self._query_starts, self._context_lens,
            c.head_dim ** -0.5 * LOG2E, window or 0, self.cache.block_size,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), self._tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            HEAD_DIM=c.head_dim, BLOCK_D=self._block_d, GROUP=c.num_heads // c.num_kv_heads,
            TOKENS=self._tokens, ROWS=self._rows, BLOCK_N=BLOCK_N, USE_WINDOW=window is not None,
            num_warps=8 if self._block_d > 64 else 4)
        return out

    def advance(self, num_tokens: int) -> None:
        """Nothing to do: the scheduler tracks how many tokens each sequence has computed."""


def paged_attention_backend(cache: PagedKVCache, meta: BatchMetadata,
                            config: ModelConfig) -> AttentionBackend:
    """The backend the model runner uses for one step: the Triton kernel for a CUDA cache when Triton
    can serve the model, else the torch path (CPU caches, no triton, head_dim > MAX_HEAD_DIM)."""
    if cache.kv.is_cuda and triton_supports(config):
        return TritonPagedAttention(cache, meta, config)
    return PagedAttention(cache, meta, config)
