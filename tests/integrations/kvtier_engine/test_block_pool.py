"""Tests for kvtier_engine/block_pool.py: block accounting, reference counts and prefix caching, told as
stories on pools of a few blocks of 4 tokens.

Prompts are lists of token ids; `prompt(n, seed)` draws distinct ones, so two prompts share a prefix
only where a test builds them to.
"""

from __future__ import annotations

import random

import pytest

from kvtier_engine import block_pool
from kvtier_engine.block_pool import BlockPool, NoFreeBlocks

BLOCK = 4


def prompt(num_tokens: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(1000), num_tokens)


def computed(pool: BlockPool, seq_id: int, tokens: list[int]) -> None:
    """What the engine does after a prompt's forward step: its KV is in the cache, so publish it."""
    pool.publish(seq_id, tokens, len(tokens))


def test_allocate_and_free_account_for_every_block():
    pool = BlockPool(8, block_size=BLOCK)
    assert pool.num_free == 8

    assert pool.allocate(0, prompt(10, seed=0)) == 0
    assert pool.allocate(1, prompt(5, seed=1)) == 0
    a, b = pool.block_table(0), pool.block_table(1)
    assert len(a) == 3 and len(b) == 2  # ceil(10 / 4), ceil(5 / 4)
    assert len(set(a + b)) == 5 and set(a + b) <= set(range(8))
    assert pool.num_free == 3

    pool.free(0)
    assert pool.num_free == 6
    pool.free(1)
    assert pool.num_free == 8
    # Every block can be handed out again.
    assert pool.allocate(2, prompt(32, seed=2)) == 0
    assert sorted(pool.block_table(2)) == list(range(8))
    assert pool.num_free == 0


def test_prefix_hit_after_publish_shares_the_blocks():
    pool = BlockPool(8, block_size=BLOCK)
    first = prompt(10, seed=0)
    pool.allocate(0, first)
    computed(pool, 0, first)

    second = first[:8] + prompt(3, seed=1)  # 2 full blocks in common, then its own tokens
    assert pool.can_allocate(second)
    assert pool.allocate(1, second) == 8
    a, b = pool.block_table(0), pool.block_table(1)
    assert b[:2] == a[:2]
    assert b[2] not in a
    assert pool.num_free == 8 - 3 - 1  # the shared blocks were not taken twice

    # The second sequence still holds the shared blocks: freeing the first returns only its own tail.
    pool.free(0)
    assert pool.num_free == 5
    assert pool.allocate(2, prompt(20, seed=2)) == 0  # takes every free block ...
    assert pool.num_free == 0
    assert not set(pool.block_table(2)) & set(b)  # ... and none of the second sequence's
    # ... and the shared prefix is still findable, being in use.
    third = first[:8] + prompt(1, seed=3)
    assert not pool.can_allocate(third)  # 2 blocks shared, 1 more needed, 0 free
    pool.free(2)
    assert pool.allocate(3, third) == 8
    assert pool.block_table(3)[:2] == a[:2]


def test_no_hit_before_publish():
    """Blocks are findable only once their KV is computed: a prompt arriving while its twin is still
    prefilling computes its own copy."""
    pool = BlockPool(8, block_size=BLOCK)
    tokens = prompt(9, seed=0)
    pool.allocate(0, tokens)
    assert pool.allocate(1, tokens) == 0
    assert not set(pool.block_table(0)) & set(pool.block_table(1))


def test_publish_makes_only_computed_full_blocks_findable():
    """Chunked prefill: after 6 of 13 tokens only block 0 is complete; after 13, blocks 0-2."""
    pool = BlockPool(16, block_size=BLOCK)
    tokens = prompt(13, seed=0)
    pool.allocate(0, tokens)
    pool.publish(0, tokens, 6)
    assert pool.allocate(1, tokens) == 4
    pool.publish(0, tokens, 13)
    pool.publish(0, tokens, 13)  # publishing again changes nothing
    assert pool.allocate(2, tokens) == 12
    assert pool.block_table(2)[:3] == pool.block_table(0)[:3]
    assert pool.block_table(1)[0] == pool.block_table(0)[0]


