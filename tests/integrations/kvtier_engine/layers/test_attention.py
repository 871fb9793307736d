"""Tests for kvtier_engine/layers/attention.py: `causal_attention` against the attention formula
written out, then the paged half (BatchMetadata, PagedAttention) against the reference backend,
ContiguousKVCache.

Sequences of mixed lengths run together through one PagedKVCache with shuffled block tables, the way
the scheduler will run them: all prefilled in one call, prefilled in chunks beside other sequences'
decode steps, and decoded together; and a prompt whose prefix blocks are another sequence's (a prefix
hit from BlockPool). The logits of each sequence must equal those of that sequence alone over
ContiguousKVCache to 1e-5 in fp32.

The models are conftest's tiny Hugging Face checkpoints (weights with std 0.2, so attention is peaked
and a token read from the wrong slot, block or sequence moves the logits far more than the tolerance),
with full attention, Mistral's sliding window of 8 in every layer, and Qwen2's window from layer 1 on.
Every cache starts full of noise, as a reused cache is: a slot read before it is written shows up.
"""

from __future__ import annotations

import pytest
import torch

from kvtier_engine.block_pool import BlockPool
from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers.attention import (
    QUERY_BLOCK,
    BatchMetadata,
    ContiguousKVCache,
    PagedAttention,
    causal_attention,
)
from kvtier_engine.models.loader import load_model

ATOL = 1e-4  # as in models/test_llama.py: how the prompt is split into calls alone moves fp32 logits by ~3e-5
LENGTHS = [5, 37, 64]  # prompts: under one block, a partial last block, whole blocks (of 16)
DECODE = 3  # tokens decoded after each prompt; 64 + 3 crosses a block boundary
MODELS = ["llama", "mistral-window-8", "qwen2-window-8-from-layer-1"]


def written_out_attention(q, k, v, start, window):
    """softmax(q k^T / sqrt(D) + mask) v per query head, its KV head q_head // group, in fp64."""
    t, hq, d = q.shape
    group = hq // k.shape[1]
    out = torch.empty(t, hq, d, dtype=torch.float64)
    for i in range(t):
        pos = start + i
        first = 0 if window is None else max(0, pos - window + 1)  # keys j: pos - window < j <= pos
        keys, values = k[first:pos + 1].double(), v[first:pos + 1].double()
        for h in range(hq):
            probs = torch.softmax(keys[:, h // group] @ q[i, h].double() / d ** 0.5, dim=0)
            out[i, h] = probs @ values[:, h // group]
    return out


# (new tokens, cached tokens before them, window): a whole prompt, a decode step, a chunk after a
# cache, a chunk longer than a query block, and windows shorter and longer than what is cached.
CASES = [(40, 0, None), (1, 70, None), (23, 50, None), (QUERY_BLOCK + 9, 30, None), (40, 0, 8),
         (1, 70, 8), (1, 5, 8), (1, 8, 8), (23, 50, 16), (QUERY_BLOCK + 9, 30, 64)]


@pytest.mark.parametrize("new, cached, window", CASES)
def test_causal_attention_is_the_formula_written_out(new, cached, window):
    gen = torch.Generator().manual_seed(new + cached)
    q = torch.randn(new, 6, 16, generator=gen) * 2  # 6 query heads over 2 KV heads
    k = torch.randn(cached + new, 2, 16, generator=gen) * 2
    v = torch.randn(cached + new, 2, 16, generator=gen)
    want = written_out_attention(q, k, v, cached, window)
    got = causal_attention(q, k, v, cached, window)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert max_error(got.double(), want) < 1e-5
    half = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cached, window)
    assert half.dtype == torch.bfloat16
    assert max_error(half.double(), written_out_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cached,
                                                         window)) < 2e-2


@pytest.fixture(scope="module", params=MODELS)
def model(request, reference):
    return load_model(reference(request.param).path)


@pytest.fixture(scope="module")
def llama(reference):
    return load_model(reference("llama").path)


def seeded_ids(num_tokens: int, seed: int, vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(seed))


def reference_logits(model, ids: torch.Tensor, chunks: list[int] | None = None) -> torch.Tensor:
    """The sequence alone over the reference backend, fed in `chunks` (all at once when None), as the
    paged run fed it: logits [T, vocab]. Same chunks, because fp32 logits of one prompt computed in
    different chunkings already differ by ~1e-5 (the GEMMs block differently), paging or not."""
    cache = ContiguousKVCache(model.config, max_tokens=len(ids))
    out, start = [], 0
    with torch.no_grad():
        for size in chunks or [len(ids)]:
            positions = torch.arange(start, start + size)
            out.append(model(ids[positions], positions, cache))
            start += size
    return torch.cat(out)


def max_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return (ours - ref).abs().max().item()


def shuffled_tables(lengths: list[int], block_size: int, num_blocks: int, seed: int) -> list[list[int]]:
    """Disjoint block tables drawn from a random permutation of the cache's blocks."""
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = []
    for length in lengths:
        count = -(-length // block_size)
        tables.append(order[:count])
        order = order[count:]
    return tables


def noisy_cache(model, num_blocks: int, block_size: int) -> PagedKVCache:
    cache = PagedKVCache(model.config, num_blocks, block_size=block_size)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=torch.Generator().manual_seed(7)) * 3)
    return cache


