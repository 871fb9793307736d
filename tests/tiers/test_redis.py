"""Tests for kvtier/tiers/redis.py against real servers: a standalone Redis and a 3-master cluster.

Round trips, pipelined batches, TTL, bad records, Redis dying and coming back, and CacheEngines
in two processes sharing KV through Redis. Each test has its own namespace (derived from its test
id), so tests share the session's servers without seeing each other's keys. Back-off timing is
driven by a fake clock where a test asserts that nothing touches the network.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch
import xxhash
from conftest import CHUNK, REPO, FakeClock, seeded_kv, seeded_tokens, small_layout
from redis.cluster import RedisCluster
from redis.connection import Encoder, PythonRespSerializer
from waiting import wait_until

from kvtier.config import RedisConfig
from kvtier.errors import ConfigError
from kvtier.keys import ChunkKey
from kvtier.metrics import Metrics
from kvtier.record import HEADER_SIZE, encode_header, tensor_bytes
from kvtier.tiers.backoff import Backoff
from kvtier.tiers.base import PutItem
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.redis_client import CONNECTION_CLASSES
from kvtier.tiers.redis_client import RecordValue as _Record

LAYOUT = small_layout()
PAYLOAD = LAYOUT.chunk_bytes(CHUNK)  # 4 KiB per chunk
DEADLINE_S = 20.0


@dataclass
class Target:
    """Where a tier under test points: the standalone server or the cluster."""

    url: str
    cluster: bool
    servers: object  # RedisServer or RedisClusterServers (to stop and restart)

    def raw(self) -> redis.Redis | RedisCluster:
        """A plain client for looking at and damaging what the tier stored."""
        if self.cluster:
            return RedisCluster.from_url(self.url)
        return redis.Redis.from_url(self.url)


@pytest.fixture(params=["standalone", "cluster"])
def target(request) -> Target:
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        return Target(cluster.url, True, cluster)
    server = request.getfixturevalue("redis_server")
    return Target(server.url, False, server)


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_port():
    """A loopback port that accepts connections (into the backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


@pytest.fixture
def namespace(request) -> bytes:
    """8 bytes unique to this test (and stable across runs, so key placement is reproducible)."""
    return xxhash.xxh3_64_digest(request.node.nodeid.encode())


@pytest.fixture
def make_tier(target, namespace):
    """RedisTiers on `target` in this test's namespace; cleared and closed at teardown."""
    tiers: list[RedisTier] = []

    def make(ns: bytes = namespace, **overrides) -> RedisTier:
        config = RedisConfig(url=target.url, cluster=target.cluster, **overrides)
        tier = RedisTier(config, ns, Metrics(["cpu", "redis"]))
        tiers.append(tier)
        return tier

    yield make
    for tier in tiers:
        tier.backoff = Backoff(0, 0)  # whatever a test did to it, the cleanup may reach Redis
        tier.clear()
        tier.close()


def chunk_key(namespace: bytes, i: int) -> ChunkKey:
    return ChunkKey(namespace, xxhash.xxh3_128_digest(i.to_bytes(8, "little")))


def records(namespace: bytes, n: int, seed: int = 0) -> list[PutItem]:
    """`n` valid records of small-layout chunks with seeded payloads."""
    items = []
    for i in range(n):
        key = chunk_key(namespace, seed * 1000 + i)
        payload = seeded_kv(LAYOUT, CHUNK, seed * 1000 + i).view(torch.uint8).reshape(-1)
        header = encode_header(key, LAYOUT.chunk_shape(CHUNK), LAYOUT.dtype, tensor_bytes(payload))
        items.append(PutItem(key, header, payload))
    return items


def slabs(n: int, size: int = PAYLOAD + 512) -> list[torch.Tensor]:
    """Destination buffers a little larger than a payload, like memory-pool slabs."""
    return [torch.full((size,), 0xEE, dtype=torch.uint8) for _ in range(n)]


def counters(tier: RedisTier) -> dict[str, int]:
    return tier._metrics.snapshot()["tiers"]["redis"]


def keys_of(items: list[PutItem]) -> list[ChunkKey]:
    return [item.key for item in items]


# -- round trips -----------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(make_tier, namespace):
    tier = make_tier()
    items = records(namespace, 5)
    missing = chunk_key(namespace, 999)

    assert tier.put(items) == [True] * 5
    assert tier.has([*keys_of(items), missing]) == [True] * 5 + [False]
    dests = slabs(6)
    headers = tier.get([*keys_of(items), missing], dests)

    assert headers[5] is None and torch.all(dests[5] == 0xEE)  # a miss leaves its buffer alone
    for item, header, dest in zip(items, headers, dests):
        assert header.key == item.key and header.shape == LAYOUT.chunk_shape(CHUNK)
        assert header.dtype == LAYOUT.dtype and header.payload_len == PAYLOAD
        assert torch.equal(dest[:PAYLOAD], item.payload)
        assert torch.all(dest[PAYLOAD:] == 0xEE)  # nothing written past the payload
    stats = counters(tier)
    assert stats["bytes_written"] == stats["bytes_read"] == 5 * PAYLOAD
    assert (stats["errors"], stats["corrupt"]) == (0, 0)


def test_a_stored_value_is_header_then_payload_under_prefix_and_key_hex(make_tier, target, namespace):
    tier = make_tier(key_prefix="kvt-test:")
    (item,) = records(namespace, 1)
    tier.put([item])

    with target.raw() as raw:
        value = raw.get("kvt-test:" + item.key.hex())

    assert value == item.header + tensor_bytes(item.payload).tobytes()
    assert len(item.header) == HEADER_SIZE


def test_a_put_sends_the_payload_buffer_itself_not_a_joined_copy():
    conn = CONNECTION_CLASSES["redis"](host="127.0.0.1", port=1)  # packing only: never connects
    header, payload = b"h" * HEADER_SIZE, memoryview(bytearray(range(256)) * 40)
    commands = [("SET", "k", _Record(header, payload), "EX", 5), ("GET", "k")]

    packed = conn.pack_commands(commands)

    assert any(piece is payload for piece in packed)
    plain = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)
    expected = plain.pack("SET", "k", header + payload.tobytes(), "EX", 5) + plain.pack("GET", "k")
    assert b"".join(bytes(p) for p in packed) == b"".join(bytes(p) for p in expected)


