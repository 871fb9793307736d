"""Tests for kvtier/sim/tiers.py's admission rules (kvtier/admission.py) in a replay: a prompt's
partial last block held as the next victim, as the engine's CPU tier holds it."""

from __future__ import annotations

import pytest

from kvtier.sim.tiers import TierSpec, replay_tiers
from kvtier.sim.trace import TraceRequest


def req(length: int, *ids: int) -> TraceRequest:
    return TraceRequest(0.0, length, 0, ids)


# Block 2 is the first prompt's partial tail (1000 of 1024 tokens); the second prompt needs a
# block of room; the third continues the first conversation (its block 4 rehashes the tail).
TRACE = [req(1000, 1, 2), req(512, 3), req(1100, 1, 4, 5)]


@pytest.mark.parametrize(("admission", "hit_tokens"), [("whole", 512), ("all", 0)])
def test_a_declined_partial_tail_goes_first_and_the_conversation_keeps_its_prefix(admission, hit_tokens):
    result = replay_tiers(TRACE, [TierSpec("cpu", 2, "lru", admission)], store_partial=True)
    assert result.hit_tokens == hit_tokens  # "all": LRU evicted block 1, the prefix, for block 3
    assert result.tiers["cpu"].evictions == 3


def test_a_declined_tail_is_still_written_below_and_an_exact_repeat_hits_it():
    tiers = [TierSpec("cpu", 2, "lru", "whole"), TierSpec("disk", 10)]
    result = replay_tiers([*TRACE, req(1000, 1, 2)], tiers, store_partial=True)
    assert result.tiers["disk"].writes == 5  # every block, the tail included
    assert result.hit_tokens == 512 + 1000  # the third prompt's block 1, then the whole repeat


def test_without_partial_blocks_admission_changes_nothing():
    for admission in ("whole", "all"):
        result = replay_tiers(TRACE, [TierSpec("cpu", 2, "lru", admission)], store_partial=False)
        assert result.hit_tokens == 512


def test_an_unknown_rule_is_refused_naming_the_rules():
    with pytest.raises(ValueError, match=r"unknown admission rule 'second-hit'; known: \['all', 'whole'\]"):
        TierSpec("cpu", 2, "lru", "second-hit")
