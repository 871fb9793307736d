"""The remote tier's blocking client of `kvtier_server`: connections, their pool, pipelined calls.

Where it runs: on the threads of `RemoteTier` (the StorageManager's I/O threads, and `has` on the
lookup path). Thread-safe: a small pool of blocking sockets (`connections`, opened on demand), each
lent to one call at a time. A new connection first sends HELLO (protocol version and token) and
waits for its answer; a pooled connection the server has closed meanwhile (its idle timeout) is
noticed before use and replaced. `Client.call` sends a list of requests on one connection, all of
them before reading a reply (pipelined: one round trip of latency per call, not per frame), then
reads the replies in order. It raises on any failure; `RemoteTier` guards it (`FailureGuard`).

Zero copy both ways: a PUT goes out as [frame header, record payload views, ...] through
`sendmsg`; a GET reply's payloads are received by `recv_into` straight into the caller's slabs
(`GetSink` hands them to the frame decoder as its payload buffers).

Time and memory are bounded whatever the server does: a new connection's connect and HELLO have
`timeout_s`, and a call one deadline, `timeout_s` plus its payload bytes at CALL_MIN_RATE, from when
it has its connection, so a server that trickles its reply a byte at a time cannot hold the caller
past it; reply payloads land only in the caller's slabs or in at most SCRATCH_BYTES of scratch per
frame (a record larger than its slab), so a reply that announces a huge length costs nothing
before its bytes arrive, and not more than that after.

Errors: a HELLO answered UNAUTHORIZED (wrong or missing token) or BAD_REQUEST (the protocol
version) raises `Refused`: this client is misconfigured, and no retry soon fixes it. A request
answered BAD_REQUEST (a frame over the server's max_frame_bytes, a reply it cannot encode) raises
`RequestRefused`: that request failed, the server and the client's other requests are fine. Any
other error status raises TierUnavailable; a malformed or mismatched reply ProtocolError; the socket
OSError. A failed call closes its connection, and but for a refusal (the server answered) the
pool's idle ones too (they lead to the same failed server).
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvtier.errors import KvtierError, ProtocolError, TierUnavailable
from kvtier.record import tensor_bytes
from kvtier.tiers.backoff import BackedOff
from kvtier.wire.decoder import FrameDecoder, anonymous
from kvtier.wire.frames import PROTOCOL_VERSION, Frame, Op, Status, check_reply, encode
from kvtier.wire.sockets import send_some, tune_socket

MAX_REPLY_BYTES = 1 << 34  # the decoder's bound; GET payloads land in our own slabs anyway
# A call may take `timeout_s` plus its payload bytes (both ways) at this rate; a slow 1 GbE link
# shared by 32 connections still moves ~3 MiB/s each.
CALL_MIN_RATE = 1 << 20
SCRATCH_BYTES = 64 << 20  # per GET frame: records larger than their slab, received to be dropped
_REFUSALS = (Status.UNAUTHORIZED, Status.BAD_REQUEST)

Sink = Callable[[int, int], memoryview]


class Refused(KvtierError):
    """kvtier_server refused this client's HELLO (UNAUTHORIZED: the token; BAD_REQUEST: the protocol
    version): the client is misconfigured. Not an outage: retrying soon will not help."""


class RequestRefused(KvtierError):
    """kvtier_server answered BAD_REQUEST to one request: that request's shape (a frame over its
    max_frame_bytes), not the client nor the server, is at fault, so only that request fails."""


@dataclass(slots=True)
class Request:
    """One frame of a call, its payload buffers (PUT), and where its reply's payloads go (GET)."""

    frame: Frame
    payloads: Sequence = ()
    sink: GetSink | None = None


def _check_status(reply: Frame) -> None:
    if reply.status is Status.UNAUTHORIZED:
        raise Refused(f"server answered {reply.status.name}: {reply.error}")
    if reply.status is Status.BAD_REQUEST:  # (at HELLO, `Connection._hello` makes it a Refused)
        raise RequestRefused(f"server answered {reply.status.name}: {reply.error}")
    if reply.status != Status.OK:
        raise TierUnavailable(f"server answered {reply.status.name}: {reply.error}")


