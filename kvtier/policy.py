"""Eviction: the order of keys (a policy) and the byte-bounded index every store keeps over it.

A policy only orders keys; it never frees anything. The store asks it for victims in eviction order
and skips the ones it cannot evict right now (pinned, or read by an in-flight transfer), so a
pinned chunk keeps its place in the order and becomes a candidate again once unpinned.

`BoundedIndex` is the one byte-bounded index (key -> size, their total, a policy's order) used by
the CPU tier, the disk tier and kvtier_server's store and spill. Its `make_room` is atomic: it
either frees enough bytes or changes nothing, so a store never evicts for a record it then refuses.

Plugging in another policy (the extension point): implement `EvictionPolicy` and pass it to the
index (or to the store that builds one). The index tells the policy every key's size on insert
(`insert(key, nbytes)`), every use (`touch`) and every removal, and asks it only for `victims`; so a
size-aware policy (GDSF, S3-FIFO with a byte budget, ...) needs nothing more than these four calls.
A policy may keep per-key state (frequency, cost) but must forget a key on `remove` and yield only
keys it was told about.

Key listener (how a fleet agent learns what this process holds, kvtier.fleet): `set_listener(fn,
tier)` makes the index call `fn("stored", tier, key)` after every `add` and `fn("evicted", tier, key)`
after every removal (`remove`, and each `make_room` victim), so every store reports its keys through
this one mechanism, whatever path changed them. It runs under the owner's lock, on the owner's
thread: it must be O(1) and never block (the agent appends to a bounded queue). A listener that
raises does not break the index: the change it was told about has been made already, the
exception is counted (`listener_errors`) and logged at most once a minute, and the listener stays
(a fleet index that misses an event heals at the agent's next full re-send).

Not thread-safe: a store guards its index with its own lock (or runs on one thread).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, Literal, Protocol, TypeVar

from kvtier.log_limit import LogLimiter

K = TypeVar("K", bound=Hashable)
# (op, tier name, key): what `BoundedIndex.set_listener` calls (kvtier.fleet.member.KeyListener).
IndexListener = Callable[[Literal["stored", "evicted"], str, Hashable], None]

logger = logging.getLogger(__name__)
_log = LogLimiter(logger)  # a broken listener fails on every key: one line a minute


class EvictionPolicy(Protocol):
    def insert(self, key: Hashable, nbytes: int = 0) -> None:
        """`key` is new (or used again, for a key already known), holding `nbytes`."""
        ...

    def touch(self, key: Hashable) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def victims(self, evictable: Callable[[Hashable], bool]) -> Iterator[Hashable]:
        """Evictable keys, first victim first. Do not insert/touch/remove while iterating."""
        ...


class LRUPolicy:
    """Least recently used first; sizes play no part. insert/touch/remove are O(1)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable, nbytes: int = 0) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victims(self, evictable: Callable[[Hashable], bool]) -> Iterator[Hashable]:
        # Lazy, no snapshot: eviction usually wants the first victim or few, and copying the whole
        # order made each eviction O(entries). So the caller must not change the policy until it
        # is done iterating (collect the victims, then remove them).
        for key in self._order:
            if evictable(key):
                yield key

    def __len__(self) -> int:
        return len(self._order)


class BoundedIndex(Generic[K]):
    """Keys -> sizes in bytes, their total, and their eviction order from a pluggable policy
    (default `LRUPolicy`). It holds no data: the owner stores the values and deletes what
    `make_room` hands back. `capacity_bytes` may be changed by the owner; the index never evicts by
    itself. Not thread-safe: its owner's lock guards it."""

    def __init__(self, capacity_bytes: int, policy: EvictionPolicy | None = None):
        self.capacity_bytes = capacity_bytes
        self._policy = policy if policy is not None else LRUPolicy()
        self._sizes: dict[K, int] = {}
        # Keys the owner declined to admit (`add(..., admit=False)`): held while there is room, the
        # first victims, oldest first; the policy learns of one only when it is used again.
        self._declined: dict[K, None] = {}
        self._used = 0
        self._listener: IndexListener | None = None
        self._tier = ""
        self.listener_errors = 0

    def set_listener(self, listener: IndexListener | None, tier: str = "") -> None:
        """Report every key added ("stored") or removed ("evicted") from now on as
        `listener(op, tier, key)`, after the change; None stops it. See the module docstring."""
        self._listener, self._tier = listener, tier

    def _notify(self, op: Literal["stored", "evicted"], key: K) -> None:
        try:
            self._listener(op, self._tier, key)  # type: ignore[misc]
        except Exception:
            self.listener_errors += 1
            _log.error("listener", "key listener of the %r index failed on %s", self._tier, op,
                       exc_info=True)

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __iter__(self) -> Iterator[K]:
        """The keys, in no particular order (not the eviction order: see `victims`)."""
        return iter(self._sizes)

    def size(self, key: K) -> int | None:
        return self._sizes.get(key)

    def add(self, key: K, nbytes: int, admit: bool = True) -> None:
        """Index a new key as most recently used, or, not `admit`ted, as the next victim (before the
        policy's; it joins the policy when touched). KeyError if present (a store replacing a value
        removes the old one first, so its bytes are never counted twice); ValueError if nbytes < 0."""
        if key in self._sizes:
            raise KeyError(f"{key!r} is already indexed")
        if nbytes < 0:
            raise ValueError(f"size of {key!r} must not be negative, got {nbytes}")
        self._sizes[key] = nbytes
        self._used += nbytes
        if admit:
            self._policy.insert(key, nbytes)
        else:
            self._declined[key] = None
        if self._listener is not None:
            self._notify("stored", key)

    def remove(self, key: K) -> int | None:
        """Forget `key`; its size, or None when it was not indexed."""
        nbytes = self._sizes.pop(key, None)
        if nbytes is not None:
            self._used -= nbytes
            if key in self._declined:
                del self._declined[key]
            else:
                self._policy.remove(key)
            if self._listener is not None:
                self._notify("evicted", key)
        return nbytes

    def touch(self, key: K) -> None:
        """Mark `key` used (no effect when absent)."""
        if key in self._declined:  # used again after all: the policy's from now on
            del self._declined[key]
            self._policy.insert(key, self._sizes[key])
        elif key in self._sizes:
            self._policy.touch(key)

    def victims(self, evictable: Callable[[K], bool]) -> Iterator[K]:
        """Evictable keys in eviction order, lazily: do not add/remove/touch while iterating."""
        if self._declined:
            yield from (key for key in self._declined if evictable(key))
        yield from self._policy.victims(evictable)  # type: ignore[arg-type, misc]

    def make_room(self, nbytes: int, protected: Callable[[K], bool]) -> list[K] | None:
        """Make `nbytes` more fit under the capacity, atomically.

        [] when they fit already. Otherwise walk the victims, skipping `protected` ones (pinned,
        being read), until enough would be freed: then those victims leave the index and are
        returned, first victim first, for the caller to delete their data. None, changing nothing,
        when even every unprotected key would not free enough (or `nbytes` alone exceeds the
        capacity). Evicting for a record that still would not fit would lose data for nothing."""
        if nbytes > self.capacity_bytes:
            return None
        excess = self._used + nbytes - self.capacity_bytes
        if excess <= 0:
            return []
        victims, freed = [], 0
        for key in self.victims(lambda k: not protected(k)):
            victims.append(key)
            freed += self._sizes[key]
            if freed >= excess:
                break
        else:
            return None
        for key in victims:  # after the walk: the policy must not change while it iterates
            self.remove(key)
        return victims
