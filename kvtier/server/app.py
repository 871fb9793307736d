"""kvtier_server: the asyncio TCP cache server behind the `remote` tier.

Where it runs: one process, one event-loop thread; the store (`kvtier.server.store`) and the frame
codec (`kvtier.wire.frames`) are called from that thread only. Lifecycle: `KvtierServer(config)`,
`await start()` (binds; `port` 0 takes any free port, `address` tells which), `await close()`
(stops accepting, lets queued replies drain for a moment, closes connections and the store).
`serve(config)` runs one until SIGTERM / SIGINT; `kvtier.server.__main__` is its command line. With a
`controller:` section it joins a fleet (`kvtier.fleet.server_member`): the agent's thread is started
and stopped from a worker thread, never on the loop, which its calls into the store hop onto.

Every connection starts with a HELLO frame (`kvtier.server.connection` has the lifecycle): a wrong
or missing token (when the server has one) gets UNAUTHORIZED and a close, another protocol version
BAD_REQUEST and a close, and a HELLO beyond `max_connections` authenticated connections BUSY and a
close. Connections still in handshake have their own small cap (`max_handshakes`; the oldest makes
room for a new one once it has had HANDSHAKE_GRACE_S) and deadline (`handshake_timeout_s`), so peers
without the token can neither hold the slots of authenticated clients nor hold memory: before the
handshake a connection reads at most one HELLO's worth of bytes. Authenticated connections idle for
`idle_timeout_s` are closed; payload bytes being received over all connections are bounded by
`receive_bytes` (`kvtier.server.budget`: back-pressure, not failure), and a connection that holds
some of them while receiving slower than MIN_RECEIVE_RATE (a frame trickled in) is closed. Reply
bytes queued to send over all connections are bounded by `reply_bytes` (the same mechanism: a
connection asks for room before it answers a request), and a connection whose queued replies drain
nothing for `send_timeout_s` is closed, its buffers dropped: a queued GET reply holds its records'
memory past their eviction, so each peer that asked and never read held ~2 x HIGH_WATER until the
idle timeout (32 GiB at 256 connections).
One periodic sweep (a few per timeout) enforces the deadlines; nothing is timed per request.

Per connection, requests are pipelined: they are decoded and answered in order as bytes arrive,
each reply carrying its request's id; `kvtier.server.handlers` answers them (one handler per op,
over the store), `kvtier.server.stats` keeps the counters STATS returns. A malformed frame gets a
BAD_REQUEST reply and decoding goes on; when the stream cannot be resynchronised the reply is
followed by a close. Error messages are short (MAX_ERROR_CHARS).

Why connections drive their sockets from the loop's reader/writer callbacks rather than through an
asyncio Transport: Python 3.11's selector transport joins `writelines` buffers and copies whatever
the kernel did not take at once into its own bytearray, so a 32 MiB GET reply would be copied once
or twice more on its way out. Here a reply is a list of views (frame header, then the stored record
buffers) handed to `sendmsg` as they are; requests are received with `recv_into` straight into the
decoder's buffers.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import socket
import time
from collections.abc import Callable

from kvtier.config import ServerConfig
from kvtier.log_limit import LogLimiter
from kvtier.policy_registry import make_policy
from kvtier.server.budget import ByteBudget
from kvtier.server.connection import Connection
from kvtier.server.handlers import Handlers
from kvtier.server.stats import ServerStats, stats_map
from kvtier.server.store import RecordStore
from kvtier.wire.frames import PROTOCOL_VERSION, Frame, Status, encode, reply
from kvtier.wire.sockets import tune_socket

logger = logging.getLogger(__name__)

CLOSE_GRACE_S = 2.0  # how long close() lets queued replies drain
HANDSHAKE_GRACE_S = 0.1  # at max_handshakes, how long the oldest handshake is kept before it makes room
ACCEPT_RETRY_S = 0.5  # after a failed accept (EMFILE: out of file descriptors), pause accepting this long


class KvtierServer:
    def __init__(self, config: ServerConfig, store: RecordStore | None = None):
        self.config = config
        if store is None:
            store = RecordStore(config.capacity, config.spill, make_policy(config.policy, config.capacity))
        self.store = store
        self.stats = ServerStats()
        self.budget = ByteBudget(config.receive_bytes)  # payload bytes being received
        self.replies = ByteBudget(config.reply_bytes)  # reply bytes queued to send
        self._token = config.token.encode() if config.token is not None else None
        self._listener: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[Connection, None] = {}  # in handshake, oldest first
        self._active: set[Connection] = set()  # authenticated
        # Deadlines are checked a few times per timeout: within 25% of it, at no cost per request.
        timeouts = (config.handshake_timeout_s, config.idle_timeout_s, config.send_timeout_s)
        self._sweep_s = min(1.0, max(0.01, min(timeouts) / 4))
        self._sweeper: asyncio.TimerHandle | None = None
        self._accepting = False
        self._resume_accept: asyncio.TimerHandle | None = None
        self._log = LogLimiter(logger)  # failures peers can repeat at will: a line a minute per kind
        self._ticker: asyncio.TimerHandle | None = None
        self._logged = (0, 0, 0)
        handlers = Handlers(self.store, self.stats, self.snapshot)
        # What a Connection calls for each decoded request, and for a frame that failed to decode.
        self.handle, self.bad_frame = handlers.handle, handlers.bad_frame

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the server is not started")
        return self._listener.getsockname()[:2]

    async def start(self) -> tuple[str, int]:
        self.loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        self._listener = socket.create_server((self.config.host, self.config.port), family=family,
                                              backlog=1024)
        self._listener.setblocking(False)
        self._set_accepting(True)
        self._sweeper = self.loop.call_later(self._sweep_s, self._sweep)
        if self.config.stats_interval_s > 0:
            self._ticker = self.loop.call_later(self.config.stats_interval_s, self._log_traffic)
        return self.address

    async def close(self) -> None:
        if self._listener is not None:
            self._set_accepting(False)
            self._listener.close()
        for timer in (self._ticker, self._sweeper, self._resume_accept):
            if timer is not None:
                timer.cancel()
        for conn in [*self._pending, *self._active]:
            conn.close_after_flush()
        deadline = time.monotonic() + CLOSE_GRACE_S
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling a drain with a deadline, at shutdown only
        for conn in list(self._active):
            conn.close()
        self.store.close()

    # -- connections ---------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            if len(self._pending) >= self.config.max_handshakes and not self._drop_oldest_handshake():
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others, retry later
                self._accept_failed(exc)
                return
            sock.setblocking(False)
            tune_socket(sock)
            self._pending[Connection(self, sock, self.loop.time())] = None
            self.stats.connections_total += 1
            self._count()

    def _drop_oldest_handshake(self) -> bool:
        """Make room for a new connection at max_handshakes by closing the oldest one in handshake,
        once it has had HANDSHAKE_GRACE_S to say HELLO (a real client does so at once; a burst of
        connections must not push out ones not yet read). Until then new connections wait in the
        listen backlog: accepting pauses. So peers that open sockets and send nothing delay a real
        client's handshake by about HANDSHAKE_GRACE_S, instead of locking it out."""
        oldest = next(iter(self._pending))
        wait = oldest.accepted_at + HANDSHAKE_GRACE_S - self.loop.time()
        if wait > 0:
            self._pause_accepting(wait)
            return False
        self.stats.handshakes_dropped += 1
        oldest.close()
        return True

    def _accept_failed(self, exc: OSError) -> None:
        """The pending connection stays in the backlog and the listener stays readable, so going on
        at once would spin the loop on accept (and log each turn: 30,000 lines a second at EMFILE).
        Pause instead; connections that close meanwhile give their descriptors back."""
        self.stats.accept_errors += 1
        self._log.warning("accept", "accept failed (%s); pausing accepts for %.1f s at a time, %d "
                          "connections open", exc, ACCEPT_RETRY_S, len(self._active) + len(self._pending))
        self._pause_accepting(ACCEPT_RETRY_S)

    def _pause_accepting(self, seconds: float) -> None:
        self._set_accepting(False)
        if self._resume_accept is not None:
            self._resume_accept.cancel()
        self._resume_accept = self.loop.call_later(seconds, self._set_accepting, True)

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting or self._listener is None or self._listener.fileno() < 0:
            return
        if on:
            self.loop.add_reader(self._listener.fileno(), self._accept)
        else:
            self.loop.remove_reader(self._listener.fileno())
        self._accepting = on

    def _sweep(self) -> None:
        now = self.loop.time()
        for conn in list(self._pending):  # oldest first
            if now - conn.accepted_at < self.config.handshake_timeout_s:
                break
            self.stats.handshake_timeouts += 1
            conn.close()
        for conn in [c for c in self._active if now - c.last_active >= self.config.idle_timeout_s]:
            # Not idle after all: held by the receive budget (not the client's silence), or a
            # request arrived that the loop has not read yet (closing now would fail it).
            if not (conn.waiting or conn.has_input()):
                self.stats.idle_timeouts += 1
                conn.close()
        for conn in [c for c in self._active if c.stalled(now)]:
            self.stats.receive_timeouts += 1
            conn.close()
        for conn in [c for c in self._active if c.send_stalled(now)]:
            self.stats.send_timeouts += 1
            conn.close()
        self._sweeper = self.loop.call_later(self._sweep_s, self._sweep)

    def forget(self, conn: Connection, reserved: int, queued: int) -> None:
        """`conn` closed; `reserved`: its receive-budget bytes, `queued`: its reply bytes, now free."""
        self._pending.pop(conn, None)
        self._active.discard(conn)
        self.budget.cancel(conn)
        self.replies.cancel(conn.turn)
        if reserved:
            self.budget.release(reserved)
        if queued:
            self.replies.release(queued)
        self._count()

    def _count(self) -> None:
        self.stats.connections, self.stats.handshakes = len(self._active), len(self._pending)

    # -- requests ------------------------------------------------------------------------------

    def hello(self, conn: Connection, frame: Frame) -> tuple[list, bool]:
        """The answer to a connection's HELLO, as buffers; and whether to close after sending it."""
        self.stats.requests["hello"] += 1
        if conn.authenticated:
            return encode(reply(frame, Status.BAD_REQUEST, error="already authenticated")), False
        if frame.version != PROTOCOL_VERSION:
            self.stats.bad_frames += 1
            error = f"protocol version {frame.version} is not supported (this server: {PROTOCOL_VERSION})"
            return encode(reply(frame, Status.BAD_REQUEST, error=error)), True
        if self._token is not None and not (
                frame.token is not None and hmac.compare_digest(frame.token.encode(), self._token)):
            self.stats.unauthorized += 1
            missing = "missing" if frame.token is None else "wrong"
            return encode(reply(frame, Status.UNAUTHORIZED, error=f"{missing} token")), True
        if len(self._active) >= self.config.max_connections:
            self.stats.refused += 1
            error = f"over {self.config.max_connections} connections"
            return encode(reply(frame, Status.BUSY, error=error)), True
        del self._pending[conn]
        self._active.add(conn)
        self._count()
        conn.authenticate(self.config.max_frame_bytes)
        return encode(reply(frame, version=PROTOCOL_VERSION)), False

    def snapshot(self) -> dict[str, int]:
        """Every counter as one flat map: what STATS returns."""
        return stats_map(self.stats, self.store, self.budget, self.replies)

    def _log_traffic(self) -> None:
        s = self.stats
        now = (sum(s.requests.values()), s.bytes_in, s.bytes_out)
        if now != self._logged:
            (r0, i0, o0), self._logged = self._logged, now
            logger.info("%d requests, %.1f MB in, %.1f MB out; %d records, %.1f MiB of %.1f MiB; "
                        "%d connections; %d evictions, %d spills, %d bad frames, %d errors",
                        now[0] - r0, (now[1] - i0) / 1e6, (now[2] - o0) / 1e6, self.store.records,
                        self.store.bytes / 2**20, self.store.capacity / 2**20, s.connections,
                        self.store.counters.evictions, self.store.counters.spills, s.bad_frames, s.errors)
        self._ticker = self.loop.call_later(self.config.stats_interval_s, self._log_traffic)


def _join_fleet(server: KvtierServer):
    """Start the fleet agent for `server` (its config's `controller:` section): a handle to close.
    Blocking: called in a worker thread."""
    from kvtier.fleet.agent import join_fleet  # imported only when configured (HTTP stack, no torch)
    from kvtier.fleet.server_member import ServerMember

    return join_fleet(server.config.controller, ServerMember(server.store, server.loop))


async def serve(config: ServerConfig, ready: Callable[[tuple[str, int]], None] | None = None) -> None:
    """Run a server until SIGTERM or SIGINT; `ready(address)` once it listens (and joined its fleet)."""
    server = KvtierServer(config)
    address = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("kvtier_server on %s:%d: capacity %.1f MiB, spill %s, token %s", *address,
                config.capacity / 2**20, config.spill.path if config.spill else "off",
                "on" if config.token is not None else "off")
    fleet = None
    try:
        if config.controller is not None:
            fleet = await asyncio.to_thread(_join_fleet, server)
        if ready is not None:
            ready(address)
        await stop.wait()
    finally:
        logger.info("kvtier_server shutting down: %s", server.snapshot())
        if fleet is not None:
            await asyncio.to_thread(fleet.close)  # first: no command may reach a closed store
        await server.close()
