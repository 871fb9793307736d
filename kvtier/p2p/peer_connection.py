"""One peer's connection to the P2P endpoint: handshake, then receive, answer, send, in a loop.

Where it runs: its own daemon thread (the peer server starts one per accepted socket), on a
blocking socket: answering may block on a hold (memory, disk reads), which an event loop could not
afford. Lifecycle:

    handshake      the decoder takes one frame, a HELLO of at most HELLO_HEADER_BYTES with no
                   payload, and reads are capped to that size, all within HELLO_TIMEOUT_S from
                   accept: a peer without the token costs a few KiB and a few seconds. The server
                   answers it (`PeerServer.hello`: the token compared in constant time, the version,
                   BUSY beyond max_connections); anything but OK is answered and closed.
    authenticated  requests are decoded (never with payloads: `check_peer_request`) and answered in
                   order, one at a time; a malformed frame gets BAD_REQUEST and the next one is read,
                   unless the stream cannot be resynchronised (then the reply is followed by a close).
                   A peer silent for IDLE_TIMEOUT_S is closed. A reply must go out within
                   SEND_TIMEOUT_S plus its bytes at MIN_SEND_RATE, or the connection closes: a GET
                   reply holds its chunks' slabs until sent, so a peer that asks and never reads
                   cannot hold memory for longer.
    closed         the socket and the decoder's buffers go; the server forgets the connection.

`shutdown()` (the server stopping, once its leases ended) wakes the thread from any blocking call:
it closes at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from kvtier.errors import ProtocolError
from kvtier.log_limit import LogLimiter
from kvtier.wire.decoder import FrameDecoder
from kvtier.wire.frames import HELLO_READ, MAX_HEADER_BYTES, PREFIX, Frame, Op, check_hello
from kvtier.wire.sockets import send_some

if TYPE_CHECKING:
    from kvtier.p2p.peer_server import PeerServer

logger = logging.getLogger(__name__)
_failures = LogLimiter(logger)  # one for all connections: a peer can trip the same failure on each

HELLO_TIMEOUT_S = 5.0  # from accept to the HELLO received
IDLE_TIMEOUT_S = 120.0  # an authenticated peer silent this long is closed (readers pool connections)
SEND_TIMEOUT_S = 10.0  # a reply's send, plus its bytes at MIN_SEND_RATE
MIN_SEND_RATE = 1 << 20
# Requests carry no payloads; a PUT's (refused on its header) are skipped up to this frame size,
# beyond it the connection closes.
MAX_REQUEST_BYTES = PREFIX.size + MAX_HEADER_BYTES + (64 << 20)


class PeerConnection:
    def __init__(self, server: PeerServer, sock: socket.socket, now: float):
        self.server = server
        self.sock = sock
        self.accepted_at = now
        self.authenticated = False
        self._decoder = FrameDecoder(HELLO_READ, check=check_hello, one_frame=True)
        self.thread = threading.Thread(target=self._run, name="kvtier-p2p-conn", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def shutdown(self) -> None:
        """Wake the connection's thread from any blocking call on its socket: it closes."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # (not connected any more)
            pass

    def _run(self) -> None:
        try:
            if self._handshake():
                self._serve()
        except OSError as exc:  # the peer went away, a timeout, or shutdown()
            logger.debug("P2P connection closed: %s", exc)
        except Exception:
            _failures.error("failed", "P2P connection failed; closing it", exc_info=True)
            self.server.count("errors", 1)
        finally:
            self._decoder.close()
            self.sock.close()
            self.server.forget(self)

    def _handshake(self) -> bool:
        try:
            frame = self._next_frame(time.monotonic() + HELLO_TIMEOUT_S)
        except ProtocolError as exc:
            self._send(self.server.bad_frame(exc))
            return False
        if frame is None:
            return False
        buffers, ok = self.server.hello(self, frame)
        self._send(buffers)
        if ok:
            self.authenticated = True
            self._decoder.upgrade(MAX_REQUEST_BYTES, self.server.check)
        return ok

    def _serve(self) -> None:
        # (Serving goes on while the server stops: its readers RELEASE their leases meanwhile, and
        # anything else they ask is a miss; `shutdown()` ends the loop once the leases are over.)
        while True:
            try:
                frame = self._next_frame(None)
            except ProtocolError as exc:
                self._send(self.server.bad_frame(exc))
                if exc.fatal:
                    return
                continue
            if frame is None:
                return
            if frame.op is Op.HELLO:
                self._send(self.server.hello(self, frame)[0])
                continue
            answer = self.server.handle(frame)
            try:
                self._send(answer.buffers)
            finally:
                if answer.done is not None:
                    answer.done()

    def _next_frame(self, deadline: float | None) -> Frame | None:
        """The next decoded frame (None: the peer closed), receiving until `deadline` (None: for
        IDLE_TIMEOUT_S). Raises ProtocolError for a bad frame, TimeoutError past the deadline."""
        while (frame := self._decoder.next_frame()) is None:
            if deadline is None:
                self.sock.settimeout(IDLE_TIMEOUT_S)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no HELLO in time")
                self.sock.settimeout(left)
            buf = self._decoder.get_buffer()
            n = self.sock.recv_into(buf if self.authenticated else buf[:HELLO_READ])
            if not n:
                return None
            self._decoder.advance(n)
        return frame

    def _send(self, buffers: list) -> None:
        views = deque(memoryview(b).cast("B") for b in buffers)
        deadline = time.monotonic() + SEND_TIMEOUT_S + sum(v.nbytes for v in views) / MIN_SEND_RATE
        while views:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the peer does not take its reply")
            self.sock.settimeout(min(left, SEND_TIMEOUT_S))
            send_some(self.sock, views)
