"""Tests for kvtier/policy_adaptive.py: the LRFU order told as stories (frequency, suffix first,
ghosts, correlated uses, a change of half-life), the shadows' choice on workloads made for LRU and
for frequency, the contract through `BoundedIndex` with any sizes and protected keys, and the
Mooncake conversation trace against LRU."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_contract import OPS, TRACE, needs_trace, walks_lazily_and_refuses_changes_mid_walk
from policy_contract import drive as keep_contract

from kvtier import policy_adaptive as adaptive
from kvtier.policy import BoundedIndex, LRUPolicy
from kvtier.policy_adaptive import CANDIDATES, AdaptivePolicy, Lrfu
from kvtier.policy_registry import make_policy
from kvtier.sim.tiers import TierSpec, replay_tiers
from kvtier.sim.trace import read_trace


def always(_key) -> bool:
    return True


def order(lrfu: Lrfu) -> list:
    return list(lrfu.order(always))


def test_adaptive_is_registered_and_starts_as_lru():
    policy = make_policy("adaptive", 100)
    assert isinstance(policy, AdaptivePolicy) and CANDIDATES[policy.choice][1] == 0.0
    assert list(policy.victims(always)) == [] and len(policy) == 0


def test_a_key_used_twice_outlives_keys_used_once_since():
    lrfu = Lrfu(half_life_ops=1000, alpha=1.0, ghost_limit=10)
    for key in ("a", "b"):
        lrfu.use(key)
    lrfu.tau += adaptive.CORRELATED_OPS * lrfu.rate  # (uses this far apart are two uses)
    lrfu.use("a")
    for key in ("c", "d"):
        lrfu.use(key)
    # a's score is ~2 (a 1-half-life head start); c and d were used once, later: a outlives them.
    assert order(lrfu) == ["b", "d", "c", "a"]


def test_with_alpha_0_it_is_lru_and_uses_close_together_count_once():
    lru = Lrfu(half_life_ops=1, alpha=0.0, ghost_limit=10)
    for key in ("a", "b", "c", "a"):
        lru.use(key)
    assert order(lru) == ["b", "c", "a"]
    lrfu = Lrfu(half_life_ops=10_000, alpha=1.0, ghost_limit=10)
    for key in ("a", "a", "a"):  # within CORRELATED_OPS: one use
        lrfu.use(key)
    assert lrfu.entries["a"].score == 1.0


def test_among_equals_the_last_indexed_goes_first_so_a_suffix_leaves_before_its_prefix():
    lrfu = Lrfu(half_life_ops=10_000, alpha=1.0, ghost_limit=10)
    for key in ("p0", "p1", "p2", "p3"):  # one request's chunks, prefix first
        lrfu.use(key)
    assert order(lrfu) == ["p3", "p2", "p1", "p0"]


def test_a_key_that_comes_back_resumes_its_score_from_the_ghost_list():
    lrfu = Lrfu(half_life_ops=10_000, alpha=1.0, ghost_limit=2)
    lrfu.use("a")
    lrfu.tau += 1.0  # a half-life later, a second use
    lrfu.use("a")
    score = lrfu.entries["a"].score
    assert lrfu.forget("a") and not lrfu.forget("a")
    lrfu.use("a")
    assert lrfu.entries["a"].score == pytest.approx(1.0 + score, rel=1e-3)
    for key in ("x", "y", "z"):  # the ghost list keeps the latest ghost_limit keys
        lrfu.use(key)
        lrfu.forget(key)
    assert list(lrfu.ghosts) == ["y", "z"]


def test_a_new_half_life_keeps_the_stored_order():
    lrfu = Lrfu(half_life_ops=1000, alpha=1.0, ghost_limit=10)
    for i in range(50):
        lrfu.use(i % 7 if i % 3 else 100 + i)
    before = order(lrfu)
    lrfu.set_params(half_life_ops=10, alpha=1.0)  # time runs 100 times faster from now on
    assert order(lrfu) == before


def test_evictable_is_asked_lazily_and_changing_the_policy_mid_walk_raises():
    policy = AdaptivePolicy(3)
    asked = walks_lazily_and_refuses_changes_mid_walk(BoundedIndex(3, policy), policy)
    assert asked == ["a", "b"]  # it starts as LRU


def test_a_byte_key_and_the_int_of_its_last_8_bytes_are_sampled_alike():
    # What lets the simulator, on the engine's key values as ints, sample the engine's chunks; above
    # 2**61 - 1, hash() of the int would fold it elsewhere.
    for raw in (b"\x00" * 16 + b"\xff" * 8, bytes(range(24))):
        number = int.from_bytes(raw[-8:], "little")
        assert adaptive._sample_point(raw) == adaptive._sample_point(number)
    assert int.from_bytes(b"\xff" * 8, "little") >= 2**61


def test_a_small_first_key_does_not_set_the_scale_for_good():
    # A 1-byte record first, then 1 KiB chunks into 64 KiB: 64 keys, not 65,536 (nor 131,072 ghosts).
    policy = AdaptivePolicy(64 << 10)
    idx = BoundedIndex(64 << 10, policy)
    idx.add("tiny", 1)
    for i in range(2_000):
        assert idx.make_room(1024, lambda k: False) is not None
        idx.add(i, 1024)
    assert policy._keys == 64 and policy._order.ghost_limit == 2 * 64
    assert len(policy._order.ghosts) <= 2 * 64
    assert all(len(s.order.entries) <= s.capacity <= 16 for s in policy._shadows)  # a quarter sampled


def test_an_old_protected_key_does_not_let_the_bucket_heap_grow():
    lrfu = Lrfu(half_life_ops=64, alpha=1.0, ghost_limit=64)
    lrfu.use("pinned")
    for i in range(20_000):
        lrfu.use(i)
        if len(lrfu.entries) > 64:
            lrfu.forget(next(lrfu.order(lambda k: k != "pinned")))
    assert "pinned" in lrfu.entries and len(lrfu.entries) == 64
    assert len(lrfu._heap) <= 2 * len(lrfu.buckets) + 64 and len(lrfu.ghosts) == 64


def drive(policy: AdaptivePolicy, capacity: int, keys) -> int:
    """The simulator's per-block loop; returns hits."""
    idx = BoundedIndex(capacity, policy)
    hits = 0
    for key in keys:
        if key in idx:
            hits += 1
            idx.touch(key)
        else:
            assert idx.make_room(1, lambda k: False) is not None
            idx.add(key, 1)
    return hits


