"""Tests for kvtier/policy.py: LRU order told as a story on four keys."""

from __future__ import annotations

import pytest

from kvtier.policy import EvictionPolicy, LRUPolicy


def always(_key) -> bool:
    return True


def lru(*keys: str) -> LRUPolicy:
    policy = LRUPolicy()
    for key in keys:
        policy.insert(key)
    return policy


def test_lru_satisfies_the_protocol():
    policy: EvictionPolicy = LRUPolicy()
    assert all(callable(getattr(policy, m)) for m in ("insert", "touch", "remove", "victims"))


def test_insertion_order_is_eviction_order():
    assert list(lru("a", "b", "c", "d").victims(always)) == ["a", "b", "c", "d"]


def test_touch_moves_a_key_to_the_back():
    policy = lru("a", "b", "c", "d")
    policy.touch("a")
    assert list(policy.victims(always)) == ["b", "c", "d", "a"]
    policy.touch("c")
    assert list(policy.victims(always)) == ["b", "d", "a", "c"]


def test_reinsert_counts_as_a_use_and_does_not_duplicate():
    policy = lru("a", "b", "c", "d")
    policy.insert("b")
    assert list(policy.victims(always)) == ["a", "c", "d", "b"]
    assert len(policy) == 4


def test_touch_of_an_unknown_key_does_not_insert_it():
    policy = lru("a", "b")
    policy.touch("z")
    assert list(policy.victims(always)) == ["a", "b"]
    assert len(policy) == 2


def test_victims_skip_non_evictable_keys_which_keep_their_place():
    policy = lru("a", "b", "c", "d")
    policy.touch("a")  # order: b c d a
    pinned = {"b", "d"}
    assert list(policy.victims(lambda k: k not in pinned)) == ["c", "a"]
    # Skipping did not move them: once unpinned, b is the first victim again.
    assert list(policy.victims(always)) == ["b", "c", "d", "a"]


def test_victims_yields_nothing_when_all_are_pinned():
    policy = lru("a", "b", "c", "d")
    assert list(policy.victims(lambda k: False)) == []
    assert len(policy) == 4


def test_remove():
    policy = lru("a", "b", "c", "d")
    policy.remove("b")
    assert list(policy.victims(always)) == ["a", "c", "d"]
    assert len(policy) == 3
    policy.remove("b")  # removing an absent key is a no-op
    policy.remove("zz")
    assert len(policy) == 3
    policy.insert("b")  # comes back as most recently used
    assert list(policy.victims(always)) == ["a", "c", "d", "b"]


def test_victims_are_collected_first_then_removed():
    # The walk is lazy (no O(n) snapshot per eviction), so tiers collect victims, then remove them.
    policy = lru("a", "b", "c", "d")
    evicted = []
    for key in policy.victims(lambda k: k != "c"):
        evicted.append(key)
        if len(evicted) == 2:
            break
    for key in evicted:
        policy.remove(key)
    assert evicted == ["a", "b"]
    assert list(policy.victims(always)) == ["c", "d"]


def test_changing_the_policy_mid_walk_is_an_error_not_a_silent_skip():
    policy = lru("a", "b", "c")
    with pytest.raises(RuntimeError):
        for key in policy.victims(always):
            policy.remove(key)


def test_evictable_is_asked_lazily():
    # A tier that needs one slab stops after the first victim; later keys are not examined.
    policy = lru("a", "b", "c", "d")
    asked = []

    def evictable(key):
        asked.append(key)
        return key == "b"

    assert next(policy.victims(evictable)) == "b"
    assert asked == ["a", "b"]


def test_empty_policy():
    policy = LRUPolicy()
    assert len(policy) == 0
    assert list(policy.victims(always)) == []
