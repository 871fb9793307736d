"""Attacks on kvtier/tiers/redis.py that got through the first hardening (issue 8, item 23), each
against a real redis-server or Redis Cluster: a node that stops answering, an ACL that refuses
INFO and SCAN, a huge value at a chunk key, unusable options in the URL, a clear() that matched
more than chunk keys, numpy destination buffers. Tests named after a bug failed before its fix;
the others pin what already held or what a fix must keep (a MOVED reply followed, a stalled or
killed server, a key expiring between lookup and retrieve)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
import test_redis
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens
from redis.cluster import PipelineCommand
from redis.exceptions import MovedError
from test_redis import PAYLOAD, counters, keys_of, records, slabs
from waiting import wait_until

from kvtier.config import RedisConfig
from kvtier.errors import ConfigError
from kvtier.metrics import Metrics
from kvtier.tiers.backoff import Backoff
from kvtier.tiers.base import TierUsage
from kvtier.tiers.redis import RedisTier

# The fixtures of test_redis.py, used here by name.
target, namespace, make_tier = test_redis.target, test_redis.namespace, test_redis.make_tier
redis_engine = test_redis.redis_engine

SECRET = "zq9SECRETzq9"
DEADLINE_S = 20.0


def test_a_cluster_node_that_stops_answering_starts_the_backoff_not_a_timeout_per_key(redis_cluster,
                                                                                      namespace):
    """Bug: a cluster pipeline hands a node's timeout back as reply objects instead of raising, after
    retrying that node's commands one by one; the tier read them as plain misses: no error counted,
    no back-off, so every later call paid a timeout per key of the stalled node (2.3 s for 30 keys
    at timeout_s=0.2) for as long as the node hung."""
    tier = RedisTier(RedisConfig(url=redis_cluster.url, cluster=True, timeout_s=0.2, retry_after_s=60),
                     namespace, Metrics(["redis"]))
    items = records(namespace, 24)
    assert tier.put(items) == [True] * 24
    stalled = redis_cluster.nodes[1]
    os.kill(stalled.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        tier.has(keys_of(items))  # the probe: one timeout for the stalled node, not one per key

        assert time.monotonic() - started < 4 * 0.2
        assert counters(tier)["errors"] > 0
        started = time.monotonic()
        assert tier.has(keys_of(items)) == [False] * 24
        assert tier.get(keys_of(items), slabs(24)) == [None] * 24
        assert time.monotonic() - started < 0.2  # backing off: not one timeout
    finally:
        os.kill(stalled.proc.pid, signal.SIGCONT)
        tier.backoff = Backoff(0, 0)
        tier.remove(keys_of(items))
        tier.close()
    redis_cluster.wait_ok()


def test_a_moved_reply_from_a_stale_slot_map_is_followed_not_an_outage(redis_cluster, namespace):
    """The stalled-node fix sends cluster pipelines without redis-py's redirection handling; MOVED
    (slots being resharded, here a stale slot map) must still be followed, not be an outage."""
    tier = RedisTier(RedisConfig(url=redis_cluster.url, cluster=True, retry_after_s=60), namespace,
                     Metrics(["redis"]))
    items = records(namespace, 6)
    try:
        assert tier.put(items) == [True] * 6
        client = tier._connect()
        slot = client.keyslot("kvtier:" + items[0].key.hex())
        owner = client.nodes_manager.slots_cache[slot][0]
        wrong = next(n for n in client.get_primaries() if n.name != owner.name)
        client.nodes_manager.slots_cache[slot] = [wrong]
        probe = [PipelineCommand(("EXISTS", "kvtier:" + items[0].key.hex()), {}, 0)]
        assert isinstance(client.pipeline().send_cluster_commands(probe, raise_on_error=False,
                                                                  allow_redirections=False)[0], MovedError)

        headers = tier.get(keys_of(items), dests := slabs(6))

        assert all(h is not None for h in headers)
        assert all(torch.equal(d[:PAYLOAD], item.payload) for d, item in zip(dests, items))
        assert counters(tier)["errors"] == 0 and tier.has(keys_of(items)) == [True] * 6
    finally:
        tier.remove(keys_of(items))
        tier.close()


@pytest.fixture
def standalone_tier(redis_server, namespace):
    """RedisTiers on the standalone server in this test's namespace; cleared and closed at teardown."""
    tiers: list[RedisTier] = []

    def make(**overrides) -> RedisTier:
        tiers.append(RedisTier(RedisConfig(url=redis_server.url, **overrides), namespace, Metrics(["redis"])))
        return tiers[-1]

    yield make
    for tier in tiers:
        tier.backoff = Backoff(0, 0)
        tier.clear()
        tier.close()


