"""kvtier's eviction policy: a decayed recency-frequency score per key (LRFU) whose balance between
recency and frequency is tuned online by miniature shadow caches.

Why it works on prefix-cache traffic. A chunk's worth is how soon its prefix is asked for again.
Two signals predict that: how recently it was used (a conversation's next turn, a document's next
question) and how often (a system prompt shared by everyone, a conversation that already came back
once is likelier to come back again than one seen once). LRFU (Lee et al., "LRFU: A Spectrum of
Policies that Subsumes the LRU and LFU Policies", IEEE ToC 2001) folds both into one score per key:
each use adds 1 and the sum halves every `half_life` operations, so a key's priority is

    P = tau_last + alpha * log2(score)       (tau: time in half-lives; alpha = 0 is plain LRU)

and the lowest P is evicted first. No fixed half-life is best: with little room only keys used
again and again earn their place (long half-life, LFU-like); with much room recency is enough and
frequency keeps stale hot keys too long (LRU). So the policy runs a few candidate settings as
miniature caches on a hash-sampled subset of the keys (SHARDS-style spatial sampling, Waldspurger
et al., FAST 2015 / ATC 2017; the feedback idea is ARC's), each scaled down by the sampling rate,
and adopts the setting whose miniature hit the most lately. LRU is one of the candidates, which is
why the policy does not fall below LRU by more than the sampling noise.

Three more mechanisms, all cheap:
- Time is virtual and measured in half-lives (`tau` advances by 1/half_life per operation), so a
  change of half-life only changes how fast time runs from then on: every stored priority stays
  comparable, nothing is re-keyed.
- A ghost list remembers the score of recently evicted keys (bounded), so a conversation or document
  that comes back resumes its history instead of starting at 1.
- Uses of a key within `CORRELATED_OPS` operations of the previous one count once (a request's
  retrieve and its store touch the same chunks: one use, not two), the correlated-reference rule of
  LRU-K/2Q.

Among keys of equal priority (same bucket), the one indexed last goes first: the storage path
touches and stores a request's chunks prefix first, so its suffix goes before its prefix and a hole
never opens in front of a prefix that is still held.

Cost: priorities are quantised to 1/QUANTUM of a half-life and keys kept in buckets of equal
quantised priority (insertion-ordered dicts), with a heap of bucket ids for the lowest; an insert,
touch or remove is O(1) plus an amortised O(log B) heap step, B (non-empty buckets) bounded by
QUANTUM x (the cache's age span in half-lives + log2 MAX_SCORE), a few hundred at most, not by the
number of keys. Memory: a resident key costs one `_Entry` (3 slots) and a bucket slot, about 150
bytes in CPython; a ghost about 100 bytes; ghosts are at most GHOST_FACTOR x the keys the capacity
holds (capacity / the largest key size seen: 200 B of ghosts per slab of the CPU tier); the shadows
hold about SHADOW_KEYS keys each (hash-sampled), 4 of them, whatever the capacity.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator

QUANTUM = 32  # priority buckets per half-life
MAX_SCORE = 64.0  # a score saturates here: bounds the bucket span and lets an old favourite fade
CORRELATED_OPS = 512  # uses of a key closer than this (operations) are one use
GHOST_FACTOR = 2  # evicted keys remembered, per resident key
SHADOW_KEYS = 2048  # a shadow cache's size in keys: sets the sampling rate
MIN_SAMPLE = 1 / 64  # but never sample fewer keys than this
MAX_SAMPLE = 1 / 4  # nor more: the shadows together cost at most one more use per use
# Candidates, (half-life in cache sizes worth of operations, alpha): LRU, then LRFU from short to
# long half-lives, a factor of 2-4 apart (closer ones the shadows cannot tell apart).
CANDIDATES = ((0.125, 0.0), (1.0, 1.0), (2.0, 1.0), (8.0, 1.0))
START = 0  # the candidate used until the shadows have an opinion: LRU
DECIDE_EVERY = 256  # sampled uses between decisions
MEMORY = 4.0  # shadow hits are averaged over about this many shadow capacities of sampled uses
MARGIN = 0.02  # a challenger must beat the current setting's shadow by this fraction (no flapping)
_MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads sequential ids over the sample space
_MASK = (1 << 64) - 1


class _Entry:
    __slots__ = ("score", "tau", "bucket")

    def __init__(self, score: float, tau: float, bucket: int):
        self.score, self.tau, self.bucket = score, tau, bucket


class Lrfu:
    """One LRFU cache order (no sizes, no capacity): scores, buckets, ghosts. The policy's own order
    and each shadow's."""

    def __init__(self, half_life_ops: float, alpha: float, ghost_limit: int,
                 correlated_ops: float = CORRELATED_OPS):
        self.tau = 0.0
        self.correlated_ops = correlated_ops
        self.set_params(half_life_ops, alpha)
        self.ghost_limit = ghost_limit
        self.entries: dict[Hashable, _Entry] = {}
        self.buckets: dict[int, dict[Hashable, None]] = {}
        self._heap: list[int] = []  # bucket ids, some stale (their bucket gone): skipped lazily
        self.ghosts: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def set_params(self, half_life_ops: float, alpha: float) -> None:
        self.rate, self.alpha = 1.0 / max(half_life_ops, 1.0), alpha
        self.correlated = self.correlated_ops * self.rate  # the same window, in half-lives

    def use(self, key: Hashable) -> None:
        """`key` was used (inserted or touched): its score grows and it moves to its new bucket."""
        tau = self.tau = self.tau + self.rate
        entry = self.entries.get(key)
        if entry is None:
            score = 1.0
            if (ghost := self.ghosts.pop(key, None)) is not None:
                score = min(score + ghost[0] * 2.0 ** (ghost[1] - tau), MAX_SCORE)
            entry = self.entries[key] = _Entry(score, tau, 0)
        else:
            members = self.buckets[entry.bucket]
            del members[key]
            if not members:
                self._drop_bucket(entry.bucket)
            if tau - entry.tau > self.correlated:
                entry.score = min(entry.score * 2.0 ** (entry.tau - tau) + 1.0, MAX_SCORE)
            entry.tau = tau
        priority = tau + self.alpha * math.log2(entry.score) if self.alpha else tau
        bucket = entry.bucket = int(QUANTUM * priority)  # (priorities are >= 0: int() is floor)
        if (members := self.buckets.get(bucket)) is None:
            members = self.buckets[bucket] = {}
            heapq.heappush(self._heap, bucket)
        members[key] = None

    def forget(self, key: Hashable) -> bool:
        """Stop ordering `key`, remembering its score as a ghost; False if it was not ordered."""
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        members = self.buckets[entry.bucket]
        del members[key]
        if not members:
            self._drop_bucket(entry.bucket)
        self.ghosts[key] = (entry.score, entry.tau)
        self.limit_ghosts(self.ghost_limit)
        return True

    def limit_ghosts(self, limit: int) -> None:
        """Keep at most `limit` ghosts from now on (the latest ones)."""
        self.ghost_limit = limit
        while len(self.ghosts) > limit:
            self.ghosts.popitem(last=False)

    def _drop_bucket(self, bucket: int) -> None:
        del self.buckets[bucket]
        if len(self._heap) > 2 * len(self.buckets) + 64:  # stale ids: rebuild, amortised O(1)
            self._heap = list(self.buckets)
            heapq.heapify(self._heap)

    def lowest_bucket(self) -> int | None:
        heap = self._heap
        while heap and heap[0] not in self.buckets:
            heapq.heappop(heap)
        return heap[0] if heap else None

    def order(self, evictable: Callable[[Hashable], bool]) -> Iterator[Hashable]:
        """Keys in eviction order, lazily: the lowest bucket's, newest first, then (rarely needed:
        only when that bucket cannot give enough) the other buckets' in ascending order."""
        first = self.lowest_bucket()
        if first is None:
            return
        yield from (key for key in reversed(self.buckets[first]) if evictable(key))
        for bucket in sorted(self.buckets):
            if bucket != first:
                yield from (key for key in reversed(self.buckets[bucket]) if evictable(key))


