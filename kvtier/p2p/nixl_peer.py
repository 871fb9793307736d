"""`NixlPeer`: reading another instance's slots over NIXL, one READ per call, bounded by a deadline.

A peer is made by `NixlEndpoint.connect` (kvtier.p2p.nixl_transport), which loads the holder's agent
metadata and prepares the descriptor list of the holder's slots ONCE; every `read` names slots of
that list and of our own prepared list by index (`makeXferReq`), so no descriptor is rebuilt per
chunk. Lifecycle: connect -> read ... read -> close (the reader, PeerLink, closes a peer once no
read uses it).

read(pairs, deadline) -> bool:

    make the request, post it, then poll its state:
        spin SPIN_CHECKS times (a small read finishes here), then sleep between checks, the
        pause doubling from PAUSE_MIN_S to PAUSE_MAX_S (a 32 MiB read overshoots by < 0.5 ms; a
        2 s deadline costs ~4000 wake-ups, not a core)
    DONE -> True.  ERR, a NIXL exception, or still in progress at the deadline -> False.
    Then release the request (NIXL cancels one in progress). If NIXL refuses (the transfer cannot
    be cancelled), keep polling for a grace of max(1 s, the read's own budget); if it still runs,
    drop the remote agent, which tears the UCX endpoint down. read() only returns once nothing of
    the transfer can still write into the local slots: the caller frees them right after.

Failure answers False, never raises (only ValueError for a slot index out of range, a bug): the P2P
tier turns False into misses and a back-off. A failed read marks the peer `broken`: every later
read answers False at once, and the reader connects anew (a fresh CONNECT, since the holder may
have restarted with a new agent). The remote agent is dropped once the last peer using it closes.

Where it runs: the P2P tier's read threads; thread-safe. Several threads may read from one peer at
once: the agent serialises its own calls (NIXL_THREAD_SYNC_STRICT, each a few microseconds), and no
Python lock is held while a transfer is polled, so reads from different peers overlap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

SPIN_CHECKS = 64
PAUSE_MIN_S = 20e-6
PAUSE_MAX_S = 500e-6
GRACE_MIN_S = 1.0


@dataclass(slots=True)
class RemoteAgent:
    """One loaded remote agent, shared by the peers connected to it (by the same metadata); the
    endpoint drops it (invalidateRemoteMD) when the last of them closes."""
    name: str
    slots: int
    peers: int = 0
    stale: bool = False  # a read failed: no new peer shares it; reload once the old ones closed
    torn_down: bool = False


@dataclass(slots=True)
class PeerLinks:
    """What a peer uses of its endpoint (a dataclass, not the endpoint, so the peer stays testable
    and the endpoint's own state stays private)."""
    nixl: Any              # the nixl bindings module
    agent: Any             # our nixlAgent
    local_dlist: int       # prepared descriptors of our slots
    local_slots: int
    closed: Callable[[NixlPeer], None] = field(repr=False)    # the endpoint's bookkeeping
    tear_down: Callable[[RemoteAgent], None] = field(repr=False)


class NixlPeer:
    def __init__(self, links: PeerLinks, remote: RemoteAgent, remote_dlist: int):
        self.name = remote.name
        self.remote = remote
        self._links = links
        self._remote_dlist = remote_dlist
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._closed = False
        self.broken = False

    def read(self, pairs: Sequence[tuple[int, int]], deadline: float) -> bool:
        """Read remote slot r into local slot l for each (l, r); True when all bytes arrived."""
        if not pairs:
            return True
        local, remote = self._indices(pairs)
        with self._lock:
            if self._closed or self.broken:
                return False
            self._in_flight += 1
        ok = False
        try:
            ok = self._transfer(local, remote, deadline)
        finally:
            with self._lock:
                self._in_flight -= 1
                if not ok:  # no new peer shares its agent; the reader connects anew
                    self.broken = self.remote.stale = True
                self._idle.notify_all()
        return ok

    def _indices(self, pairs: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        local = [int(p[0]) for p in pairs]
        remote = [int(p[1]) for p in pairs]
        if min(local) < 0 or max(local) >= self._links.local_slots:
            raise ValueError(f"local slot out of range 0..{self._links.local_slots - 1}: {local}")
        if min(remote) < 0 or max(remote) >= self.remote.slots:
            raise ValueError(f"remote slot out of range 0..{self.remote.slots - 1}: {remote}")
        return local, remote

    def _transfer(self, local: list[int], remote: list[int], deadline: float) -> bool:
        nixl, agent = self._links.nixl, self._links.agent
        started = time.monotonic()
        try:
            handle = agent.makeXferReq(nixl.NIXL_READ, self._links.local_dlist, local,
                                       self._remote_dlist, remote, b"", [], False)
        except Exception as exc:  # noqa: BLE001 - nixl's errors share no base but Exception
            logger.warning("NIXL read from %s: the request failed: %s: %s", self.name,
                           type(exc).__name__, exc)
            return False
        try:
            status = _poll(nixl, agent, handle, agent.postXferReq(handle, b""), deadline)
        except Exception as exc:  # noqa: BLE001 - NIXL_ERR_BACKEND, a remote disconnect, ...
            logger.info("NIXL read from %s failed: %s: %s", self.name, type(exc).__name__, exc)
            status = None
        if status == nixl.NIXL_IN_PROG:
            logger.info("NIXL read of %d slots from %s still in progress at its deadline: aborting",
                        len(local), self.name)
        self._release(handle, grace=max(GRACE_MIN_S, deadline - started))
        return status == nixl.NIXL_SUCCESS

    def _release(self, handle: int, grace: float) -> None:
        """Free the request, cancelling it if it still runs; return only once it cannot write."""
        nixl, agent = self._links.nixl, self._links.agent
        give_up = time.monotonic() + grace
        while True:
            try:
                agent.releaseXferReq(handle)
                return
            except Exception as exc:  # noqa: BLE001 - NIXL_ERR_REPOST_ACTIVE: cannot cancel
                refused = exc
            if time.monotonic() >= give_up:
                break
            try:  # let it settle, then release again
                _poll(nixl, agent, handle, nixl.NIXL_IN_PROG, give_up)
            except Exception:  # noqa: BLE001 - settled with an error: release it
                time.sleep(PAUSE_MAX_S)  # a handle NIXL refuses twice at once: do not spin
        logger.error("NIXL read from %s: a transfer could not be cancelled (%s) and ran past %.1f s "
                     "of grace: dropping the remote agent", self.name, refused, grace)
        self._links.tear_down(self.remote)  # the request handle is leaked on purpose

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new reads, wait (bounded) for those in flight, then let the endpoint drop the
        remote agent if no other peer uses it. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout_s):
                # Its descriptors and agent stay: a read still runs on them (the endpoint then
                # keeps the arena registered too).
                logger.error("NIXL peer %s closed with %d reads still in flight", self.name,
                             self._in_flight)
                return
        self._links.closed(self)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def release_dlist(self) -> None:
        """Called by the endpoint (under its lock) before it drops the remote agent."""
        try:
            self._links.agent.releasedDlistH(self._remote_dlist)
        except Exception as exc:  # noqa: BLE001 - best effort at close
            logger.warning("NIXL peer %s: releasing its descriptors failed: %s", self.name, exc)


def _poll(nixl: Any, agent: Any, handle: int, status: Any, deadline: float) -> Any:
    """The transfer's state once it is no longer in progress, or NIXL_IN_PROG at the deadline."""
    checks = 0
    pause = PAUSE_MIN_S
    while status == nixl.NIXL_IN_PROG:
        if time.monotonic() >= deadline:
            return status
        checks += 1
        if checks > SPIN_CHECKS:
            time.sleep(pause)
            pause = min(pause * 2, PAUSE_MAX_S)
        status = agent.getXferStatus(handle)
    return status
