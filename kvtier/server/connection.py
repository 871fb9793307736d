"""One `kvtier_server` client socket: handshake, receive, answer, send, time out, close.

Where it runs: the server's event-loop thread, driven by the loop's reader/writer callbacks (see
`kvtier.server.app` for why not an asyncio Transport). Lifecycle:

    accepted    in handshake: the decoder takes one frame, a HELLO of at most HELLO_HEADER_BYTES
                with no payload, and reads are capped to that size, so a peer without the token
                costs a few KiB. The server answers it (`KvtierServer.hello`): OK makes the
                connection authenticated, anything else is answered and closed. The server closes
                a connection still in handshake after `handshake_timeout_s`.
    authenticated  frames up to `max_frame_bytes`, every op; each frame's payload bytes are
                reserved in the server's receive budget before they are allocated (a frame that
                does not fit stops this connection's reading until it does). The server closes a
                connection that moved no bytes either way for `idle_timeout_s`, and one that holds
                budget bytes but received less than MIN_RECEIVE_RATE over a window of
                `min(idle_timeout_s, RECEIVE_GRACE_S)` (`kvtier.server.budget.ReceiveRate`).
                Replies: before answering a request the connection asks the server's reply budget
                for room (`reply_bytes` over all connections; over it, it stops decoding and
                reading until replies elsewhere drain), and its queued reply bytes count there
                until the kernel takes them (`kvtier.server.outbox`). The server closes a
                connection with replies queued that sent none of them for `send_timeout_s`: a
                queued GET reply holds its records' buffers (eviction cannot free them), so a
                client that asks and never reads would otherwise hold memory, and the reply
                budget, until the idle timeout.
    closing     no more reading; queued replies drain, then the socket closes.

Requests are pipelined: decoded and answered in order as bytes arrive, each reply carrying its
request's id. Back-pressure: with more than HIGH_WATER reply bytes queued the connection stops
decoding and reading until the client has taken half of them. A client that half-closes (EOF)
still gets the replies to everything it sent: reading stops, answering goes on, and the socket
closes once the last reply is out.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from kvtier.errors import ProtocolError
from kvtier.log_limit import LogLimiter
from kvtier.server.budget import ReceiveRate
from kvtier.server.outbox import Outbox
from kvtier.wire.decoder import FrameDecoder
from kvtier.wire.frames import HELLO_READ, Frame, Op, check_hello, check_request

if TYPE_CHECKING:
    from kvtier.server.app import KvtierServer

logger = logging.getLogger(__name__)
_failures = LogLimiter(logger)  # one for all connections: a peer can trip the same failure on each

HIGH_WATER = 64 << 20  # queued reply bytes at which a connection stops reading
READS_PER_WAKEUP = 16  # recv_into calls per readiness event before giving other connections a turn
MIN_RECEIVE_RATE = 1 << 20  # bytes/s a connection holding receive budget must average (see above)
RECEIVE_GRACE_S = 10.0  # ... over windows this long (or idle_timeout_s when shorter)


class _ReplyTurn:
    """A connection as a waiter on the reply budget (`Connection.resume` is the receive budget's)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection):
        self._conn = conn

    def resume(self) -> None:
        self._conn.reply_room()


class Connection:
    def __init__(self, server: KvtierServer, sock: socket.socket, now: float):
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.accepted_at = now
        self.last_active = now  # bytes last received or sent
        self.authenticated = False
        self.decoder = FrameDecoder(HELLO_READ, check=check_hello, admit=self._admit, one_frame=True)
        self._loop = server.loop
        self._out = Outbox(server.replies, self._loop.time)
        self.turn = _ReplyTurn(self)  # (the same object each time: the budget's queue compares identity)
        self._reserved = 0  # receive-budget bytes held by frames not yet answered
        self._rate = ReceiveRate(MIN_RECEIVE_RATE, min(server.config.idle_timeout_s, RECEIVE_GRACE_S))
        self._reading = self._writing = self._closing = self._closed = self._answering = False
        self._eof = False  # the client half-closed: answer what it sent, then close
        self._set_reading(True)

    @property
    def waiting(self) -> bool:
        """Held by a budget: not reading through no fault of the client."""
        return self.decoder.holding or self.server.replies.holds(self.turn)

    def send_stalled(self, now: float) -> bool:
        """Replies queued, and none of their bytes sent for `send_timeout_s`."""
        return self._out.stalled(now, self.server.config.send_timeout_s)

    def has_input(self) -> bool:
        """Request bytes wait in the socket, unread, while this connection is reading (a client
        that sends but never reads its replies is paused, and idle all the same)."""
        if not self._reading:
            return False
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # (BlockingIOError: nothing there)
            return False

    def stalled(self, now: float) -> bool:
        """Holding receive-budget bytes while receiving under MIN_RECEIVE_RATE over the current
        window. While a budget holds it (`waiting`) its window starts again."""
        if not self._reserved:
            return False
        if self.waiting:
            self._rate.restart(now)
            return False
        return self._rate.too_slow(now)

    def authenticate(self, max_frame_bytes: int) -> None:
        """The handshake succeeded: full frame limits, and decode whatever followed the HELLO."""
        self.authenticated = True
        self.decoder.upgrade(max_frame_bytes, check_request)

    # -- receiving -----------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            for _ in range(READS_PER_WAKEUP):
                buf = self.decoder.get_buffer()
                if not self.authenticated:
                    buf = buf[:HELLO_READ]
                try:
                    n = self.sock.recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    return
                if n == 0:
                    self._eof = True
                    self._set_reading(False)
                    self._answer()
                    return
                self.server.stats.bytes_in += n
                self._rate.received(n)
                self.last_active = self._loop.time()
                self.decoder.advance(n)
                self._answer()
                if not self._reading or n < len(buf):
                    return
        except OSError as exc:
            logger.debug("connection %d: %s", self.fd, exc)
            self.close()
        except Exception:
            _failures.error("failed", "connection %d failed; closing it", self.fd, exc_info=True)
            self.server.stats.errors += 1
            self.close()

    def _admit(self, total: int) -> bool:
        if not self.server.budget.reserve(total, self):
            return False
        if not self._reserved:  # (it starts holding budget: a new window)
            self._rate.restart(self._loop.time())
        self._reserved += total
        return True

    def resume(self) -> None:
        """The receive budget has room again: take the held frame and go on reading."""
        if self._closed or not self.decoder.holding:
            self.server.budget.cancel(self)
            return
        self.decoder.resume()
        self.last_active = self._loop.time()
        if not self._answering:  # (else the _answer loop below us picks the frame up, in order)
            self._answer()

    def reply_room(self) -> None:
        """The reply budget has room again: answer what is decoded, then read again."""
        if self._closed:
            self.server.replies.cancel(self.turn)
        elif not self._answering:  # (else the _answer loop below us asks again itself)
            self._answer()

    def _release(self, frame: Frame) -> None:
        n = sum(k for k in frame.lengths if k)
        if n:
            self._reserved -= n
            self.server.budget.release(n)

    # -- answering -----------------------------------------------------------------------------

    def _answer(self) -> None:
        """Answer the decoded frames, in order, until the reply queue is over HIGH_WATER or the
        server's reply budget has no room."""
        self._answering = True  # (sending a reply must not re-enter here through _flush)
        drained = held = False
        while not self._closing and self._out.queued <= HIGH_WATER:
            if self.authenticated and not self.server.replies.wait_for_room(self.turn):
                held = True  # (reply_room() brings us back here)
                break
            try:
                frame = self.decoder.next_frame()
            except ProtocolError as exc:
                self._send(self.server.bad_frame(exc))
                if exc.fatal or not self.authenticated:
                    self.close_after_flush()
                continue
            if frame is None:
                drained = True
                break
            if self.authenticated and frame.op is not Op.HELLO:
                buffers, close = self.server.handle(frame)
            else:
                buffers, close = self.server.hello(self, frame)
            self._release(frame)
            self._send(buffers)
            if close:
                self.close_after_flush()
        self._answering = False
        if self._eof and drained and not self.decoder.holding:
            self.close_after_flush()  # everything the client sent is answered
        self._set_reading(not (self._closing or self._eof or self.decoder.holding or held)
                          and self._out.queued <= HIGH_WATER)

    # -- sending -------------------------------------------------------------------------------

    def _send(self, buffers: list) -> None:
        self._out.add(buffers)
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        try:
            while self._out:
                sent = self._out.send(self.sock)
                self.server.stats.bytes_out += sent
                self.last_active = self._out.sent_at
                # Last, with this connection's state whole: the release may wake other
                # connections, and through them this one (reply_room), which may send.
                self.server.replies.release(sent)
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
        elif not self._reading and not self._answering and self._out.queued <= HIGH_WATER // 2:
            self._answer()  # frames decoded before the pause, then reading again

    # -- loop registration and closing ---------------------------------------------------------

    def _set_reading(self, on: bool) -> None:
        self._reading = self._watch(on, self._reading, self._loop.add_reader, self._loop.remove_reader,
                                    self._on_readable)

    def _set_writing(self, on: bool) -> None:
        self._writing = self._watch(on, self._writing, self._loop.add_writer, self._loop.remove_writer,
                                    self._flush)

    def _watch(self, on: bool, watching: bool, add, remove, callback) -> bool:
        """(Un)register one of the loop's readiness callbacks for this socket; whether it is now
        registered. A closed connection registers nothing."""
        if on == watching or self._closed:
            return watching
        if on:
            add(self.fd, callback)
        else:
            remove(self.fd)
        return on

    def close_after_flush(self) -> None:
        self._closing = True
        self._set_reading(False)
        self.server.replies.cancel(self.turn)  # (it answers nothing more: it must not hold the line)
        if not self._out:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._set_reading(False)
        self._set_writing(False)
        self._closed = self._closing = True  # (_answer stops at once)
        queued = self._out.drop()
        self.decoder.close()  # its buffers go now, not when the garbage collector finds the cycle
        self.sock.close()
        reserved, self._reserved = self._reserved, 0
        self.server.forget(self, reserved, queued)
