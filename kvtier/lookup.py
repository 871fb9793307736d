"""Prefix lookup across the tiers: how many leading chunks some tier holds. Index only, no payload I/O.

Where it runs: on the caller's thread, outside the StorageManager's lock (it gives this function
what host memory holds, read under the lock); the tiers' `has` may be network round trips, one
batch per tier at most.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.keys import ChunkKey
from kvtier.tiers.base import Tier


def prefix_length(keys: Sequence[ChunkKey], in_memory: Sequence[bool], lower: Sequence[Tier]) -> int:
    """How many leading `keys` some tier holds, given which of them host memory holds. The tiers
    below are asked in order, each only if a gap is left, from the first gap in memory on: a later
    chunk can be in memory while an earlier one is only below (a store inserts a prompt first chunk
    first, so LRU evicts that first)."""
    present = list(in_memory)
    n = present.index(False) if False in present else len(present)
    rest, present = list(keys[n:]), present[n:]
    for tier in lower:
        if all(present):
            break
        present = [p or found for p, found in zip(present, tier.has(rest))]
    return n + (present.index(False) if False in present else len(present))
