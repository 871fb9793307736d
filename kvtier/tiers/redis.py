"""The Redis tier: chunk records in Redis or Redis Cluster, one key per chunk, pipelined batches.

    key   = key_prefix + ChunkKey.hex()   e.g. "kvtier:" + 16 hex namespace + 32 hex prefix hash
    value = the whole record (kvtier.record header + payload), so a chunk is one GET or SET

Multi-chunk calls go out as pipelines of `batch_size` commands: one round trip per batch (on a
cluster, redis-py sends each node its share of the batch and then reads all the replies). Keys
carry no `{hash tag}`, so a cluster spreads one prompt's chunks over all its slots and nodes.

Where it runs: `has` on the lookup path, `get`/`put` on the StorageManager's I/O threads; the
redis-py clients are thread-safe (a pool of connections; one pipeline object per call).

Failure handling (`kvtier.tiers.backoff.FailureGuard`): a connection error, timeout or cluster
error is a miss (has False, get None, put False) plus `errors` (one per chunk of the failed round
trip), and starts the back-off: until it expires every call answers misses at once without
touching the network, so a dead Redis costs the lookup path nothing; then one call probes, and the
first success ends the outage. One warning when Redis goes down, one info line when it is back;
refusals and dropped values, at most a line a minute each (kvtier.log_limit). A wrong password or
user (AuthenticationError) is a configuration error: one ERROR line, then one attempt per
`retry_max_s`. How a round trip is sent and what its errors mean: `kvtier.tiers.redis_client`.
An error reply from a server that answers (NOPERM from an ACL, an unknown command, OOM) is counted
but is not an outage: it never starts the back-off.

Every record read is verified (magic, version, key, length, checksum); a bad one is deleted,
counted `corrupt`, and is a miss. So is a value of another type (a LIST or HASH someone put at a
chunk key: WRONGTYPE). `has` asks STRLEN, not EXISTS, so it never promises a
value of another type or one too short to be a record, and lookup and get agree. `get` reads a
value with GETRANGE only as far as a record fitting the caller's buffer could go (plus one byte),
so a huge string at a chunk key costs a slab, not its size. Query options in the URL are checked
when the tier is built (ConfigError), not at the first call.

Pins cannot be honoured: Redis evicts by its own policy (`maxmemory-policy`) and expires by TTL,
and other processes share the keys. Copies: a put sends header and payload straight from their
buffers (see `redis_client._RecordPacker`); a get receives each value as one bytes object (redis-py's parser
allocates it) and copies the payload once into the caller's slab after verifying it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import redis
import torch
from redis.cluster import RedisCluster

from kvtier.config import RedisConfig
from kvtier.config_values import redact_url
from kvtier.errors import ConfigError, CorruptRecord
from kvtier.keys import DIGEST_BYTES, ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.record import HEADER_SIZE, RecordHeader, decode_header, tensor_bytes, verify
from kvtier.tiers.backoff import Backoff, FailureGuard
from kvtier.tiers.base import PutItem, TierUsage
from kvtier.tiers.redis_client import (
    CONNECTION_CLASSES,
    RecordValue,
    check_url_options,
    classify,
    connect,
    pipeline,
    round_trip,
    wrong_type,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
_SCAN_COUNT = 1000  # keys per SCAN step and per UNLINK in clear()
_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


class RedisTier:
    name = "redis"
    writable = True
    fans_out = False
    local = False

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
        check_url_options(config.url, self._connection_class)
        self._client: redis.Redis | RedisCluster | None = None
        self._client_lock = threading.Lock()
        self._log = LogLimiter(logger)  # refusals and bad values can come once per call or record
        self._guard = FailureGuard(f"redis tier: {self.where}",
                                   Backoff(config.retry_after_s, config.retry_max_s),
                                   lambda n: metrics.tier_inc(self.name, "errors", n), self._log, classify)

    @property
    def backoff(self) -> Backoff:
        return self._guard.backoff

    @backoff.setter
    def backoff(self, backoff: Backoff) -> None:  # (tests swap in one with a fake clock)
        self._guard.backoff = backoff

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
                self._client = connect(self.config, self._connection_class)
            return self._client

    def _run(self, chunks: int, fn: Callable[[Any], T]) -> T | None:
        """`fn(client)` unless backing off; None when skipped or failed (counted as `chunks` errors)."""
        return self._guard.call(chunks, lambda: fn(self._connect()))

    def _pipelined(self, commands: Sequence[tuple], chunks: int | None = None) -> list | None:
        """Send `commands` (for `chunks` chunks: one per command unless given) as one pipeline;
        replies in order (an error reply is an exception object)."""
        return self._run(len(commands) if chunks is None else chunks,
                         lambda client: round_trip(client, self.config.cluster, commands))

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
                if wrong_type(value):
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
            replies = self._pipelined([("SET", self._rkey(item.key), RecordValue(item.header, payload),
                                        *expiry) for item, payload in zip(part, payloads)])
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
            pipe = pipeline(client, self.config.cluster)
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
