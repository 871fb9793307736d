"""Eviction policy, apart from the tiers that use it.

A policy only orders keys; it never frees anything. The tier asks it for victims in eviction order
and skips the ones it cannot evict right now (pinned, or read by an in-flight transfer), so a
pinned chunk keeps its place in the order and becomes a candidate again once unpinned.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Protocol


class EvictionPolicy(Protocol):
    def insert(self, key: Hashable) -> None: ...
    def touch(self, key: Hashable) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def victims(self, evictable: Callable[[Hashable], bool]) -> Iterator[Hashable]:
        """Evictable keys, first victim first. Do not insert/touch/remove while iterating."""
        ...


class LRUPolicy:
    """Least recently used first. insert/touch/remove are O(1)."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable) -> None:
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
