"""The contract every eviction policy keeps through `kvtier.policy.BoundedIndex`, driven by random
operations with any sizes and protected keys (tests/test_policy_*.py run it on their policy and add
their own invariants through `check`): victims are resident, unprotected and offered once each, all
of them eventually; `make_room` is atomic and gives up only when it truly cannot; a walk stopped early
loses nothing; the policy forgets every removed key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import strategies as st

from kvtier.policy import BoundedIndex, EvictionPolicy
from kvtier.policy_registry import make_policy
from kvtier.sim.replay import replay
from kvtier.sim.trace import read_trace

TRACE = Path(__file__).resolve().parents[2] / "shared" / "workloads" / "mooncake_conversation_trace.jsonl"
needs_trace = pytest.mark.skipif(not TRACE.exists(), reason=f"no trace at {TRACE}")

OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "touch", "room", "walk"]),
                         st.integers(0, 11), st.integers(0, 40)), max_size=80)


def rate_at_5_percent(name: str) -> float:
    """Policy `name`'s token hit rate on the conversation trace with room for 5% of its distinct
    blocks, every block stored (kvtier.sim.replay: the published figures' mode)."""
    requests, _ = read_trace(TRACE)
    cap = int(0.05 * len({h for r in requests for h in r.hash_ids}))
    return replay(requests, cap, policy=lambda: make_policy(name, cap)).hit_rate


def always(_key) -> bool:
    return True


def never(_key) -> bool:
    return False


def use(idx: BoundedIndex, *keys) -> None:
    """What the simulator does per block: a hit is a touch, a miss makes room and is admitted."""
    for key in keys:
        if key in idx:
            idx.touch(key)
        else:
            assert idx.make_room(1, never) is not None
            idx.add(key, 1)


def walks_lazily_and_refuses_changes_mid_walk(idx: BoundedIndex, policy: EvictionPolicy) -> list:
    """`idx` (room for 3 unit keys) takes a, b, c: a walk asks about keys only until the caller stops
    (b), and removing keys while walking raises. Returns the keys asked about, in order."""
    use(idx, "a", "b", "c")
    asked = []

    def evictable(key) -> bool:
        asked.append(key)
        return key == "b"

    assert next(idx.victims(evictable)) == "b" and asked[-1] == "b" and len(set(asked)) == len(asked)
    with pytest.raises(RuntimeError):
        for key in policy.victims(always):
            policy.remove(key)
    return asked


def _room(idx: BoundedIndex, capacity: int, nbytes: int, before: dict, protected: frozenset) -> None:
    victims = idx.make_room(nbytes, protected.__contains__)
    excess = sum(before.values()) + nbytes - capacity
    if victims is None:  # atomic, and only when it truly cannot
        assert {k: idx.size(k) for k in idx} == before
        assert nbytes > capacity or sum(s for k, s in before.items() if k not in protected) < excess
        return
    assert len(set(victims)) == len(victims) and not set(victims) & protected
    assert all(k in before and k not in idx for k in victims)
    assert idx.used_bytes + nbytes <= capacity
    assert not victims or sum(before[k] for k in victims[:-1]) < excess  # it stopped once enough


def drive(policy: EvictionPolicy, capacity: int, ops: list, protected: frozenset,
          check: Callable[[BoundedIndex], None] = lambda idx: None) -> None:
    idx: BoundedIndex[int] = BoundedIndex(capacity, policy)

    def unprotected(key) -> bool:
        return key not in protected

    for op, key, nbytes in ops:
        before = {k: idx.size(k) for k in idx}
        if op == "add" and key not in idx:
            if idx.make_room(nbytes, protected.__contains__) is not None:
                idx.add(key, nbytes)
        elif op == "remove":
            idx.remove(key)
        elif op == "touch":
            idx.touch(key)
        elif op == "room":
            _room(idx, capacity, nbytes, before, protected)
        elif op == "walk":  # a caller that stops early (a walk may move keys) loses none
            walked = [k for _, k in zip(range(nbytes % 4), idx.victims(unprotected))]
            assert all(k in idx and unprotected(k) for k in walked)
        offered = list(idx.victims(unprotected))
        assert len(offered) == len(set(offered)) and set(offered) == {k for k in idx if unprotected(k)}
        assert len(policy) == len(idx)  # type: ignore[arg-type]
        check(idx)
    for key in list(idx):
        idx.remove(key)
    assert len(policy) == 0 and list(policy.victims(always)) == []  # type: ignore[arg-type]