def test_batches_larger_than_batch_size_are_pipelined_round_trips(make_tier, namespace, monkeypatch):
    tier = make_tier(batch_size=3)
    items = records(namespace, 10)
    round_trips = []
    real = tier._pipelined
    monkeypatch.setattr(tier, "_pipelined", lambda commands, chunks=None:
                        round_trips.append(chunks or len(commands)) or real(commands, chunks))

    assert tier.put(items) == [True] * 10
    asked = [*keys_of(items[:4]), chunk_key(namespace, 999), *keys_of(items[4:])]  # a miss in batch 2
    assert tier.has(asked) == [True] * 4 + [False] + [True] * 6
    headers = tier.get(asked, dests := slabs(11))

    assert round_trips == [3, 3, 3, 1] + [3, 3, 3, 2] * 2
    assert [h is not None for h in headers] == [True] * 4 + [False] + [True] * 6
    got = [d for d, h in zip(dests, headers) if h is not None]
    assert all(torch.equal(d[:PAYLOAD], item.payload) for d, item in zip(got, items))


def test_cluster_spreads_chunks_over_every_node(redis_cluster, namespace):
    tier = RedisTier(RedisConfig(url=redis_cluster.url, cluster=True), namespace, Metrics(["redis"]))
    try:
        items = records(namespace, 32)
        assert tier.put(items) == [True] * 32
        per_node = []
        for node in redis_cluster.nodes:
            with node.client() as c:
                per_node.append(sum(1 for _ in c.scan_iter(match="kvtier:" + namespace.hex() + "*")))
        assert sum(per_node) == 32 and all(per_node), per_node
        assert tier.usage().chunks >= 32  # DBSIZE summed over the primaries
    finally:
        tier.clear()
        tier.close()


def test_remove_deletes_only_the_given_keys(make_tier, namespace):
    tier = make_tier(batch_size=2)
    items = records(namespace, 5)
    tier.put(items)

    assert tier.remove([items[1].key, items[3].key, chunk_key(namespace, 999)]) == 2
    assert tier.has(keys_of(items)) == [True, False, True, False, True]
    assert tier.remove([items[1].key]) == 0


