"""ARC: Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement Cache", FAST 2003 (Fig. 4),
as a `kvtier.policy.EvictionPolicy`, byte-aware.

Four LRU lists, least recently used first: T1 (resident, used once since it came in), T2 (resident,
used again), B1 and B2 (ghosts: keys and sizes only, of keys that left T1 and T2). A target `p` for
T1's size moves towards whichever ghost list gets hits: a B1 hit says T1 was too small, a B2 hit
that T2 was.

How the paper's request loop maps onto the four calls (`BoundedIndex` asks for victims, removes
them, then inserts the new key):

    Case I (hit)         touch: T1 -> MRU of T2, or refresh in T2.
    REPLACE              victims: T1's LRU end while T1 (less what this walk has offered already) is
                         above p, else T2's; when one list runs out, the other. remove() of a T1 key
                         puts it at B1's MRU end, of a T2 key at B2's: every removal of a resident
                         key counts as an eviction (a plain delete cannot be told apart).
    Case II/III (ghost)  insert of a B1 key: p += size * max(1, |B2|/|B1|) (at most c); of a B2 key:
                         p -= size * max(1, |B1|/|B2|) (at least 0); the key goes to T2's MRU end.
    Case IV (new)        insert: MRU of T1; then the ghost directory is trimmed as the paper does
                         before its REPLACE: B1's LRU goes while |T1|+|B1| > c, B2's (B1's if B2 is
                         empty) while |T1|+|T2|+|B1|+|B2| > 2c.

Sizes (|X| above) are in the units of `insert`'s nbytes, each key weighing at least 1 so that even
empty records count against the ghost bound; with every size 1 (the simulator) this is the paper's
page-count ARC. Two departures forced by the interface, both because victims are asked for before
the new key is seen: p adapts on the ghost hit after, not before, the REPLACE made room for it; and
REPLACE's tie rule (evict from T1 when |T1| == p and the new key is a B2 ghost) cannot apply, so a
tie evicts from T2.

Cost: insert, touch and remove are O(1) amortised (OrderedDict moves; each trimmed ghost was added
once); victims is lazy, O(1) per key offered. Memory: one OrderedDict entry (key -> size, about
100 bytes in CPython besides the key) per resident key and per ghost; ghosts weigh at most c while
the cache is full and never more than 2c (|T1|+|B1| <= c, all four <= 2c), so at most 2c ghost keys.
Not thread-safe: the owning index's lock guards it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator

_END = object()


class ARCPolicy:
    """Adaptive Replacement Cache for `capacity` units (bytes in a tier, blocks in the simulator)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._p = 0.0  # T1's target size; fractional, as the paper's |B2|/|B1| step is
        # key -> weight, least recently used first
        self._t1: OrderedDict[Hashable, int] = OrderedDict()
        self._t2: OrderedDict[Hashable, int] = OrderedDict()
        self._b1: OrderedDict[Hashable, int] = OrderedDict()
        self._b2: OrderedDict[Hashable, int] = OrderedDict()
        self._w_t1 = self._w_t2 = self._w_b1 = self._w_b2 = 0

    @property
    def target(self) -> float:
        """p: the size T1 is steered towards, 0 <= p <= capacity."""
        return self._p

    @property
    def ghosts(self) -> int:
        """How many ghost keys (B1 and B2) are remembered."""
        return len(self._b1) + len(self._b2)

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def insert(self, key: Hashable, nbytes: int = 0) -> None:
        weight = max(nbytes, 1)
        if key in self._t1 or key in self._t2:  # used again: a hit, whatever its new size
            self._drop_resident(key)
        elif key in self._b1:  # Case II: T1 was too small
            self._p = min(self._p + weight * max(1.0, self._w_b2 / self._w_b1), self.capacity)
            self._w_b1 -= self._b1.pop(key)
        elif key in self._b2:  # Case III: T2 was too small
            self._p = max(self._p - weight * max(1.0, self._w_b1 / self._w_b2), 0.0)
            self._w_b2 -= self._b2.pop(key)
        else:  # Case IV: new to the cache and to its history
            self._t1[key] = weight
            self._w_t1 += weight
            self._trim_ghosts()
            return
        self._t2[key] = weight
        self._w_t2 += weight
        self._trim_ghosts()  # a no-op unless the key's size changed

    def touch(self, key: Hashable) -> None:
        if key in self._t1:
            weight = self._t1.pop(key)
            self._w_t1 -= weight
            self._t2[key] = weight
            self._w_t2 += weight
        elif key in self._t2:
            self._t2.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        # A resident key leaves for the ghost list of the list it was in (REPLACE's second half);
        # a ghost or unknown key is left as it is. Totals do not change, so nothing to trim.
        if key in self._t1:
            weight = self._t1.pop(key)
            self._w_t1 -= weight
            self._b1[key] = weight
            self._w_b1 += weight
        elif key in self._t2:
            weight = self._t2.pop(key)
            self._w_t2 -= weight
            self._b2[key] = weight
            self._w_b2 += weight

    def victims(self, evictable: Callable[[Hashable], bool]) -> Iterator[Hashable]:
        # REPLACE repeated, lazily: `t1_left` is T1's size once the T1 keys offered so far are gone,
        # so a walk that frees several keys follows the order ARC would evict them in. A skipped
        # (protected) key stays, so it does not count. Each list is walked once from its LRU end:
        # no key is offered twice, and the walk ends after every resident key.
        t1, t2 = iter(self._t1), iter(self._t2)
        k1, k2 = next(t1, _END), next(t2, _END)
        t1_left = self._w_t1
        while k1 is not _END or k2 is not _END:
            if k1 is not _END and (k2 is _END or t1_left > self._p):
                key, k1 = k1, next(t1, _END)
                if evictable(key):
                    t1_left -= self._t1[key]
                    yield key
            else:
                key, k2 = k2, next(t2, _END)
                if evictable(key):
                    yield key

    def _drop_resident(self, key: Hashable) -> None:
        if key in self._t1:
            self._w_t1 -= self._t1.pop(key)
        else:
            self._w_t2 -= self._t2.pop(key)

    def _trim_ghosts(self) -> None:
        # The paper's directory bounds: L1 = T1 + B1 within c, L1 + L2 within 2c. Only a new key can
        # break them (a removal moves a key from T to B, a ghost hit from B to T), so insert trims.
        c = self.capacity
        while self._b1 and self._w_t1 + self._w_b1 > c:
            self._w_b1 -= self._b1.popitem(last=False)[1]
        while (self._b1 or self._b2) and self._w_t1 + self._w_t2 + self._w_b1 + self._w_b2 > 2 * c:
            if self._b2:
                self._w_b2 -= self._b2.popitem(last=False)[1]
            else:
                self._w_b1 -= self._b1.popitem(last=False)[1]