@pytest.mark.parametrize("num_tokens, hit", [(8, 4), (9, 8), (12, 8), (4, 0), (1, 0)])
def test_the_block_of_the_last_prompt_token_is_never_a_hit(num_tokens, hit):
    """Its logits are needed, so it is recomputed even when the whole prompt is cached."""
    pool = BlockPool(8, block_size=BLOCK)
    tokens = prompt(num_tokens, seed=0)
    pool.allocate(0, tokens)
    computed(pool, 0, tokens)
    assert pool.allocate(1, tokens) == hit
    last = pool.block_table(1)[-1]
    assert last not in pool.block_table(0)
    assert pool.block_table(1)[:hit // BLOCK] == pool.block_table(0)[:hit // BLOCK]


def test_a_longer_prompt_reuses_the_last_block_of_a_cached_one():
    pool = BlockPool(8, block_size=BLOCK)
    tokens = prompt(8, seed=0)
    pool.allocate(0, tokens)
    computed(pool, 0, tokens)
    assert pool.allocate(1, tokens + [7]) == 8
    assert pool.block_table(1)[:2] == pool.block_table(0)


def test_a_freed_published_block_is_reused_by_the_same_prefix():
    pool = BlockPool(8, block_size=BLOCK)
    tokens = prompt(10, seed=0)
    pool.allocate(0, tokens)
    computed(pool, 0, tokens)
    table = list(pool.block_table(0))
    pool.free(0)
    assert pool.num_free == 8  # cached blocks at ref 0 count as free

    assert pool.allocate(1, tokens) == 8
    assert pool.block_table(1)[:2] == table[:2]
    assert pool.num_free == 5


def test_a_cached_block_recycled_for_another_prompt_is_no_longer_a_hit():
    pool = BlockPool(8, block_size=BLOCK)
    tokens = prompt(10, seed=0)
    pool.allocate(0, tokens)
    computed(pool, 0, tokens)
    cached = pool.block_table(0)[:2]
    pool.free(0)

    assert pool.allocate(1, prompt(32, seed=1)) == 0  # needs all 8 blocks: the cached ones too
    assert set(cached) <= set(pool.block_table(1))
    pool.free(1)  # never published: those blocks now hold the other prompt's KV, unhashed

    assert pool.allocate(2, tokens) == 0  # a hit here would serve the other prompt's KV


def test_unhashed_free_blocks_are_recycled_before_cached_ones():
    """The pool's documented policy: a free block holding nothing findable goes before any cached one."""
    pool = BlockPool(8, block_size=BLOCK)
    tokens = prompt(9, seed=0)
    pool.allocate(0, tokens)
    computed(pool, 0, tokens)
    pool.free(0)  # 2 cached blocks, 6 free ones (one of them its partial last block)

    pool.allocate(1, prompt(24, seed=1))  # exactly the 6 uncached blocks
    pool.free(1)
    assert pool.allocate(2, tokens) == 8


def x_then_y_cached_and_freed() -> tuple[BlockPool, list[int], list[int], list[int], list[int]]:
    """A 6-block pool in which prompts X then Y (12 tokens each) were computed, published and freed."""
    pool = BlockPool(6, block_size=BLOCK)
    x, y = prompt(12, seed=0), prompt(12, seed=1)
    for seq_id, tokens in [(0, x), (1, y)]:
        pool.allocate(seq_id, tokens)
        computed(pool, seq_id, tokens)
    x_table, y_table = list(pool.block_table(0)), list(pool.block_table(1))
    pool.free(0)
    pool.free(1)
    return pool, x, y, x_table, y_table


def test_cached_free_blocks_are_recycled_least_recently_freed_first():
    """6 blocks, all cached: X freed before Y, so a new prompt takes X's blocks and Y stays findable."""
    pool, x, y, x_table, y_table = x_then_y_cached_and_freed()

    pool.allocate(2, prompt(12, seed=2))
    assert set(pool.block_table(2)) == set(x_table)
    pool.free(2)
    assert pool.allocate(3, y) == 8
    assert pool.block_table(3)[:2] == y_table[:2]
    assert pool.allocate(4, x) == 0


def test_a_reused_cached_block_becomes_most_recently_used():
    """X freed before Y, then X used again and freed: now Y's blocks are the older ones."""
    pool, x, y, x_table, y_table = x_then_y_cached_and_freed()
    assert pool.allocate(2, x) == 8
    assert pool.block_table(2)[:2] == x_table[:2]
    computed(pool, 2, x)
    pool.free(2)

    pool.allocate(3, prompt(12, seed=2))
    assert set(pool.block_table(3)) == set(y_table)
    pool.free(3)
    assert pool.allocate(4, x) == 8
    assert pool.block_table(4)[:2] == x_table[:2]


def test_a_full_pool_refuses_without_changing_anything():
    pool = BlockPool(8, block_size=BLOCK)
    pool.allocate(0, prompt(24, seed=0))  # 6 blocks
    table = list(pool.block_table(0))
    too_big = prompt(9, seed=1)  # 3 blocks, 2 free

    assert not pool.can_allocate(too_big)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1, too_big)
    assert pool.num_free == 2
    assert pool.block_table(0) == table

    assert pool.allocate(1, prompt(8, seed=2)) == 0  # the 2 free blocks are still there
    assert pool.num_free == 0
    pool.free(0)
    pool.free(1)
    assert pool.num_free == 8


