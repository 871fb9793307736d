"""The offline bound for `kvtier.sim.replay`: Belady's MIN with bypass (Belady, "A study of replacement
algorithms for a virtual-storage computer", IBM Systems Journal 5(2), 1966), which knows the whole
trace in advance.

The same requests, hit rule and block weight as `kvtier.sim.replay.replay` (a request's hit is the
run of leading blocks held, in tokens capped at input_length; then every block of it is used or
admitted; each block weighs 1), but eviction sees the future: every block occurrence knows its next
use (the index of the next request holding that block; computed in one reverse pass). A used block's
next use moves on to that of this occurrence. A missing block is admitted while there is room; with
the cache full, it is bypassed (not admitted) when it is next used no sooner than the resident used
farthest in the future, else that resident is evicted for it. Evicting a block of the request being
replayed is fine: its use in this request has been counted already, and a block of it not yet
processed is next used now, the nearest possible, so never the farthest unless all are (then the
incoming block is bypassed).

This is the bound a block-level policy chases, not the optimum of the prefix hit rate (which would
also weigh a block by the hits after it in its prefix). A max-heap of (next use, block) with lazy
deletion finds the farthest: a use pushes a fresh entry and leaves the old one stale (skipped when
it surfaces). O(log n) a block; memory: the trace's next uses (one int per block occurrence) and at
most one heap entry per occurrence.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from kvtier.sim.replay import ReplayResult
from kvtier.sim.trace import TraceRequest


def next_uses(trace: Sequence[TraceRequest]) -> list[tuple[int, ...]]:
    """For each request, each of its blocks' next use: the index of the next request holding that
    block, or len(trace) for never."""
    never = len(trace)
    seen: dict[int, int] = {}
    out: list[tuple[int, ...]] = [()] * len(trace)
    for i in range(len(trace) - 1, -1, -1):
        ids = trace[i].hash_ids
        out[i] = tuple([seen.get(block, never) for block in ids])
        for block in ids:
            seen[block] = i
    return out


def belady(trace: Iterable[TraceRequest], capacity_blocks: int, block_tokens: int = 512) -> ReplayResult:
    """The token hit rate of a `capacity_blocks` cache that evicts (or bypasses) the block used
    farthest in the future, over `trace`."""
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    requests = trace if isinstance(trace, Sequence) else list(trace)
    resident: dict[int, int] = {}  # block -> its next use
    farthest: list[tuple[int, int]] = []  # (-next use, block); stale when it disagrees with resident
    input_tokens = hit_tokens = 0
    for request, uses in zip(requests, next_uses(requests)):
        ids = request.hash_ids
        held = 0
        while held < len(ids) and ids[held] in resident:
            held += 1
        input_tokens += request.input_length
        hit_tokens += min(held * block_tokens, request.input_length)
        for block, use in zip(ids, uses):
            if block not in resident and len(resident) >= capacity_blocks:
                if not resident:  # a cache of no blocks
                    continue
                while resident.get(farthest[0][1]) != -farthest[0][0]:
                    heapq.heappop(farthest)
                if use >= -farthest[0][0]:  # bypass: it is needed no sooner than anything held
                    continue
                del resident[heapq.heappop(farthest)[1]]
            resident[block] = use
            heapq.heappush(farthest, (-use, block))
    return ReplayResult(capacity_blocks, len(requests), input_tokens, hit_tokens)
