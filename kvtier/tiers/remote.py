"""The remote tier: a client of `kvtier_server` (`kvtier://host:port`), following `Tier`.

Where it runs: on the StorageManager's I/O threads, and `has` on the lookup path. Thread-safe: a
small pool of blocking sockets (`connections`, opened on demand), each used by one call at a time.
A new connection first sends HELLO (protocol version and token) and waits for its answer; a pooled
connection the server has closed meanwhile (its idle timeout) is noticed before use and replaced.
A call splits its batch into frames of at most BATCH_BYTES of payload, sends them all, then reads
the replies in order (pipelined: one round trip of latency per call, not per frame).

Zero copy both ways: a PUT goes out as [frame header, record payload views, ...] through
`sendmsg`; a GET reply's payloads are received by `recv_into` straight into `dests[i]` (the frame
decoder hands out the slab as its payload buffer). Every record is verified (header, key, length,
checksum) before it is reported; a bad one is a miss, a `corrupt` count and a DELETE on the server.

Time and memory are bounded whatever the server does: a new connection's connect and HELLO have
`timeout_s`, and a call one deadline, `timeout_s` plus its payload bytes at CALL_MIN_RATE, from when
it has its connection, so a server that trickles its reply a byte at a time cannot hold the caller
past it; reply payloads land only in the caller's slabs or in at most SCRATCH_BYTES of scratch per
frame (a record larger than its slab), so a reply that announces a huge length costs nothing
before its bytes arrive, and not more than that after.

Failure: a connection error, a timeout (`timeout_s` per socket operation, or the call's deadline),
a malformed, mismatched or oversized reply, or an error status costs the call (misses / False /
0), an `errors` count and the pool's idle connections, and starts a back-off
(`kvtier.tiers.backoff`: `retry_after_s` doubling to `retry_max_s`) during which calls answer at
once without touching the network. The first call after the delay probes the server; when it
succeeds the tier is back. Nothing raises out of the Tier methods.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

import torch

from kvtier.config import RemoteConfig
from kvtier.config_values import redact_url
from kvtier.errors import ConfigError, CorruptRecord, KvtierError, ProtocolError, TierUnavailable
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.record import RecordHeader, tensor_bytes, verify
from kvtier.server.decoder import FrameDecoder, anonymous
from kvtier.server.protocol import (
    MAX_KEYS,
    PROTOCOL_VERSION,
    Frame,
    Op,
    PutResult,
    Status,
    check_reply,
    encode,
)
from kvtier.server.sockets import send_some, tune_socket
from kvtier.tiers.backoff import Backoff
from kvtier.tiers.base import PutItem, TierUsage

logger = logging.getLogger(__name__)

BATCH_BYTES = 64 << 20  # payload bytes per frame (a larger record goes alone); keys: MAX_KEYS
MAX_REPLY_BYTES = 1 << 34  # the decoder's bound; GET payloads land in our own slabs anyway
# A call may take `timeout_s` plus its payload bytes (both ways) at this rate; a slow 1 GbE link
# shared by 32 connections still moves ~3 MiB/s each.
CALL_MIN_RATE = 1 << 20
SCRATCH_BYTES = 64 << 20  # per GET frame: records larger than their slab, received to be dropped

Sink = Callable[[int, int], memoryview]


def parse_url(url: str) -> tuple[str, int]:
    """`kvtier://host:port` -> (host, port). Raises ConfigError."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "kvtier" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"remote.url: expected kvtier://host:port, got {redact_url(url)}")
    return parts.hostname, port


def _batches(sizes: Sequence[int]) -> list[list[int]]:
    """Consecutive index groups of at most BATCH_BYTES (by `sizes`) and MAX_KEYS each."""
    groups: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if groups[-1] and (total + size > BATCH_BYTES or len(groups[-1]) >= MAX_KEYS):
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups if groups[0] else []