class Connection:
    """One blocking socket to the server, with its frame decoder."""

    def __init__(self, host: str, port: int, timeout: float, token: str | None):
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout  # the HELLO's; each call sets its own
        self.sock = socket.create_connection((host, port), timeout=timeout)
        tune_socket(self.sock)
        self.sinks: dict[int, Sink] = {}  # request id -> where its reply's payloads go
        self.decoder = FrameDecoder(MAX_REPLY_BYTES, check=check_reply, alloc=self._alloc)
        try:
            self._hello(token)
        except BaseException:
            self.close()
            raise

    def _hello(self, token: str | None) -> None:
        hello = Frame(Op.HELLO, 0, token=token, version=PROTOCOL_VERSION)
        try:
            self.send(encode(hello))
            self.reply_to(hello)
        except RequestRefused as exc:  # a HELLO refused is this client refused, whatever the shape
            raise Refused(str(exc)) from None

    def dropped(self) -> bool:
        """True when the server has closed this idle connection (or sent what nobody asked for)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def _alloc(self, frame: Frame, index: int, size: int) -> memoryview:
        sink = self.sinks.get(frame.request_id)
        if sink is None:  # only GET replies carry payloads: never allocate what a server announces
            raise ProtocolError(f"unexpected payload of {size} bytes in {frame.op.name} reply "
                                f"#{frame.request_id}")
        return sink(index, size)

    def _arm(self) -> None:
        """Socket timeout for the next operation: `timeout` at most, and never past the deadline
        (per-operation timeouts alone let a server that sends a byte at a time hold a call forever)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the call's deadline passed")
        self.sock.settimeout(min(self.timeout, left))

    def send(self, buffers: list) -> None:
        views = deque(memoryview(b).cast("B") for b in buffers)
        try:
            while views:
                self._arm()
                send_some(self.sock, views)
        except OSError:
            self._raise_refusal()
            raise

    def _raise_refusal(self) -> None:
        """Raise Refused / RequestRefused if the server refused a frame of this call before the
        send failed: it refuses a frame on its header (over its max_frame_bytes), answers, and
        closes while the payload is still on its way, so the send fails with a reset and only a
        reply tells why; not necessarily the first one (the call's earlier frames got theirs)."""
        try:
            self.sock.settimeout(0)
            while True:
                while (frame := self.decoder.next_frame()) is not None:
                    if frame.status in _REFUSALS:
                        _check_status(frame)
                n = self.sock.recv_into(self.decoder.get_buffer())
                if not n:
                    return
                self.decoder.advance(n)
        except (OSError, ProtocolError):  # nothing (more) to read: the send's error stands
            return

    def receive(self) -> Frame:
        while (frame := self.decoder.next_frame()) is None:
            self._arm()
            n = self.sock.recv_into(self.decoder.get_buffer())
            if not n:
                raise ConnectionError("the server closed the connection")
            self.decoder.advance(n)
        return frame

    def reply_to(self, request: Frame) -> Frame:
        """The next reply, checked against `request` (its id, op, status and shape)."""
        reply = self.receive()
        self.sinks.pop(request.request_id, None)
        if reply.status in _REFUSALS:  # (a frame the server could not read comes back as PING #0)
            _check_status(reply)
        if reply.request_id != request.request_id or reply.op != request.op:
            raise ProtocolError(f"reply {reply.op.name} #{reply.request_id} to {request.op.name} "
                                f"#{request.request_id}")
        _check_status(reply)
        n = len(request.keys)
        if (request.op is Op.GET and len(reply.heads) != n) or (
                request.op in (Op.PUT, Op.HAS) and len(reply.flags) != n):
            raise ProtocolError(f"{request.op.name} of {n} keys answered for a different number")
        return reply

    def close(self) -> None:
        self.decoder.close()  # (it and this connection reference each other: free its buffers now)
        self.sock.close()


