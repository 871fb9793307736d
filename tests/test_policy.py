"""Tests for kvtier/policy.py: LRU order told as a story on four keys; the byte-bounded index."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.policy import BoundedIndex, EvictionPolicy, LRUPolicy


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


# -- BoundedIndex: the one byte-bounded index of the CPU tier, the disk tier and the server store ----

def never(_key) -> bool:
    return False


def index(capacity: int, **sizes: int) -> BoundedIndex[str]:
    idx: BoundedIndex[str] = BoundedIndex(capacity)
    for key, nbytes in sizes.items():
        idx.add(key, nbytes)
    return idx


def test_index_counts_sizes_and_membership():
    idx = index(100, a=10, b=20, c=30)
    assert idx.used_bytes == 60 and len(idx) == 3
    assert "b" in idx and "z" not in idx
    assert sorted(idx) == ["a", "b", "c"]
    assert idx.size("c") == 30 and idx.size("z") is None


def test_add_of_a_present_key_raises_and_counts_nothing():
    idx = index(100, a=10)
    with pytest.raises(KeyError):
        idx.add("a", 50)
    assert idx.used_bytes == 10 and idx.size("a") == 10
    with pytest.raises(ValueError):
        idx.add("b", -1)
    assert "b" not in idx


def test_remove_returns_the_size_and_accounting_goes_back_to_zero():
    idx = index(100, a=10, b=20)
    assert idx.remove("a") == 10
    assert idx.remove("a") is None
    assert idx.remove("b") == 20
    assert idx.used_bytes == 0 and len(idx) == 0 and list(idx.victims(always)) == []


def test_make_room_is_empty_when_it_fits():
    idx = index(100, a=40, b=40)
    assert idx.make_room(20, never) == []
    assert idx.used_bytes == 80


def test_make_room_frees_just_enough_in_lru_order():
    idx = index(100, a=30, b=30, c=30)
    idx.touch("a")  # order: b c a
    assert idx.make_room(30, never) == ["b"]  # 90 + 30 - 100 = 20 over: b alone frees enough
    assert idx.make_room(50, never) == ["c"]  # 60 + 50 - 100 = 10 over
    assert idx.make_room(100, never) == ["a"]
    assert len(idx) == 0 and idx.used_bytes == 0


def test_make_room_stops_at_the_first_victim_that_is_enough():
    idx = index(100, a=30, b=30, c=30)
    assert idx.make_room(20, never) == ["a"]  # 110 - 100 = 10 over
    assert idx.used_bytes == 60


def test_make_room_never_picks_protected_keys():
    idx = index(100, a=30, b=30, c=30)
    assert idx.make_room(60, lambda k: k == "a") == ["b", "c"]
    assert list(idx) == ["a"] and idx.used_bytes == 30


def test_make_room_changes_nothing_when_it_cannot_free_enough():
    idx = index(100, a=30, b=30, c=30)
    assert idx.make_room(80, lambda k: k == "c") is None  # b and a free 60 of the 70 needed
    assert sorted(idx) == ["a", "b", "c"] and idx.used_bytes == 90
    assert list(idx.victims(always)) == ["a", "b", "c"]  # order untouched too


def test_make_room_refuses_more_than_the_capacity_even_when_empty():
    idx = index(100)
    assert idx.make_room(101, never) is None
    assert idx.make_room(100, never) == []


def test_make_room_after_the_capacity_shrinks():
    idx = index(100, a=40, b=40)
    idx.capacity_bytes = 50
    assert idx.make_room(0, never) == ["a"]
    assert idx.used_bytes == 40


def test_touch_of_an_absent_key_is_a_no_op():
    idx = index(100, a=10)
    idx.touch("z")
    assert list(idx.victims(always)) == ["a"] and "z" not in idx


class _SizeRecorder(LRUPolicy):
    """A policy that wants sizes: the index must tell them on insert."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict = {}

    def insert(self, key, nbytes: int = 0) -> None:
        super().insert(key, nbytes)
        self.sizes[key] = nbytes

    def remove(self, key) -> None:
        super().remove(key)
        self.sizes.pop(key, None)


def test_a_custom_policy_is_told_sizes_and_removals():
    policy = _SizeRecorder()
    idx: BoundedIndex[str] = BoundedIndex(100, policy)
    idx.add("a", 60)
    idx.add("b", 30)
    assert policy.sizes == {"a": 60, "b": 30}
    assert idx.make_room(50, never) == ["a"]
    assert policy.sizes == {"b": 30}


