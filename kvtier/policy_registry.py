"""Eviction policies by name: what a tier's `policy:` config key and the simulator (`kvtier.sim`) choose.

A factory takes the capacity the policy will serve, in the units its keys' sizes come in (bytes in a
tier, blocks in the simulator): policies that size queues or ghost lists from it (ARC, S3-FIFO,
kvtier's own) need it; LRU ignores it.
"""

from __future__ import annotations

from collections.abc import Callable

from kvtier.policy import EvictionPolicy, LRUPolicy
from kvtier.policy_adaptive import AdaptivePolicy
from kvtier.policy_arc import ARCPolicy
from kvtier.policy_s3fifo import S3FIFOPolicy

PolicyFactory = Callable[[int], EvictionPolicy]

POLICIES: dict[str, PolicyFactory] = {
    "lru": lambda capacity: LRUPolicy(),
    "arc": ARCPolicy,
    "s3fifo": S3FIFOPolicy,
    "adaptive": AdaptivePolicy,
}
DEFAULT_POLICY = "lru"  # disk tiers, kvtier_server: where adaptive was measured no better than LRU
DEFAULT_CPU_POLICY = "adaptive"  # host memory: the best measured (benchmarks/README.md, policy_replay.py)


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """A new policy `name` for `capacity` units; ValueError naming the known ones."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return factory(capacity)
