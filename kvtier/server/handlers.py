"""kvtier_server's answers to the requests of authenticated connections: one handler per op.

Where it runs: the server's event-loop thread (a `Connection` calls `KvtierServer.handle` for each
decoded request, in order), over the store, which is called from that thread only.

A handler returns its reply frame and the reply's payload buffers (a GET's stored record buffers,
sent as they are, never copied). Nothing a client sends can stop the server: a handler that fails
answers ERROR and is logged (at most a line a minute per op), and a reply that cannot be encoded
(over the header limit) answers BAD_REQUEST. A malformed frame gets a BAD_REQUEST reply (`bad_frame`:
op PING, and the request id when it was readable, else 0). A GET reply carries at most HIGH_WATER
payload bytes (its first record always; the keys past the cut are answered as misses and counted in
`reply_cuts`): a connection stops decoding at HIGH_WATER queued reply bytes, so this bounds what one
connection's replies hold to about 2 x HIGH_WATER, where one GET of MAX_KEYS spilled records used to
read them all into fresh memory (1024 x the record size, past any capacity).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvtier.errors import ProtocolError
from kvtier.log_limit import LogLimiter
from kvtier.server.connection import HIGH_WATER
from kvtier.server.stats import ServerStats
from kvtier.server.store import RecordStore
from kvtier.wire.frames import Frame, Op, Status, encode, reply, short

logger = logging.getLogger(__name__)

Answer = tuple[Frame, list]  # a reply frame and its payload buffers


class Handlers:
    def __init__(self, store: RecordStore, stats: ServerStats, snapshot: Callable[[], dict[str, int]]):
        self.store = store
        self.stats = stats
        self._log = LogLimiter(logger)  # failures peers can repeat at will: a line a minute per op
        self._by_op: dict[Op, Callable[[Frame], Answer]] = {
            Op.PING: lambda f: (reply(f), []), Op.PUT: self._put, Op.GET: self._get,
            Op.EXISTS: self._exists, Op.HAS: self._has, Op.DELETE: self._delete, Op.CLEAR: self._clear,
            Op.STATS: lambda f: (reply(f, stats=snapshot()), [])}

    def handle(self, frame: Frame) -> tuple[list, bool]:
        """The reply to one decoded request of an authenticated connection, as buffers; and
        whether to close after sending it."""
        self.stats.requests[frame.op.name.lower()] += 1
        if frame.op not in self._by_op:  # a P2P op (LEASE, RELEASE, CONNECT): instances serve those
            refusal = reply(frame, Status.BAD_REQUEST, error=f"kvtier_server does not serve {frame.op.name}")
            return encode(refusal), False
        try:
            answer, payloads = self._by_op[frame.op](frame)
        except Exception as exc:  # a bug must cost this request, not the server
            self._log.error(frame.op, "%s request %d failed", frame.op.name, frame.request_id,
                            exc_info=True)
            self.stats.errors += 1
            answer, payloads = reply(frame, Status.ERROR, error=f"{type(exc).__name__}: {exc}"), []
        try:
            return encode(answer, payloads), False
        except ProtocolError as exc:  # a reply over the header limit: say so, keep the connection
            self.stats.bad_frames += 1
            return encode(reply(frame, Status.BAD_REQUEST, error=f"cannot answer: {exc}")), False

    def bad_frame(self, exc: ProtocolError) -> list:
        """The BAD_REQUEST reply to a frame that failed to decode, as buffers."""
        self.stats.bad_frames += 1
        return encode(Frame(Op.PING, exc.request_id or 0, status=Status.BAD_REQUEST, error=short(str(exc))))

    def _put(self, f: Frame) -> Answer:
        put = self.store.put
        return reply(f, flags=[put(k, h, p) for k, h, p in zip(f.keys, f.heads, f.payloads)]), []

    def _get(self, f: Frame) -> Answer:
        records, room = [], HIGH_WATER
        for i, key in enumerate(f.keys):
            size = self.store.payload_bytes(key)
            if size is not None and size > room and room < HIGH_WATER:  # (the first always goes)
                self.stats.reply_cuts += len(f.keys) - i
                records += [None] * (len(f.keys) - i)
                break
            records.append(self.store.get(key))
            room -= records[-1].payload.nbytes if records[-1] is not None else 0
        heads = [r.head if r is not None else None for r in records]
        return reply(f, heads=heads), [r.payload if r is not None else None for r in records]

    def _exists(self, f: Frame) -> Answer:
        count = 0
        while count < len(f.keys) and self.store.contains(f.keys[count]):
            count += 1
        return reply(f, count=count), []

    def _has(self, f: Frame) -> Answer:
        return reply(f, flags=[int(self.store.contains(k)) for k in f.keys]), []

    def _delete(self, f: Frame) -> Answer:
        return reply(f, count=self.store.delete(f.keys)), []

    def _clear(self, f: Frame) -> Answer:
        return reply(f, count=self.store.clear(f.namespaces)), []