@pytest.mark.parametrize("prefix", ["kvtier:", "kv[t]*?:"], ids=["plain", "glob_characters"])
def test_clear_removes_only_this_namespace(make_tier, target, namespace, prefix):
    other_ns = bytes(reversed(namespace))
    mine, theirs = make_tier(key_prefix=prefix), make_tier(ns=other_ns, key_prefix=prefix)
    my_items, their_items = records(namespace, 4), records(other_ns, 4)
    mine.put(my_items)
    theirs.put(their_items)
    # More keys than one SCAN step / UNLINK pipeline, so clear() loops; and keys it must leave:
    # another prefix, and one that the prefix would match if read as a glob pattern.
    fillers = [f"{prefix}{namespace.hex()}{i:032x}" for i in range(2500)]
    survivors = [f"other:{namespace.hex()}", f"kvtXY:{namespace.hex()}"]
    with target.raw() as raw:
        pipe = raw.pipeline()
        for name in fillers + survivors:
            pipe.set(name, b"x")
        pipe.execute()

        mine.clear()

        assert mine.has(keys_of(my_items)) == [False] * 4
        assert theirs.has(keys_of(their_items)) == [True] * 4
        pipe = raw.pipeline()
        for name in fillers + survivors:
            pipe.exists(name)
        assert pipe.execute() == [0] * len(fillers) + [1] * len(survivors)
        pipe = raw.pipeline()
        for name in survivors:
            pipe.delete(name)
        pipe.execute()


@pytest.mark.parametrize("ttl_s", [None, 100])
def test_ttl_is_set_on_every_chunk_when_configured(make_tier, target, namespace, ttl_s):
    tier = make_tier(ttl_s=ttl_s, batch_size=2)
    items = records(namespace, 3)
    tier.put(items)

    with target.raw() as raw:
        ttls = [raw.ttl("kvtier:" + item.key.hex()) for item in items]

    if ttl_s is None:
        assert ttls == [-1] * 3  # no expiry
    else:
        assert all(0 < t <= ttl_s for t in ttls), ttls


def test_usage_is_one_cheap_answer_from_redis(make_tier, namespace):
    tier = make_tier()
    tier.put(records(namespace, 3))

    usage = tier.usage()

    assert usage.chunks >= 3  # keys of the whole database, not only this namespace
    assert usage.bytes > 3 * PAYLOAD  # Redis's used_memory
    assert usage.capacity_bytes == 0  # the test servers set no maxmemory


# -- bad records: a counted miss, deleted -----------------------------------------------------------


def flip_payload_byte(value: bytes, other: bytes) -> bytes:
    return value[:HEADER_SIZE + 100] + bytes([value[HEADER_SIZE + 100] ^ 0x01]) + value[HEADER_SIZE + 101:]


def flip_header_byte(value: bytes, other: bytes) -> bytes:
    return value[:20] + bytes([value[20] ^ 0x80]) + value[21:]  # inside the shape fields


def truncated(value: bytes, other: bytes) -> bytes:
    return value[:HEADER_SIZE + 1000]


def header_only(value: bytes, other: bytes) -> bytes:
    return value[:HEADER_SIZE]


def empty(value: bytes, other: bytes) -> bytes:
    return b""


def garbage(value: bytes, other: bytes) -> bytes:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (len(value),), generator=g, dtype=torch.uint8).numpy().tobytes()


def wrong_key(value: bytes, other: bytes) -> bytes:
    return other  # a valid record, but of another chunk


DAMAGE = [flip_payload_byte, flip_header_byte, truncated, header_only, empty, garbage, wrong_key]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_bad_record_is_a_counted_miss_and_is_deleted(make_tier, target, namespace, damage):
    tier = make_tier()
    items = records(namespace, 4)
    tier.put(items)
    bad, source = "kvtier:" + items[2].key.hex(), "kvtier:" + items[0].key.hex()
    with target.raw() as raw:
        raw.set(bad, damage(raw.get(bad), raw.get(source)))

        headers = tier.get(keys_of(items), dests := slabs(4))

        assert [h is not None for h in headers] == [True, True, False, True]
        assert counters(tier)["corrupt"] == 1
        assert raw.exists(bad) == 0
        assert raw.exists(source) == 1  # the source of the wrong-key copy is untouched
    assert all(torch.equal(dests[i][:PAYLOAD], items[i].payload) for i in (0, 1, 3))
    assert tier.has(keys_of(items)) == [True, True, False, True]