class _Model:
    """The index's contract written the slow, obvious way: the declined keys (oldest first), then
    the admitted ones in LRU order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.declined: list[tuple[int, int]] = []  # (key, size), the next victims, oldest first
        self.order: list[tuple[int, int]] = []  # (key, size), least recently used first

    def entries(self) -> list[tuple[int, int]]:
        return self.declined + self.order

    def used(self) -> int:
        return sum(size for _, size in self.entries())

    def drop(self, keys) -> None:
        self.declined = [(k, s) for k, s in self.declined if k not in keys]
        self.order = [(k, s) for k, s in self.order if k not in keys]

    def touch(self, key: int) -> None:
        entry = next(e for e in self.entries() if e[0] == key)
        self.drop({key})
        self.order.append(entry)

    def make_room(self, nbytes: int, protected) -> list[int] | None:
        if nbytes > self.capacity:
            return None
        victims = []
        for key, _ in self.entries():
            if self.used() - sum(s for k, s in self.entries() if k in victims) + nbytes <= self.capacity:
                break
            if not protected(key):
                victims.append(key)
        if self.used() - sum(s for k, s in self.entries() if k in victims) + nbytes > self.capacity:
            return None
        self.drop(set(victims))
        return victims


_ops = st.lists(st.tuples(st.sampled_from(["add", "decline", "remove", "touch", "room"]),
                          st.integers(0, 7), st.integers(0, 60)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 150), ops=_ops, protected_keys=st.frozensets(st.integers(0, 7)))
def test_index_matches_a_simple_model(capacity, ops, protected_keys):
    idx: BoundedIndex[int] = BoundedIndex(capacity)
    model = _Model(capacity)
    protected = protected_keys.__contains__
    for op, key, nbytes in ops:
        present = any(k == key for k, _ in model.entries())
        if op in ("add", "decline") and not present:
            idx.add(key, nbytes, admit=op == "add")
            (model.order if op == "add" else model.declined).append((key, nbytes))
        elif op == "remove":
            size = next((s for k, s in model.entries() if k == key), None)
            assert idx.remove(key) == size
            model.drop({key})
        elif op == "touch" and present:
            idx.touch(key)
            model.touch(key)
        elif op == "room":
            victims = idx.make_room(nbytes, protected)
            assert victims == model.make_room(nbytes, protected)
            assert not any(protected(k) for k in victims or [])
            if victims is not None:
                assert idx.used_bytes + nbytes <= capacity
        assert idx.used_bytes == model.used()
        assert list(idx.victims(always)) == [k for k, _ in model.entries()]
        assert {k: idx.size(k) for k in idx} == dict(model.entries())
    for key in list(idx):
        idx.remove(key)
    assert idx.used_bytes == 0 and len(idx) == 0


def test_a_declined_key_is_the_policy_s_only_once_used_again():
    policy = _SizeRecorder()
    idx: BoundedIndex[str] = BoundedIndex(100, policy)
    idx.add("a", 10)
    idx.add("tail", 5, admit=False)
    assert policy.sizes == {"a": 10} and idx.used_bytes == 15
    assert list(idx.victims(always)) == ["tail", "a"]
    idx.touch("tail")  # an exact repeat used it: it joins the order as most recently used
    assert policy.sizes == {"a": 10, "tail": 5}
    assert list(idx.victims(always)) == ["a", "tail"]


# -- the key listener: every store reports its keys through its index ------------------------------

def listened(capacity: int, **sizes: int) -> tuple[BoundedIndex[str], list]:
    idx = index(capacity, **sizes)
    events: list = []
    idx.set_listener(lambda op, tier, key: events.append((op, tier, key)), "mem")
    return idx, events


def test_the_listener_hears_adds_removes_and_make_room_victims_with_its_tier_name():
    idx, events = listened(100, a=30)  # added before the listener: not reported
    idx.add("b", 30)
    idx.add("c", 30)
    assert idx.remove("c") == 30
    assert idx.remove("c") is None  # absent: nothing happened, nothing reported
    idx.touch("a")  # a use is not a change of what is stored
    assert idx.make_room(80, never) == ["b", "a"]
    assert events == [("stored", "mem", "b"), ("stored", "mem", "c"), ("evicted", "mem", "c"),
                      ("evicted", "mem", "b"), ("evicted", "mem", "a")]


def test_a_refused_add_or_make_room_reports_nothing():
    idx, events = listened(100, a=60)
    with pytest.raises(KeyError):
        idx.add("a", 10)
    with pytest.raises(ValueError):
        idx.add("b", -1)
    assert idx.make_room(80, lambda k: k == "a") is None
    assert events == []


def test_the_listener_is_called_after_the_change():
    idx: BoundedIndex[str] = BoundedIndex(100)
    seen = []
    idx.set_listener(lambda op, tier, key: seen.append((op, key in idx, idx.used_bytes)), "t")
    idx.add("a", 10)
    idx.remove("a")
    assert seen == [("stored", True, 10), ("evicted", False, 0)]


def test_a_listener_that_raises_breaks_nothing_and_is_counted(caplog):
    idx: BoundedIndex[str] = BoundedIndex(100)
    calls = []

    def broken(op, tier, key):
        calls.append((op, key))
        raise RuntimeError("queue gone")

    idx.set_listener(broken, "disk")
    idx.add("a", 40)
    idx.add("b", 40)
    assert idx.make_room(70, never) == ["a", "b"]  # a raising listener mid-eviction: every victim goes
    assert len(idx) == 0 and idx.used_bytes == 0
    idx.add("c", 10)
    assert sorted(idx) == ["c"] and idx.used_bytes == 10
    assert calls == [("stored", "a"), ("stored", "b"), ("evicted", "a"), ("evicted", "b"), ("stored", "c")]
    assert idx.listener_errors == 5
    lines = [r for r in caplog.records if r.name == "kvtier.policy"]
    assert len(lines) <= 1  # rate-limited (per process): one line a minute, not one per key
    assert all("key listener of the 'disk' index failed" in r.getMessage() for r in lines)


def test_set_listener_none_stops_the_reports():
    idx, events = listened(100)
    idx.add("a", 1)
    idx.set_listener(None)
    idx.add("b", 1)
    idx.remove("a")
    assert events == [("stored", "mem", "a")]


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(0, 150), ops=_ops)
def test_replaying_the_listener_events_gives_the_index_keys(capacity, ops):
    idx: BoundedIndex[int] = BoundedIndex(capacity)
    mirror: set[int] = set()

    def replay(op, tier, key):
        assert (key in mirror) == (op == "evicted") and tier == "t"
        (mirror.discard if op == "evicted" else mirror.add)(key)

    idx.set_listener(replay, "t")
    for op, key, nbytes in ops:
        if op == "add" and key not in idx:
            idx.add(key, nbytes)
        elif op == "remove":
            idx.remove(key)
        elif op == "room":
            idx.make_room(nbytes, lambda k: k % 3 == 0)
        assert mirror == set(idx)
    assert idx.listener_errors == 0
