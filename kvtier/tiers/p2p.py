"""The P2P tier: the chunks this instance misses, read from the peers that hold them, following `Tier`.

Where it runs: the last of the StorageManager's lower tiers; `has` on the lookup path, `get` with a
whole batch on the retrieving thread (`fans_out`: kvtier.transfers.TierReader). Thread-safe. Not
writable: nothing is ever put here (`put` answers False, `remove` 0, `clear` nothing, `usage` zeros).

    has(keys)   the PeerDirectory's answer (one controller round trip, cached for directory_ttl_s):
                some peer other than this instance holds the key
    get(keys, dests)
                1. locate again (cached from `has`: no round trip) and give each key to one holder:
                   peers not backing off first, then one that holds the key in memory (no disk read
                   on its side), then the longest leading run (a holder serves the leading run of
                   what it is asked);
                2. per peer, at once (one on the caller's thread, the others on FANOUT_THREADS):
                   room in the byte budget, then `PeerLink.read` under that peer's FailureGuard,
                   all with one deadline, now + timeout_s;
                3. wait for every peer's read (a dest must never be handed back while a read into
                   it runs), count `bytes_read` and return.

Isolation: each peer has its own link and FailureGuard (a failing peer backs off alone: `errors`
per chunk, misses at once while backing off, one probe per period), and no tier-wide lock is held
during I/O, so a slow or dead peer costs only the keys given to it. Bytes being read are bounded by
`max_bytes_in_flight` (`ByteBudget`: a read waits for room until its deadline, then misses; one
larger than the whole budget goes alone). Links are kept per URL, at most MAX_LINKS (the least
recently used idle one is closed beyond that, as links are made and as reads end); a peer's
back-off outlives its link (MAX_GUARDS peers remembered). A read after close() is a miss that opens
nothing. Corrupt records are `corrupt` counts and misses (a peer's copy is not ours to remove).
Nothing raises out of a Tier method.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvtier.config import P2PConfig
from kvtier.fleet.messages import PeerHolding
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.p2p.directory import PeerDirectory, leading_run
from kvtier.p2p.peer_client import PeerLink
from kvtier.record import RecordHeader, tensor_bytes
from kvtier.tiers.backoff import Backoff, FailureGuard
from kvtier.tiers.base import PutItem, TierUsage
from kvtier.tiers.remote import _classify

if TYPE_CHECKING:
    from kvtier.p2p.nixl_transport import NixlEndpoint

logger = logging.getLogger(__name__)

MAX_LINKS = 64  # peers with an open link at once
MAX_GUARDS = 4096  # peers whose back-off is remembered (a link closed for room keeps its peer's)
FANOUT_THREADS = 32  # peer reads of concurrent calls beyond each call's first, at once


class ByteBudget:
    """A byte semaphore: `acquire(n, deadline)` waits until n more bytes fit under `limit` (or
    nothing else is in flight: a request larger than the whole budget goes alone)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self._room = threading.Condition()

    def acquire(self, n: int, deadline: float) -> bool:
        with self._room:
            while self.in_flight and self.in_flight + n > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._room.wait(left)
            self.in_flight += n
            return True

    def release(self, n: int) -> None:
        with self._room:
            self.in_flight -= n
            self._room.notify_all()


@dataclass(slots=True)
class _Peer:
    link: PeerLink
    guard: FailureGuard
    users: int = 0  # reads using the link now: an idle link may be closed to make room