def test_record_larger_than_the_buffer_is_dropped_not_overflowed(make_tier, namespace):
    tier = make_tier()
    (item,) = records(namespace, 1)
    tier.put([item])
    small = torch.zeros(PAYLOAD // 2 + 16, dtype=torch.uint8)

    assert tier.get([item.key], [small[:PAYLOAD // 2]]) == [None]
    assert counters(tier)["corrupt"] == 1
    assert torch.all(small[PAYLOAD // 2:] == 0)


def a_list(raw, name: str) -> None:
    raw.delete(name)
    raw.rpush(name, b"a", b"b")


def a_hash(raw, name: str) -> None:
    raw.delete(name)
    raw.hset(name, "field", b"value")


def a_set(raw, name: str) -> None:
    raw.delete(name)
    raw.sadd(name, b"member")


@pytest.mark.parametrize("plant", [a_list, a_hash, a_set], ids=lambda f: f.__name__)
def test_a_list_or_hash_at_a_chunk_key_is_a_corrupt_miss_that_lookup_stops_promising(make_tier, target,
                                                                                      namespace, plant):
    """Bug: a LIST or HASH value at a chunk key (WRONGTYPE) was counted as an error and kept
    forever, and lookup kept promising it."""
    tier = make_tier()
    items = records(namespace, 3)
    tier.put(items)
    bad = "kvtier:" + items[1].key.hex()
    with target.raw() as raw:
        plant(raw, bad)

        assert tier.has(keys_of(items)) == [True, False, True]  # never promised
        headers = tier.get(keys_of(items), dests := slabs(3))

        assert [h is not None for h in headers] == [True, False, True]
        assert (counters(tier)["corrupt"], counters(tier)["errors"]) == (1, 0)
        assert raw.exists(bad) == 0
    assert torch.all(dests[1] == 0xEE)
    # Not an outage: the Backoff did not start, the next calls reach Redis.
    assert tier.has(keys_of(items)) == [True, False, True]
    assert tier.put([items[1]]) == [True] and tier.has(keys_of(items)) == [True] * 3


def test_engine_lookup_stops_at_a_chunk_key_holding_a_list(redis_engine, target, layout):
    engine = redis_engine()
    tokens, kv = seeded_tokens(3 * CHUNK, 11), seeded_kv(layout, 3 * CHUNK, 11)
    engine.store(tokens, kv)
    assert engine.flush(timeout=DEADLINE_S)
    engine.clear("cpu")
    with target.raw() as raw:
        a_list(raw, "kvtier:" + engine.db.keys(tokens)[1].hex())

    assert engine.lookup(tokens) == CHUNK
    got, n = engine.retrieve(tokens)

    assert n == CHUNK and torch.equal(got, kv[:, :, :CHUNK])
    assert engine.lookup(tokens) == CHUNK
    assert redis_stats(engine)["errors"] == 0


@pytest.mark.parametrize("value", [b"", b"x", b"KVTR", bytes(HEADER_SIZE)], ids=["empty", "one_byte", "magic",
                                                                                 "header_size"])
def test_a_string_too_short_to_be_a_record_is_a_miss_never_promised(make_tier, target, namespace, value):
    tier = make_tier()
    items = records(namespace, 2)
    tier.put(items)
    bad = "kvtier:" + items[1].key.hex()
    with target.raw() as raw:
        raw.set(bad, value)

        assert tier.has(keys_of(items)) == [True, False]
        assert [h is not None for h in tier.get(keys_of(items), slabs(2))] == [True, False]
        assert counters(tier)["corrupt"] == 1 and counters(tier)["errors"] == 0
        assert raw.exists(bad) == 0


# -- Redis down: misses, counted, back-off without network, recovery --------------------------------


@pytest.fixture
def connects(monkeypatch) -> list[str]:
    """Every socket connection attempt any RedisTier makes (through its connection classes)."""
    attempts: list[str] = []
    for cls in CONNECTION_CLASSES.values():
        real = cls._connect

        def counting(self, real=real):
            attempts.append(f"{self.host}:{self.port}" if hasattr(self, "host") else "unix")
            return real(self)

        monkeypatch.setattr(cls, "_connect", counting)
    return attempts


def stop_server_of(target: Target, key: ChunkKey):
    """Stop the standalone server, or the cluster node that holds `key` (the others stay up)."""
    server = target.servers
    if target.cluster:
        with target.raw() as raw:
            port = raw.get_node_from_key("kvtier:" + key.hex()).port
        server = next(node for node in target.servers.nodes if node.port == port)
    server.stop()
    return server


def test_redis_down_means_misses_then_backoff_without_network_then_recovery(make_tier, target, namespace,
                                                                           connects):
    tier = make_tier(batch_size=4)
    clock = FakeClock()
    tier.backoff = Backoff(1.0, 8.0, clock=clock)
    items = records(namespace, 10)
    assert tier.put(items) == [True] * 10
    server = stop_server_of(target, items[0].key)

    # The first call fails on the network (on a cluster, one node down fails the batch it is in):
    # misses, counted, no exception.
    assert tier.has(keys_of(items)) == [False] * 10
    assert counters(tier)["errors"] == 4  # the failed batch of 4; the others were skipped at once
    # Backing off: every call answers misses without a single connection attempt.
    connects.clear()
    assert tier.has(keys_of(items)) == [False] * 10
    assert tier.get(keys_of(items), slabs(10)) == [None] * 10
    assert tier.put(records(namespace, 3, seed=1)) == [False] * 3
    assert tier.remove(keys_of(items)) == 0
    tier.clear()
    assert tier.usage().bytes == 0
    assert connects == []
    assert counters(tier)["errors"] == 4
    # After the delay one call probes; it fails, and the next delay is twice as long.
    clock.now += 1.0
    assert tier.has(keys_of(items[:1])) == [False]
    assert connects and counters(tier)["errors"] == 5
    connects.clear()
    clock.now += 1.5
    assert tier.has(keys_of(items[:1])) == [False] and connects == []

    server.start()
    if target.cluster:
        target.servers.wait_ok()
    clock.now += 0.5  # 2 s after the failed probe
    assert tier.put(items) == [True] * 10  # (a restarted test server lost its data)
    assert tier.has(keys_of(items)) == [True] * 10
    headers = tier.get(keys_of(items), dests := slabs(10))
    assert all(h is not None for h in headers)
    assert all(torch.equal(d[:PAYLOAD], item.payload) for d, item in zip(dests, items))


def test_a_server_that_never_answers_times_out_into_a_miss(silent_port):
    tier = RedisTier(RedisConfig(url=f"redis://127.0.0.1:{silent_port}/0", timeout_s=0.05,
                                 retry_after_s=60.0), bytes(8), Metrics(["redis"]))
    (item,) = records(bytes(8), 1)

    assert tier.has([item.key]) == [False]  # the read timed out
    assert tier.put([item]) == [False]  # backing off: no second wait
    assert counters(tier)["errors"] == 1
    tier.close()


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
def test_tier_built_while_redis_is_down_serves_misses(cluster, unused_port):
    tier = RedisTier(RedisConfig(url=f"redis://127.0.0.1:{unused_port}/0", cluster=cluster,
                                 timeout_s=1.0, retry_after_s=60.0),
                     bytes(8), Metrics(["redis"]))
    (item,) = records(bytes(8), 1)

    assert tier.has([item.key]) == [False]
    assert tier.get([item.key], slabs(1)) == [None]
    assert tier.put([item]) == [False]
    assert tier.usage().chunks == 0
    assert counters(tier)["errors"] == 1  # one failed attempt, then back-off
    tier.close()


# -- CacheEngine with a Redis tier ------------------------------------------------------------------


@pytest.fixture
def redis_engine(make_engine, target, request):
    """CacheEngines from configs/redis.yaml / redis_cluster.yaml (no disk tier) on `target`, with
    a model id unique to this test; their Redis keys are cleared at teardown."""
    engines = []

    def make(model_id: str = request.node.nodeid, **overrides):
        config = "redis_cluster" if target.cluster else "redis"
        engine = make_engine(config, model_id=model_id, disk="null", redis__url=target.url, **overrides)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.tier("redis").backoff = Backoff(0, 0)
        engine.clear("redis")


def redis_stats(engine) -> dict:
    return engine.stats()["tiers"]["redis"]


def test_engine_serves_from_redis_and_reports_its_metrics(redis_engine, layout):
    engine = redis_engine()
    tokens, kv = seeded_tokens(4 * CHUNK, 3), seeded_kv(layout, 4 * CHUNK, 3)
    engine.store(tokens, kv)
    assert engine.flush(timeout=DEADLINE_S)
    engine.clear("cpu")

    assert engine.lookup(tokens) == 4 * CHUNK
    got, n = engine.retrieve(tokens)

    assert n == 4 * CHUNK and torch.equal(got, kv)
    stats = redis_stats(engine)
    assert (stats["hits"], stats["misses"], stats["corrupt"], stats["errors"]) == (4, 0, 0, 0)
    assert stats["bytes_written"] == stats["bytes_read"] == 4 * layout.chunk_bytes(CHUNK)
    assert stats["chunks"] >= 4 and stats["bytes"] > 0
    text = engine.prometheus_text()
    assert 'kvtier_tier_hits_total{tier="redis"} 4.0' in text
    assert 'kvtier_tier_bytes{tier="redis"}' in text


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import CHUNK, REPO, seeded_kv, seeded_tokens, small_layout
from kvtier import CacheEngine, load_config

env = {{"KVTIER_DISK": "null", "KVTIER_REDIS__URL": {url!r}, "KVTIER_CHUNK_SIZE": str(CHUNK),
        "KVTIER_CPU__PIN_MEMORY": "off", "KVTIER_CPU__CAPACITY": "1MiB"}}
layout = small_layout()
with CacheEngine(load_config(REPO / "configs" / {config!r}, env=env), layout, {model!r}) as engine:
    print(engine.store(seeded_tokens(6 * CHUNK, 42), seeded_kv(layout, 6 * CHUNK, 42)))
    print(engine.flush(timeout=30))
    print(engine.stats()["tiers"]["redis"]["errors"])
"""


def test_a_second_process_retrieves_kv_stored_through_redis(redis_engine, target, layout, request):
    model = request.node.nodeid
    config = "redis_cluster.yaml" if target.cluster else "redis.yaml"
    script = WRITER.format(tests=str(Path(__file__).parents[1]), url=target.url, config=config, model=model)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "True", "0"]

    engine = redis_engine(model)  # an empty CPU tier: everything comes from Redis
    tokens, expected = seeded_tokens(6 * CHUNK, 42), seeded_kv(layout, 6 * CHUNK, 42)
    assert engine.lookup(tokens) == 6 * CHUNK
    got, n = engine.retrieve(tokens)

    assert n == 6 * CHUNK and torch.equal(got, expected)
    assert redis_stats(engine)["hits"] == 6 and redis_stats(engine)["corrupt"] == 0


def test_engine_with_redis_down_at_start_degrades_to_misses(make_engine, layout, unused_port):
    engine = make_engine("redis", disk="null", redis__url=f"redis://127.0.0.1:{unused_port}/0",
                         redis__retry_after_s=60)
    tokens, kv = seeded_tokens(3 * CHUNK, 5), seeded_kv(layout, 3 * CHUNK, 5)

    assert engine.store(tokens, kv) == 3  # returns: the Redis writes are queued in the background
    assert engine.flush(timeout=DEADLINE_S)
    assert redis_stats(engine)["errors"] >= 1
    got, n = engine.retrieve(tokens)  # the CPU tier still serves
    assert n == 3 * CHUNK and torch.equal(got, kv)
    engine.clear("cpu")
    assert engine.lookup(tokens) == 0
    assert engine.retrieve(tokens)[1] == 0
    assert engine.stats()["pool"]["failed_writes"] == 0  # the tier never raised


def test_engine_recovers_when_redis_comes_back(make_engine, redis_server, layout, request):
    # The standalone server is enough for the engine-level story (the tier test above covers a
    # cluster node going away and back).
    engine = make_engine("redis", model_id=request.node.nodeid, disk="null", redis__url=redis_server.url,
                         redis__retry_after_s=0.05, redis__retry_max_s=0.05)
    tier = engine.tier("redis")
    redis_server.stop()
    tokens, kv = seeded_tokens(2 * CHUNK, 6), seeded_kv(layout, 2 * CHUNK, 6)
    assert engine.store(tokens, kv) == 2
    assert engine.flush(timeout=DEADLINE_S)
    assert redis_stats(engine)["errors"] >= 1
    redis_server.start()

    # Poll the real state: new stores reach Redis once the back-off has let a probe through.
    seeds = iter(range(101, 1_000_000))

    def a_new_store_reaches_redis() -> bool:
        seed = next(seeds)
        more = seeded_tokens(2 * CHUNK, seed)
        engine.store(more, seeded_kv(layout, 2 * CHUNK, seed))
        engine.flush(timeout=DEADLINE_S)
        return all(tier.has(engine.db.keys(more)))

    wait_until(a_new_store_reaches_redis, "stores did not reach Redis after it came back", DEADLINE_S)
    engine.clear("redis")


def test_a_bad_scheme_error_never_shows_the_redis_password():
    # Regression: the error quoted config.url, password included, into logs.
    with pytest.raises(ConfigError) as err:
        RedisTier(RedisConfig(url="http://:hunter2@cache:6379/0"), b"n" * 8, Metrics(["redis"]))

    assert "hunter2" not in str(err.value)