class _Connection:
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
        self.send(encode(Frame(Op.HELLO, 0, token=token, version=PROTOCOL_VERSION)))
        answer = self.receive()
        if answer.op is not Op.HELLO or answer.request_id != 0:
            raise ProtocolError(f"expected the HELLO reply, got {answer.op.name} #{answer.request_id}")
        if answer.status != Status.OK:
            raise TierUnavailable(f"server refused the connection: {answer.status.name}: {answer.error}")

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
        while views:
            self._arm()
            send_some(self.sock, views)

    def receive(self) -> Frame:
        while (frame := self.decoder.next_frame()) is None:
            self._arm()
            n = self.sock.recv_into(self.decoder.get_buffer())
            if not n:
                raise ConnectionError("the server closed the connection")
            self.decoder.advance(n)
        return frame

    def close(self) -> None:
        self.decoder.close()  # (it and this connection reference each other: free its buffers now)
        self.sock.close()


class _Pool:
    """Up to `size` connections, opened on demand; each lent to one thread at a time."""

    def __init__(self, connect: Callable[[], _Connection], size: int):
        self._connect = connect
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._closed = False

    @contextmanager
    def connection(self, seconds: float) -> Iterator[_Connection]:
        """A connection whose socket operations end within `seconds` from now: from when it is
        lent, not from when it was asked for (waiting for a slot is not the server's doing)."""
        with self._slots:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is not None and conn.dropped():
                conn.close()
                conn = None
            conn = conn or self._connect()
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


class _GetSink:
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
        return sum(self.dests[i].numel() * self.dests[i].element_size() for i in self.indices)

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