class Batch:
    """Sequences stepped together through one PagedKVCache: `step(num_new)` feeds sequence i its next
    `num_new[i]` tokens in one model call and returns each sequence's logits."""

    def __init__(self, model, cache: PagedKVCache, tokens: list[torch.Tensor], tables: list[list[int]],
                 num_computed: list[int] | None = None):
        self.model, self.cache, self.tokens, self.tables = model, cache, tokens, tables
        self.done = list(num_computed or [0] * len(tokens))

    def step(self, num_new: list[int]) -> list[torch.Tensor]:
        meta = BatchMetadata.build(self.tables, self.done, num_new, self.cache.block_size)
        ids = torch.cat([t[d:d + n] for t, d, n in zip(self.tokens, self.done, num_new)])
        with torch.no_grad():
            logits = self.model(ids, meta.positions, PagedAttention(self.cache, meta, self.model.config))
        assert logits.shape == (sum(num_new), self.model.config.vocab_size)
        starts = [int(s) for s in meta.query_starts]
        out = [logits[starts[i]:starts[i + 1]] for i in range(len(num_new))]
        self.done = [d + n for d, n in zip(self.done, num_new)]
        return out


def test_batch_metadata_maps_each_new_token_to_its_position_and_slot():
    meta = BatchMetadata.build([[3, 1], [0], [5, 2, 4]], num_computed=[2, 0, 9], num_new=[3, 1, 2],
                               block_size=4)
    assert meta.positions.dtype == meta.slot_mapping.dtype == torch.long
    assert meta.positions.tolist() == [2, 3, 4, 0, 9, 10]
    # seq 0: positions 2, 3 in block 3, position 4 at offset 0 of block 1; seq 2: offsets 1, 2 of block 4
    assert meta.slot_mapping.tolist() == [14, 15, 4, 0, 17, 18]
    assert [int(s) for s in meta.query_starts] == [0, 3, 4, 6]
    assert [int(n) for n in meta.context_lens] == [5, 1, 11]