class P2PTier:
    name = "p2p"
    writable = False
    # A batch is read whole, on the retrieving thread (kvtier.transfers.TierReader): this tier fans
    # it out per peer on its own threads, so a stalled peer holds that retrieve alone.
    fans_out = True
    local = False

    def __init__(self, config: P2PConfig, directory: PeerDirectory, namespace: bytes, metrics: Metrics,
                 endpoint: NixlEndpoint | None, own_url: str | None):
        self.config, self.namespace = config, namespace
        self._directory, self._metrics = directory, metrics
        self._endpoint, self._own_url = endpoint, own_url  # own_url: our PeerServer's, never asked
        self._log = LogLimiter(logger)
        self._budget = ByteBudget(config.max_bytes_in_flight)
        self._lock = threading.Lock()  # the peer map only, never held during I/O
        self._peers: OrderedDict[str, _Peer] = OrderedDict()
        self._guards: OrderedDict[str, FailureGuard] = OrderedDict()  # per URL, outliving links
        self._closed = False
        self._fanout = ThreadPoolExecutor(FANOUT_THREADS, thread_name_prefix="kvtier-p2p")

    def _holders(self, keys: list[ChunkKey]) -> list[PeerHolding]:
        return [p for p in self._directory.locate(keys) if p.p2p_url != self._own_url]

    # -- Tier protocol -------------------------------------------------------------------------

    def has(self, keys: Sequence[ChunkKey]) -> list[bool]:
        keys = list(keys)
        found = [False] * len(keys)
        if keys:
            for peer in self._holders(keys):
                found = [f or held for f, held in zip(found, peer.held)]
        return found

    def get(self, keys: Sequence[ChunkKey], dests: Sequence[torch.Tensor]) -> list[RecordHeader | None]:
        keys = list(keys)
        if len(keys) != len(dests):
            raise ValueError(f"{len(keys)} keys but {len(dests)} destinations")
        results: list[RecordHeader | None] = [None] * len(keys)
        if not keys:
            return results
        deadline = time.monotonic() + self.config.timeout_s
        try:
            plan = list(self._assign(keys).items())
        except Exception:  # noqa: BLE001 - never raises: a miss, and a traceback once a minute
            self._log.error("assign", "p2p tier: cannot plan a read", exc_info=True)
            return results
        futures = [(indices, self._start(url, keys, dests, indices, deadline)) for url, indices in plan[1:]]
        parts = [(plan[0][1], self._read(plan[0][0], keys, dests, plan[0][1], deadline))] if plan else []
        parts += [(indices, future.result()) for indices, future in futures]
        for indices, headers in parts:
            for i, header in zip(indices, headers or ()):
                results[i] = header
        self._metrics.tier_inc(self.name, "bytes_read", sum(h.payload_len for h in results if h is not None))
        return results

    def _start(self, url: str, keys: list[ChunkKey], dests: Sequence[torch.Tensor], indices: list[int],
               deadline: float) -> Future:
        try:
            return self._fanout.submit(self._read, url, keys, dests, indices, deadline)
        except RuntimeError:  # closed: no more reads (the engine is shutting down)
            missed: Future = Future()
            missed.set_result(None)
            return missed

    def _assign(self, keys: list[ChunkKey]) -> dict[str, list[int]]:
        """Peer URL -> the indices of the keys to read from it (see the module docstring)."""
        holders = self._holders(keys)
        rank = {p.p2p_url: (self._backing_off(p.p2p_url), -leading_run(p.held), -sum(p.in_memory))
                for p in holders}
        plan: dict[str, list[int]] = {}
        for i in range(len(keys)):
            options = [p for p in holders if p.held[i]]
            if options:
                best = min(options, key=lambda p: (rank[p.p2p_url][0], not p.in_memory[i], rank[p.p2p_url]))
                plan.setdefault(best.p2p_url, []).append(i)
        return dict(sorted(plan.items(), key=lambda item: -len(item[1])))  # the largest on our thread

    def _backing_off(self, url: str) -> bool:
        guard = self._guards.get(url)
        return guard is not None and guard.backoff.down

    def _read(self, url: str, keys: list[ChunkKey], dests: Sequence[torch.Tensor], indices: list[int],
              deadline: float) -> list[RecordHeader | None] | None:
        """One peer's share of a get: its headers (None: all missed). Never raises."""
        try:
            peer = self._use(url)
        except Exception as exc:  # noqa: BLE001 - a URL the controller should not have taken
            self._log.warning("url", "p2p tier: cannot read from %s: %s", url, exc)
            return None
        if peer is None:
            return None  # closed: misses
        nbytes = sum(tensor_bytes(dests[i]).nbytes for i in indices)
        try:
            if not self._budget.acquire(nbytes, deadline):
                return None  # no room before the deadline: misses
            try:
                return peer.guard.call(len(indices), lambda: peer.link.read(
                    [keys[i] for i in indices], [dests[i] for i in indices], deadline, peer.guard.superseded))
            finally:
                self._budget.release(nbytes)
        except Exception:  # noqa: BLE001 - the guard lets through only what it cannot classify
            self._log.error("read", "p2p tier: read from %s failed", url, exc_info=True)
            return None
        finally:
            self._unuse(peer)

    def _use(self, url: str) -> _Peer | None:
        """The peer's link and guard (made on first use), counted as in use; None once closed."""
        with self._lock:
            if self._closed:
                return None
            peer = self._peers.get(url)
            if peer is None:
                peer = self._peers[url] = self._new_peer(url)
            self._peers.move_to_end(url)
            peer.users += 1
            idle = self._over_max_locked()
        for old in idle:
            old.link.close()
        return peer

    def _over_max_locked(self) -> list[_Peer]:
        """Idle links beyond MAX_LINKS, least recently used first, taken out of the map (to close).
        Called as links are made and as reads end: links in use when one was made are closed later."""
        idle: list[_Peer] = []
        for url, peer in list(self._peers.items()):
            if len(self._peers) <= MAX_LINKS:
                break
            if not peer.users:
                idle.append(self._peers.pop(url))
        return idle

    def _new_peer(self, url: str) -> _Peer:
        """A link, and the peer's guard: kept from its last link (under the lock), so a peer backing
        off stays backed off when its link was closed to make room for others."""
        link = PeerLink(url, self.config, self._endpoint,
                        lambda n: self._metrics.tier_inc(self.name, "corrupt", n))
        guard = self._guards.pop(url, None) or FailureGuard(
            f"p2p peer {url}", Backoff(self.config.retry_after_s, self.config.retry_max_s),
            lambda n: self._metrics.tier_inc(self.name, "errors", n), self._log, _classify)
        self._guards[url] = guard
        while len(self._guards) > MAX_GUARDS:
            self._guards.popitem(last=False)  # the least recently linked peer forgets its back-off
        return _Peer(link, guard)

    def _unuse(self, peer: _Peer) -> None:
        with self._lock:
            peer.users -= 1
            idle = self._over_max_locked()
        for old in idle:
            old.link.close()

    def put(self, items: Sequence[PutItem]) -> list[bool]:
        return [False] * len(items)  # not writable: the write path never calls this

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        return 0  # a peer's copy is the peer's

    def clear(self) -> None:
        pass

    def usage(self) -> TierUsage:
        return TierUsage(0, 0, 0)

    def close(self) -> None:
        """Wait for the peer reads in flight, then close every link and the directory."""
        self._fanout.shutdown(wait=True)
        with self._lock:
            self._closed = True  # a read still on a caller's thread opens no new link
            peers, self._peers = list(self._peers.values()), OrderedDict()
        for peer in peers:
            peer.link.close()
        self._directory.close()
