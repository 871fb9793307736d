"""The controller's state in Redis or Redis Cluster, shared by every controller pointed at it, so
several controllers behind one address answer the same (no replication of our own).

    <prefix>session              the session string (SET NX: a Redis that comes back empty gets a
                                 new one, and every instance is told to register again)
    <prefix>instances            set of registered instance ids
    <prefix>{<id>}:meta / :index  one instance: its record, and its chunk keys -> tier masks
                                 (kvtier.controller.redis_scripts; one hash tag, one cluster slot)

Per-instance index hashes, as in `MemoryState`: a reset or a sweep is one UNLINK, and `holders`
is one HMGET per instance and 8192 keys (HMGET_KEYS), all in one pipelined round trip; on a cluster the
instances' hashes spread over the nodes and redis-py sends each node its share. Everything that
reads and then writes an instance's keys runs as one Lua script, atomic against other controllers.

Time: `now` must be wall-clock seconds (`time.time()`): heartbeats written by one controller are
judged by another, so the controllers' clocks must agree (NTP); a skew of s seconds moves the
heartbeat timeout by s. `holders` takes no `now`: it reads the instances that were up at the last
`instances` or `sweep` call (`fleet_lookup` calls `instances(now)` just before it).

Values someone else wrote under the prefix (wrong types, unparsable numbers or JSON) read as absent
(kvtier.controller.redis_records, and the scripts' own checks); the sweep forgets such a record and
its instance registers again. One tampered instance never fails the answers about the others.

Failures: every call is one or a few round trips under a `kvtier.tiers.backoff.FailureGuard`;
a connection error, timeout or cluster error raises StateUnavailable (the app's 503) after at most
one `timeout_s` per round trip, and while backing off raises at once; the first success after an
outage ends it. Messages show the URL without credentials. The Redis must not evict keys
(`maxmemory-policy noeviction`): an evicted index hash would silently lose an instance's keys.

Where it runs: the controller's request threads and its sweeper; redis-py's clients are
thread-safe (a pool of connections, a pipeline per round trip).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import redis
from redis.cluster import RedisCluster

from kvtier.config import RedisConfig
from kvtier.config_values import hide_url_secrets
from kvtier.controller import redis_scripts as lua
from kvtier.controller.memory_state import FORGET_AFTER_S, tier_bits
from kvtier.controller.redis_records import held, joined, record
from kvtier.controller.state import InstanceRecord, StateUnavailable, UnknownInstance
from kvtier.errors import ConfigError
from kvtier.fleet.messages import EventsReply, KeyEvent, Registration, TierUsage
from kvtier.log_limit import LogLimiter
from kvtier.tiers.backoff import Backoff, Failure, FailureGuard
from kvtier.tiers.redis_client import CONNECTION_CLASSES, check_url_options, classify, connect, round_trip

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 0.2  # back-off after a failed round trip, doubling up to RETRY_MAX_S
RETRY_MAX_S = 2.0
MAX_CONNECTIONS = 64
HMGET_KEYS = 8192  # keys per HMGET in holders
KEYS_PER_SCRIPT = 2048  # keys per EVAL of an event: a script blocks Redis while it runs
_READS = frozenset({"HGETALL", "HLEN", "HMGET"})  # commands whose refusal is a value, not an outage


def _usage_json(tiers: Sequence[TierUsage]) -> str:
    return json.dumps([t.model_dump() for t in tiers])


class RedisState:
    in_process = False  # FleetState: every call is a round trip

    def __init__(self, url: str, cluster: bool, timeout_s: float, heartbeat_timeout_s: float,
                 key_prefix: str = "kvtier:ctl:", forget_after_s: float = FORGET_AFTER_S,
                 clock: Callable[[], float] = time.monotonic):
        self._connection_class = CONNECTION_CLASSES.get(urlsplit(url).scheme)
        if self._connection_class is None:
            raise ConfigError(f"index: scheme must be redis, rediss or unix, got {hide_url_secrets(url)}")
        check_url_options(url, self._connection_class)
        # More connections than a tier's default: FastAPI runs up to 40 request threads at once.
        self._config = RedisConfig(url=url, cluster=cluster, timeout_s=timeout_s, key_prefix=key_prefix,
                                   max_connections=MAX_CONNECTIONS)
        self.where = hide_url_secrets(url)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.forget_after_s = max(forget_after_s, heartbeat_timeout_s)
        self._prefix = key_prefix
        self._client: redis.Redis | RedisCluster | None = None
        self._client_lock = threading.Lock()
        self._session: str | None = None
        self._up_ids: tuple[str, ...] | None = None  # up at the last instances(): for holders
        self._latest: float | None = None  # the latest `now` given
        self._last_error = "no answer yet"
        self._guard = FailureGuard(f"controller index in Redis at {self.where}",
                                   Backoff(RETRY_AFTER_S, RETRY_MAX_S, clock), lambda n: None,
                                   LogLimiter(logger), self._classify, meanwhile="answering 503")

    # -- round trips ---------------------------------------------------------------------------

    def _connect(self) -> redis.Redis | RedisCluster:
        # Built on first use: a cluster client reads the slot map when built, and a controller
        # must start (and answer 503) while Redis is down.
        with self._client_lock:
            if self._client is None:
                self._client = connect(self._config, self._connection_class)
            return self._client

    def _classify(self, exc: Exception) -> Failure | None:
        self._last_error = hide_url_secrets(f"{type(exc).__name__}: {exc}")[:300]
        return classify(exc)

    def _run(self, commands: Sequence[tuple]) -> list:
        """`commands` in one pipelined round trip, or StateUnavailable. A read Redis refused (WRONGTYPE:
        a key someone else wrote) is its reply, as an exception object, for redis_records to ignore."""
        if not commands:
            return []
        replies = self._guard.call(len(commands), lambda: round_trip(
            self._connect(), self._config.cluster, commands))
        if replies is None:
            raise StateUnavailable(f"the controller's index in Redis at {self.where} is unavailable "
                                   f"({self._last_error}); retry later")
        refused = next((r for r, c in zip(replies, commands)
                        if isinstance(r, Exception) and c[0] not in _READS), None)
        if refused is not None:
            raise StateUnavailable(f"the controller's index in Redis at {self.where} refused a command: "
                                   f"{hide_url_secrets(str(refused))[:300]}")
        return replies

    def _seen(self, now: float) -> None:
        self._latest = now if self._latest is None else max(self._latest, now)

    def _meta(self, instance_id: str) -> str:
        return f"{self._prefix}{{{instance_id}}}:meta"

    def _index(self, instance_id: str) -> str:
        return f"{self._prefix}{{{instance_id}}}:index"

    def _live_args(self, instance_id: str, session: str, now: float) -> tuple:
        self._seen(now)
        return (self._meta(instance_id), self._index(instance_id), session, repr(now),
                repr(self.heartbeat_timeout_s))

    # -- FleetState ----------------------------------------------------------------------------

    @property
    def session(self) -> str:
        if self._session is None:
            self._refresh_session()
        return self._session

    def _refresh_session(self) -> str:
        key = self._prefix + "session"
        _, current = self._run([("SET", key, uuid.uuid4().hex, "NX"), ("GET", key)])
        if current is None:  # deleted between the two commands (a FLUSHALL)
            raise StateUnavailable(f"the controller's index in Redis at {self.where} lost its session")
        self._session = current.decode()
        return self._session

    def register(self, registration: Registration, now: float) -> None:
        session = self._refresh_session()
        fields = ["reg", registration.model_dump_json(), "session", session, "hb", repr(now),
                  "usage", _usage_json(registration.tiers)]
        bits = tier_bits(registration)
        for name, bit in [*bits.items(), ("", sum(bits.values()))]:
            fields += [f"tier:{name}", bit]
        rid = registration.instance_id
        self._seen(now)
        self._up_ids = None  # holders asks again: a new instance is up
        self._run([("EVAL", lua.REGISTER, 2, self._meta(rid), self._index(rid), *fields),
                   ("SADD", self._prefix + "instances", rid)])

    def heartbeat(self, instance_id: str, session: str, tiers: list[TierUsage], now: float) -> bool:
        meta, _, *live = self._live_args(instance_id, session, now)
        # SADD heals the id set should a sweep have dropped it while the instance re-registered.
        known, _ = self._run([("EVAL", lua.HEARTBEAT, 1, meta, *live, _usage_json(tiers)),
                              ("SADD", self._prefix + "instances", instance_id)])
        return known == 1

    def apply(self, instance_id: str, session: str, seq: int, events: list[KeyEvent],
              now: float) -> EventsReply:
        args = self._live_args(instance_id, session, now)
        commands: list[tuple] = [("EVAL", lua.SEQUENCE, 1, args[0], *args[2:], seq)]
        for event in events:
            keys = [bytes.fromhex(h) for h in event.keys]
            head = ("EVAL", lua.EVENTS, 2, *args, event.op, event.tier or "")
            if event.op in ("reset", "cleared"):
                commands.append(head)
            for start in range(0, len(keys), KEYS_PER_SCRIPT):
                commands.append((*head, *keys[start:start + KEYS_PER_SCRIPT]))
        last, *_ = self._run(commands)
        if last == -1:
            return EventsReply(known=False)
        return EventsReply(known=True, resync=last != b"" and int(last) + 1 != seq)

    def _records(self, ids: Sequence[str], now: float) -> tuple[list[InstanceRecord], dict[str, object]]:
        """The records of `ids` that are there, and the raw meta of those that cannot be read."""
        commands = []
        for instance_id in ids:
            commands += [("HGETALL", self._meta(instance_id)), ("HLEN", self._index(instance_id))]
        replies = self._run(commands)
        records, unreadable = [], {}
        for instance_id, meta, count in zip(ids, replies[::2], replies[1::2]):
            if meta == {}:  # forgotten meanwhile
                continue
            found = record(instance_id, meta, count, now, self.heartbeat_timeout_s)
            if found is None:
                unreadable[instance_id] = meta
            else:
                records.append(found)
        return records, unreadable

    def _ids(self) -> list[str]:
        [ids] = self._run([("SMEMBERS", self._prefix + "instances")])
        return sorted(i.decode() for i in ids)

    def instances(self, now: float) -> list[InstanceRecord]:
        self._seen(now)
        records, _ = self._records(self._ids(), now)
        self._up_ids = tuple(r.instance_id for r in records if r.up)
        return records

    def instance(self, instance_id: str, now: float) -> InstanceRecord:
        records, _ = self._records([instance_id], now)
        if not records:
            raise UnknownInstance(f"no instance {instance_id!r} is registered")
        return records[0]

    def holders(self, keys: list[bytes]) -> list[dict[str, int]]:
        ids = self._up_ids
        if ids is None:
            now = time.time() if self._latest is None else self._latest
            ids = tuple(r.instance_id for r in self.instances(now) if r.up)
        if not keys or not ids:
            return [{} for _ in keys]
        # Slices: one HMGET of 1M keys would block Redis for a second; still one round trip.
        starts = range(0, len(keys), HMGET_KEYS)
        replies = self._run([("HMGET", self._index(i), *keys[s:s + HMGET_KEYS]) for i in ids for s in starts])
        n = len(starts)
        return held(ids, [joined(replies[j * n:(j + 1) * n]) for j in range(len(ids))], len(keys))

    def sweep(self, now: float) -> int:
        ids = self._ids()
        args = (repr(now), repr(self.heartbeat_timeout_s), repr(self.forget_after_s))
        replies = self._run([("EVAL", lua.SWEEP, 2, self._meta(i), self._index(i), *args) for i in ids])
        gone = [i for i, (_, forgotten) in zip(ids, replies) if forgotten]
        self._seen(now)
        records, unreadable = self._records(self._ids(), now)
        self._up_ids = tuple(r.instance_id for r in records if r.up)  # what holders takes as up
        gone += self._forget(unreadable)
        if gone:
            self._run([("SREM", self._prefix + "instances", *gone)])
        return sum(removed for removed, _ in replies)

    def _forget(self, unreadable: dict[str, object]) -> list[str]:
        """Forget the records that cannot be read (someone else's values), unless they changed since;
        the instances get known=False and register again. The ids forgotten."""
        if not unreadable:
            return []
        logger.warning("forgetting %d instance records in Redis that cannot be read: %s",
                       len(unreadable), ", ".join(sorted(unreadable))[:300])
        fields = [b"reg", b"usage", b"hb"]
        commands = [("EVAL", lua.FORGET, 2, self._meta(i), self._index(i),
                     *(meta.get(f, b"") if isinstance(meta, dict) else b"" for f in fields))
                    for i, meta in unreadable.items()]
        return [i for i, done in zip(unreadable, self._run(commands)) if done == 1]

    def index_size(self) -> tuple[int, int]:
        """(entries, 0): the entries live in Redis, not in this process."""
        counts = self._run([("HLEN", self._index(i)) for i in self._ids()])
        return sum(c for c in counts if isinstance(c, int)), 0  # an index of another type: none

    def close(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            # `connect` hands a plain client its pool, which the client's own close leaves open.
            (client.close if isinstance(client, RedisCluster) else client.connection_pool.disconnect)()
