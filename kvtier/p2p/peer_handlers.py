"""The P2P endpoint's answers to the requests of authenticated peers: one handler per op.

Where it runs: on the peer server's connection threads, several at once (each handler is
thread-safe: the StorageManager, the lease table and the counters have their own locks). A handler
may block: GET and LEASE hold chunks (`kvtier.p2p.holding.hold`: a memory wait, lower-tier reads).

    HAS keys      flags: host memory or a writable lower tier holds the key (another namespace: 0)
    GET keys      the held leading run as [head, payload] (misses nil), exactly kvtier_server's
                  reply; the payloads are views of the held slabs, let go once the reply is sent
    LEASE keys    the held leading run stays held under a lease: heads, slots (slab indices), lease id
    RELEASE lease the lease's chunks are let go; count = chunks released (0: unknown or expired)
    CONNECT       the NIXL endpoint's geometry (stats), heads [b""], payload: its agent metadata
    STATS, PING   counters; OK
    PUT, DELETE, CLEAR, EXISTS   BAD_REQUEST: a P2P endpoint is read-only (a PUT is refused on its
                  header, by `check_peer_request`, before any payload buffer is allocated)

Keys of another namespace than this engine's are misses: a GET or LEASE serves the leading run of
keys in its namespace only. A GET reply carries at most REPLY_BYTES of payload (its first record
always), as kvtier_server's (HIGH_WATER): what one connection holds and sends is bounded.

What all peers hold at once is bounded too: chunks held by GET replies not yet sent, by LEASEs
being held and by granted leases together stay within the lease table's `max_chunks` (half the
memory pool). Each GET or LEASE reserves its keys before it holds anything (`_reserve`), so neither
concurrent LEASEs (each seeing the same room) nor slow readers of GET replies (each holding its
chunks for up to the send timeout) can pin the owner's whole pool; the keys past the room are
misses. `close()` (the server stopping) ends reservations: every GET and LEASE after it is a miss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.errors import ProtocolError
from kvtier.keys import NAMESPACE_BYTES, ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.p2p.holding import HeldChunk, hold, let_go, payload_view, present
from kvtier.wire.frames import Frame, Op, Status, check_request, encode, reply

if TYPE_CHECKING:
    from kvtier.p2p.leases import LeaseTable
    from kvtier.p2p.nixl_transport import NixlEndpoint
    from kvtier.storage import StorageManager

logger = logging.getLogger(__name__)

REPLY_BYTES = 64 << 20  # payload bytes in one GET reply, as kvtier_server's HIGH_WATER
READ_ONLY = "a P2P endpoint is read-only"

Count = Callable[[str, int], None]


@dataclass(slots=True)
class Answer:
    """A reply as buffers, and what to do once it is sent (or failed to send): let go of a GET's chunks."""

    buffers: list
    done: Callable[[], None] | None = None


def check_peer_request(frame: Frame) -> None:
    """What the endpoint decodes after the handshake: a request, never one with payloads."""
    check_request(frame)
    if frame.op is Op.PUT:  # (the only op with payloads: refused before they are allocated)
        raise ProtocolError(READ_ONLY, request_id=frame.request_id)


