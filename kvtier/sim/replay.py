"""Replay a trace through one eviction policy at one capacity, block by block, with no KV: the token
hit rate a cache of that many blocks reaches.

For each request, in trace order: its hit is the run of leading blocks the cache holds (a block's
tokens count up to the prompt's `input_length`); then its blocks are used (`touch`) or admitted, the
index making room for each new one through the policy (`BoundedIndex.make_room`), as the CPU tier
does. Every block weighs 1, so a capacity is a number of blocks. The policy objects are the storage
path's own (`kvtier.policy.EvictionPolicy`), so what is measured here is what a tier would do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvtier.policy import BoundedIndex, EvictionPolicy, LRUPolicy
from kvtier.sim.trace import TraceRequest

BLOCK_TOKENS = 512  # the Mooncake traces' block


@dataclass(frozen=True, slots=True)
class ReplayResult:
    capacity_blocks: int
    requests: int
    input_tokens: int
    hit_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0


def _never(_key: object) -> bool:
    return False


def replay(trace: Iterable[TraceRequest], capacity_blocks: int,
           policy: Callable[[], EvictionPolicy] = LRUPolicy, block_tokens: int = BLOCK_TOKENS
           ) -> ReplayResult:
    """The token hit rate of a `capacity_blocks` cache under a new `policy()` over `trace`."""
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    index: BoundedIndex[int] = BoundedIndex(capacity_blocks, policy())
    requests = input_tokens = hit_tokens = 0
    for request in trace:
        ids = request.hash_ids
        held = 0
        while held < len(ids) and ids[held] in index:
            held += 1
        requests += 1
        input_tokens += request.input_length
        hit_tokens += min(held * block_tokens, request.input_length)
        for block in ids:
            if block in index:
                index.touch(block)
            elif index.make_room(1, _never) is not None:
                index.add(block, 1)
    return ReplayResult(capacity_blocks, requests, input_tokens, hit_tokens)