class RemoteTier:
    name = "remote"

    def __init__(self, config: RemoteConfig, namespace: bytes, metrics: Metrics):
        self.config = config
        self.namespace = namespace
        self.host, self.port = parse_url(config.url)
        self._metrics = metrics
        self._backoff = Backoff(config.retry_after_s, config.retry_max_s)
        self._log = LogLimiter(logger)  # a full or misbehaving server can fail every call
        self._pool = _Pool(lambda: _Connection(self.host, self.port, config.timeout_s, config.token),
                           config.connections)
        self._ids = itertools.count(1)
        self._usage = TierUsage(0, 0, 0)

    def _frame(self, op: Op, **fields) -> Frame:
        return Frame(op, next(self._ids), **fields)

    def _call(self, requests: list[tuple[Frame, list, Sink | None]]) -> list[Frame] | None:
        """Send `(frame, payloads, sink)` requests pipelined on one connection and return their
        replies, or None (counted, backing off) when the server cannot answer them all."""
        if not self._backoff.ready():
            return None
        moved = sum(memoryview(p).nbytes for _, payloads, _ in requests for p in payloads) + sum(
            sink.nbytes for _, _, sink in requests if sink is not None)
        try:
            with self._pool.connection(self.config.timeout_s + moved / CALL_MIN_RATE) as conn:
                for frame, payloads, sink in requests:
                    if sink is not None:
                        conn.sinks[frame.request_id] = sink
                    conn.send(encode(frame, payloads))
                replies = [self._reply(conn, frame) for frame, _, _ in requests]
        except Exception as exc:
            self._metrics.tier_inc(self.name, "errors")
            self._pool.discard_idle()  # they lead to the same failed server
            if not isinstance(exc, (OSError, KvtierError)):
                self._log.error("unexpected", "remote tier %s: unexpected failure", self.config.url,
                                exc_info=True)
            if self._backoff.failed():
                logger.warning("remote tier %s unavailable (%s: %s); backing off", self.config.url,
                               type(exc).__name__, exc)
            return None
        if self._backoff.succeeded():
            logger.info("remote tier %s is back", self.config.url)
        return replies

    @staticmethod
    def _reply(conn: _Connection, request: Frame) -> Frame:
        reply = conn.receive()
        conn.sinks.pop(request.request_id, None)
        if reply.request_id != request.request_id or reply.op != request.op:
            raise ProtocolError(f"reply {reply.op.name} #{reply.request_id} to {request.op.name} "
                                f"#{request.request_id}")
        if reply.status != Status.OK:
            raise TierUnavailable(f"server answered {reply.status.name}: {reply.error}")
        n = len(request.keys)
        if (request.op is Op.GET and len(reply.heads) != n) or (
                request.op in (Op.PUT, Op.HAS) and len(reply.flags) != n):
            raise ProtocolError(f"{request.op.name} of {n} keys answered for a different number")
        return reply

    # -- Tier protocol -------------------------------------------------------------------------

    def has(self, keys: Sequence[ChunkKey]) -> list[bool]:
        keys = list(keys)
        if not keys:
            return []
        groups = _batches([0] * len(keys))
        replies = self._call([(self._frame(Op.HAS, keys=[keys[i] for i in g]), [], None) for g in groups])
        if replies is None:
            return [False] * len(keys)
        return [bool(flag) for r in replies for flag in r.flags]

    def get(self, keys: Sequence[ChunkKey], dests: Sequence[torch.Tensor]) -> list[RecordHeader | None]:
        keys = list(keys)
        if len(keys) != len(dests):
            raise ValueError(f"{len(keys)} keys but {len(dests)} destinations")
        if not keys:
            return []
        sinks = [_GetSink(g, dests) for g in _batches([d.numel() for d in dests])]
        replies = self._call([(self._frame(Op.GET, keys=[keys[i] for i in s.indices]), [], s) for s in sinks])
        results: list[RecordHeader | None] = [None] * len(keys)
        if replies is None:
            return results
        corrupt = []
        for sink, reply in zip(sinks, replies):
            for j, (head, payload) in enumerate(zip(reply.heads, reply.payloads)):
                i = sink.indices[j]
                if head is None:
                    continue
                try:
                    if j in sink.oversized:
                        raise CorruptRecord(f"record of {payload.nbytes} bytes exceeds its buffer")
                    results[i] = verify(head, payload, keys[i])
                except CorruptRecord as exc:
                    self._log.warning("corrupt", "remote tier: dropping corrupt record: %s", exc)
                    corrupt.append(keys[i])
        if corrupt:
            self._metrics.tier_inc(self.name, "corrupt", len(corrupt))
            self.remove(corrupt)
        self._metrics.tier_inc(self.name, "bytes_read", sum(h.payload_len for h in results if h is not None))
        return results

    def put(self, items: Sequence[PutItem]) -> list[bool]:
        items = list(items)
        if not items:
            return []
        groups = _batches([item.payload.numel() for item in items])
        requests = []
        for g in groups:
            frame = self._frame(Op.PUT, keys=[items[i].key for i in g], heads=[items[i].header for i in g])
            requests.append((frame, [tensor_bytes(items[i].payload) for i in g], None))
        replies = self._call(requests)
        if replies is None:
            return [False] * len(items)
        stored = [flag == PutResult.STORED for r in replies for flag in r.flags]
        rejected = len(stored) - sum(stored)
        if rejected:
            self._log.warning("refused", "remote tier: server refused %d of %d records", rejected,
                              len(stored))
            self._metrics.tier_inc(self.name, "rejected", rejected)
        self._metrics.tier_inc(self.name, "bytes_written",
                               sum(item.payload.numel() for item, ok in zip(items, stored) if ok))
        return stored

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        keys = list(keys)
        if not keys:
            return 0
        groups = _batches([0] * len(keys))
        replies = self._call([(self._frame(Op.DELETE, keys=[keys[i] for i in g]), [], None) for g in groups])
        return sum(r.count or 0 for r in replies) if replies else 0

    def clear(self) -> None:
        """Remove every record of this tier's namespace from the server (other namespaces stay)."""
        self._call([(self._frame(Op.CLEAR, namespaces=[self.namespace]), [], None)])

    def usage(self) -> TierUsage:
        """The server's occupancy (memory plus spill; all namespaces), from STATS; the last known
        numbers while the server cannot be reached."""
        replies = self._call([(self._frame(Op.STATS), [], None)])
        if replies:
            s = replies[0].stats or {}
            self._usage = TierUsage(s.get("records", 0) + s.get("spill_records", 0),
                                    s.get("bytes", 0) + s.get("spill_bytes", 0),
                                    s.get("capacity", 0) + s.get("spill_capacity", 0))
        return self._usage

    def stats(self) -> dict[str, int] | None:
        """The server's STATS counters, or None when it cannot be reached."""
        replies = self._call([(self._frame(Op.STATS), [], None)])
        return replies[0].stats if replies else None

    def ping(self) -> bool:
        return self._call([(self._frame(Op.PING), [], None)]) is not None

    def close(self) -> None:
        self._pool.close()
