"""Chunks that no tier may evict: pinned by a user, or leased by a request that is about to load them.

A pin is a user's, held until `unpin` (or `clear`); pinning twice is one pin; no tier evicts a pinned
chunk. A lease is a request's, counted: two requests leasing one chunk hold it until both release.
The connector leases the chunks it promised the scheduler at lookup time and releases them once the
load is done or the request is finished or aborted, so a chunk cannot disappear between "it is
there" and "it was read". A lease protects a chunk in *some* tier, not in host memory: the CPU tier
may push a leased chunk down (last of all its victims, and only once a tier below confirms it holds
a copy), so a leased prompt larger than host memory can still stream through it; the tiers below
never evict it. A CPU-only engine has nowhere to push it, so there a lease holds it in memory.

Tiers ask `key in pins` (pinned or leased) from their own threads while evicting; membership tests
on a set and a dict are atomic under the GIL, and every change is made under the storage manager's
lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from kvtier.keys import ChunkKey


class PinTable:
    def __init__(self) -> None:
        self._pinned: set[ChunkKey] = set()
        self._leases: Counter[ChunkKey] = Counter()

    def __contains__(self, key: object) -> bool:
        return key in self._pinned or key in self._leases

    def is_pinned(self, key: ChunkKey) -> bool:
        """Pinned by a user (leases aside)."""
        return key in self._pinned

    def is_leased(self, key: ChunkKey) -> bool:
        return key in self._leases

    def pin(self, keys: Iterable[ChunkKey]) -> int:
        """Pin keys; returns how many were not pinned before."""
        new = {k for k in keys if k not in self._pinned}
        self._pinned |= new
        return len(new)

    def unpin(self, keys: Iterable[ChunkKey]) -> int:
        gone = {k for k in keys if k in self._pinned}
        self._pinned -= gone
        return len(gone)

    def lease(self, keys: Iterable[ChunkKey]) -> None:
        self._leases.update(keys)

    def release(self, keys: Iterable[ChunkKey]) -> None:
        """Release one lease per key (a key given twice, twice). All or nothing: a release of
        more than was leased raises before changing any count."""
        wanted = Counter(keys)
        if any(self._leases.get(key, 0) < n for key, n in wanted.items()):
            raise RuntimeError("chunk lease released more often than taken")
        self._leases.subtract(wanted)
        for key in wanted:
            if self._leases[key] == 0:
                del self._leases[key]

    def clear_pins(self) -> None:
        """Drop every user pin. Leases stay: their requests still hold them."""
        self._pinned.clear()

    @property
    def num_pinned(self) -> int:
        return len(self._pinned)

    @property
    def num_leased(self) -> int:
        return len(self._leases)
