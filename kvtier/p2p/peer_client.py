"""PeerLink: the reader's connection to one peer's endpoint (kvtier.p2p.peer_server).

    link = PeerLink("kvtier://host:port", config.p2p, endpoint)   # endpoint: None = TCP only
    link.read(keys, dests, deadline) -> [RecordHeader | None]      # raises on a transport failure
    link.close()

Control always goes over the kvtier wire (`kvtier.tiers.remote_client.Client`: HELLO with the
P2P token, a pool of CONNECTIONS sockets, pipelined frames). The bytes go one of two ways:

- NIXL, when this process has an endpoint, the peer has one with the same slot size (asked once,
  with CONNECT, on first use: the holder's agent metadata and slot geometry, then
  `endpoint.connect`), and every dest is a slot of our registered arena (`endpoint.slot_of`):
      LEASE keys   -> heads + the holder's slots + a lease id (the holder keeps them until RELEASE
                      or `lease_s`)
      NixlPeer.read([(our slot, its slot)...], deadline)   (returns once nothing is in flight)
      RELEASE      always, also after a failed read; best effort (an unsent one expires)
- TCP otherwise: GET keys, the reply's payloads received straight into the dests (`GetSink`), as
  the remote tier reads from kvtier_server.

A CONNECT refused ("TCP only") or another slot size makes this peer TCP-only for the link's life;
an `endpoint.connect` that fails, for NIXL_RETRY_S (the old NixlPeer may still be closing). Every
record is verified (`kvtier.record.verify`: header, key, length, checksum) before it is reported; a
bad one is None and counted (`count_corrupt`). Any transport failure (socket, protocol, status, a
NIXL read that failed or missed the deadline) raises: the tier's per-peer FailureGuard counts it
and backs off. A failed NIXL read also drops the
NixlPeer (the holder may have restarted with a new agent): the next use asks CONNECT again.

Where it runs: the P2P tier's read threads; thread-safe. The NixlPeer is shared by concurrent reads
and closed only when no read uses it (a dest slab must never be given back while a transfer into it
may run: NixlPeer.read returns only once its transfer is done, failed or aborted).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from kvtier.config import P2PConfig
from kvtier.errors import CorruptRecord, KvtierError, ProtocolError, TierUnavailable
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.record import RecordHeader, decode_header, tensor_bytes, verify
from kvtier.tiers.backoff import BackedOff
from kvtier.tiers.remote import _batches, parse_url
from kvtier.tiers.remote_client import Client, GetSink, Request, RequestRefused
from kvtier.wire.frames import Frame, Op

if TYPE_CHECKING:
    from kvtier.p2p.nixl_transport import NixlEndpoint, NixlPeer

logger = logging.getLogger(__name__)

CONNECTIONS = 4  # sockets per peer: a few read threads pipeline at once
NIXL_RETRY_S = 5.0  # after a failed NIXL connect, reads go over TCP this long before it is tried again
MAX_METADATA_BYTES = 16 << 20  # a NIXL agent's metadata is KBs; more is not a peer we trust


class _MetadataSink:
    """Where a CONNECT reply's one payload (the holder's agent metadata) lands, bounded."""

    nbytes = 0  # (Client.call stretches a call's deadline by its bytes: this one is small)

    def __init__(self) -> None:
        self.buffer: bytearray | None = None

    def __call__(self, j: int, size: int) -> memoryview:
        if j or size > MAX_METADATA_BYTES:
            raise ProtocolError(f"CONNECT reply payload {j} of {size} bytes")
        self.buffer = bytearray(size)
        return memoryview(self.buffer)


class PeerLink:
    def __init__(self, url: str, config: P2PConfig, endpoint: NixlEndpoint | None,
                 count_corrupt: Callable[[int], None] = lambda n: None):
        self.url = url
        host, port = parse_url(url)
        self._client = Client(host, port, config.timeout_s, config.token, CONNECTIONS)
        self._endpoint = endpoint
        self._count_corrupt = count_corrupt
        self._log = LogLimiter(logger)  # a bad peer can send a bad record per read
        self._ids = itertools.count(1)
        self._tcp_only = endpoint is None
        self._connecting = threading.Lock()  # one CONNECT at a time
        self._lock = threading.Lock()
        self._nixl: NixlPeer | None = None
        self._retry_at = 0.0  # no NIXL connect before this (time.monotonic()) after one failed
        self._slot_bytes = self._remote_slots = 0
        self._users: dict[NixlPeer, int] = {}  # reads using each NixlPeer (the current or a dropped one)

    def read(self, keys: Sequence[ChunkKey], dests: Sequence[torch.Tensor], deadline: float,
             superseded: Callable[[], bool] = lambda: False) -> list[RecordHeader | None]:
        """Each key's record into its dest, verified: its header, or None (a miss, or corrupt).
        Raises on a transport failure. Past `deadline`, or once `superseded()` (the peer's guard:
        it failed meanwhile), a call still waiting for a connection gives up (BackedOff)."""
        keys = list(keys)
        if len(keys) != len(dests):
            raise ValueError(f"{len(keys)} keys but {len(dests)} destinations")
        if not keys:
            return []
        late = lambda: superseded() or time.monotonic() >= deadline  # noqa: E731
        slots = self._local_slots(dests)
        peer = self._use_nixl(deadline, late) if slots is not None else None
        if peer is None:
            return self._read_tcp(keys, dests, deadline, late)
        failed = True
        try:
            results = self._read_nixl(peer, keys, dests, slots, deadline, late)
            failed = False
            return results
        finally:
            self._done_with(peer, failed)

    # -- TCP -----------------------------------------------------------------------------------

    def _read_tcp(self, keys: list[ChunkKey], dests: Sequence[torch.Tensor], deadline: float,
                  late: Callable[[], bool]) -> list[RecordHeader | None]:
        sinks = [GetSink(g, dests) for g in _batches([tensor_bytes(d).nbytes for d in dests])]
        replies = self._client.call([Request(self._frame(Op.GET, keys=[keys[i] for i in s.indices]),
                                             sink=s) for s in sinks], late, deadline)
        results: list[RecordHeader | None] = [None] * len(keys)
        corrupt = 0
        for sink, reply in zip(sinks, replies):
            for j, (head, payload) in enumerate(zip(reply.heads, reply.payloads)):
                if head is not None:
                    i = sink.indices[j]
                    results[i] = self._verified(_received, head, payload, keys[i], j in sink.oversized)
                    corrupt += results[i] is None
        self._count_corrupt(corrupt)
        return results

    def _verified(self, check: Callable[..., RecordHeader], *args) -> RecordHeader | None:
        """`check(*args)`: the verified header of one record, or None (logged; the caller counts)."""
        try:
            return check(*args)
        except CorruptRecord as exc:
            self._log.warning("corrupt", "p2p peer %s: dropping a corrupt record: %s", self.url, exc)
            return None

    # -- NIXL ----------------------------------------------------------------------------------

    def _local_slots(self, dests: Sequence[torch.Tensor]) -> list[int] | None:
        """Our arena's slot of each dest, or None when any dest is not one (then TCP)."""
        if self._tcp_only:
            return None
        slots = [self._endpoint.slot_of(d) if isinstance(d, torch.Tensor) else None for d in dests]
        return None if None in slots else slots

    def _use_nixl(self, deadline: float, late: Callable[[], bool]) -> NixlPeer | None:
        """The NixlPeer (connected on first use), counted as in use; None: TCP."""
        if self._nixl is None and not self._tcp_only and time.monotonic() >= self._retry_at:
            # Another read's connect may be stuck in native code (NIXL loading metadata, UCX making
            # its connection), which no deadline interrupts: wait for it until our own deadline.
            if not self._connecting.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise BackedOff("another read's NIXL connect to this peer outlived this deadline")
            try:
                if self._nixl is None and not self._tcp_only:
                    self._connect(deadline, late)
            finally:
                self._connecting.release()
        with self._lock:
            peer = self._nixl
            if peer is not None:
                self._users[peer] = self._users.get(peer, 0) + 1
            return peer

    def _connect(self, deadline: float, late: Callable[[], bool]) -> None:
        sink = _MetadataSink()
        try:
            reply = self._client.call([Request(self._frame(Op.CONNECT), sink=sink)], late, deadline)[0]
        except RequestRefused as exc:  # "this peer serves over TCP only"
            return self._tcp_from_now(f"it refused CONNECT ({exc})")
        geometry, mine = reply.stats or {}, self._endpoint.geometry()
        if sink.buffer is None or geometry.get("slot_bytes") != mine["slot_bytes"]:
            return self._tcp_from_now(f"its slots are {geometry.get('slot_bytes')} bytes, ours "
                                      f"{mine['slot_bytes']}")
        try:
            peer = self._endpoint.connect(bytes(sink.buffer), geometry)
        except KvtierError as exc:  # TransportError: its agent cannot be reached over NIXL (now)
            # Not for good: a peer dropped after a failed read is still closing, or the holder is
            # restarting. TCP until then.
            self._retry_at = time.monotonic() + NIXL_RETRY_S
            self._log.warning("connect", "p2p peer %s: NIXL connect failed (%s); TCP for %.0f s",
                              self.url, exc, NIXL_RETRY_S)
            return None
        with self._lock:
            self._nixl = peer
            self._slot_bytes, self._remote_slots = mine["slot_bytes"], geometry.get("slots", 0)

    def _tcp_from_now(self, why: str) -> None:
        self._tcp_only = True
        logger.info("p2p peer %s: reading over TCP: %s", self.url, why)

    def _read_nixl(self, peer: NixlPeer, keys: list[ChunkKey], dests: Sequence[torch.Tensor],
                   slots: list[int], deadline: float, late: Callable[[], bool]
                   ) -> list[RecordHeader | None]:
        groups = _batches([0] * len(keys))  # MAX_KEYS keys per LEASE frame
        replies = self._client.call([Request(self._frame(Op.LEASE, keys=[keys[i] for i in g]))
                                     for g in groups], late, deadline)
        leased: list[tuple[int, bytes]] = []  # (index, head)
        pairs: list[tuple[int, int]] = []
        try:
            for group, reply in zip(groups, replies):
                if len(reply.slots) != len(group):
                    raise ProtocolError(f"LEASE of {len(group)} keys answered {len(reply.slots)} slots")
                for i, head, remote in zip(group, reply.heads, reply.slots):
                    if remote is not None:
                        if remote >= self._remote_slots:
                            raise ProtocolError(f"LEASE slot {remote} beyond the peer's {self._remote_slots}")
                        leased.append((i, head))
                        pairs.append((slots[i], remote))
            if pairs and not peer.read(pairs, deadline):
                raise TierUnavailable(f"NIXL read of {len(pairs)} chunks failed or missed its deadline")
        finally:
            self._release([r.lease for r in replies if r.lease is not None], deadline)
        results: list[RecordHeader | None] = [None] * len(keys)
        for i, head in leased:
            results[i] = self._verified(_in_slot, head, dests[i], keys[i], self._slot_bytes)
        self._count_corrupt(sum(results[i] is None for i, _ in leased))
        return results

    def _release(self, leases: list[int], deadline: float) -> None:
        """Best effort: a lease not ended here expires on the holder after `lease_s`."""
        if not leases or time.monotonic() >= deadline:
            return
        try:
            self._client.call([Request(self._frame(Op.RELEASE, lease=lease)) for lease in leases],
                              deadline=deadline)
        except Exception as exc:  # noqa: BLE001 - the read's own outcome is what counts
            self._log.warning("release", "p2p peer %s: RELEASE failed (%s: %s); the lease expires on "
                              "its own", self.url, type(exc).__name__, exc)

    def _done_with(self, peer: NixlPeer, failed: bool) -> None:
        """A read is done with `peer`; a failed one drops it (the next read connects anew), and
        the last read of a dropped peer closes it."""
        with self._lock:
            if failed and self._nixl is peer:
                self._nixl = None
            self._users[peer] -= 1
            last = self._users[peer] == 0 and self._nixl is not peer
            if last:
                del self._users[peer]
        if last:
            peer.close()

    def _frame(self, op: Op, **fields) -> Frame:
        return Frame(op, next(self._ids), **fields)

    def close(self) -> None:
        """Close the connections and the NixlPeer; the caller has no read in flight."""
        with self._lock:
            peer, self._nixl = self._nixl, None
        if peer is not None:
            peer.close()
        self._client.close()


def _received(head: bytes, payload: memoryview, key: ChunkKey, oversized: bool) -> RecordHeader:
    if oversized:
        raise CorruptRecord(f"record of {payload.nbytes} bytes exceeds its buffer")
    return verify(head, payload, key)


def _in_slot(head: bytes, dest: torch.Tensor, key: ChunkKey, slot_bytes: int) -> RecordHeader:
    """The record a NIXL read left in `dest` (its payload length from the leased head)."""
    header = decode_header(head)
    view = tensor_bytes(dest)
    if header.payload_len > min(view.nbytes, slot_bytes):
        raise CorruptRecord(f"record of {header.payload_len} bytes exceeds its slot")
    return verify(head, view[:header.payload_len], key, header)
