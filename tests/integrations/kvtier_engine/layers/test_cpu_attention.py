"""Tests for kvtier_engine/layers/cpu_attention.py: `PagedAttention` on a CPU cache, which reads each
sequence's keys in place (grouped-query rows, flash kernel, log-sum-exp merge), against masked softmax
written out in fp64 over the same keys.

Shapes cover what the engine runs: decode steps (T = 1), short questions and long chunks (T = 2, 16,
300, 600) after 0..5000 cached tokens, 1 and 4 query heads per KV head, block tables that are one run
of consecutive blocks, a few long runs (merged by log-sum-exp) and fragmented (gathered), block sizes
that leave partial first/last blocks, and sliding windows. Every cache starts full of noise, so a
slot read that should not be shows up. fp32 outputs stay within MAX_ERROR of the fp64 formula.
"""

from __future__ import annotations

import random
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers import attention, cpu_attention
from kvtier_engine.layers.attention import BatchMetadata, PagedAttention
from kvtier_engine.layers.cpu_attention import (
    MIN_PREFIX_TOKENS,
    MIN_RUN_TOKENS,
    SequencePlan,
    SharedKeys,
    plan_sequence,
    shared_keys,
)
from kvtier_engine.model_config import ModelConfig

# Measured worst case over these shapes 1.0e-6 (fp32 scores over up to 5,600 keys); 1e-5 leaves room
# for another BLAS and still catches one misread key (N(0, 1) values: one key of 5,600 moves ~1e-4).
MAX_ERROR = 1e-5
HEAD_DIM = 32
KV_HEADS = 2
KINDS = ["contiguous", "runs", "fragmented"]

pytestmark = pytest.mark.skipif(cpu_attention.FLASH is None, reason="this torch has no CPU flash kernel")


def config(group: int, window: int | None = None) -> ModelConfig:
    heads = KV_HEADS * group
    return ModelConfig(model_type="llama", vocab_size=16, hidden_size=heads * HEAD_DIM, intermediate_size=16,
                       num_layers=1, num_heads=heads, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                       sliding_window=window)


def block_table(kind: str, num_blocks: int, gen: torch.Generator) -> tuple[list[int], int]:
    """A table of `num_blocks` and the cache size it needs: one run at a random offset, three runs in
    separate regions (never adjacent, so they stay three ranges), or a random permutation."""
    if kind == "contiguous":
        first = int(torch.randint(0, 7, (1,), generator=gen))
        return list(range(first, first + num_blocks)), first + num_blocks
    if kind == "fragmented":
        return torch.randperm(2 * num_blocks, generator=gen)[:num_blocks].tolist(), 2 * num_blocks
    cuts = sorted(torch.randint(0, num_blocks + 1, (2,), generator=gen).tolist())
    sizes = [cuts[0], cuts[1] - cuts[0], num_blocks - cuts[1]]
    regions = torch.randperm(3, generator=gen).tolist()
    table = [r * num_blocks + j for r, size in zip(regions, sizes) for j in range(size)]
    return table, 3 * num_blocks


def masked_softmax(q, k, v, start: int, window: int | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal/window mask by position) v in fp64; q [T, Hq, D] at positions
    start.., k, v [N, Hkv, D] at positions 0..; query head h reads KV head h // group."""
    t, num_heads, dim = q.shape
    group = num_heads // k.shape[1]
    keys, values = (x.double().repeat_interleave(group, 1).transpose(0, 1) for x in (k, v))  # [Hq, N, D]
    k_pos = torch.arange(k.shape[0])[None]
    out = []
    for lo in range(0, t, 128):  # row blocks keep the [Hq, rows, N] scores small
        rows = q[lo:lo + 128].double().transpose(0, 1)
        q_pos = torch.arange(start + lo, start + lo + rows.shape[1])[:, None]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= k_pos > q_pos - window
        scores = (rows @ keys.transpose(1, 2) / dim ** 0.5).masked_fill(~visible, float("-inf"))
        out.append((torch.softmax(scores, -1) @ values).transpose(0, 1))
    return torch.cat(out)