class Pool:
    """Up to `size` connections, opened on demand; each lent to one thread at a time."""

    def __init__(self, connect: Callable[[float], Connection], size: int):
        self._connect = connect
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._closed = False

    @contextmanager
    def connection(self, seconds: float, superseded: Callable[[], bool] = lambda: False
                   ) -> Iterator[Connection]:
        """A connection whose socket operations end within `seconds` from now: from when it is
        lent, not from when it was asked for (waiting for a slot is not the server's doing).
        Raises BackedOff instead when, once a slot is free, `superseded()` says the server failed
        another call meanwhile (the back-off has started: this one must not add a timeout)."""
        with self._slots:
            if superseded():
                raise BackedOff("the server failed while this call waited for a connection")
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is not None and conn.dropped():
                conn.close()
                conn = None
            conn = conn or self._connect(seconds)
            conn.deadline = time.monotonic() + seconds
            try:
                yield conn
            except BaseException:
                conn.close()  # its stream is in an unknown state
                raise
            with self._lock:
                if self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)

    def discard_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.discard_idle()


class GetSink:
    """Payload buffers for one GET frame: reply payload j lands in `dests[indices[j]]`, or in a
    scratch buffer when it would not fit (then it is reported as corrupt). Scratch is bounded
    (SCRATCH_BYTES per frame) and not zeroed up front: a length is only what the server says."""

    def __init__(self, indices: list[int], dests: Sequence[torch.Tensor]):
        self.indices = indices
        self.dests = dests
        self.oversized: set[int] = set()
        self._scratch = 0

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(self.dests[i]).nbytes for i in self.indices)

    def __call__(self, j: int, size: int) -> memoryview:
        if j >= len(self.indices):
            raise ProtocolError(f"GET reply payload {j} for a frame of {len(self.indices)} keys")
        view = tensor_bytes(self.dests[self.indices[j]])
        if size <= view.nbytes:
            return view[:size]
        self._scratch += size
        if self._scratch > SCRATCH_BYTES:
            raise ProtocolError(f"GET reply of records larger than their buffers ({self._scratch} bytes)")
        self.oversized.add(j)
        return memoryview(anonymous(size))


class Client:
    """Pipelined calls to one kvtier_server over a pool of `connections` sockets."""

    def __init__(self, host: str, port: int, timeout_s: float, token: str | None, connections: int):
        self.timeout_s = timeout_s
        # A new connection's connect and HELLO get `timeout_s`, and never more than the call has left.
        self._pool = Pool(lambda seconds: Connection(host, port, min(timeout_s, seconds), token), connections)

    def call(self, requests: Sequence[Request], superseded: Callable[[], bool] = lambda: False,
             deadline: float | None = None) -> list[Frame]:
        """Send `requests` pipelined on one connection and return their replies in order. Raises
        (Refused, RequestRefused, TierUnavailable, ProtocolError, OSError) when the server cannot
        answer them all, BackedOff when `superseded()` once a connection is free (see Pool).
        `deadline` (time.monotonic()): the caller's own, which the call never outlives (TimeoutError)."""
        moved = sum(memoryview(p).nbytes for r in requests for p in r.payloads) + sum(
            r.sink.nbytes for r in requests if r.sink is not None)
        seconds = self.timeout_s + moved / CALL_MIN_RATE
        if deadline is not None:
            seconds = min(seconds, deadline - time.monotonic())
            if seconds <= 0:
                raise TimeoutError("the caller's deadline passed before the call")
        try:
            with self._pool.connection(seconds, superseded) as conn:
                for r in requests:
                    if r.sink is not None:
                        conn.sinks[r.frame.request_id] = r.sink
                    conn.send(encode(r.frame, r.payloads))
                return [conn.reply_to(r.frame) for r in requests]
        except (Refused, RequestRefused, BackedOff):  # answered (or not asked): keep the idle ones
            raise
        except BaseException:
            self._pool.discard_idle()  # they lead to the same failed server
            raise

    def close(self) -> None:
        self._pool.close()
