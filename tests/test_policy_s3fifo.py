"""Tests for kvtier/policy_s3fifo.py: S3-FIFO's queues told as stories on 10- and 20-block caches,
checked against a transcription of the paper's Algorithm 1, driven through `BoundedIndex` with
protected keys, and on the Mooncake conversation trace at 5% of its distinct blocks."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_contract import (
    OPS,
    always,
    drive,
    needs_trace,
    never,
    rate_at_5_percent,
    use,
    walks_lazily_and_refuses_changes_mid_walk,
)

from kvtier.policy import BoundedIndex
from kvtier.policy_registry import make_policy
from kvtier.policy_s3fifo import S3FIFOPolicy


def cache(capacity: int, **options) -> tuple[BoundedIndex, S3FIFOPolicy]:
    policy = S3FIFOPolicy(capacity, **options)
    return BoundedIndex(capacity, policy), policy


def queues(policy: S3FIFOPolicy) -> tuple[list, list]:
    """(S, M) keys, oldest first."""
    def keys(fifo) -> list:
        out, node = [], fifo.root.next
        while node is not fifo.root:
            out.append(node.key)
            node = node.next
        return out
    return keys(policy._small), keys(policy._main)


def test_s3fifo_is_registered_and_checks_its_arguments():
    policy = make_policy("s3fifo", 10)
    assert isinstance(policy, S3FIFOPolicy) and policy.small_share == 1 and policy.ghost_share == 9
    assert policy.promote_at == 2  # the paper's pseudo-code and libCacheSim: freq > 1
    for bad in ({"capacity": -1}, {"capacity": 10, "small_fraction": 1.5}, {"capacity": 10, "promote_at": 0}):
        with pytest.raises(ValueError):
            S3FIFOPolicy(**bad)


def test_a_one_hit_wonder_leaves_from_s_without_touching_m():
    idx, policy = cache(10)
    use(idx, "a", "a", "a")  # a used twice since insertion
    use(idx, *"bcdefghij")
    use(idx, "k")  # S's tail: a -> M (count reset), b unused -> out, to G
    use(idx, "l")  # c, the same
    assert "a" in idx and not {"b", "c"} & set(idx) and policy.ghosts == 2
    assert queues(policy) == (list("defghijkl"), ["a"])
    # S holds its share, so the walk drains S before it reaches M.
    assert list(idx.victims(always)) == [*"defghijkl", "a"]


def test_a_ghost_hit_goes_straight_to_m():
    idx, policy = cache(10)
    use(idx, "a", "a", "a", *"bcdefghij", "k", "l")  # as above: a in M, b and c in G
    use(idx, "b")  # room from S (d -> G), then b, remembered, skips S
    assert queues(policy) == (list("efghijkl"), ["a", "b"]) and policy.ghosts == 2  # c, d


def test_one_use_is_not_enough_to_reach_m_unless_promote_at_is_1():
    for promote_at, kept in ((2, False), (1, True)):
        idx, policy = cache(10, promote_at=promote_at)
        use(idx, "a", "a", *"bcdefghij", "k")
        assert ("a" in idx) is kept
        assert queues(policy)[1] == (["a"] if kept else [])


def test_m_gives_a_used_key_a_second_chance_spending_one_use():
    idx, policy = cache(10)
    use(idx, "a", "a", "a", *"bcdefghij", "k", "l", "b")  # S = e..l, M = a b
    idx.touch("a")
    assert list(idx.victims(always)) == [*"efghijkl", "b", "a"]  # a went round once
    assert queues(policy)[1] == ["b", "a"]
    assert list(idx.victims(always)) == [*"efghijkl", "b", "a"]  # its use is spent: no second lap


def test_the_walk_takes_from_m_while_s_is_below_its_share():
    policy = S3FIFOPolicy(20)  # S's share: 2; G: 18
    keys = [f"k{i}" for i in range(20)]
    for key in keys:
        policy.insert(key, 1)
    for key in keys:
        policy.remove(key)  # plain deletes from S count as evictions: G keeps the newest 18
    assert policy.ghosts == 18
    for key in keys[2:]:
        policy.insert(key, 1)  # remembered: into M
    policy.insert("x", 1)  # S = x: below its share
    assert list(policy.victims(always)) == [*keys[2:], "x"]
    policy.insert("y", 1)  # S = x y: at its share, x goes first, then S is below it again
    assert list(policy.victims(always)) == ["x", *keys[2:], "y"]


def test_once_the_walk_takes_from_s_it_stays_until_s_offers_one():
    policy = S3FIFOPolicy(20)
    for key in ("m1", "m2"):
        policy.insert(key, 1)
        policy.remove(key)
        policy.insert(key, 1)  # a ghost hit: M = m1 m2
    for key in ("p", "q", "r"):
        policy.insert(key, 1)
    for key in ("p", "q"):
        policy.touch(key)
        policy.touch(key)
    # S = p q r (3 >= 2): p and q move to M (S drops below its share), but S must offer one first.
    assert next(policy.victims(always)) == "r"
    assert queues(policy) == (["r"], ["m1", "m2", "p", "q"])


def test_a_walk_over_protected_keys_only_ends_and_drops_nothing():
    idx, policy = cache(10)
    use(idx, "a", "a", "a", *"bcdefghij", "k")  # a in M
    for _ in range(3):
        idx.touch("a")  # count 3: three second chances
    assert list(idx.victims(never)) == []
    assert sorted(idx) == sorted("acdefghijk") and len(policy) == 10
    assert list(idx.victims(always))[-1] == "a"


def test_remove_from_s_leaves_a_ghost_and_from_m_nothing():
    idx, policy = cache(10)
    use(idx, "a", "a", "a", *"bcdefghij", "k")  # a in M, b in G
    idx.remove("a")
    idx.remove("c")
    assert policy.ghosts == 2 and len(policy) == 8  # b, c
    idx.remove("zz")  # unknown: nothing happens
    assert policy.ghosts == 2 and len(policy) == 8


def test_ghosts_are_bounded_by_size_not_count():
    policy = S3FIFOPolicy(100)  # G: 90 units
    for key, nbytes in (("a", 50), ("b", 30), ("c", 40)):
        policy.insert(key, nbytes)
        policy.remove(key)
    assert policy.ghosts == 2  # 50 + 30 + 40 > 90: a, the oldest, went


def test_evictable_is_asked_lazily_and_changing_the_policy_mid_walk_raises():
    idx, policy = cache(10)
    assert walks_lazily_and_refuses_changes_mid_walk(idx, policy) == ["a", "b"]


class _PaperS3FIFO:
    """Algorithm 1 of the paper for unit sizes, as libCacheSim's S3FIFOv0.c runs it (an evictS that
    empties S without evicting falls through to M on the next EVICT)."""

    def __init__(self, c: int, small_fraction: float, promote_at: int) -> None:
        self.c, self.share, self.promote_at = c, int(c * small_fraction), promote_at
        self.s, self.m, self.g, self.freq = OrderedDict(), OrderedDict(), OrderedDict(), {}

    def access(self, x: int) -> None:
        if x in self.freq:
            self.freq[x] = min(self.freq[x] + 1, 3)
            return
        if not self.c:
            return
        while len(self.s) + len(self.m) >= self.c:
            self.evict()
        if x in self.g:
            del self.g[x]
            self.m[x] = None
        else:
            self.s[x] = None
        self.freq[x] = 0

    def evict(self) -> None:
        if self.s and len(self.s) >= self.share:
            while self.s:
                t = self.s.popitem(last=False)[0]
                if self.freq[t] >= self.promote_at:
                    self.m[t], self.freq[t] = None, 0
                    continue
                del self.freq[t]
                self.g[t] = None
                while len(self.g) > self.c - self.share:
                    self.g.popitem(last=False)
                return
            return
        while self.m:
            t = self.m.popitem(last=False)[0]
            if self.freq[t]:
                self.m[t] = None
                self.freq[t] -= 1
                continue
            del self.freq[t]
            return


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 24), small_fraction=st.sampled_from([0.1, 0.25, 0.5]),
       promote_at=st.integers(1, 3), keys=st.lists(st.integers(0, 30), max_size=150))
def test_through_the_index_it_makes_the_papers_choices(capacity, small_fraction, promote_at, keys):
    idx, policy = cache(capacity, small_fraction=small_fraction, promote_at=promote_at)
    paper = _PaperS3FIFO(capacity, small_fraction, promote_at)
    for key in keys:
        if key in idx:
            idx.touch(key)
        elif idx.make_room(1, never) is not None:
            idx.add(key, 1)
        paper.access(key)
        assert queues(policy) == (list(paper.s), list(paper.m))
        assert list(policy._ghost) == list(paper.g)
        assert {k: policy._nodes[k].count for k in idx} == paper.freq


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 100), ops=OPS, protected_keys=st.frozensets(st.integers(0, 11)),
       promote_at=st.integers(1, 3))
def test_victims_rooms_and_ghosts_keep_their_contract_with_any_sizes_and_pins(capacity, ops, protected_keys,
                                                                             promote_at):
    policy = S3FIFOPolicy(capacity, promote_at=promote_at)

    def queues_and_ghosts(idx) -> None:
        small, main = queues(policy)
        assert sorted(small + main) == sorted(idx)
        assert sum(policy._ghost.values()) <= policy.ghost_share and policy.ghosts <= policy.ghost_share
        assert not set(policy._ghost) & set(idx)

    drive(policy, capacity, ops, protected_keys, queues_and_ghosts)


@needs_trace
def test_s3fifo_on_the_conversation_trace_at_5_percent_of_distinct_blocks_hits_19_3_percent():
    hit_rate = rate_at_5_percent("s3fifo")
    # Issue 17 states 19.5%. The replay marks a hit block used twice per request (retrieve, then
    # store), so the paper's "used twice in S" threshold is met by one reuse: promote_at 1 and 2 give
    # the same 19.30%. Marking it once per request gave 19.09% (promote_at 2) and 19.45% (1).
    assert hit_rate == pytest.approx(0.19299, abs=0.0001)
