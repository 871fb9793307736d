"""The remote tier: a client of `kvtier_server` (`kvtier://host:port`), following `Tier`.

Where it runs: on the StorageManager's I/O threads, and `has` on the lookup path; thread-safe (the
connection pool and the guard are). Each Tier method is one call of `kvtier.tiers.remote_client`
(connections, pool, pipelining, deadlines): its batch split into frames of at most BATCH_BYTES of
payload and MAX_KEYS keys, all sent on one connection before the replies are read.

Every record read is verified (header, key, length, checksum) before it is reported; a bad one is
a miss, a `corrupt` count and a DELETE on the server.

Failure: a connection error, a timeout, a malformed, mismatched or oversized reply, or an error
status costs the call (misses / False / 0), an `errors` count per chunk of the call and the pool's
idle connections, and starts a back-off (`kvtier.tiers.backoff.FailureGuard`: `retry_after_s`
doubling to `retry_max_s`) during which calls answer at once without touching the network. The
first call after the delay probes the server; when it succeeds the tier is back. A server that
refuses this client's HELLO (UNAUTHORIZED: the token; BAD_REQUEST: the protocol version) is a
configuration error, not an outage: one ERROR line, and the tier misses without a round trip,
asking again once per `retry_max_s`. A BAD_REQUEST to one request (a frame over the server's
max_frame_bytes) costs that call and its `errors`, with a warning at most once a minute: the
server is up, so the tier's other requests go on. Nothing raises out of the Tier methods.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

import torch

from kvtier.config import RemoteConfig
from kvtier.config_values import hide_url_secrets, redact_url
from kvtier.errors import ConfigError, CorruptRecord, KvtierError
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.record import RecordHeader, tensor_bytes, verify
from kvtier.tiers.backoff import Backoff, Failure, FailureGuard
from kvtier.tiers.base import PutItem, TierUsage
from kvtier.tiers.remote_client import Client, GetSink, Refused, Request, RequestRefused
from kvtier.wire.frames import MAX_KEYS, Frame, Op, PutResult

logger = logging.getLogger(__name__)

BATCH_BYTES = 64 << 20  # payload bytes per frame (a larger record goes alone); keys: MAX_KEYS


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


def _classify(exc: Exception) -> Failure:
    if isinstance(exc, Refused):
        return Failure.MISCONFIGURED
    if isinstance(exc, RequestRefused):  # one request's shape: the server is up for the others
        return Failure.REFUSED
    return Failure.OUTAGE if isinstance(exc, (OSError, KvtierError)) else Failure.BUG


class RemoteTier:
    name = "remote"
    writable = True
    fans_out = False
    local = False

    def __init__(self, config: RemoteConfig, namespace: bytes, metrics: Metrics):
        self.config = config
        self.namespace = namespace
        self.host, self.port = parse_url(config.url)
        self._metrics = metrics
        self._log = LogLimiter(logger)  # a full or misbehaving server can fail every call
        self._client = Client(self.host, self.port, config.timeout_s, config.token, config.connections)
        self._guard = FailureGuard(f"remote tier {hide_url_secrets(config.url)}",
                                   Backoff(config.retry_after_s, config.retry_max_s),
                                   lambda n: metrics.tier_inc(self.name, "errors", n), self._log, _classify)
        self._ids = itertools.count(1)
        self._usage = TierUsage(0, 0, 0)

    def _frame(self, op: Op, **fields) -> Frame:
        return Frame(op, next(self._ids), **fields)

    def _call(self, requests: list[Request]) -> list[Frame] | None:
        """The replies to `requests` (one pipelined call), or None (counted, backing off) when the
        server cannot answer them all."""
        chunks = sum(len(r.frame.keys) for r in requests)
        return self._guard.call(chunks, lambda: self._client.call(requests, self._guard.superseded))

    # -- Tier protocol -------------------------------------------------------------------------

    def has(self, keys: Sequence[ChunkKey]) -> list[bool]:
        keys = list(keys)
        if not keys:
            return []
        groups = _batches([0] * len(keys))
        replies = self._call([Request(self._frame(Op.HAS, keys=[keys[i] for i in g])) for g in groups])
        if replies is None:
            return [False] * len(keys)
        return [bool(flag) for r in replies for flag in r.flags]

    def get(self, keys: Sequence[ChunkKey], dests: Sequence[torch.Tensor]) -> list[RecordHeader | None]:
        keys = list(keys)
        if len(keys) != len(dests):
            raise ValueError(f"{len(keys)} keys but {len(dests)} destinations")
        if not keys:
            return []
        sinks = [GetSink(g, dests) for g in _batches([tensor_bytes(d).nbytes for d in dests])]
        replies = self._call([Request(self._frame(Op.GET, keys=[keys[i] for i in s.indices]), sink=s)
                               for s in sinks])
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
        payloads = [tensor_bytes(item.payload) for item in items]  # torch or numpy: the Tier contract
        requests = []
        for g in _batches([p.nbytes for p in payloads]):
            frame = self._frame(Op.PUT, keys=[items[i].key for i in g], heads=[items[i].header for i in g])
            requests.append(Request(frame, [payloads[i] for i in g]))
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
                               sum(p.nbytes for p, ok in zip(payloads, stored) if ok))
        return stored

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        keys = list(keys)
        if not keys:
            return 0
        groups = _batches([0] * len(keys))
        replies = self._call([Request(self._frame(Op.DELETE, keys=[keys[i] for i in g])) for g in groups])
        return sum(r.count or 0 for r in replies) if replies else 0

    def clear(self) -> None:
        """Remove every record of this tier's namespace from the server (other namespaces stay)."""
        self._call([Request(self._frame(Op.CLEAR, namespaces=[self.namespace]))])

    def usage(self) -> TierUsage:
        """The server's occupancy (memory plus spill; all namespaces), from STATS; the last known
        numbers while the server cannot be reached."""
        replies = self._call([Request(self._frame(Op.STATS))])
        if replies:
            s = replies[0].stats or {}
            self._usage = TierUsage(s.get("records", 0) + s.get("spill_records", 0),
                                    s.get("bytes", 0) + s.get("spill_bytes", 0),
                                    s.get("capacity", 0) + s.get("spill_capacity", 0))
        return self._usage

    def stats(self) -> dict[str, int] | None:
        """The server's STATS counters, or None when it cannot be reached."""
        replies = self._call([Request(self._frame(Op.STATS))])
        return replies[0].stats if replies else None

    def ping(self) -> bool:
        return self._call([Request(self._frame(Op.PING))]) is not None

    def close(self) -> None:
        self._client.close()
