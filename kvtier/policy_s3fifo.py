"""S3-FIFO: Yang, Zhang, Qiu, Yue & Rashmi, "FIFO queues are all you need for cache eviction",
SOSP 2023 (Algorithm 1), as a `kvtier.policy.EvictionPolicy`, byte-aware.

Three FIFO queues: S (small, `small_fraction` of the capacity: new keys), M (main, the rest: keys
that proved themselves) and G (ghost: keys only, of keys that left S unused, weighing at most M's
share, oldest dropped first). Each resident key has a use count capped at 3 (the paper's two bits).

    insert   a key G remembers -> M's head (it left S too early once); any other new key -> S's head.
             Count 0. (Inserting a resident key counts as a use.)
    touch    count + 1, at most 3. Nothing moves: FIFO queues are reordered only at eviction time.
    victims  the paper's EVICT, lazily: from S while S holds at least its share (S less the keys
             this walk has offered or moved), else from M; each side when the other has no more.
               S's tail: used at least `promote_at` times since insertion -> moved to M's head with
               count 0; else offered. Once the walk takes from S it stays there until it offers one
               (the paper's evictS loop).
               M's tail: count > 0 -> back to M's head with count - 1 (second chance); else offered.
    remove   a key removed from S goes to G (every removal counts as an eviction: a plain delete
             cannot be told apart); from M it is forgotten.

The S -> M threshold is that of the code the paper's numbers come from, the SOSP artifact's
libCacheSim (Thesys-lab/sosp23-s3fifo S3FIFO.c; today's libCacheSim S3FIFO.c and S3FIFOv0.c alike):
`move-to-main-threshold=2`, two uses while in S (Algorithm 1's `t.freq > 1`): `promote_at=2`. The
authors' blog describes one use since insertion: `promote_at=1`. As in libCacheSim, a move S -> M
evicts nothing from M by itself: M above its share is what sends the next eviction to M. Where this
differs from libCacheSim: the queues share one budget (S's share is a target, not a hard split), a
key too big for S is still admitted (the index decides admission), and a new key always goes to S
(S3FIFO.c sends it to M while the cache has never evicted; S3FIFOv0.c, the paper's, does not).

The walk moves keys as it goes (S -> M, second chances in M): that is the algorithm's own work
towards the next eviction, kept even when the caller stops early or `make_room` gives up (so a
walk that evicts nothing, a peek such as write-back's clean-ahead, spends second chances too). A key
offered or skipped (protected) keeps its place. It ends: each key is offered or skipped at most
once per walk, and a key goes back to M's head at most 3 times (each time with a lower count), so
a walk over protected keys only ends after at most 4 passes over M.

Queues are doubly linked lists of nodes (the walk's cursor survives moves of other keys; an
OrderedDict iterator would not). Cost: insert, touch, remove O(1); victims O(1) amortised per key
visited. Memory: a resident key costs a 6-slot node plus a dict entry (about 130 bytes in CPython
besides the key); a ghost one OrderedDict entry (about 100 bytes). Ghosts weigh at most
capacity - S's share (each key at least 1), so at most that many ghost keys.
Not thread-safe: the owning index's lock guards it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator

_MAX_COUNT = 3


class _Node:
    __slots__ = ("key", "weight", "count", "in_main", "prev", "next")

    def __init__(self, key: Hashable, weight: int) -> None:
        self.key, self.weight, self.count, self.in_main = key, weight, 0, False
        self.prev: _Node = self
        self.next: _Node = self


class _Fifo:
    """A circular doubly linked list behind a sentinel: `root.next` is the tail (oldest), `root.prev`
    the head (newest)."""

    __slots__ = ("root", "weight")

    def __init__(self) -> None:
        self.root = _Node(None, 0)
        self.weight = 0

    def push_head(self, node: _Node) -> None:
        last = self.root.prev
        node.prev, node.next = last, self.root
        last.next = self.root.prev = node
        self.weight += node.weight

    def unlink(self, node: _Node) -> None:
        node.prev.next, node.next.prev = node.next, node.prev
        self.weight -= node.weight


class S3FIFOPolicy:
    """S3-FIFO for `capacity` units (bytes in a tier, blocks in the simulator)."""

    def __init__(self, capacity: int, small_fraction: float = 0.1, *, promote_at: int = 2) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if not 0 <= small_fraction <= 1:
            raise ValueError(f"small_fraction must be within [0, 1], got {small_fraction}")
        if not 1 <= promote_at <= _MAX_COUNT:
            raise ValueError(f"promote_at must be within [1, {_MAX_COUNT}], got {promote_at}")
        self.capacity = capacity
        self.small_share = int(capacity * small_fraction)  # libCacheSim rounds down too
        self.ghost_share = capacity - self.small_share  # "as many as M holds"
        self.promote_at = promote_at
        self._nodes: dict[Hashable, _Node] = {}
        self._small, self._main = _Fifo(), _Fifo()
        self._ghost: OrderedDict[Hashable, int] = OrderedDict()  # key -> weight, oldest first
        self._w_ghost = 0
        self._changes = 0  # insert/touch/remove calls: a walk resumed after one raises

    @property
    def ghosts(self) -> int:
        """How many ghost keys (G) are remembered."""
        return len(self._ghost)

    def __len__(self) -> int:
        return len(self._nodes)

    def insert(self, key: Hashable, nbytes: int = 0) -> None:
        weight = max(nbytes, 1)
        self._changes += 1
        node = self._nodes.get(key)
        if node is not None:  # used again, maybe at a new size
            queue = self._main if node.in_main else self._small
            queue.weight += weight - node.weight
            node.weight = weight
            node.count = min(node.count + 1, _MAX_COUNT)
            return
        node = self._nodes[key] = _Node(key, weight)
        if key in self._ghost:
            self._w_ghost -= self._ghost.pop(key)
            node.in_main = True
            self._main.push_head(node)
        else:
            self._small.push_head(node)

    def touch(self, key: Hashable) -> None:
        self._changes += 1
        node = self._nodes.get(key)
        if node is not None and node.count < _MAX_COUNT:
            node.count += 1

    def remove(self, key: Hashable) -> None:
        self._changes += 1
        node = self._nodes.pop(key, None)
        if node is None:
            return
        if node.in_main:
            self._main.unlink(node)
            return
        self._small.unlink(node)
        self._ghost[key] = node.weight
        self._w_ghost += node.weight
        while self._w_ghost > self.ghost_share:
            self._w_ghost -= self._ghost.popitem(last=False)[1]

    def victims(self, evictable: Callable[[Hashable], bool]) -> Iterator[Hashable]:
        # Two cursors, each the last node passed (offered or skipped, left in place) in its queue;
        # the next node to look at is cursor.next. A node moved to M's head lands beyond M's cursor,
        # so the walk meets it again: that is FIFO-reinsertion's second lap.
        small, main = self._small, self._main
        s_cur, m_cur = small.root, main.root
        s_left = small.weight  # S once this walk's offers and moves are gone
        in_small = False  # the paper's evictS: stay in S until it offers one
        changes = self._changes
        while True:
            s_node, m_node = s_cur.next, m_cur.next
            s_more, m_more = s_node is not small.root, m_node is not main.root
            if not s_more and not m_more:
                return
            if s_more and (in_small or not m_more or s_left >= self.small_share):
                in_small = True
                if s_node.count >= self.promote_at:  # proved itself in S: on to M, count reset
                    small.unlink(s_node)
                    s_left -= s_node.weight
                    s_node.count, s_node.in_main = 0, True
                    main.push_head(s_node)
                    continue
                s_cur = s_node
                if evictable(s_node.key):
                    in_small = False
                    s_left -= s_node.weight
                    yield s_node.key
                    self._check_unchanged(changes)
            else:
                in_small = False
                if m_node.count > 0:  # second chance, one use spent
                    m_node.count -= 1
                    main.unlink(m_node)
                    main.push_head(m_node)
                    continue
                m_cur = m_node
                if evictable(m_node.key):
                    yield m_node.key
                    self._check_unchanged(changes)

    def _check_unchanged(self, changes: int) -> None:
        # The cursors may point at nodes a removal unlinked: going on would walk a stale chain.
        if self._changes != changes:
            raise RuntimeError("S3FIFOPolicy changed during victims(): collect the victims, then remove")
