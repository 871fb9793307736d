"""The `Tier` protocol: a store of chunk records below host memory (disk, Redis, kvtier_server, peers).

Where it runs: on the StorageManager's I/O threads (and `has` on the caller's thread), so every
method must be thread-safe and may block on its medium. Batched calls are the primary API; a tier
that cannot batch loops inside.

Contract:
- `has(keys)` answers from the tier's index or one round trip: no payload I/O, no side effects.
- `get(keys, dests)` reads each record into the caller's buffer (`dests[i]`, a 1-D contiguous uint8
  CPU tensor or numpy array at least as large as the payload; 4 KiB aligned and padded to whole
  4 KiB blocks when it comes from the memory pool, which lets the disk tier read it with O_DIRECT;
  a record that processes only move, like kvtier_server's, never needs torch) and returns its
  verified header, or None for a miss. A record that fails validation is removed, counted as
  corrupt and returned as None; an I/O failure is counted and returned as None. Never raises for a
  bad record or a failing medium: the caller recomputes.
- `put(items)` stores each record (header + payload, written as separate buffers); True when the
  record is stored or was already there, False when the tier had no room (everything left is
  pinned) or failed. The caller keeps each payload alive and unchanged until `put` returns.
- Pins: tiers never evict a key for which the shared `is_pinned` predicate is true.
- `writable`: False for a tier that serves reads only (the P2P tier, kvtier.tiers.p2p: other
  instances' memory). Such a tier is never written, moved or demoted to, never cleared or removed
  from by a move, and never reported to the fleet as holding keys; `put` answers False there.
  Host memory with only such tiers below drops what it evicts, as with no tier below.

The CPU tier is not a `Tier`: it owns the memory pool whose slabs every other tier reads from and
writes into, and it holds tensors, not records. Forcing both behind one protocol would mean a
serialisation step on the hottest path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kvtier.keys import ChunkKey
from kvtier.record import RecordHeader

if TYPE_CHECKING:
    import numpy as np
    import torch

PinPredicate = Callable[[ChunkKey], bool]


@dataclass(frozen=True, slots=True)
class PutItem:
    key: ChunkKey
    header: bytes  # kvtier.record.encode_header(...) for exactly this payload
    payload: torch.Tensor | np.ndarray  # 1-D contiguous uint8, exactly the payload bytes


@dataclass(frozen=True, slots=True)
class TierUsage:
    chunks: int
    bytes: int
    capacity_bytes: int


class Tier(Protocol):
    name: str
    writable: bool  # stores, demotions and moves may go here (False: a read-only tier, P2P)
    fans_out: bool  # `get` spreads its own I/O (P2P: per peer): give it whole batches, not thread shares
    local: bool  # `has` answers from this process's own index (disk), not over the network (Redis, peers)

    def has(self, keys: Sequence[ChunkKey]) -> list[bool]: ...
    def get(self, keys: Sequence[ChunkKey],
            dests: Sequence[torch.Tensor | np.ndarray]) -> list[RecordHeader | None]: ...
    def put(self, items: Sequence[PutItem]) -> list[bool]: ...
    def remove(self, keys: Sequence[ChunkKey]) -> int: ...
    def clear(self) -> None: ...
    def usage(self) -> TierUsage: ...
    def close(self) -> None: ...


def writable_tiers(tiers: Sequence[Tier]) -> list[Tier]:
    """The tiers of `tiers` that take writes, in order: where stores, demotions and moves go."""
    return [tier for tier in tiers if tier.writable]
