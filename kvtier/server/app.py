"""kvtier_server: the asyncio TCP cache server behind the `remote` tier.

Where it runs: one process, one event-loop thread; the store (`kvtier.server.store`) and the frame
codec (`kvtier.server.protocol`) are called from that thread only. Lifecycle: `KvtierServer(config)`,
`await start()` (binds; `port` 0 takes any free port, `address` tells which), `await close()`
(stops accepting, lets queued replies drain for a moment, closes connections and the store).
`serve(config)` runs one until SIGTERM / SIGINT; `kvtier.server.__main__` is its command line.

Per connection, requests are pipelined: they are decoded and answered in order as bytes arrive,
each reply carrying its request's id. A malformed frame gets a BAD_REQUEST reply (op PING, and the
request id when it was readable, else 0) and decoding goes on; when the stream cannot be
resynchronised the reply is followed by a close. A wrong or missing token (when the server has one)
gets UNAUTHORIZED and a close; a connection beyond `max_connections` gets BUSY and a close. Nothing
a client sends can stop the server: a handler that fails answers ERROR and is logged.

Why connections drive their sockets from the loop's reader/writer callbacks rather than through an
asyncio Transport: Python 3.11's selector transport joins `writelines` buffers and copies whatever
the kernel did not take at once into its own bytearray, so a 32 MiB GET reply would be copied once
or twice more on its way out. Here a reply is a list of views (frame header, then the stored record
buffers) handed to `sendmsg` as they are; requests are received with `recv_into` straight into the
decoder's buffers. Back-pressure: a connection with more than HIGH_WATER reply bytes queued stops
decoding and reading until the client has taken half of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice

from kvtier.config import ServerConfig
from kvtier.errors import ProtocolError
from kvtier.server.protocol import Frame, FrameDecoder, Op, Status, check_request, encode, reply
from kvtier.server.sockets import IOV_MAX, tune_socket
from kvtier.server.store import RecordStore

logger = logging.getLogger(__name__)

HIGH_WATER = 64 << 20  # queued reply bytes at which a connection stops reading
READS_PER_WAKEUP = 16  # recv_into calls per readiness event before giving other connections a turn
CLOSE_GRACE_S = 2.0  # how long close() lets queued replies drain


@dataclass(slots=True)
class ServerStats:
    requests: dict[str, int] = field(default_factory=lambda: {op.name.lower(): 0 for op in Op})
    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0  # open now
    connections_total: int = 0
    refused: int = 0  # connections turned away at max_connections
    bad_frames: int = 0
    unauthorized: int = 0
    errors: int = 0  # requests the server failed to serve


class KvtierServer:
    def __init__(self, config: ServerConfig, store: RecordStore | None = None):
        self.config = config
        self.store = store if store is not None else RecordStore(config.capacity, config.spill)
        self.stats = ServerStats()
        self._token = config.token.encode() if config.token is not None else None
        self._listener: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[Connection] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._logged = (0, 0, 0)
        self._handlers: dict[Op, Callable[[Frame], tuple[Frame, list]]] = {
            Op.PING: lambda f: (reply(f), []), Op.PUT: self._put, Op.GET: self._get,
            Op.EXISTS: self._exists, Op.HAS: self._has, Op.DELETE: self._delete, Op.CLEAR: self._clear,
            Op.STATS: lambda f: (reply(f, stats=self.snapshot()), [])}

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
        self.loop.add_reader(self._listener.fileno(), self._accept)
        if self.config.stats_interval_s > 0:
            self._ticker = self.loop.call_later(self.config.stats_interval_s, self._log_traffic)
        return self.address

    async def close(self) -> None:
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
        if self._ticker is not None:
            self._ticker.cancel()
        for conn in list(self._connections):
            conn.close_after_flush()
        deadline = time.monotonic() + CLOSE_GRACE_S
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling a drain with a deadline, at shutdown only
        for conn in list(self._connections):
            conn.close()
        self.store.close()

    # -- connections ---------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, keep serving the others
                logger.warning("accept failed: %s", exc)
                return
            if len(self._connections) >= self.config.max_connections:
                self.stats.refused += 1
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(encode(Frame(Op.PING, 0, status=Status.BUSY,
                                           error=f"over {self.config.max_connections} connections"))[0])
                sock.close()
                continue
            sock.setblocking(False)
            tune_socket(sock)
            self._connections.add(Connection(self, sock))
            self.stats.connections = len(self._connections)
            self.stats.connections_total += 1

    def forget(self, conn: Connection) -> None:
        self._connections.discard(conn)
        self.stats.connections = len(self._connections)

    # -- requests ------------------------------------------------------------------------------

    def handle(self, frame: Frame) -> tuple[list, bool]:
        """The reply to one decoded request, as buffers; and whether to close after sending it."""
        if self._token is not None and not (
                frame.token is not None and hmac.compare_digest(frame.token.encode(), self._token)):
            self.stats.unauthorized += 1
            missing = "missing" if frame.token is None else "wrong"
            return encode(reply(frame, Status.UNAUTHORIZED, error=f"{missing} token")), True
        self.stats.requests[frame.op.name.lower()] += 1
        try:
            answer, payloads = self._handlers[frame.op](frame)
        except Exception as exc:  # a bug must cost this request, not the server
            logger.exception("%s request %d failed", frame.op.name, frame.request_id)
            self.stats.errors += 1
            answer, payloads = reply(frame, Status.ERROR, error=f"{type(exc).__name__}: {exc}"), []
        return encode(answer, payloads), False

    def bad_frame(self, exc: ProtocolError) -> list:
        self.stats.bad_frames += 1
        return encode(Frame(Op.PING, exc.request_id or 0, status=Status.BAD_REQUEST, error=str(exc)))

    def _put(self, f: Frame) -> tuple[Frame, list]:
        put = self.store.put
        return reply(f, flags=[put(k, h, p) for k, h, p in zip(f.keys, f.heads, f.payloads)]), []

    def _get(self, f: Frame) -> tuple[Frame, list]:
        records = [self.store.get(k) for k in f.keys]
        heads = [r.head if r is not None else None for r in records]
        return reply(f, heads=heads), [r.payload if r is not None else None for r in records]

    def _exists(self, f: Frame) -> tuple[Frame, list]:
        count = 0
        while count < len(f.keys) and self.store.contains(f.keys[count]):
            count += 1
        return reply(f, count=count), []

    def _has(self, f: Frame) -> tuple[Frame, list]:
        return reply(f, flags=[int(self.store.contains(k)) for k in f.keys]), []

    def _delete(self, f: Frame) -> tuple[Frame, list]:
        return reply(f, count=self.store.delete(f.keys)), []

    def _clear(self, f: Frame) -> tuple[Frame, list]:
        return reply(f, count=self.store.clear(f.namespaces)), []

    def snapshot(self) -> dict[str, int]:
        """Every counter as one flat map: what STATS returns."""
        s, store, c = self.stats, self.store, self.store.counters
        spill = store.spill
        return {**{f"requests_{op}": n for op, n in s.requests.items()},
                "bytes_in": s.bytes_in, "bytes_out": s.bytes_out, "connections": s.connections,
                "connections_total": s.connections_total, "refused": s.refused, "bad_frames": s.bad_frames,
                "unauthorized": s.unauthorized, "errors": s.errors, "hits": c.hits, "misses": c.misses,
                "evictions": c.evictions, "spills": c.spills, "spill_hits": c.spill_hits,
                "dropped": c.dropped, "invalid": c.invalid, "records": store.records, "bytes": store.bytes,
                "capacity": store.capacity, "spill_records": spill.records if spill else 0,
                "spill_bytes": spill.bytes if spill else 0, "spill_capacity": spill.capacity if spill else 0}

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


class Connection:
    """One client socket: receive into the decoder, answer each frame, send replies as views."""

    def __init__(self, server: KvtierServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = FrameDecoder(server.config.max_frame_bytes, check=check_request)
        self._loop = server.loop
        self._out: deque[memoryview] = deque()
        self._queued = 0  # reply bytes not yet sent
        self._reading = self._writing = self._closing = self._closed = self._answering = False
        self._set_reading(True)

    def _on_readable(self) -> None:
        try:
            for _ in range(READS_PER_WAKEUP):
                buf = self.decoder.get_buffer()
                try:
                    n = self.sock.recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    return
                if n == 0:  # the client closed its side
                    self.close()
                    return
                self.server.stats.bytes_in += n
                self.decoder.advance(n)
                self._answer()
                if not self._reading or n < len(buf):
                    return
        except OSError as exc:
            logger.debug("connection %d: %s", self.fd, exc)
            self.close()
        except Exception:
            logger.exception("connection %d failed; closing it", self.fd)
            self.server.stats.errors += 1
            self.close()

    def _answer(self) -> None:
        """Answer the decoded frames, in order, until the reply queue is over HIGH_WATER."""
        self._answering = True  # (sending a reply must not re-enter here through _flush)
        while not self._closing and self._queued <= HIGH_WATER:
            try:
                frame = self.decoder.next_frame()
            except ProtocolError as exc:
                self._send(self.server.bad_frame(exc))
                if exc.fatal:
                    self.close_after_flush()
                continue
            if frame is None:
                break
            buffers, close = self.server.handle(frame)
            self._send(buffers)
            if close:
                self.close_after_flush()
        self._answering = False
        self._set_reading(not self._closing and self._queued <= HIGH_WATER)

    def _send(self, buffers: list) -> None:
        for b in buffers:
            view = memoryview(b).cast("B")
            self._out.append(view)
            self._queued += view.nbytes
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        try:
            while self._out:
                n = self.sock.sendmsg(list(islice(self._out, IOV_MAX)))
                self._queued -= n
                self.server.stats.bytes_out += n
                while n:
                    first = self._out[0]
                    if n >= first.nbytes:
                        n -= first.nbytes
                        self._out.popleft()
                    else:
                        self._out[0], n = first[n:], 0
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            logger.debug("connection %d: %s", self.fd, exc)
            self.close()
            return
        self._set_writing(bool(self._out))
        if self._closing:
            if not self._out:
                self.close()
        elif not self._reading and not self._answering and self._queued <= HIGH_WATER // 2:
            self._answer()  # frames decoded before the pause, then reading again

    def _set_reading(self, on: bool) -> None:
        if on == self._reading or self._closed:
            return
        if on:
            self._loop.add_reader(self.fd, self._on_readable)
        else:
            self._loop.remove_reader(self.fd)
        self._reading = on

    def _set_writing(self, on: bool) -> None:
        if on == self._writing or self._closed:
            return
        if on:
            self._loop.add_writer(self.fd, self._flush)
        else:
            self._loop.remove_writer(self.fd)
        self._writing = on

    def close_after_flush(self) -> None:
        self._closing = True
        self._set_reading(False)
        if not self._out:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._set_reading(False)
        self._set_writing(False)
        self._closed = self._closing = True  # (_answer stops at once)
        self._out.clear()
        self.sock.close()
        self.server.forget(self)


async def serve(config: ServerConfig, ready: Callable[[tuple[str, int]], None] | None = None) -> None:
    """Run a server until SIGTERM or SIGINT; `ready(address)` once it listens."""
    server = KvtierServer(config)
    address = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info("kvtier_server on %s:%d: capacity %.1f MiB, spill %s, token %s", *address,
                config.capacity / 2**20, config.spill.path if config.spill else "off",
                "on" if config.token is not None else "off")
    if ready is not None:
        ready(address)
    try:
        await stop.wait()
    finally:
        logger.info("kvtier_server shutting down: %s", server.snapshot())
        await server.close()
