"""Tests for kvtier_engine/kv_cache.py: the paged KV memory and its kvtier-shaped gather / scatter.

The config has a different size on every axis (3 layers, 2 kv heads, head_dim 6, blocks of 4), so a
transposed or mis-flattened axis cannot pass by accident. Block ids are shuffled and non-contiguous
throughout: a cache that ignored the table and read blocks 0, 1, 2 ... would fail.
"""

from __future__ import annotations

import pytest
import torch

from kvtier import KVLayout
from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.model_config import ModelConfig

CONFIG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=24, intermediate_size=48, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=6)
NUM_BLOCKS, BLOCK = 8, 4
HIDDEN = CONFIG.num_kv_heads * CONFIG.head_dim
TABLE = [6, 1, 4, 3]  # shuffled, non-contiguous; blocks 0, 2, 5, 7 belong to no one


def make_cache(dtype: torch.dtype = torch.float32) -> PagedKVCache:
    """A cache whose every slot holds distinct noise, so a write or scatter that lands in the wrong
    place, or a gather that reads one, shows up."""
    cache = PagedKVCache(CONFIG, NUM_BLOCKS, block_size=BLOCK, dtype=dtype)
    g = torch.Generator().manual_seed(99)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g).to(dtype))
    return cache


def seeded_chunk(num_tokens: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[2, L, T, H*D]`: kvtier's chunk layout."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, CONFIG.num_layers, num_tokens, HIDDEN), generator=g).to(dtype)


def slots_of(table: list[int], num_tokens: int, start: int = 0) -> torch.Tensor:
    return torch.tensor([table[t // BLOCK] * BLOCK + t % BLOCK for t in range(start, start + num_tokens)])


def blocks_outside(cache: PagedKVCache, table: list[int]) -> torch.Tensor:
    others = [b for b in range(NUM_BLOCKS) if b not in table]
    return cache.kv[:, :, others].clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_has_the_documented_shape(dtype):
    cache = PagedKVCache(CONFIG, NUM_BLOCKS, block_size=BLOCK, dtype=dtype)
    assert cache.kv.shape == (2, CONFIG.num_layers, NUM_BLOCKS, BLOCK, CONFIG.num_kv_heads, CONFIG.head_dim)
    assert cache.kv.dtype == dtype
    assert cache.kv.device.type == "cpu"


def test_write_then_gather_returns_the_written_kv_in_chunk_layout():
    """Prefill 6 tokens, then decode 1: per layer, K and V land in their slots and come back from gather
    as `[2, L, T, H*D]`, token t of layer l at `[:, l, t]`."""
    cache = make_cache()
    untouched = blocks_outside(cache, TABLE[:2])
    g = torch.Generator().manual_seed(0)
    shape = (CONFIG.num_layers, 7, CONFIG.num_kv_heads, CONFIG.head_dim)
    k, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    for start, count in [(0, 6), (6, 1)]:
        slots = slots_of(TABLE, count, start)
        for layer in range(CONFIG.num_layers):
            cache.write(layer, slots, k[layer, start:start + count], v[layer, start:start + count])

    got = cache.gather(TABLE[:2], 7)
    expected = torch.stack([k, v]).reshape(2, CONFIG.num_layers, 7, HIDDEN)
    assert got.shape == (2, CONFIG.num_layers, 7, HIDDEN)
    assert torch.equal(got, expected)
    # The raw layout too: token 5 is offset 1 of the second block (id 1); V of layer 2.
    assert torch.equal(cache.kv[1, 2, TABLE[1], 1], v[2, 5])
    assert torch.equal(blocks_outside(cache, TABLE[:2]), untouched)


def test_write_of_one_layer_leaves_the_other_layers_alone():
    cache = make_cache()
    before = cache.kv.clone()
    k = torch.ones(3, CONFIG.num_kv_heads, CONFIG.head_dim)
    cache.write(1, slots_of(TABLE, 3), k, -k)
    changed = (cache.kv != before).any(dim=(2, 3, 4, 5))  # [2, L]
    assert changed.tolist() == [[False, True, False], [False, True, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [14, 16, 3], ids=["partial-last-block", "full-blocks", "one-partial"])
def test_scatter_then_gather_is_bit_exact(dtype, num_tokens):
    cache = make_cache(dtype)
    table = TABLE[:-(-num_tokens // BLOCK)]
    untouched = blocks_outside(cache, table)
    kv = seeded_chunk(num_tokens, seed=num_tokens, dtype=dtype)

    cache.scatter(table, kv)
    got = cache.gather(table, num_tokens)

    assert got.dtype == dtype
    assert torch.equal(got, kv)
    assert torch.equal(blocks_outside(cache, table), untouched)


def test_scatter_puts_token_t_in_block_t_div_block_size():
    cache = make_cache()
    kv = seeded_chunk(14, seed=1)
    cache.scatter(TABLE, kv)
    for t in [0, 3, 4, 9, 13]:
        block, offset = TABLE[t // BLOCK], t % BLOCK
        k = cache.kv[0, :, block, offset].reshape(CONFIG.num_layers, HIDDEN)
        v = cache.kv[1, :, block, offset].reshape(CONFIG.num_layers, HIDDEN)
        assert torch.equal(k, kv[0, :, t]), t
        assert torch.equal(v, kv[1, :, t]), t


def test_gather_reads_blocks_in_the_order_given():
    """Shuffled and partial tables: gather is `kv[:, :, ids]` flattened, whatever order the ids come in."""
    cache = make_cache()
    kv = seeded_chunk(16, seed=2)
    cache.scatter(TABLE, kv)  # blocks 6, 1, 4, 3 hold tokens 0-3, 4-7, 8-11, 12-15
    got = cache.gather([3, 6, 1], 10)
    expected = torch.cat([kv[:, :, 12:16], kv[:, :, 0:4], kv[:, :, 4:6]], dim=2)
    assert torch.equal(got, expected)
    # Against the raw layout, for blocks nobody scattered into as well.
    ids = [7, 0, 5, 2]
    raw = cache.kv[:, :, ids].reshape(2, CONFIG.num_layers, len(ids) * BLOCK, HIDDEN)
    assert torch.equal(cache.gather(ids, 13), raw[:, :, :13])


def test_gather_returns_a_copy():
    cache = make_cache()
    before = cache.kv.clone()
    cache.gather(TABLE, 14).fill_(7.0)
    assert torch.equal(cache.kv, before)  # writing the result does not write the cache

    got = cache.gather(TABLE, 14)
    snapshot = got.clone()
    cache.scatter(TABLE, seeded_chunk(14, seed=3))
    assert torch.equal(got, snapshot)  # ... nor does writing the cache change a gathered result


def test_gathered_kv_round_trips_through_kvtier(make_engine):
    """gather's output is what kvtier stores, and what kvtier retrieves scatters back: the engine's
    save and load paths. 34 tokens from 9 shuffled blocks (the last one partial) are stored as two
    kvtier chunks of 16 (the 2-token tail is not a whole chunk) and loaded into 8 other blocks."""
    num_blocks = 17
    cache = PagedKVCache(CONFIG, num_blocks, block_size=BLOCK)
    kv = seeded_chunk(34, seed=4)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(5)).tolist()
    src, dst = order[:9], order[9:]
    cache.scatter(src, kv)
    layout = KVLayout(num_layers=CONFIG.num_layers, num_kv_heads=CONFIG.num_kv_heads,
                      head_dim=CONFIG.head_dim, dtype=torch.float32)
    engine = make_engine("cpu", layout=layout)
    tokens = list(range(100, 134))

    assert engine.store(tokens, cache.gather(src, 34)) == 2
    got, n = engine.retrieve(tokens)
    assert n == 32
    cache.scatter(dst, got)
    assert torch.equal(cache.gather(dst, 32), kv[:, :, :32])
