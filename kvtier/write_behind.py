"""Background writes of host-memory entries to the tiers below: a StorageManager's write-behind.
Its `lower` are the manager's writable tiers (`Tier.writable`): a read-only tier (P2P) is never written.

Where it runs: `submit_locked` and the removal marks under the manager's lock (the condition given
at construction); each write on the write threads, which takes that lock once, when the write has
landed, to record its outcome on the entry, hand it to the manager (`landed(key, entry, ok)`, still
under the lock: the manager decides what a landed demotion means) and let go of the entry's slab.

What it keeps: the writes in flight (a retrieve that needs memory waits for them, never for another
retrieve), and the removal epochs. A write's success counts only if no removal below (clear, move
up) overlapped it: such a removal may have deleted what it wrote, so `persisted` stays False and
the next eviction writes the chunk down again (a tier that still holds it says so).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future

from kvtier.job_queue import TransferQueue
from kvtier.keys import ChunkKey
from kvtier.memory import MemoryPool
from kvtier.slab_io import SlabIO
from kvtier.tiers.base import Tier
from kvtier.tiers.cpu import CpuEntry

Landed = Callable[[ChunkKey, CpuEntry, bool], None]


class WriteBehind:
    def __init__(self, progress: threading.Condition, io: SlabIO, pool: MemoryPool, lower: Sequence[Tier],
                 threads: int, landed: Landed):
        self._progress = progress  # over the manager's lock; notified whenever a write lands
        self._io = io
        self._pool = pool
        self._lower = list(lower)
        self._landed = landed
        self._queue = TransferQueue(threads, "kvtier-write")
        self.in_flight = 0
        self.removing = 0  # removals below in progress
        self._epoch = 0  # bumped when a removal starts and when one ends
        self.clears = 0  # clears of the tiers below begun (kvtier.recode: none may be undone by it)

    def submit_locked(self, key: ChunkKey, entry: CpuEntry, tiers: Sequence[Tier] | None = None) -> Future:
        """Queue a write of `entry` to `tiers` (None: every tier below). The future's result: True
        if a tier holds the chunk now and no removal overlapped the write."""
        epoch = None if self.removing else self._epoch
        # Counted once the queue took it (the job takes this lock, held here, before it ends).
        future = self._queue.submit(self._write, key, entry, tiers, epoch, entry.persisted)
        entry.hold()  # the slab must outlive the write
        self.in_flight += 1
        return future

    def clean_ahead_locked(self, victims: Iterable[tuple[ChunkKey, CpuEntry]], target: int) -> None:
        """Write-back, the pool nearly full: start writes of the next eviction `victims` that have no
        copy below, up to `target` writes in flight, so the evictions that follow free at once."""
        budget = target - self.in_flight
        for key, entry in victims:
            if budget <= 0:
                break
            if not (entry.persisted or entry.write_failed):
                self.submit_locked(key, entry)
                budget -= 1

    def _write(self, key: ChunkKey, entry: CpuEntry, tiers: Sequence[Tier] | None, epoch: int | None,
               confirm: bool) -> bool:
        """The job: write one chunk below. `confirm`: it was written below before, so ask first."""
        ok = False
        try:
            ok = self._io.write(key, entry, self._lower if tiers is None else tiers, confirm)
        finally:
            with self._progress:
                entry.write_failed |= not ok and tiers is None
                ok = ok and epoch == self._epoch
                # A write to every tier below that fails means none holds it (put answers True
                # for a record already there): forget a stale claim.
                entry.persisted = ok or (entry.persisted and tiers is not None)
                self.in_flight -= 1
                self._progress.notify_all()
                self._landed(key, entry, ok)
                entry.release(self._pool)
        return ok

    def begin_removal_locked(self) -> None:
        """Copies below are about to be deleted: no write overlapping the deletion counts."""
        self.removing += 1
        self._epoch += 1

    def end_removal_locked(self) -> None:
        """The deletion is done (call after resetting `persisted` of what it removed, in the same
        locked section)."""
        self.removing -= 1
        self._epoch += 1

    @property
    def queued(self) -> int:
        """Writes submitted and not yet finished, as the queue counts them."""
        return self._queue.pending

    @property
    def failed(self) -> int:
        return self._queue.failed

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every write submitted so far. True when all finished within `timeout`."""
        return self._queue.drain(timeout)

    def close(self) -> None:
        self._queue.close()