def test_the_shadows_keep_lru_where_recency_is_all_there_is():
    # A working set that drifts: each key is used in bursts far apart (uses of a key closer than
    # CORRELATED_OPS count once), never again once it has drifted out.
    keys = [k for start in range(0, 40_000, 40) for k in range(start, start + 400, 4) for _ in (0,)]
    policy = AdaptivePolicy(300)
    drive(policy, 300, keys)
    assert policy._sampled_uses >= 20 * adaptive.DECIDE_EVERY  # many decisions
    assert CANDIDATES[policy.choice][1] == 0.0


def test_the_shadows_pick_frequency_where_a_hot_set_competes_with_a_scan():
    # 200 hot keys used every 1,000 operations against a scan of keys used once: LRU keeps the scan.
    keys = []
    for round_ in range(60):
        keys += [("hot", i) for i in range(200)]
        keys += [("scan", round_, i) for i in range(800)]
    policy = AdaptivePolicy(400)
    hits = drive(policy, 400, keys)
    assert CANDIDATES[policy.choice][1] > 0.0 and policy.switches >= 1
    assert hits > drive(LRUPolicy(), 400, keys) + 5_000  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 100), ops=OPS, protected_keys=st.frozensets(st.integers(0, 11)))
def test_victims_rooms_and_ghosts_keep_their_contract_with_any_sizes_and_pins(capacity, ops, protected_keys):
    policy = AdaptivePolicy(capacity)

    def bounded(_idx) -> None:
        if policy._order is not None:
            assert len(policy._order.ghosts) <= policy._order.ghost_limit
            assert all(len(s.order.entries) <= s.capacity for s in policy._shadows)

    keep_contract(policy, capacity, ops, protected_keys, bounded)


@needs_trace
def test_on_the_conversation_trace_at_5_percent_it_beats_lru_by_almost_2_points():
    requests, _ = read_trace(TRACE)
    cap = int(0.05 * len({h for r in requests for h in r.hash_ids}))
    rates = {name: replay_tiers(requests, [TierSpec("cpu", cap, name)], store_partial=False).hit_rate
             for name in ("lru", "adaptive")}
    assert rates["lru"] == pytest.approx(0.2067, abs=0.0005)
    assert rates["adaptive"] == pytest.approx(0.2267, abs=0.0005)