@pytest.mark.parametrize("block_size", [16, 5])
def test_one_call_prefill_of_a_batch_matches_each_sequence_alone(model, block_size):
    vocab = model.config.vocab_size
    tokens = [seeded_ids(n, seed=i, vocab_size=vocab) for i, n in enumerate(LENGTHS)]
    num_blocks = sum(-(-n // block_size) for n in LENGTHS) + 3  # 3 spare blocks of noise
    tables = shuffled_tables(LENGTHS, block_size, num_blocks, seed=block_size)
    batch = Batch(model, noisy_cache(model, num_blocks, block_size), tokens, tables)

    logits = batch.step(LENGTHS)

    for ids, ours in zip(tokens, logits):
        assert max_error(ours, reference_logits(model, ids)) < ATOL, len(ids)


def test_paged_cache_holds_the_reference_kv(llama):
    """After a batched prefill, gathering a sequence's blocks gives the K/V the reference cached."""
    tokens = [seeded_ids(n, seed=i, vocab_size=llama.config.vocab_size) for i, n in enumerate(LENGTHS)]
    tables = shuffled_tables(LENGTHS, 16, 10, seed=0)
    cache = noisy_cache(llama, 10, 16)
    Batch(llama, cache, tokens, tables).step(LENGTHS)

    c = llama.config
    for ids, table in zip(tokens, tables):
        ref = ContiguousKVCache(c, max_tokens=len(ids))
        with torch.no_grad():
            llama(ids, torch.arange(len(ids)), ref)
        expected = torch.stack([ref.k, ref.v]).reshape(2, c.num_layers, len(ids), c.num_kv_heads * c.head_dim)
        assert max_error(cache.gather(table, len(ids)), expected) < ATOL


def test_chunked_prefill_and_decode_of_a_batch_match_each_sequence_alone(model):
    """Prompts of 5, 37 and 64 tokens prefilled in chunks over 3 steps (num_computed > 0), each one
    decoding beside the others' prefill chunks as soon as its prompt is in, then 3 steps decoding all 3.
    Block tables cover the whole run from the start, so the tail of each table is noise the queries
    must not see."""
    schedule = [[5, 16, 20], [1, 21, 30], [1, 1, 14], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    total = [sum(column) for column in zip(*schedule)]  # 10, 41, 67
    vocab = model.config.vocab_size
    tokens = [seeded_ids(n, seed=10 + i, vocab_size=vocab) for i, n in enumerate(total)]
    batch = Batch(model, noisy_cache(model, 12, 16), tokens, shuffled_tables(total, 16, 12, seed=1))

    outputs: list[list[torch.Tensor]] = [[] for _ in tokens]
    for num_new in schedule:
        for i, logits in enumerate(batch.step(num_new)):
            outputs[i].append(logits)

    for ids, chunks in zip(tokens, outputs):
        sizes = [len(chunk) for chunk in chunks]
        assert max_error(torch.cat(chunks), reference_logits(model, ids, sizes)) < ATOL, len(ids)


def test_decode_one_token_each_matches_each_sequence_alone(model):
    """The pure decode batch: after a one-call prefill, every step feeds each sequence 1 token."""
    vocab = model.config.vocab_size
    total = [n + DECODE for n in LENGTHS]
    tokens = [seeded_ids(n, seed=20 + i, vocab_size=vocab) for i, n in enumerate(total)]
    batch = Batch(model, noisy_cache(model, 12, 16), tokens, shuffled_tables(total, 16, 12, seed=2))
    batch.step(LENGTHS)
    references = [reference_logits(model, ids, [n] + [1] * DECODE) for ids, n in zip(tokens, LENGTHS)]
    for step in range(DECODE):
        for n, ref, logits in zip(LENGTHS, references, batch.step([1, 1, 1])):
            assert max_error(logits, ref[n + step:n + step + 1]) < ATOL, (n, step)


def test_a_prompt_on_shared_prefix_blocks_matches_computing_it_from_scratch(model):
    """A 40-token prompt is prefilled and published; a second prompt sharing its first 32 tokens gets a
    32-token hit and the first prompt's two blocks, and computes only its own 10 tokens, in the same
    step as the first prompt's next decode token. Both match their references, and the shared blocks
    are read, never rewritten."""
    vocab = model.config.vocab_size
    block_size = 16
    pool = BlockPool(8, block_size=block_size)
    cache = noisy_cache(model, 8, block_size)
    first = seeded_ids(41, seed=30, vocab_size=vocab)  # a 40-token prompt and its next token
    second = torch.cat([first[:32], seeded_ids(10, seed=31, vocab_size=vocab)])
    prompt = first[:40].tolist()

    assert pool.allocate(0, prompt) == 0
    Batch(model, cache, [first], [pool.block_table(0)]).step([40])
    pool.publish(0, prompt, 40)
    shared = pool.block_table(0)[:2]
    shared_kv = cache.gather(shared, 32)

    hit = pool.allocate(1, second.tolist())
    assert hit == 32
    assert pool.block_table(1)[:2] == shared
    assert pool.append_slot(0, 41)
    batch = Batch(model, cache, [first, second], [pool.block_table(0), pool.block_table(1)],
                  num_computed=[40, hit])
    decode, rest = batch.step([1, 10])

    assert max_error(rest, reference_logits(model, second, [32, 10])[32:]) < ATOL
    assert max_error(decode, reference_logits(model, first, [40, 1])[40:]) < ATOL
    assert torch.equal(cache.gather(shared, 32), shared_kv)
