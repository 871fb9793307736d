"""Tests for kvtier/sim/belady.py: the offline bound on hand-made traces, against an exhaustive
search on tiny ones, and on the Mooncake conversation trace at 5% of its distinct blocks."""

from __future__ import annotations

from functools import cache, partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.policy_registry import make_policy
from kvtier.sim.belady import belady, next_uses
from kvtier.sim.replay import replay
from kvtier.sim.trace import TraceRequest, read_trace

TRACE = Path(__file__).resolve().parents[3] / "shared" / "workloads" / "mooncake_conversation_trace.jsonl"


def req(length: int, *ids: int) -> TraceRequest:
    return TraceRequest(0.0, length, 0, ids)


def test_next_uses_are_the_next_request_holding_each_block():
    trace = [req(1024, 1, 2), req(512, 2), req(1024, 1, 3), req(512, 2)]
    assert next_uses(trace) == [(2, 1), (3,), (4, 4), (4,)]  # 4 = never


def test_the_hit_rule_is_the_replays():
    trace = [req(1000, 1, 2), req(1100, 1, 2, 3), req(600, 1, 9)]
    result = belady(trace, capacity_blocks=10, block_tokens=512)
    assert result == replay(trace, capacity_blocks=10, block_tokens=512)
    assert (result.hit_tokens, result.input_tokens, result.requests) == (1024 + 512, 2700, 3)


def test_a_block_needed_later_than_everything_held_is_bypassed():
    trace = [req(512, 1), req(512, 2), req(512, 1)]  # 2 is never used again: not worth 1's place
    assert belady(trace, capacity_blocks=1).hit_tokens == 512
    assert replay(trace, capacity_blocks=1).hit_tokens == 0  # LRU lets 2 push 1 out


def test_the_block_used_farthest_in_the_future_is_evicted():
    trace = [req(512, 1), req(512, 2), req(512, 3), req(512, 3), req(512, 2), req(512, 1)]
    # at 3: 1 (next at 5) is farthest and 3 (next at 3) is sooner: 1 goes; then 3 and 2 hit, 1 misses
    assert belady(trace, capacity_blocks=2).hit_tokens == 2 * 512


def test_a_cache_of_no_blocks_hits_nothing_a_negative_one_is_refused_and_any_iterable_will_do():
    assert belady([req(512, 1), req(512, 1)], capacity_blocks=0).hit_tokens == 0
    with pytest.raises(ValueError, match="capacity_blocks"):
        belady([], capacity_blocks=-1)
    assert belady(iter([req(512, 1), req(512, 1)]), capacity_blocks=1).hit_tokens == 512


def _most_hits(blocks: tuple[int, ...], capacity: int) -> int:
    """The most hits any admission and eviction choices give, by exhaustive search."""

    @cache
    def best(i: int, held: frozenset) -> int:
        if i == len(blocks):
            return 0
        block = blocks[i]
        if block in held:
            return 1 + best(i + 1, held)
        options = [best(i + 1, held)]  # bypass
        if len(held) < capacity:
            options.append(best(i + 1, held | {block}))
        else:
            options += [best(i + 1, held - {out} | {block}) for out in held]
        return max(options)

    return best(0, frozenset())


@settings(max_examples=300, deadline=None)
@given(blocks=st.lists(st.integers(0, 5), max_size=14), capacity=st.integers(0, 4))
def test_with_one_block_a_request_it_gets_the_most_hits_possible(blocks, capacity):
    trace = [req(512, b) for b in blocks]  # a request's hit is then exactly its block's hit
    assert belady(trace, capacity).hit_tokens == 512 * _most_hits(tuple(blocks), capacity)


@pytest.mark.skipif(not TRACE.exists(), reason=f"no trace at {TRACE}")
def test_on_the_conversation_trace_at_5_percent_of_distinct_blocks_it_hits_37_4_percent():
    requests, _ = read_trace(TRACE)
    distinct = len({h for r in requests for h in r.hash_ids})
    cap = int(0.05 * distinct)
    result = belady(requests, cap)
    assert result.hit_rate == pytest.approx(0.37362, abs=0.0001)  # issue 17: 37.4%
    # No more than 8,138 blocks are ever waiting for a next use, so 9,139 lose nothing but the
    # first uses: the same hits as a cache holding every block.
    assert result.hit_tokens == replay(requests, distinct).hit_tokens
    for name in ("lru", "arc", "s3fifo"):
        assert replay(requests, cap, policy=partial(make_policy, name, cap)).hit_tokens < result.hit_tokens