def run_one(new: int, cached: int, group: int, kind: str, window: int | None = None, block_size: int = 16,
            dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's step through PagedAttention over a noisy cache, and the fp64 formula over the
    keys it should see (noise already in its cached slots, then its new k, v)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = config(group, window)
    ctx = cached + new
    table, num_blocks = block_table(kind, -(-ctx // block_size), gen)
    cache = PagedKVCache(cfg, num_blocks, block_size=block_size, dtype=dtype)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=gen))
    q = torch.randn(new, cfg.num_heads, HEAD_DIM, generator=gen)
    k, v = (torch.randn(new, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    meta = BatchMetadata.build([table], [cached], [new], block_size)
    got = PagedAttention(cache, meta, cfg).attend(0, q.to(dtype), k.to(dtype), v.to(dtype))
    keys = cache.gather(table, ctx).reshape(2, 1, ctx, KV_HEADS, HEAD_DIM)[:, 0]  # after the write
    return got, masked_softmax(q.to(dtype), keys[0], keys[1], cached, window)


def never_gathers(monkeypatch) -> None:
    """Read every sequence in place, however short its cached prefix (MIN_PREFIX_TOKENS only picks the
    faster path), and make the gathering path fail the test."""
    def gathered(*args):
        raise AssertionError("PagedAttention fell back to gathering")
    monkeypatch.setattr(cpu_attention, "MIN_PREFIX_TOKENS", 0)
    monkeypatch.setattr(attention, "causal_attention", gathered)


CACHED = [0, 1, 15, 16, 17, 700, 4999, 5000]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("new", [1, 2, 16, 300, 600])
def test_in_place_attention_is_masked_softmax(new, group, kind, monkeypatch):
    never_gathers(monkeypatch)
    for i, cached in enumerate(CACHED if new < 300 else [0, 17, 5000]):
        got, want = run_one(new, cached, group, kind, seed=i)
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got.double() - want).abs().max().item() < MAX_ERROR, cached


@settings(max_examples=40, deadline=None)
@given(new=st.sampled_from([1, 2, 3, 16, 300, 600]), cached=st.integers(0, 5000),
       group=st.sampled_from([1, 4]), kind=st.sampled_from(KINDS),
       window=st.sampled_from([None, 1, 7, 64, 1000, 6000]), block_size=st.sampled_from([16, 5]),
       seed=st.integers(0, 2**16))
def test_any_shape_window_and_table_is_masked_softmax(new, cached, group, kind, window, block_size, seed):
    got, want = run_one(new, cached, group, kind, window, block_size, seed=seed)
    assert (got.double() - want).abs().max().item() < MAX_ERROR


@pytest.mark.parametrize("new, cached, window", [(1, 3000, 100), (1, 50, 100), (16, 40, 100)])
def test_windows_a_query_sees_whole_are_read_in_place(new, cached, window, monkeypatch):
    """A decode step sees a contiguous key range (its window), and a query whose context fits the
    window needs only the causal mask: neither gathers."""
    never_gathers(monkeypatch)
    got, want = run_one(new, cached, 4, "runs", window)
    assert (got.double() - want).abs().max().item() < MAX_ERROR


def test_a_window_that_masks_part_of_a_query_takes_the_gathering_path():
    cpu = torch.device("cpu")
    assert plan_sequence(list(range(200)), 16, 3000, 2999, 16, cpu) is None
    assert plan_sequence(list(range(200)), 16, 3000, 3000, 16, cpu) is not None  # the window holds it all
    got, want = run_one(16, 2984, 4, "contiguous", window=2999)
    assert (got.double() - want).abs().max().item() < MAX_ERROR


def test_a_query_after_a_short_prefix_takes_the_gathering_path():
    """Below MIN_PREFIX_TOKENS cached tokens a multi-token query is gathered (faster there); a decode
    step is read in place from the first token."""
    cpu, table = torch.device("cpu"), list(range(100))
    short = MIN_PREFIX_TOKENS - 1
    assert plan_sequence(table, 16, short + 16, None, 16, cpu) is None
    assert plan_sequence(table, 40, 40, None, 16, cpu) is None  # a first prefill chunk: one fused call
    assert plan_sequence(table, 16, short + 17, None, 16, cpu) == SequencePlan(
        SharedKeys(ranges=((0, MIN_PREFIX_TOKENS),)), True)
    assert plan_sequence(table, 1, 5, None, 16, cpu) == SequencePlan(SharedKeys(ranges=((0, 5),)), False)


def test_a_batch_of_decode_question_and_prefill_rows_each_see_their_own_keys(monkeypatch):
    """Three sequences in one call (rows sliced per sequence): a decode step, a question after a
    cache and a first prefill chunk, each against the formula over its own keys only."""
    never_gathers(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    cfg, bs = config(4), 16
    cached, new = [900, 300, 0], [1, 16, 40]
    tables = [list(range(0, 57)), list(range(200, 220)), [90, 60, 61]]
    cache = PagedKVCache(cfg, 260, block_size=bs)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=gen))
    meta = BatchMetadata.build(tables, cached, new, bs)
    q = torch.randn(sum(new), cfg.num_heads, HEAD_DIM, generator=gen)
    k, v = (torch.randn(sum(new), KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    got = PagedAttention(cache, meta, cfg).attend(0, q, k, v)
    for i, (table, done, n) in enumerate(zip(tables, cached, new)):
        lo, hi = meta.query_starts[i], meta.query_starts[i + 1]
        keys = cache.gather(table, done + n).reshape(2, 1, done + n, KV_HEADS, HEAD_DIM)[:, 0]
        want = masked_softmax(q[lo:hi], keys[0], keys[1], done, None)
        assert (got[lo:hi].double() - want).abs().max().item() < MAX_ERROR, i


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_caches_attend_in_fp32_and_return_their_dtype(dtype):
    for new, cached, kind in [(1, 2000, "contiguous"), (16, 2000, "fragmented"), (300, 100, "runs")]:
        got, want = run_one(new, cached, 4, kind, dtype=dtype)
        assert got.dtype == dtype
        assert (got.double() - want).abs().max().item() < 2e-2  # the output's own rounding


def test_shared_keys_are_ranges_of_the_flat_slot_axis():
    cpu = torch.device("cpu")
    # One run of blocks 10..19 (16 slots each), positions 20..149: a partial first and last block.
    assert shared_keys(list(range(10, 20)), 20, 150, 16, cpu) == SharedKeys(ranges=((180, 310),))
    # Two long runs: blocks 0..19 then 40..59 -> two ranges, each attended in place.
    two = shared_keys(list(range(20)) + list(range(40, 60)), 0, 640, 16, cpu)
    assert two.ranges == ((0, 320), (640, 960)) and two.gathered is None
    assert shared_keys([3], 0, 0, 16, cpu) == SharedKeys()  # a first chunk: no cached keys


def per_block_runs(table: list[int], first: int, end: int, bs: int) -> list[tuple[int, int]]:
    """The runs of slots, one block at a time: the reference for shared_keys' vector pass."""
    runs: list[tuple[int, int]] = []
    for j in range(first // bs, -(-end // bs)):
        lo, hi = table[j] * bs + max(first - j * bs, 0), table[j] * bs + min(end - j * bs, bs)
        if runs and runs[-1][1] == lo:
            runs[-1] = (runs[-1][0], hi)
        else:
            runs.append((lo, hi))
    return runs


@pytest.mark.parametrize("seed", range(20))
def test_shared_keys_find_the_runs_a_per_block_walk_finds(seed):
    rng = random.Random(seed)
    blocks = rng.randint(1, 40)
    table = rng.sample(range(200), blocks) if seed % 2 else sorted(rng.sample(range(60), blocks))
    first = rng.randrange(0, blocks * 16)
    end = rng.randint(first + 1, blocks * 16)
    keys = shared_keys(table, first, end, 16, torch.device("cpu"))
    runs = per_block_runs(table, first, end, 16)
    short = [r for r in runs if r[1] - r[0] < MIN_RUN_TOKENS] if len(runs) > 1 else []
    assert list(keys.ranges) == [r for r in runs if r not in short]
    gathered = keys.gathered.tolist() if keys.gathered is not None else []
    assert gathered == [slot for lo, hi in short for slot in range(lo, hi)]


def test_short_runs_are_gathered_in_one_copy_and_long_ones_stay_views():
    cpu = torch.device("cpu")
    fragmented = list(range(0, 80, 2))  # no two blocks adjacent: 40 runs of 16 tokens
    keys = shared_keys(fragmented, 5, 600, 16, cpu)
    slots = [b * 16 + i for b in fragmented[:38] for i in range(16)][5:600]
    assert keys.ranges == () and keys.gathered.tolist() == slots
    blocks = torch.arange(80 * 16 * 2 * 3, dtype=torch.float32).view(80, 16, 2, 3)
    (k, v), = keys.views(blocks, blocks + 1)
    assert torch.equal(k, blocks[fragmented[:38]].flatten(0, 1)[5:600])
    assert torch.equal(v, k + 1)
    # A long run (blocks 100..119), a short one (block 7), the long run's continuation cut short by
    # `end` (blocks 200..203, 60 tokens): the two short ones are gathered, the long one is a view.
    long_run = list(range(100, 100 + MIN_RUN_TOKENS // 16 + 4))
    table = long_run + [7] + [200, 201, 202, 203]
    end = len(long_run) * 16 + 16 + 60
    mixed = shared_keys(table, 0, end, 16, cpu)
    assert mixed.ranges == ((1600, 1600 + len(long_run) * 16),)
    assert mixed.gathered.tolist() == list(range(112, 128)) + list(range(3200, 3260))
    assert sum(len(k) for k, _ in mixed.views(torch.zeros(300, 16, 2, 3), torch.zeros(300, 16, 2, 3))) == end


def test_without_the_flash_kernel_every_sequence_is_gathered(monkeypatch):
    """A torch without the private op: `_flash_kernel` finds none and PagedAttention gathers, with the
    same results."""
    monkeypatch.setattr(torch.ops, "aten", types.SimpleNamespace())
    assert cpu_attention._flash_kernel() is None
    monkeypatch.undo()
    monkeypatch.setattr(cpu_attention, "FLASH", None)
    calls = []
    reference = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention", lambda *a: calls.append(1) or reference(*a))
    for new, cached in [(1, 900), (16, 900), (40, 0)]:
        got, want = run_one(new, cached, 4, "contiguous")
        assert (got.double() - want).abs().max().item() < MAX_ERROR
    assert len(calls) == 3