def _sample_point(key: Hashable) -> int:
    """Where `key` falls in [0, 2**64): stable across processes for kvtier's byte keys (their
    digest's last 8 bytes) and the simulator's int ids (the int itself, not `hash()`, which folds
    ints modulo 2**61 - 1: a byte key and the int of its last 8 bytes must fall at the same point),
    mixed so that sequential ids spread evenly."""
    if isinstance(key, bytes):
        raw = int.from_bytes(key[-8:], "little")
    else:
        raw = key if isinstance(key, int) else hash(key)
    return (raw * _MIX) & _MASK


class _Shadow:
    """A miniature cache of `capacity` keys: one candidate setting over the sampled keys."""

    def __init__(self, capacity: int, half_life_ops: float, alpha: float, rate: float):
        self.order = Lrfu(half_life_ops, alpha, 1)
        self.hits = 0.0
        self.resize(capacity, half_life_ops, alpha, rate)

    def resize(self, capacity: int, half_life_ops: float, alpha: float, rate: float) -> None:
        self.capacity = max(capacity, 1)
        # It sees `rate` of the uses: its windows in operations shrink by as much.
        self.order.correlated_ops = CORRELATED_OPS * rate
        self.order.set_params(half_life_ops, alpha)
        self.order.limit_ghosts(GHOST_FACTOR * self.capacity)
        self._trim()

    def access(self, key: Hashable) -> None:
        order = self.order
        entry = order.entries.get(key)
        if entry is not None and order.tau - entry.tau > order.correlated:
            self.hits += 1
        order.use(key)
        self._trim(key)

    def _trim(self, keep: Hashable = None) -> None:
        """Evict until the shadow fits its capacity, never `keep` (the key just used)."""
        order = self.order
        while len(order.entries) > self.capacity:
            victim = next(order.order(lambda k: k != keep), None)
            if victim is None:
                break
            order.forget(victim)


