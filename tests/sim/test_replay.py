"""Tests for kvtier/sim/replay.py: token hit rates of a trace replayed through an eviction policy,
on hand-made traces, and LRU on the Mooncake conversation trace at the rate issue 17 states."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.sim.replay import replay
from kvtier.sim.trace import TraceRequest, read_trace

TRACE = Path(__file__).resolve().parents[3] / "shared" / "workloads" / "mooncake_conversation_trace.jsonl"


def req(length: int, *ids: int) -> TraceRequest:
    return TraceRequest(0.0, length, 0, ids)


def test_the_hit_is_the_run_of_leading_blocks_held_cut_to_the_prompt():
    trace = [req(1000, 1, 2), req(1100, 1, 2, 3), req(600, 1, 9)]
    result = replay(trace, capacity_blocks=10, block_tokens=512)
    # first: nothing held; second: blocks 1, 2 (1024 tokens); third: block 1 only (512 of 600)
    assert (result.hit_tokens, result.input_tokens, result.requests) == (1024 + 512, 2700, 3)
    assert result.hit_rate == pytest.approx(1536 / 2700)


def test_lru_evicts_the_least_recently_used_block_and_a_hole_ends_the_prefix():
    trace = [req(1024, 1, 2), req(1024, 3, 4), req(1024, 1, 2)]  # room for 3: block 1 goes at 4
    assert replay(trace, capacity_blocks=3, block_tokens=512).hit_tokens == 0
    assert replay(trace, capacity_blocks=4, block_tokens=512).hit_tokens == 1024


def test_a_cache_of_no_blocks_hits_nothing_and_a_negative_one_is_refused():
    assert replay([req(512, 1), req(512, 1)], capacity_blocks=0).hit_tokens == 0
    with pytest.raises(ValueError, match="capacity_blocks"):
        replay([], capacity_blocks=-1)


@pytest.mark.skipif(not TRACE.exists(), reason=f"no trace at {TRACE}")
def test_lru_on_the_conversation_trace_at_5_percent_of_distinct_blocks_hits_19_9_percent():
    requests, skipped = read_trace(TRACE)
    distinct = len({h for r in requests for h in r.hash_ids})
    assert (len(requests), distinct, skipped) == (12031, 182790, [])
    result = replay(requests, capacity_blocks=int(0.05 * distinct))
    assert result.hit_rate == pytest.approx(0.1993, abs=0.0005)  # issue 17's LRU figure