@pytest.fixture
def limited_user(redis_server, namespace):
    """A Redis user allowed everything but INFO and SCAN (an operator's ACL), removed at teardown."""
    user = f"kvt-{namespace.hex()}"
    with redis_server.client() as c:
        c.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", "~*", "+@all", "-info", "-scan")
    yield f"redis://{user}:pw@127.0.0.1:{redis_server.port}/0"
    with redis_server.client() as c:
        c.execute_command("ACL", "DELUSER", user)


def test_a_wrong_redis_password_is_a_configuration_error_logged_once_not_an_outage(limited_user, namespace,
                                                                                   caplog):
    """A wrong password is not fixed by retrying every retry_after_s (here 0 s: every call): one
    ERROR line, then one attempt per retry_max_s."""
    caplog.set_level(logging.INFO, "kvtier.tiers.redis")
    url = limited_user.replace(":pw@", ":wrong@")
    tier = RedisTier(RedisConfig(url=url, retry_after_s=0.0, retry_max_s=60.0), namespace, Metrics(["redis"]))
    items = records(namespace, 3)
    try:
        for _ in range(5):
            assert tier.has(keys_of(items)) == [False] * 3 and tier.put(items) == [False] * 3

        assert counters(tier)["errors"] == 3  # the first call's three chunks; then no attempt
        logged = [r for r in caplog.records if r.name == "kvtier.tiers.redis" and r.levelno > logging.INFO]
        assert [r.levelno for r in logged] == [logging.ERROR]
        assert "refuses this client as configured" in logged[0].getMessage()
    finally:
        tier.close()


def test_a_redis_that_refuses_info_or_scan_keeps_serving_chunks(limited_user, namespace):
    """Bug: usage() (every metrics scrape) and clear() treated NOPERM as an outage and started the
    back-off: the tier answered misses for retry_after_s after each scrape."""
    tier = RedisTier(RedisConfig(url=limited_user, retry_after_s=60), namespace, Metrics(["redis"]))
    items = records(namespace, 3)
    try:
        assert tier.put(items) == [True] * 3

        assert tier.usage() == TierUsage(0, 0, 0)
        tier.clear()  # SCAN refused: nothing cleared, and not an outage either

        assert tier.has(keys_of(items)) == [True] * 3
        headers = tier.get(keys_of(items), dests := slabs(3))
        assert all(h is not None for h in headers)
        assert all(torch.equal(d[:PAYLOAD], item.payload) for d, item in zip(dests, items))
        assert counters(tier)["errors"] == 2  # the two refused calls, counted
    finally:
        tier.remove(keys_of(items))
        tier.close()


def test_a_huge_string_at_a_chunk_key_is_read_only_as_far_as_the_buffer(redis_server, standalone_tier,
                                                                         namespace):
    """Bug: get() fetched a whole value whatever its size, so a 512 MiB string at each key of a
    32-key batch could cost 16 GiB; now a value is read up to what a record in the caller's
    buffer could be, and the rest is never sent."""
    tier = standalone_tier()
    items = records(namespace, 2)
    tier.put(items)
    bad = "kvtier:" + items[1].key.hex()
    with redis_server.client() as raw:
        raw.set(bad, items[1].header + b"\0" * (32 << 20))  # the right header, a 32 MiB tail
        before = raw.info("stats")["total_net_output_bytes"]

        headers = tier.get(keys_of(items), slabs(2))

        sent = raw.info("stats")["total_net_output_bytes"] - before
        assert [h is not None for h in headers] == [True, False]
        assert sent < 1 << 20, sent
        assert counters(tier)["corrupt"] == 1 and raw.exists(bad) == 0
    assert tier.has(keys_of(items)) == [True, False]  # lookup agrees with what get found


@pytest.mark.parametrize("query", ["?foo=bar", "?socket_timeout=abc", "?decode_responses=1",
                                   f"?password={SECRET}&db=x", f"?password={SECRET}&ssl_cert_reqs=none"])
def test_unusable_options_in_the_redis_url_are_a_config_error_at_construction(redis_server, query):
    """Bug: query options reached redis-py only at the first call, so `?foo=bar` loaded fine and
    then every lookup raised TypeError (ValueError for `?socket_timeout=abc`, UnicodeDecodeError
    for `?decode_responses=1`) to the caller."""
    with pytest.raises(ConfigError) as err:
        RedisTier(RedisConfig(url=redis_server.url + query), bytes(8), Metrics(["redis"]))

    assert "redis.url" in str(err.value) and SECRET not in str(err.value)


def test_usable_options_in_the_redis_url_still_work(redis_server, namespace):
    tier = RedisTier(RedisConfig(url=redis_server.url + "?client_name=kvtier-test&db=0"),
                     namespace, Metrics(["redis"]))
    items = records(namespace, 1)
    try:
        assert tier.put(items) == [True] and tier.has(keys_of(items)) == [True]
    finally:
        tier.remove(keys_of(items))
        tier.close()


# -- attacks that held -----------------------------------------------------------------------------