def test_a_refused_prompt_does_not_take_its_prefix_hits():
    """2 cached blocks and 1 other free block: a prompt hitting both cached blocks but needing 2 more
    does not fit (its hits leave the free pool too); refusing it must leave the cache as it was."""
    pool = BlockPool(8, block_size=BLOCK)
    tokens = prompt(9, seed=0)
    pool.allocate(0, tokens)
    computed(pool, 0, tokens)
    cached = pool.block_table(0)[:2]
    pool.free(0)
    pool.allocate(1, prompt(20, seed=1))  # 5 of the 6 uncached blocks
    assert pool.num_free == 3

    longer = tokens[:8] + prompt(8, seed=2)  # 4 blocks: 2 hits + 2 new, only 1 new free
    assert not pool.can_allocate(longer)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2, longer)
    assert pool.num_free == 3

    assert pool.allocate(3, tokens) == 8  # the cached blocks are still cached and free to take
    assert pool.block_table(3)[:2] == cached
    assert pool.num_free == 0
    pool.free(1)
    pool.free(3)
    assert pool.num_free == 8  # no reference was leaked


def test_can_allocate_counts_prefix_blocks_already_in_use():
    """A prompt whose prefix another sequence holds needs free blocks only for the rest."""
    pool = BlockPool(8, block_size=BLOCK)
    tokens = prompt(9, seed=0)
    pool.allocate(0, tokens)
    computed(pool, 0, tokens)
    pool.allocate(1, prompt(16, seed=1))
    assert pool.num_free == 1

    sharing = tokens[:8] + prompt(1, seed=2)  # 3 blocks, 2 of them held by sequence 0
    assert pool.can_allocate(sharing)
    assert pool.allocate(2, sharing) == 8
    assert pool.num_free == 0


def test_append_slot_grows_by_one_block_at_each_boundary():
    pool = BlockPool(8, block_size=BLOCK)
    pool.allocate(0, prompt(6, seed=0))
    assert len(pool.block_table(0)) == 2

    for num_tokens, blocks in [(7, 2), (8, 2), (9, 3), (12, 3), (13, 4)]:
        assert pool.append_slot(0, num_tokens)
        assert len(pool.block_table(0)) == blocks, num_tokens
    assert pool.num_free == 4
    assert len(set(pool.block_table(0))) == 4


