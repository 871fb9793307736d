"""PeerServer: this instance's P2P endpoint, serving its chunks to peers over the kvtier wire.

Where it runs: in the engine's process, on its own threads: one accepting, one per connection
(`kvtier.p2p.peer_connection`: blocking sockets, since answering may block on a hold's memory wait
or disk reads), one sweeping expired leases. Lifecycle, in the engine's order:

    PeerServer(config, namespace, metrics, endpoint)   binds and listens on p2p.host:p2p.port
                    (OSError -> ConfigError); `url` is known from here on (the real port)
    start(storage)  accepting and answering begin (connections made before wait in the backlog)
    stop()          stop accepting and holding (GET and LEASE answer misses), wait for the leases
                    to end: RELEASEd by their readers, whose connections stay open meanwhile, or
                    older than min(lease_s, timeout_s), a reader's deadline for its READ; then close
                    every connection, end every lease left (let go of its chunks), join the
                    threads; all of it bounded by STOP_WAIT_S: before storage.close(), and before
                    the NIXL endpoint deregisters the arena peers READ from (a slab let go while a
                    reader's READ may still run could be reused: that READ would get other KV)

The guarantees are kvtier_server's: the same HELLO handshake (constant-time token compare,
UNAUTHORIZED and close on a wrong token, BAD_REQUEST and close on another protocol version, BUSY and
close beyond `max_connections` authenticated peers), at most MAX_HANDSHAKES connections in handshake
(the oldest makes room for a new one once it has had HANDSHAKE_GRACE_S), bounded frames and replies,
BAD_REQUEST for a malformed frame while serving goes on. The ops are `kvtier.p2p.peer_handlers`'.
Leases (`kvtier.p2p.leases`) and GET replies being sent together hold at most half the memory
pool's slabs (`kvtier.p2p.peer_handlers`); leases end after `lease_s` on their own: the sweeper
runs a few times per lease_s, so a reader that vanished holds memory for at most about 1.25 x
lease_s.

Counters: `stats()` (what STATS returns), and the engine's `p2p_served_chunks`,
`p2p_served_bytes`, `p2p_leases`, `p2p_leases_expired` (kvtier.metrics).
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

from kvtier.errors import ConfigError, ProtocolError
from kvtier.log_limit import LogLimiter
from kvtier.p2p.holding import HeldChunk, let_go
from kvtier.p2p.leases import LeaseTable
from kvtier.p2p.peer_connection import PeerConnection
from kvtier.p2p.peer_handlers import Answer, PeerHandlers, check_peer_request
from kvtier.wire.frames import PROTOCOL_VERSION, Frame, Op, Status, encode, reply, short
from kvtier.wire.sockets import tune_socket

if TYPE_CHECKING:
    from kvtier.config import P2PConfig
    from kvtier.metrics import Metrics
    from kvtier.p2p.nixl_transport import NixlEndpoint
    from kvtier.storage import StorageManager

logger = logging.getLogger(__name__)

MAX_HANDSHAKES = 64  # connections before their HELLO
HANDSHAKE_GRACE_S = 0.1  # at MAX_HANDSHAKES, the oldest handshake's time before it makes room
ACCEPT_RETRY_S = 0.5  # after a failed accept (EMFILE), pause this long
STOP_WAIT_S = 5.0  # how long stop() waits for the threads
# Engine counters the server counts into (kvtier.metrics ENGINE_COUNTERS).
METRICS = ("p2p_served_chunks", "p2p_served_bytes", "p2p_leases", "p2p_leases_expired")


class PeerServer:
    check = staticmethod(check_peer_request)  # what a connection decodes after its handshake

    def __init__(self, config: P2PConfig, namespace: bytes, metrics: Metrics,
                 endpoint: NixlEndpoint | None):
        self.config = config
        self.namespace = namespace
        self.metrics = metrics
        self.endpoint = endpoint
        self._token = config.token.encode() if config.token is not None else None
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        try:
            self._listener = socket.create_server((config.host, config.port), family=family, backlog=1024)
        except OSError as exc:
            raise ConfigError(f"p2p.host/p2p.port: cannot listen on {config.host}:{config.port}: "
                              f"{exc}") from None
        self.port = self._listener.getsockname()[1]
        host = config.advertise_host or config.host
        self.url = f"kvtier://{f'[{host}]' if ':' in host else host}:{self.port}"
        self.stopping = False
        self._lock = threading.Lock()  # connections, counters
        self._pending: dict[PeerConnection, None] = {}  # in handshake, oldest first
        self._active: set[PeerConnection] = set()  # authenticated
        self._counts: Counter[str] = Counter()
        self._log = LogLimiter(logger)
        self._storage: StorageManager | None = None
        self._leases: LeaseTable | None = None
        self._handlers: PeerHandlers | None = None
        self._wake = threading.Event()  # the sweeper's: set by stop()
        self._threads: list[threading.Thread] = []

    def start(self, storage: StorageManager) -> None:
        """Begin accepting and answering peers, serving `storage`'s chunks. Once."""
        if self._storage is not None or self.stopping:
            raise RuntimeError("a PeerServer starts once")
        self._storage = storage
        self._leases = LeaseTable(self.config.lease_s, max(1, storage.pool.num_slabs // 2), self._expired)
        self._handlers = PeerHandlers(storage, self.namespace, self._leases, self.endpoint,
                                      self.config.timeout_s, self.count, self.stats)
        self._threads = [threading.Thread(target=self._accept_loop, name="kvtier-p2p-accept", daemon=True),
                         threading.Thread(target=self._sweep_loop, name="kvtier-p2p-leases", daemon=True)]
        for thread in self._threads:
            thread.start()
        logger.info("P2P endpoint on %s (token %s, %s)", self.url, "on" if self._token else "off",
                    "NIXL" if self.endpoint is not None else "TCP only")

    def stop(self) -> None:
        """Stop accepting, close every connection, end every lease, join the threads (bounded). Once."""
        with self._lock:
            if self.stopping:
                return
            self.stopping = True
            conns = [*self._pending, *self._active]
            if self._handlers is not None:
                self._handlers.close()  # (from now on, GET and LEASE hold nothing)
        self._wake.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        except OSError:
            pass
        self._listener.close()
        deadline = time.monotonic() + STOP_WAIT_S
        if self._leases is not None:
            if left := self._leases.drain(min(self.config.lease_s, self.config.timeout_s), deadline):
                logger.warning("P2P endpoint stopping with %d leases its readers did not release", left)
        for conn in conns:
            conn.shutdown()
        threads = [*self._threads, *(conn.thread for conn in conns)]
        for thread in threads:
            if thread.ident is not None:
                thread.join(max(0.0, deadline - time.monotonic()))
        if left := sum(thread.is_alive() for thread in threads):
            logger.error("P2P endpoint stopped with %d threads still running after %.0f s", left, STOP_WAIT_S)
        if self._leases is not None:
            let_go(self._storage, self._leases.close())

    def stats(self) -> dict[str, int]:
        """Every counter as one flat map: what STATS returns."""
        leases, chunks = self._leases.active() if self._leases is not None else (0, 0)
        with self._lock:
            return {**self._counts, "connections": len(self._active), "handshakes": len(self._pending),
                    "leases_active": leases, "leased_chunks": chunks}

    def count(self, name: str, n: int) -> None:
        """Add `n` to a STATS counter, and to the engine's metric of that name when it is one of METRICS."""
        if name in METRICS:
            self.metrics.inc(name, n)
        if n:
            with self._lock:
                self._counts[name] += n

    # -- what connections call -------------------------------------------------------------------

    def hello(self, conn: PeerConnection, frame: Frame) -> tuple[list, bool]:
        """The answer to a connection's HELLO, as buffers; and whether the connection is now
        authenticated (False: close after sending it, unless it was authenticated already)."""
        if conn.authenticated:
            return encode(reply(frame, Status.BAD_REQUEST, error="already authenticated")), False
        if frame.version != PROTOCOL_VERSION:
            self.count("bad_frames", 1)
            error = f"protocol version {frame.version} is not supported (this peer: {PROTOCOL_VERSION})"
            return encode(reply(frame, Status.BAD_REQUEST, error=error)), False
        if self._token is not None and not (
                frame.token is not None and hmac.compare_digest(frame.token.encode(), self._token)):
            self.count("unauthorized", 1)
            return encode(reply(frame, Status.UNAUTHORIZED,
                                error=f"{'missing' if frame.token is None else 'wrong'} token")), False
        with self._lock:
            busy = self.stopping or len(self._active) >= self.config.max_connections
            if not busy:
                self._pending.pop(conn, None)
                self._active.add(conn)
        if busy:
            self.count("refused", 1)
            error = f"over {self.config.max_connections} connections"
            return encode(reply(frame, Status.BUSY, error=error)), False
        return encode(reply(frame, version=PROTOCOL_VERSION)), True

    def handle(self, frame: Frame) -> Answer:
        return self._handlers.handle(frame)

    def bad_frame(self, exc: ProtocolError) -> list:
        """The BAD_REQUEST reply to a frame that failed to decode, as buffers."""
        self.count("bad_frames", 1)
        return encode(Frame(Op.PING, exc.request_id or 0, status=Status.BAD_REQUEST, error=short(str(exc))))

    def forget(self, conn: PeerConnection) -> None:
        with self._lock:
            self._pending.pop(conn, None)
            self._active.discard(conn)

    # -- threads -----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError as exc:
                if self.stopping:
                    return
                self.count("accept_errors", 1)
                self._log.warning("accept", "P2P accept failed (%s); pausing %.1f s", exc, ACCEPT_RETRY_S)
                self._wake.wait(ACCEPT_RETRY_S)
                continue
            tune_socket(sock)
            conn = self._admit(sock)
            if conn is not None:
                self.count("connections_total", 1)
                conn.start()

    def _admit(self, sock: socket.socket) -> PeerConnection | None:
        """A connection for `sock`, or None (closed) when stopping or when every handshake slot is
        taken by one younger than HANDSHAKE_GRACE_S; an older one is closed to make room."""
        now = time.monotonic()
        with self._lock:
            oldest = next(iter(self._pending), None)
            full = len(self._pending) >= MAX_HANDSHAKES
            if self.stopping or (full and now - oldest.accepted_at < HANDSHAKE_GRACE_S):
                sock.close()
                return None
            if full:
                del self._pending[oldest]
                oldest.shutdown()
            conn = PeerConnection(self, sock, now)
            self._pending[conn] = None
        if full:
            self.count("handshakes_dropped", 1)
        return conn

    def _sweep_loop(self) -> None:
        tick = min(1.0, max(0.01, self.config.lease_s / 4))
        while not self._wake.wait(tick):
            try:
                self._leases.expire()
            except Exception:
                self._log.error("expire", "P2P lease expiry failed", exc_info=True)

    def _expired(self, held: list[HeldChunk]) -> None:
        let_go(self._storage, held)
        self.count("p2p_leases_expired", 1)
