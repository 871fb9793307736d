"""The Redis tier: chunk records in Redis or Redis Cluster, one key per chunk, pipelined batches.

    key   = key_prefix + ChunkKey.hex()   e.g. "kvtier:" + 16 hex namespace + 32 hex prefix hash
    value = the whole record (kvtier.record header + payload), so a chunk is one GET or SET

Multi-chunk calls go out as pipelines of `batch_size` commands: one round trip per batch (on a
cluster, redis-py sends each node its share of the batch and then reads all the replies). Keys
carry no `{hash tag}`, so a cluster spreads one prompt's chunks over all its slots and nodes.

Where it runs: `has` on the lookup path, `get`/`put` on the StorageManager's I/O threads; the
redis-py clients are thread-safe (a pool of connections; one pipeline object per call).

Failure handling: a connection error, timeout or cluster error is a miss (has False, get None,
put False) plus `errors` (one per chunk of the failed round trip), and starts a `Backoff`: until
it expires every call answers misses at once without touching the network, so a dead Redis costs
the lookup path nothing; then one call probes, and the first success ends the outage. redis-py's
own retries are off, so this is the only retry policy. One warning when Redis goes down, one info
line when it is back; refusals and dropped values, at most a line a minute each (kvtier.log_limit).
On a cluster, a round trip skips redis-py's one-command-at-a-time retries of
a failed node (only MOVED/ASK are followed), so a stalled node costs the probing call one timeout,
and its failure fails the round trip like a raised error. An error reply from a server that
answers (NOPERM from an ACL, an unknown command, OOM) is counted but is not an outage: it never
starts the Backoff. Every record read is verified (magic, version, key, length, checksum); a bad
one is deleted, counted `corrupt`, and is a miss. So is a value of another type (a LIST or HASH
someone put at a chunk key: WRONGTYPE). `has` asks STRLEN, not EXISTS, so it never promises a
value of another type or one too short to be a record, and lookup and get agree. `get` reads a
value with GETRANGE only as far as a record fitting the caller's buffer could go (plus one byte),
so a huge string at a chunk key costs a slab, not its size. Query options in the URL are checked
when the tier is built (ConfigError), not at the first call.

Pins cannot be honoured: Redis evicts by its own policy (`maxmemory-policy`) and expires by TTL,
and other processes share the keys. Copies: a put sends header and payload straight from their
buffers (see `_RecordPacker`); a get receives each value as one bytes object (redis-py's parser
allocates it) and copies the payload once into the caller's slab after verifying it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import redis
import torch
from redis.backoff import NoBackoff
from redis.cluster import PipelineCommand, RedisCluster
from redis.connection import Encoder, PythonRespSerializer, parse_url
from redis.exceptions import (
    AskError,
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry

from kvtier.config import RedisConfig
from kvtier.config_values import check_url, redact_url
from kvtier.errors import ConfigError, CorruptRecord
from kvtier.keys import DIGEST_BYTES, ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.record import HEADER_SIZE, RecordHeader, decode_header, tensor_bytes, verify
from kvtier.tiers.backoff import Backoff
from kvtier.tiers.base import PutItem, TierUsage

logger = logging.getLogger(__name__)

T = TypeVar("T")
# What a failing medium raises: redis-py's error tree (connection, timeout, cluster down, ...) and
# RedisClusterException, which sits outside it (no reachable node, slots not covered).
_UNAVAILABLE = (RedisError, RedisClusterException)
_SCAN_COUNT = 1000  # keys per SCAN step and per UNLINK in clear()
_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True, slots=True)
class _Record:
    """A SET value given as its two buffers; only `_RecordPacker` knows how to send it."""

    header: bytes
    payload: memoryview


class _RecordPacker(PythonRespSerializer):
    """redis-py's RESP packer, plus `_Record` arguments written as one bulk string whose payload is
    a separate output buffer. redis-py takes one buffer per argument, so without this every put
    would join header and payload into a new bytes object (a 32 MiB copy for a large chunk)."""

    def __init__(self) -> None:
        # 6000: redis-py's own cut-off between joining small pieces and sending them alone.
        super().__init__(6000, Encoder("utf-8", "strict", False).encode)

    def pack(self, *args: Any) -> list:
        if not any(isinstance(arg, _Record) for arg in args):
            return super().pack(*args)
        out, head = [], b"*%d\r\n" % len(args)
        for arg in args:
            if isinstance(arg, _Record):
                # The payload is a memoryview: pack_commands and sendall pass it through uncopied.
                size = len(arg.header) + arg.payload.nbytes
                out += [b"%b$%d\r\n%b" % (head, size, arg.header), arg.payload]
                head = b"\r\n"
            else:
                value = self.encode(arg)
                head = b"%b$%d\r\n%b\r\n" % (head, len(value), value)
        out.append(head)
        return out


def _with_record_packer(base: type) -> type:
    class RecordConnection(base):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(command_packer=_RecordPacker(), **kwargs)

    RecordConnection.__name__ = f"Record{base.__name__}"
    return RecordConnection


# One connection class per URL scheme, as redis-py picks them.
CONNECTION_CLASSES = {"redis": _with_record_packer(redis.Connection),
                      "rediss": _with_record_packer(redis.SSLConnection),
                      "unix": _with_record_packer(redis.UnixDomainSocketConnection)}


def _wrong_type(reply: object) -> bool:
    """A per-key error reply saying the key holds a LIST, HASH, ...: bad data, not an outage."""
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def _refused(exc: object) -> bool:
    """An error reply from a server that is up and answering (WRONGTYPE, NOPERM, OOM, unknown
    command): that command failed, the medium did not, so it never starts the Backoff. Cluster
    errors (CLUSTERDOWN, MOVED/ASK still pending, TRYAGAIN) and READONLY (a failover) are outages."""
    return isinstance(exc, ResponseError) and not isinstance(
        exc, (ClusterError, AskError, TryAgainError, ReadOnlyError))


_REDIRECTS = (AskError, TryAgainError)  # MOVED is an AskError


def _cluster_round_trip(client: RedisCluster, commands: Sequence[tuple]) -> list:
    """One pipelined round trip over a cluster's nodes; a node's failure comes back as reply objects.

    redis-py's cluster pipeline would send each command of a failed node again, one at a time, at
    a timeout each (2.3 s for the 10 keys of a stalled node at timeout_s=0.2), and hand the failures
    back as replies, so the call neither raised nor ended early. Sent without following
    redirections, a stalled node costs one timeout; only MOVED/ASK/TRYAGAIN replies (slots being
    moved) are sent again the usual way, which follows them and refreshes the slot map."""
    stack = [PipelineCommand(args, {}, i) for i, args in enumerate(commands)]
    replies = client.pipeline().send_cluster_commands(stack, raise_on_error=False, allow_redirections=False)
    moved = [i for i, reply in enumerate(replies) if isinstance(reply, _REDIRECTS)]
    failed = any(_outage(reply) for reply in replies if not isinstance(reply, _REDIRECTS))
    if moved and not failed:
        again = client.pipeline()
        for i in moved:
            again.execute_command(*commands[i])
        for i, reply in zip(moved, again.execute(raise_on_error=False)):
            replies[i] = reply
    return replies


def _outage(reply: object) -> bool:
    """A pipeline reply that is a failed medium (a node timed out, refused, is down)."""
    return isinstance(reply, _UNAVAILABLE) and not _refused(reply)


class RedisTier:
    name = "redis"

    def __init__(self, config: RedisConfig, namespace: bytes, metrics: Metrics):
        self.config = config
        self.namespace = namespace
        self._prefix = config.key_prefix
        self._metrics = metrics
        self._ex = config.ttl_s  # None: no expiry
        parts = urlsplit(config.url)
        self._connection_class = CONNECTION_CLASSES.get(parts.scheme)
        if self._connection_class is None:
            raise ConfigError(
                f"redis.url: scheme must be redis, rediss or unix, got {redact_url(config.url)}")
        self.where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
        self._check_url_options()
        self.backoff = Backoff(config.retry_after_s, config.retry_max_s)
        self._client: redis.Redis | RedisCluster | None = None
        self._client_lock = threading.Lock()
        self._log = LogLimiter(logger)  # refusals and bad values can come once per call or record

    def _check_url_options(self) -> None:
        """Query options in the URL (`?socket_timeout=x`, `?foo=1`) reach redis-py's connection
        constructor only at the first call, where a bad one would raise ValueError or TypeError on
        every lookup: build one connection object now (it does not connect) to refuse them here."""
        check_url(self.config.url, ("redis", "rediss", "unix"), "redis.url")  # when not from load_config
        try:
            options = parse_url(self.config.url)
            options.pop("connection_class", None)
            self._connection_class(**options)
        except (TypeError, ValueError, RedisError) as exc:
            # Messages name the option, never its value (a query may hold `password=`).
            reason = str(exc).partition(": ")[0][:120]
            raise ConfigError(f"redis.url: unusable connection options in {redact_url(self.config.url)}: "
                              f"{reason}") from None

    def _rkey(self, key: ChunkKey) -> str:
        return self._prefix + key.hex()

    # -- the guarded round trip ----------------------------------------------------------------

    def _connect(self) -> redis.Redis | RedisCluster:
        """The client, built on first use: a cluster client reads the slot map when built, which
        needs a live node, and a tier must be constructible while Redis is down."""
        if self._client is not None:
            return self._client
        with self._client_lock:
            if self._client is None:
                c = self.config
                # retries=0: redis-py's default retries with back-off would stall the caller for
                # seconds on a dead server; the tier's Backoff decides when to try again.
                # Blocking pools: a thread waits (up to timeout_s) for a free connection rather
                # than failing with "too many connections", which would look like an outage.
                common = dict(socket_timeout=c.timeout_s, socket_connect_timeout=c.timeout_s,
                              retry=Retry(NoBackoff(), 0), connection_class=self._connection_class,
                              max_connections=c.max_connections, timeout=c.timeout_s)
                if c.cluster:
                    self._client = RedisCluster.from_url(
                        c.url, connection_pool_class=redis.BlockingConnectionPool, **common)
                else:
                    pool = redis.BlockingConnectionPool.from_url(c.url, **common)
                    self._client = redis.Redis(connection_pool=pool)
            return self._client

    def _run(self, chunks: int, fn: Callable[[Any], T]) -> T | None:
        """`fn(client)` unless backing off; None when skipped or failed (counted as `chunks` errors)."""
        if not self.backoff.ready():
            return None
        try:
            result = fn(self._connect())
        except _UNAVAILABLE as exc:
            self._metrics.tier_inc(self.name, "errors", chunks)
            if _refused(exc):  # e.g. an ACL without INFO: usage() must not switch the tier off
                self._log.warning("refused", "redis tier: %s refused a command (%s: %s)",
                                  self.where, type(exc).__name__, exc)
                self.backoff.succeeded()  # a probe that got an answer: the server is up
                return None
            if self.backoff.failed():
                logger.warning("redis tier: %s unavailable (%s: %s); serving misses, retrying after %g s",
                               self.where, type(exc).__name__, exc, self.backoff.initial_s)
            return None
        if self.backoff.succeeded():
            logger.info("redis tier: %s is back", self.where)
        return result

    def _pipeline(self, client):
        return client.pipeline() if self.config.cluster else client.pipeline(transaction=False)

    def _pipelined(self, commands: Sequence[tuple], chunks: int | None = None) -> list | None:
        """Send `commands` (for `chunks` chunks: one per command unless given) as one pipeline;
        replies in order (an error reply is an exception object)."""
        def send(client):
            if self.config.cluster:
                replies = _cluster_round_trip(client, commands)
            else:
                pipe = self._pipeline(client)
                for command in commands:
                    pipe.execute_command(*command)
                replies = pipe.execute(raise_on_error=False)
            down = next((reply for reply in replies if _outage(reply)), None)
            if down is not None:  # one node of the round trip failed: the call is an outage
                raise down
            return replies

        return self._run(len(commands) if chunks is None else chunks, send)

    def _batches(self, n: int) -> range:
        return range(0, n, self.config.batch_size)

    # -- Tier protocol -------------------------------------------------------------------------

    def has(self, keys: Sequence[ChunkKey]) -> list[bool]:
        found = [False] * len(keys)
        for start in self._batches(len(keys)):
            part = keys[start:start + self.config.batch_size]
            # STRLEN: 0 for a missing key, a WRONGTYPE error reply for a LIST/HASH/..., and the
            # length that tells a record (header + at least one payload byte) from a stub.
            replies = self._pipelined([("STRLEN", self._rkey(k)) for k in part])
            if replies is not None:
                found[start:start + len(part)] = [isinstance(reply, int) and reply > HEADER_SIZE
                                                    for reply in replies]
        return found

    def get(self, keys: Sequence[ChunkKey],
            dests: Sequence[torch.Tensor | np.ndarray]) -> list[RecordHeader | None]:
        if len(keys) != len(dests):
            raise ValueError(f"{len(keys)} keys but {len(dests)} destination buffers")
        # The Tier contract allows tensors and numpy arrays (`dest.numel()` failed on the latter).
        dests = [tensor_bytes(d) for d in dests]
        headers: list[RecordHeader | None] = [None] * len(keys)
        corrupt: list[ChunkKey] = []
        errors = 0
        for start in self._batches(len(keys)):
            part = keys[start:start + self.config.batch_size]
            # GETRANGE, not GET: a value is read only as far as a record could fit the buffer (one
            # byte more, so a longer value shows as a length mismatch), so a 512 MiB string at a
            # chunk key costs a slab's worth of memory, not 512 MiB per key of the batch. EXISTS
            # tells a missing key (a miss) from an empty string (GETRANGE answers "" for both).
            commands = []
            for k, dest in zip(part, dests[start:start + len(part)]):
                name = self._rkey(k)
                commands += [("EXISTS", name), ("GETRANGE", name, 0, HEADER_SIZE + dest.nbytes)]
            replies = self._pipelined(commands, len(part)) or ()
            values = [value if exists else None for exists, value in zip(replies[::2], replies[1::2])]
            for i, value in enumerate(values):
                if _wrong_type(value):
                    self._log.warning("wrong type", "redis tier: dropping %s: not a string value",
                                      self._rkey(part[i]))
                    corrupt.append(part[i])
                elif isinstance(value, Exception):
                    errors += 1
                elif value is not None:
                    headers[start + i] = self._accept(part[i], value, dests[start + i], corrupt)
        self._metrics.tier_inc(self.name, "errors", errors)
        self._metrics.tier_inc(self.name, "bytes_read", sum(h.payload_len for h in headers if h is not None))
        if corrupt:
            # Best effort: a concurrent good SET of the same key between our GET and this UNLINK is
            # lost too, which costs a recompute, never wrong KV.
            self._metrics.tier_inc(self.name, "corrupt", len(corrupt))
            self.remove(corrupt)
        return headers

    def _accept(self, key: ChunkKey, value: bytes, dest: memoryview,
                corrupt: list[ChunkKey]) -> RecordHeader | None:
        """Verify one fetched record and copy its payload into `dest`; None (and noted) if bad."""
        view = memoryview(value)
        try:
            header = decode_header(view)
            if header.payload_len > dest.nbytes:  # not a chunk of this namespace's geometry
                raise CorruptRecord(f"record {key} has {header.payload_len} payload bytes, "
                                    f"more than the {dest.nbytes}-byte buffer")
            payload = view[HEADER_SIZE:]
            verify(view[:HEADER_SIZE], payload, key, header)
        except CorruptRecord as exc:
            self._log.warning("corrupt", "redis tier: dropping corrupt record: %s", exc)
            corrupt.append(key)
            return None
        dest[:header.payload_len] = payload  # the one copy, after verifying
        return header

    def put(self, items: Sequence[PutItem]) -> list[bool]:
        stored = [False] * len(items)
        errors = written = 0
        expiry = ("EX", self._ex) if self._ex is not None else ()
        for start in self._batches(len(items)):
            part = items[start:start + self.config.batch_size]
            payloads = [tensor_bytes(item.payload) for item in part]  # tensor or numpy: see PutItem
            replies = self._pipelined([("SET", self._rkey(item.key), _Record(item.header, payload), *expiry)
                                       for item, payload in zip(part, payloads)])
            for i, reply in enumerate(replies or ()):
                ok = reply is True or reply == b"OK"
                stored[start + i] = ok
                errors += not ok
                written += payloads[i].nbytes if ok else 0
        self._metrics.tier_inc(self.name, "errors", errors)
        self._metrics.tier_inc(self.name, "bytes_written", written)
        return stored

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        removed = 0
        for start in self._batches(len(keys)):
            part = keys[start:start + self.config.batch_size]
            replies = self._pipelined([("UNLINK", self._rkey(k)) for k in part])
            removed += sum(reply for reply in replies or () if isinstance(reply, int))
        return removed

    def clear(self) -> None:
        """Delete this namespace's keys (SCAN + UNLINK; on a cluster, over every primary). Other
        namespaces sharing the server are untouched. Best effort while Redis is down."""
        # Exactly a chunk key: prefix, namespace, then the digest's hex digits and nothing more. With
        # a trailing "*", another tool's "kvtier:<ns>:meta", or the keys of a tier whose key_prefix
        # is this prefix plus hex digits, were deleted too.
        digest = "[0-9a-f]" * 2 * DIGEST_BYTES
        pattern = _GLOB_SPECIALS.sub(r"\\\1", self._prefix + self.namespace.hex()) + digest

        def scan_and_unlink(client) -> None:
            # One pipeline of UNLINKs per SCAN step: a cluster client's multi-key UNLINK would
            # cost a round trip per hash slot.
            pipe = self._pipeline(client)
            for n, name in enumerate(client.scan_iter(match=pattern, count=_SCAN_COUNT), 1):
                pipe.execute_command("UNLINK", name)
                if n % _SCAN_COUNT == 0:
                    pipe.execute()
            pipe.execute()

        self._run(1, scan_and_unlink)

    def usage(self) -> TierUsage:
        """What Redis can tell in one cheap round trip per node (counting this namespace's chunks
        would need a full SCAN): `chunks` = keys in the database (every namespace and any other
        user's keys), `bytes` = Redis's used_memory, `capacity_bytes` = its maxmemory (0: none
        set), summed over a cluster's primaries. All zero while Redis is unreachable."""
        def ask(client) -> TierUsage:
            if self.config.cluster:
                # One INFO per primary: {node: info}, or the info itself for a one-node cluster.
                replies = client.info("memory", "keyspace", target_nodes=RedisCluster.PRIMARIES)
                infos, db = (list(replies.values()) if "used_memory" not in replies else [replies]), "db0"
            else:
                infos = [client.info("memory", "keyspace")]
                db = f"db{client.connection_pool.connection_kwargs.get('db', 0)}"
            return TierUsage(sum(info.get(db, {}).get("keys", 0) for info in infos),
                             sum(info["used_memory"] for info in infos),
                             sum(info["maxmemory"] for info in infos))

        return self._run(1, ask) or TierUsage(0, 0, 0)

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if isinstance(client, RedisCluster):
            client.close()
        elif client is not None:
            client.connection_pool.disconnect()