class AdaptivePolicy:
    """LRFU whose half-life and recency/frequency balance follow the best of CANDIDATES, judged by
    miniature shadow caches (the module docstring). `capacity` is in the units of insert's sizes;
    the policy counts the cache's size in keys from the first key's size (a tier's chunks are all
    alike), which scales the half-lives, the ghost list and the sampling rate."""

    def __init__(self, capacity: int):
        self.capacity = max(int(capacity), 1)
        self.choice = START
        self.switches = 0
        self._order: Lrfu | None = None  # built on the first insert: its scale needs a key's size
        self._shadows: list[_Shadow] = []
        self._keys = 1.0
        self._unit = 1
        self._threshold = 0
        self._keep = 0.0
        self._sampled_uses = 0

    def _start(self, nbytes: int) -> Lrfu:
        self._shadows = [_Shadow(1, 1.0, alpha, 1.0) for _, alpha in CANDIDATES]
        self._order = Lrfu(1.0, CANDIDATES[self.choice][1], 1)
        self._scale(nbytes)
        return self._order

    def _scale(self, nbytes: int) -> None:
        """Size the half-lives, ghost lists, sampling and shadows for keys of `nbytes`: the largest
        seen, so that a small first key (a partial chunk, a compressed record) does not make the
        policy count far more keys than the tier can hold (and keep that many ghosts)."""
        self._unit = max(nbytes, 1)
        keys = self._keys = max(self.capacity / self._unit, 1.0)
        rate = min(max(SHADOW_KEYS / keys, MIN_SAMPLE), MAX_SAMPLE)
        self._threshold = int(rate * 2**64)
        small = keys * rate  # a shadow's size in keys
        for shadow, (mult, alpha) in zip(self._shadows, CANDIDATES):
            shadow.resize(max(round(small), 1), mult * small, alpha, rate)
        self._keep = 1.0 - min(DECIDE_EVERY / (MEMORY * small), 0.5)
        mult, alpha = CANDIDATES[self.choice]
        self._order.set_params(mult * keys, alpha)  # type: ignore[union-attr]
        self._order.limit_ghosts(int(GHOST_FACTOR * keys))  # type: ignore[union-attr]

    def _use(self, key: Hashable, nbytes: int) -> None:
        order = self._order or self._start(nbytes)
        if nbytes > 2 * self._unit:
            self._scale(nbytes)
        order.use(key)
        if _sample_point(key) < self._threshold:
            for shadow in self._shadows:
                shadow.access(key)
            self._sampled_uses += 1
            if self._sampled_uses % DECIDE_EVERY == 0:
                self._decide()

    def _decide(self) -> None:
        """Follow the shadow that hit the most lately (an exponential average of its hits)."""
        hits = [shadow.hits for shadow in self._shadows]
        best = max(range(len(hits)), key=hits.__getitem__)
        if hits[best] > hits[self.choice] * (1.0 + MARGIN):
            self.choice, self.switches = best, self.switches + 1
            mult, alpha = CANDIDATES[best]
            self._order.set_params(mult * self._keys, alpha)  # type: ignore[union-attr]
        for shadow in self._shadows:
            shadow.hits *= self._keep

    def insert(self, key: Hashable, nbytes: int = 0) -> None:
        self._use(key, nbytes)

    def touch(self, key: Hashable) -> None:
        if self._order is not None and key in self._order.entries:
            self._use(key, 0)

    def remove(self, key: Hashable) -> None:
        if self._order is not None:
            self._order.forget(key)

    def victims(self, evictable: Callable[[Hashable], bool]) -> Iterator[Hashable]:
        return self._order.order(evictable) if self._order is not None else iter(())

    def describe(self) -> dict:
        """The setting in use and how often it changed (for stats)."""
        mult, alpha = CANDIDATES[self.choice]
        return {"half_life_cache_fills": mult, "alpha": alpha, "switches": self.switches}

    def __len__(self) -> int:
        return len(self._order.entries) if self._order is not None else 0
