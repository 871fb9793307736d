"""Replay a trace through a stack of tiers the way `kvtier.storage.StorageManager` drives them, with no
KV: per tier, its policy's hits, writes and evictions; for the stack, the token hit rate.

The first tier is host memory (the CPU tier), the others are below it in order (disk, a remote
store). Per request, in trace order, the same calls in the same order as the engine's
lookup / retrieve / store:

    lookup:   the hit is the run of leading blocks some tier holds (tokens capped at input_length).
    retrieve: the hit's blocks in host memory are marked used, the last one first (so the prefix
              ends up the most recently used); each block only a lower tier holds is read from the
              first tier that has it (marked used there), making room for it in host memory, and
              is kept there once all are read (promotion) unless `promote` is off.
    store:    every block is looked up in host memory (marked used, first one first); room is made
              for the ones it lacks (a victim of the policy at a time), then they are admitted and,
              with `write_through`, written to every lower tier (which marks a block it holds
              already as used). Without write-through a block evicted from host memory is written
              below then (demotion). A store larger than host memory streams in waves when there
              is a tier below; without one, what does not fit is not stored.

A block that does not fit (the tier's capacity is 0) is not admitted, and a store without room in
host memory goes on below. Every block weighs 1, so capacities are numbers of blocks. `to_chunks`
turns a trace of 512-token blocks into one of the engine's 256-token chunks (whole chunks only: the
engine stores no partial chunk), which is what makes this replay and a `CacheEngine` replay count
the same hits (tested in tests/benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kvtier.admission import admission_rule
from kvtier.policy import BoundedIndex, EvictionPolicy
from kvtier.policy_registry import make_policy
from kvtier.sim.trace import TraceRequest

BLOCK_TOKENS = 512  # the Mooncake traces' block


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One tier: its name, how many blocks it holds, its eviction policy (a registry name, or a
    factory taking the capacity) and its admission rule (a `kvtier.admission` name)."""

    name: str
    capacity: int
    policy: str | Callable[[int], EvictionPolicy] = "lru"
    admission: str = "all"

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ValueError(f"tier {self.name!r}: capacity must be >= 0 blocks, got {self.capacity}")
        admission_rule(self.admission)


@dataclass(slots=True)
class TierCounts:
    hits: int = 0  # blocks served from this tier by retrieves
    writes: int = 0  # blocks written into it: stores, promotions (host memory), write-through, demotions
    evictions: int = 0


@dataclass(slots=True)
class TieredResult:
    requests: int = 0
    input_tokens: int = 0
    hit_tokens: int = 0
    tiers: dict[str, TierCounts] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0


# A store's partial last block, its tokens and a whole block's (None: no partial block), what
# admission rules look at.
Tail = tuple[int, int, int] | None


def _never(_key: object) -> bool:
    return False


class _Tier:
    """One tier's index and counters."""

    def __init__(self, spec: TierSpec):
        policy = spec.policy
        made = make_policy(policy, spec.capacity) if isinstance(policy, str) else policy(spec.capacity)
        self.index: BoundedIndex[int] = BoundedIndex(spec.capacity, made)
        self.rule = admission_rule(spec.admission)
        self.counts = TierCounts()

    def admits(self, block: int, tail: Tail) -> bool:
        """Whether a stored `block` joins the policy (else it is held as the next victim)."""
        return tail is None or block != tail[0] or self.rule(tail[1], tail[2])

    def admit(self, block: int, tail: Tail = None) -> list[int] | None:
        """Make room for a stored `block` and index it: the blocks evicted for it, or None (no room)."""
        victims = self.index.make_room(1, _never)
        if victims is None:
            return None
        self.index.add(block, 1, self.admits(block, tail))
        self.counts.writes += 1
        self.counts.evictions += len(victims)
        return victims

    def admit_together(self, blocks: Sequence[int], tail: Tail = None) -> tuple[int, list[int]]:
        """Room for `blocks` first, one victim at a time, then all of them indexed: how host memory
        takes a store or a retrieve's promotions (a slab per chunk, each freed by evicting the next
        victim, before any of them is indexed). (How many were admitted, the blocks evicted.)"""
        evicted: list[int] = []
        room = 0
        for k in range(1, len(blocks) + 1):
            victims = self.index.make_room(k, _never)
            if victims is None:
                break
            evicted += victims
            room = k
        for block in blocks[:room]:
            self.index.add(block, 1, self.admits(block, tail))
        self.counts.writes += room
        self.counts.evictions += len(evicted)
        return room, evicted


