"""Leases: chunks a peer is READing from this instance's slabs, held until it says it is done.

Where it runs: the peer server's connection threads (`grant`, `end`) and its sweeper thread
(`expire`), all at once: one lock guards the table. The table only keeps books; letting the chunks
go (`kvtier.p2p.holding.let_go`) is its caller's: `end` and `close` hand the chunks back, `expire`
passes them to `on_expire`, always outside the lock, and a lease's chunks leave the table exactly
once, so nothing is let go twice.

    grant(held)   a lease of `held` (a hold's chunks) until now + lease_s; None when the table
                  would then hold more than max_chunks (the caller lets the chunks go at once)
    end(id)       the reader is done (RELEASE): the lease's chunks, [] for an unknown or ended id
    expire()      ends every lease past its deadline: a reader that vanished costs lease_s at most
    drain(..)     the server is stopping: nothing is granted any more; wait (bounded) until every
                  lease ended or is older than its reader's deadline (its READ is over or aborted)
    close()       the server is stopping: every lease ends, and nothing is granted any more

A lease id is a random 64-bit number, not a counter: a reader that RELEASEs a stale id (its
holder restarted, or the lease expired) must not end another reader's lease, whose NIXL READ
may still be in flight out of those slabs.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.p2p.holding import HeldChunk


@dataclass(slots=True)
class _Lease:
    expires: float
    held: list[HeldChunk]


class LeaseTable:
    def __init__(self, lease_s: float, max_chunks: int, on_expire: Callable[[list[HeldChunk]], None],
                 clock: Callable[[], float] = time.monotonic):
        if lease_s <= 0 or max_chunks < 1:
            raise ValueError(f"lease_s must be > 0 and max_chunks >= 1, got {lease_s}, {max_chunks}")
        self.lease_s, self.max_chunks = lease_s, max_chunks
        self._on_expire, self._clock = on_expire, clock  # (expired chunks go to on_expire)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a lease ended (drain waits on it)
        self._leases: dict[int, _Lease] = {}  # insertion order is expiry order (one lease_s for all)
        self._chunks = 0
        self._closed = False

    def grant(self, held: list[HeldChunk]) -> int | None:
        """A new lease's id; None when over max_chunks (or closed): the caller keeps `held`."""
        if not held:
            raise ValueError("a lease holds at least one chunk")
        with self._lock:
            if self._closed or self._chunks + len(held) > self.max_chunks:
                return None
            while (lease_id := secrets.randbits(64)) in self._leases or not lease_id:
                pass  # (a collision, or 0: practically never)
            self._leases[lease_id] = _Lease(self._clock() + self.lease_s, list(held))
            self._chunks += len(held)
            return lease_id

    def end(self, lease_id: int) -> list[HeldChunk]:
        """The chunks of lease `lease_id`, which ends; [] for an unknown, expired or ended id."""
        with self._lock:
            return self._pop(lease_id)

    def expire(self) -> int:
        """End every lease past its deadline, handing each one's chunks to `on_expire`. The count."""
        now = self._clock()
        with self._lock:
            due = []
            for lease_id, lease in self._leases.items():
                if lease.expires > now:
                    break
                due.append(lease_id)
            ended = [self._pop(lease_id) for lease_id in due]
        for held in ended:
            self._on_expire(held)
        return len(ended)

    def active(self) -> tuple[int, int]:
        """(leases, chunks) held now."""
        with self._lock:
            return len(self._leases), self._chunks

    def drain(self, grace_s: float, deadline: float) -> int:
        """Grant no more, then wait until every lease ended (RELEASE, expiry) or was granted at
        least `grace_s` ago (its reader's deadline has passed: its READ is done or abandoned), or
        until `deadline` (this table's clock). The leases still active."""
        with self._lock:
            self._closed = True
            while self._leases:
                newest = next(reversed(self._leases.values()))
                left = min(newest.expires - self.lease_s + grace_s, deadline) - self._clock()
                if left <= 0 or not self._changed.wait(left):  # (timed out: the newest is old enough)
                    break
            return len(self._leases)

    def close(self) -> list[HeldChunk]:
        """End every lease (the server is stopping) and grant no more: all their chunks."""
        with self._lock:
            self._closed = True
            held = [chunk for lease in self._leases.values() for chunk in lease.held]
            self._leases.clear()
            self._chunks = 0
            self._changed.notify_all()
        return held

    def _pop(self, lease_id: int) -> list[HeldChunk]:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return []
        self._chunks -= len(lease.held)
        self._changed.notify_all()
        return lease.held
