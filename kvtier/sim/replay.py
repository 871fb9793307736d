"""Replay a trace through one eviction policy at one capacity, block by block, with no KV: the token
hit rate a cache of that many blocks reaches.

For each request, in trace order: its hit is the run of leading blocks the cache holds (a block's
tokens count up to the prompt's `input_length`); then its blocks are used (`touch`) or admitted, the
index making room for each new one through the policy (`BoundedIndex.make_room`), as the CPU tier
does: this is `kvtier.sim.tiers` with one tier, the storage path's order of calls. Every block
weighs 1, so a capacity is a number of blocks. The policy objects are the storage path's own
(`kvtier.policy.EvictionPolicy`), so what is measured here is what a tier would do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvtier.policy import EvictionPolicy, LRUPolicy
from kvtier.sim.tiers import BLOCK_TOKENS, TierSpec, replay_tiers
from kvtier.sim.trace import TraceRequest


@dataclass(frozen=True, slots=True)
class ReplayResult:
    capacity_blocks: int
    requests: int
    input_tokens: int
    hit_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0


def replay(trace: Iterable[TraceRequest], capacity_blocks: int,
           policy: Callable[[], EvictionPolicy] = LRUPolicy, block_tokens: int = BLOCK_TOKENS
           ) -> ReplayResult:
    """The token hit rate of a `capacity_blocks` cache under a new `policy()` over `trace`: one tier
    of `kvtier.sim.tiers` (every block stored, the partial last one too)."""
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    tier = TierSpec("cpu", capacity_blocks, lambda _capacity: policy())
    result = replay_tiers(trace, [tier], block_tokens=block_tokens)
    return ReplayResult(capacity_blocks, result.requests, result.input_tokens, result.hit_tokens)