class TierStack:
    """The tiers of one replay and the engine's calls on them (see the module docstring)."""

    def __init__(self, specs: Sequence[TierSpec], write_through: bool = True, promote: bool = True):
        if not specs:
            raise ValueError("a replay needs at least one tier")
        if len({s.name for s in specs}) != len(specs):
            raise ValueError(f"tier names must differ: {[s.name for s in specs]}")
        self.top, *self.lower = [_Tier(s) for s in specs]
        self.names = [s.name for s in specs]
        self.write_through, self.promote = write_through, promote

    def lookup(self, ids: Sequence[int]) -> int:
        tiers = [self.top, *self.lower]
        held = 0
        while held < len(ids) and any(ids[held] in t.index for t in tiers):
            held += 1
        return held

    def retrieve(self, ids: Sequence[int]) -> None:
        top = self.top
        for block in reversed(ids):
            top.index.touch(block)
        promoted = []
        for block in ids:
            if block in top.index:
                top.counts.hits += 1
                continue
            tier = next(t for t in self.lower if block in t.index)
            tier.counts.hits += 1
            tier.index.touch(block)
            if self.promote:
                promoted.append(block)
        self._into_top(promoted)

    def store(self, ids: Sequence[int], tail: Tail = None) -> None:
        top = self.top
        new = []
        for block in ids:
            if block in top.index:
                top.index.touch(block)
            else:
                new.append(block)
        while new:  # in waves when larger than host memory and there is a tier below to stream to
            stored = self._into_top(new, tail)
            if self.write_through:
                for block in new[:stored]:
                    self._write_below(block, tail)
            new = new[stored:] if stored and self.lower else []

    def _into_top(self, blocks: list[int], tail: Tail = None) -> int:
        stored, victims = self.top.admit_together(blocks, tail)
        if not self.write_through:
            for victim in victims:
                self._write_below(victim)
        return stored

    def _write_below(self, block: int, tail: Tail = None) -> None:
        for tier in self.lower:
            if block in tier.index:
                tier.index.touch(block)
            else:
                tier.admit(block, tail)

    def counts(self) -> dict[str, TierCounts]:
        return dict(zip(self.names, [self.top.counts, *(t.counts for t in self.lower)]))


def replay_tiers(trace: Iterable[TraceRequest], tiers: Sequence[TierSpec], *, write_through: bool = True,
                 promote: bool = True, store_partial: bool = True, block_tokens: int = BLOCK_TOKENS
                 ) -> TieredResult:
    """Replay `trace` through `tiers` (host memory first). With `store_partial` off, a request's last
    block is not stored when the prompt ends inside it (kvtier stores no partial chunk)."""
    stack = TierStack(tiers, write_through, promote)
    result = TieredResult()
    for request in trace:
        ids = request.hash_ids
        held = stack.lookup(ids)
        result.requests += 1
        result.input_tokens += request.input_length
        result.hit_tokens += min(held * block_tokens, request.input_length)
        if held:
            stack.retrieve(ids[:held])
        tail_tokens = request.input_length - (len(ids) - 1) * block_tokens
        tail = (ids[-1], tail_tokens, block_tokens) if ids and 0 < tail_tokens < block_tokens else None
        if tail and not store_partial:  # the prompt ends inside its last block, which is not stored
            ids, tail = ids[:-1], None
        stack.store(ids, tail)
    result.tiers = stack.counts()
    return result


def to_chunks(trace: Iterable[TraceRequest], chunk_tokens: int = 256, block_tokens: int = BLOCK_TOKENS
              ) -> list[TraceRequest]:
    """The trace in whole `chunk_tokens` chunks: block `h`'s i-th chunk is `h * k + i` (k chunks a
    block), and a prompt's partial last chunk is left out, as the engine leaves it out."""
    if block_tokens % chunk_tokens:
        raise ValueError(f"a block ({block_tokens} tokens) must be whole chunks of {chunk_tokens}")
    k = block_tokens // chunk_tokens
    out = []
    for r in trace:
        whole = min(r.input_length // chunk_tokens, len(r.hash_ids) * k)
        ids = tuple(r.hash_ids[i // k] * k + i % k for i in range(whole))
        out.append(TraceRequest(r.timestamp, r.input_length, r.output_length, ids))
    return out