class PeerHandlers:
    def __init__(self, storage: StorageManager, namespace: bytes, leases: LeaseTable,
                 endpoint: NixlEndpoint | None, timeout_s: float, count: Count,
                 snapshot: Callable[[], dict[str, int]]):
        self.storage = storage
        self.namespace = namespace
        self.leases = leases
        self.endpoint = endpoint
        self.timeout_s = timeout_s  # how long a hold may wait for memory
        self._count = count  # (name, n): the server's counters and the engine's p2p_* metrics
        self._log = LogLimiter(logger)
        self._reply_chunks = max(1, REPLY_BYTES // storage.pool.slab_bytes)
        self._budget = threading.Lock()  # _reserved, _closed (then the lease table's lock, never back)
        self._reserved = 0  # chunks reserved by GETs (until their reply is sent) and LEASEs being held
        self._closed = False
        self._by_op: dict[Op, Callable[[Frame], tuple[Frame, list, Callable[[], None] | None]]] = {
            Op.PING: lambda f: (reply(f), [], None), Op.HAS: self._has, Op.GET: self._get,
            Op.LEASE: self._lease, Op.RELEASE: self._release, Op.CONNECT: self._connect,
            Op.STATS: lambda f: (reply(f, stats=snapshot()), [], None)}

    def handle(self, frame: Frame) -> Answer:
        """The answer to one decoded request of an authenticated peer (never raises for a request)."""
        self._count("requests", 1)
        if frame.op not in self._by_op:
            return Answer(encode(reply(frame, Status.BAD_REQUEST, error=READ_ONLY)))
        try:
            answer, payloads, done = self._by_op[frame.op](frame)
        except Exception as exc:  # a bug must cost this request, not the endpoint
            self._log.error(frame.op, "P2P %s request %d failed", frame.op.name, frame.request_id,
                            exc_info=True)
            self._count("errors", 1)
            return Answer(encode(reply(frame, Status.ERROR, error=f"{type(exc).__name__}: {exc}")))
        try:
            return Answer(encode(answer, payloads), done)
        except ProtocolError as exc:  # a reply over the header limit: say so, keep the connection
            if done is not None:
                done()
            return Answer(encode(reply(frame, Status.BAD_REQUEST, error=f"cannot answer: {exc}")))
        except BaseException:  # (never sent: a GET's chunks and reservation must still go back)
            if done is not None:
                done()
            raise

    def close(self) -> None:
        """The server is stopping: no GET or LEASE holds anything from now on."""
        with self._budget:
            self._closed = True

    def _reserve(self, n: int) -> int:
        """Room for `n` more held chunks (fewer when GETs in flight and leases fill max_chunks)."""
        with self._budget:
            room = 0 if self._closed else self.leases.max_chunks - self._reserved - self.leases.active()[1]
            n = max(0, min(n, room))
            self._reserved += n
        return n

    def _unreserve(self, n: int) -> None:
        if n:
            with self._budget:
                self._reserved -= n

    def _ours(self, keys: list[bytes]) -> list[ChunkKey]:
        """The leading run of `keys` in this engine's namespace (the others are misses)."""
        run = []
        for raw in keys:
            if raw[:NAMESPACE_BYTES] != self.namespace:
                break
            run.append(ChunkKey.from_bytes(raw))
        return run

    def _hold(self, keys: list[ChunkKey]) -> tuple[list[HeldChunk], int]:
        """The held leading run of the `keys` there is room for, and the chunks reserved for it
        (the caller unreserves them once they are let go, or granted as a lease)."""
        n = self._reserve(len(keys))
        if n < len(keys):
            self._count("hold_cuts", len(keys) - n)
        try:
            held = hold(self.storage, keys[:n], time.monotonic() + self.timeout_s) if n else []
        except BaseException:
            self._unreserve(n)
            raise
        return held, n

    def _served(self, held: list[HeldChunk]) -> None:
        self._count("p2p_served_chunks", len(held))
        self._count("p2p_served_bytes", sum(h.payload_len for h in held))

    def _has(self, f: Frame):
        mine = [i for i, raw in enumerate(f.keys) if raw[:NAMESPACE_BYTES] == self.namespace]
        flags = [0] * len(f.keys)
        found = present(self.storage, [ChunkKey.from_bytes(f.keys[i]) for i in mine]) if mine else []
        for i, flag in zip(mine, found):
            flags[i] = int(flag)
        return reply(f, flags=flags), [], None

    def _get(self, f: Frame):
        keys = self._ours(f.keys)
        if len(keys) > self._reply_chunks:  # (the keys past the cut are answered as misses)
            self._count("reply_cuts", len(keys) - self._reply_chunks)
        held, reserved = self._hold(keys[:self._reply_chunks])

        def done() -> None:  # (the reply was sent, or failed to send)
            try:
                let_go(self.storage, held)
            finally:
                self._unreserve(reserved)
        try:
            payloads = [payload_view(self.storage, h) for h in held]
            self._served(held)
        except BaseException:
            done()
            raise
        misses = [None] * (len(f.keys) - len(held))
        return reply(f, heads=[h.header for h in held] + misses), payloads + misses, done

    def _lease(self, f: Frame):
        keys = self._ours(f.keys)
        held, reserved = self._hold(keys)
        try:
            lease_id = self.leases.grant(held) if held else None
            if held and lease_id is None:  # the server is stopping
                let_go(self.storage, held)
                held = []
        finally:
            self._unreserve(reserved)  # (granted chunks count in the table from here on)
        if keys and not held:
            self._count("lease_misses", 1)
        if lease_id is not None:
            self._count("p2p_leases", 1)
            self._served(held)
        misses = [None] * (len(f.keys) - len(held))
        return reply(f, heads=[h.header for h in held] + misses, slots=[h.slot for h in held] + misses,
                     lease=lease_id), [], None

    def _release(self, f: Frame):
        held = self.leases.end(f.lease)
        let_go(self.storage, held)
        self._count("released_chunks", len(held))
        return reply(f, count=len(held)), [], None

    def _connect(self, f: Frame):
        if self.endpoint is None:
            return reply(f, Status.BAD_REQUEST, error="this peer serves over TCP only"), [], None
        return reply(f, stats=self.endpoint.geometry(), heads=[b""]), [self.endpoint.metadata()], None
