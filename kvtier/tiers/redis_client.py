"""The redis-py side of the Redis tier: the client it builds, how it packs a record, one pipelined
round trip (standalone or cluster), and what a failure means (`classify`, for `FailureGuard`).

Where it runs: on `RedisTier`'s threads; everything here is a pure function or a redis-py class
(redis-py's clients and pools are thread-safe; a pipeline object is built per round trip).

redis-py's own retries are off (`connect`), so the tier's `FailureGuard` is the only retry policy.
On a cluster, a round trip skips redis-py's one-command-at-a-time retries of a failed node (only
MOVED/ASK/TRYAGAIN are followed), so a stalled node costs the probing call one timeout, and its
failure fails the round trip like a raised error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import PipelineCommand, RedisCluster
from redis.connection import Encoder, PythonRespSerializer, parse_url
from redis.exceptions import (
    AskError,
    AuthenticationError,
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
from kvtier.errors import ConfigError
from kvtier.tiers.backoff import Failure

# What a failing medium raises: redis-py's error tree (connection, timeout, cluster down, ...) and
# RedisClusterException, which sits outside it (no reachable node, slots not covered).
UNAVAILABLE = (RedisError, RedisClusterException)
_REDIRECTS = (AskError, TryAgainError)  # MOVED is an AskError


@dataclass(frozen=True, slots=True)
class RecordValue:
    """A SET value given as its two buffers; only `_RecordPacker` knows how to send it."""

    header: bytes
    payload: memoryview


class _RecordPacker(PythonRespSerializer):
    """redis-py's RESP packer, plus `RecordValue` arguments written as one bulk string whose payload
    is a separate output buffer. redis-py takes one buffer per argument, so without this every put
    would join header and payload into a new bytes object (a 32 MiB copy for a large chunk)."""

    def __init__(self) -> None:
        # 6000: redis-py's own cut-off between joining small pieces and sending them alone.
        super().__init__(6000, Encoder("utf-8", "strict", False).encode)

    def pack(self, *args: Any) -> list:
        if not any(isinstance(arg, RecordValue) for arg in args):
            return super().pack(*args)
        out, head = [], b"*%d\r\n" % len(args)
        for arg in args:
            if isinstance(arg, RecordValue):
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


def check_url_options(url: str, connection_class: type) -> None:
    """Query options in the URL (`?socket_timeout=x`, `?foo=1`) reach redis-py's connection
    constructor only at the first call, where a bad one would raise ValueError or TypeError on
    every lookup: build one connection object now (it does not connect) to refuse them here."""
    check_url(url, ("redis", "rediss", "unix"), "redis.url")  # when not from load_config
    try:
        options = parse_url(url)
        options.pop("connection_class", None)
        connection_class(**options)
    except (TypeError, ValueError, RedisError) as exc:
        # Messages name the option, never its value (a query may hold `password=`).
        reason = str(exc).partition(": ")[0][:120]
        raise ConfigError(f"redis.url: unusable connection options in {redact_url(url)}: {reason}") from None


def connect(c: RedisConfig, connection_class: type) -> redis.Redis | RedisCluster:
    """A client for `c.url`. A cluster client reads the slot map when built (it needs a live node)."""
    # retries=0: redis-py's default retries with back-off would stall the caller for seconds on a
    # dead server; the tier's FailureGuard decides when to try again. Blocking pools: a thread
    # waits (up to timeout_s) for a free connection rather than failing with "too many
    # connections", which would look like an outage.
    common = dict(socket_timeout=c.timeout_s, socket_connect_timeout=c.timeout_s,
                  retry=Retry(NoBackoff(), 0), connection_class=connection_class,
                  max_connections=c.max_connections, timeout=c.timeout_s)
    if c.cluster:
        return RedisCluster.from_url(c.url, connection_pool_class=redis.BlockingConnectionPool, **common)
    return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(c.url, **common))


def pipeline(client: redis.Redis | RedisCluster, cluster: bool):
    return client.pipeline() if cluster else client.pipeline(transaction=False)


def wrong_type(reply: object) -> bool:
    """A per-key error reply saying the key holds a LIST, HASH, ...: bad data, not an outage."""
    return isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE")


def _refused(exc: object) -> bool:
    """An error reply from a server that is up and answering (WRONGTYPE, NOPERM, OOM, unknown
    command): that command failed, the medium did not, so it never starts the back-off. Cluster
    errors (CLUSTERDOWN, MOVED/ASK still pending, TRYAGAIN) and READONLY (a failover) are outages."""
    return isinstance(exc, ResponseError) and not isinstance(
        exc, (ClusterError, AskError, TryAgainError, ReadOnlyError))


def outage(reply: object) -> bool:
    """A pipeline reply that is a failed medium (a node timed out, refused, is down)."""
    return isinstance(reply, UNAVAILABLE) and not _refused(reply)


def classify(exc: Exception) -> Failure | None:
    """What a raised error says (for `FailureGuard`); None for what is not redis-py's (a bug)."""
    # A wrong password or user: no retry soon fixes it. A cluster client reading its slot map
    # raises it as the cause of a RedisClusterException ("cannot be connected").
    if isinstance(exc, AuthenticationError) or isinstance(exc.__cause__, AuthenticationError):
        return Failure.MISCONFIGURED
    if not isinstance(exc, UNAVAILABLE):
        return None
    return Failure.REFUSED if _refused(exc) else Failure.OUTAGE


def round_trip(client: redis.Redis | RedisCluster, cluster: bool, commands: Sequence[tuple]) -> list:
    """`commands` as one pipelined round trip; replies in order (an error reply is an exception
    object). Raises the first reply that is an outage: one failed node fails the round trip."""
    if cluster:
        replies = _cluster_round_trip(client, commands)
    else:
        pipe = pipeline(client, cluster)
        for command in commands:
            pipe.execute_command(*command)
        replies = pipe.execute(raise_on_error=False)
    down = next((reply for reply in replies if outage(reply)), None)
    if down is not None:
        raise down
    return replies


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
    failed = any(outage(reply) for reply in replies if not isinstance(reply, _REDIRECTS))
    if moved and not failed:
        again = client.pipeline()
        for i in moved:
            again.execute_command(*commands[i])
        for i, reply in zip(moved, again.execute(raise_on_error=False)):
            replies[i] = reply
    return replies