def test_a_stalled_redis_is_a_bounded_miss_and_the_next_call_gets_the_right_bytes(redis_server,
                                                                                   standalone_tier,
                                                                                   namespace):
    tier = standalone_tier(timeout_s=0.2, retry_after_s=0.0, retry_max_s=0.0, max_connections=1)
    items = records(namespace, 4)
    tier.put(items)
    with redis_server.client() as admin:
        admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")  # every client's commands wait 1 s
        started = time.monotonic()
        assert tier.get(keys_of(items), slabs(4)) == [None] * 4
        assert time.monotonic() - started < 0.9
        assert admin.ping()  # answered once the pause is over
    # The timed-out connection was dropped, not reused with the stale replies still queued on it.
    order = items[::-1]
    headers = tier.get(keys_of(order), dests := slabs(4))
    assert all(h is not None for h in headers)
    assert all(torch.equal(d[:PAYLOAD], item.payload) for d, item in zip(dests, order))


def test_a_chunk_expiring_between_lookup_and_retrieve_is_a_miss_and_lookup_then_agrees(redis_engine, target,
                                                                                     layout):
    engine = redis_engine()
    tokens, kv = seeded_tokens(3 * CHUNK, 21), seeded_kv(layout, 3 * CHUNK, 21)
    engine.store(tokens, kv)
    assert engine.flush(timeout=DEADLINE_S)
    engine.clear("cpu")
    assert engine.lookup(tokens) == 3 * CHUNK
    name = "kvtier:" + engine.db.keys(tokens)[1].hex()
    with target.raw() as raw:
        raw.pexpire(name, 1)
        wait_until(lambda: not raw.exists(name), "the key did not expire")

    got, n = engine.retrieve(tokens)

    assert n == CHUNK and torch.equal(got[:, :, :CHUNK], kv[:, :, :CHUNK])
    assert engine.lookup(tokens) == CHUNK


def test_a_redis_killed_while_a_get_waits_on_it_is_a_prompt_miss(redis_server, standalone_tier, namespace):
    tier = standalone_tier(timeout_s=5.0, retry_after_s=0.0, retry_max_s=0.0)
    items = records(namespace, 8)
    assert tier.put(items) == [True] * 8
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # the get's pipeline goes out and waits
    result: list = []
    reader = threading.Thread(target=lambda: result.append(tier.get(keys_of(items), slabs(8))))
    started = time.monotonic()
    reader.start()
    pool = tier._connect().connection_pool
    wait_until(lambda: any(c._sock is not None for c in pool._connections), "the get did not connect")
    redis_server.stop()  # SIGKILL mid-pipeline

    reader.join(DEADLINE_S)
    assert result == [[None] * 8]
    assert time.monotonic() - started < 5.0  # the closed socket ends the wait, not the timeout
    assert counters(tier)["errors"] == 8
    redis_server.start()  # empty: no persistence
    assert tier.has(keys_of(items)) == [False] * 8
    assert tier.get(keys_of(items), slabs(8)) == [None] * 8


def test_clear_deletes_only_chunk_keys_not_every_key_that_starts_like_one(make_tier, target, namespace):
    """Bug: clear() matched key_prefix + namespace + "*", so it also deleted another tool's
    "kvtier:<ns>:meta" and every key of a tier whose key_prefix is this one plus hex digits."""
    mine = make_tier()
    neighbour = make_tier(ns=bytes(reversed(namespace)), key_prefix="kvtier:" + namespace.hex())
    my_items, their_items = records(namespace, 3), records(bytes(reversed(namespace)), 3, seed=1)
    mine.put(my_items)
    neighbour.put(their_items)
    others = [f"kvtier:{namespace.hex()}:meta", f"kvtier:{namespace.hex()}{'0' * 32}x"]
    with target.raw() as raw:
        for name in others:
            raw.set(name, b"x")

        mine.clear()

        assert mine.has(keys_of(my_items)) == [False] * 3
        assert neighbour.has(keys_of(their_items)) == [True] * 3
        assert [raw.exists(name) for name in others] == [1, 1]
        for name in others:
            raw.delete(name)


def test_get_into_numpy_buffers_as_the_tier_contract_allows(make_tier, namespace):
    """Bug: the Tier contract (kvtier/tiers/base.py) lets `dests` be numpy arrays, as the disk tier
    takes them; get() called `dest.numel()` and raised AttributeError to the caller."""
    tier = make_tier()
    items = records(namespace, 2)
    tier.put(items)
    dests = [np.full(PAYLOAD + 512, 0xEE, dtype=np.uint8) for _ in items]

    headers = tier.get(keys_of(items), dests)

    assert all(h is not None for h in headers)
    assert all(np.array_equal(d[:PAYLOAD], item.payload.numpy()) for d, item in zip(dests, items))
    assert all((d[PAYLOAD:] == 0xEE).all() for d in dests)