def test_append_slot_refuses_when_full_without_changing_anything():
    pool = BlockPool(8, block_size=BLOCK)
    pool.allocate(0, prompt(9, seed=0))  # 3 blocks, room up to 12 tokens
    pool.allocate(1, prompt(20, seed=1))  # the other 5
    table = list(pool.block_table(0))

    assert pool.append_slot(0, 10)
    assert pool.append_slot(0, 12)  # the last block still has room
    assert not pool.append_slot(0, 13)
    assert pool.block_table(0) == table
    assert pool.num_free == 0

    pool.free(1)
    assert pool.append_slot(0, 13)
    assert len(pool.block_table(0)) == 4
    assert pool.num_free == 4


def test_append_slot_recycles_a_cached_block_and_drops_its_hash():
    pool = BlockPool(4, block_size=BLOCK)
    cached = prompt(8, seed=0)
    pool.allocate(0, cached)
    computed(pool, 0, cached)
    pool.free(0)  # 2 cached blocks
    pool.allocate(1, prompt(8, seed=1))  # the 2 uncached ones
    assert pool.append_slot(1, 16)  # decode into both cached blocks
    assert pool.num_free == 0
    pool.free(1)
    assert pool.allocate(2, cached + [1]) == 0


def test_different_prefixes_never_share_blocks():
    """Hashes chain over every token before a block: equal blocks after different prefixes differ."""
    pool = BlockPool(16, block_size=BLOCK)
    a = prompt(13, seed=0)
    pool.allocate(0, a)
    computed(pool, 0, a)

    other_first_token = [a[0] + 1000] + a[1:]  # differs only in token 0; blocks 1 and 2 are equal
    assert pool.allocate(1, other_first_token) == 0
    other_second_block = a[:4] + [a[4] + 1000] + a[5:]  # block 0 shared, block 1 differs, block 2 equal
    assert pool.allocate(2, other_second_block) == 4
    assert pool.block_table(2)[0] == pool.block_table(0)[0]
    assert not set(pool.block_table(1)) & set(pool.block_table(0))
    assert not set(pool.block_table(2)[1:]) & set(pool.block_table(0))


def test_a_hash_collision_is_rejected_by_the_token_comparison(monkeypatch):
    """Forcing a collision needs a white-box hook: the pool hashes with `kvtier.keys.chained_digests`,
    imported into block_pool, so this test monkeypatches that name (allowed here) to give every i-th
    block the same digest whatever its tokens. Only the token comparison can then tell prompts apart."""

    def colliding(raw, seed, ends, start=0):
        return [f"block-{end}".encode() for end in ends]

    monkeypatch.setattr(block_pool, "chained_digests", colliding)
    pool = BlockPool(8, block_size=BLOCK)
    a, b = prompt(9, seed=0), prompt(9, seed=1)
    pool.allocate(0, a)
    computed(pool, 0, a)
    assert pool.allocate(1, a) == 8  # the hook still finds real hits
    assert pool.allocate(2, b) == 0  # same digests, different tokens: no hit
    assert not set(pool.block_table(2)) & set(pool.block_table(0))


def test_twin_prompts_computed_twice_leave_no_stale_hit():
    """Two sequences compute the same prompt (neither had published yet), so two blocks hold each
    prefix block. After both are freed and a third prompt recycles some of them, a lookup of that prompt
    must return only blocks that still hold it, never one now holding the third prompt's KV."""
    pool = BlockPool(8, block_size=BLOCK)
    tokens = prompt(9, seed=0)
    for seq_id in (0, 1):
        pool.allocate(seq_id, tokens)
    tables = [list(pool.block_table(0)), list(pool.block_table(1))]
    for seq_id in (0, 1):
        computed(pool, seq_id, tokens)
        pool.free(seq_id)
    assert pool.num_free == 8

    pool.allocate(2, prompt(28, seed=1))  # 7 of 8: some of the prefix blocks are recycled
    recycled = set(pool.block_table(2))
    pool.free(2)  # unpublished: its blocks are free and hold no findable prefix
    hit = pool.allocate(3, tokens)
    shared = pool.block_table(3)[:hit // BLOCK]
    assert not set(shared) & recycled
    assert all(block in (tables[0][i], tables[1][i]) for i, block in enumerate(shared))
