"""The Redis-backed index as real processes: two kvtier_controllers on one real redis-server (or one
Redis Cluster) answer the same, whichever of them the instances talk to; Redis down -> 503s with a
message, never a hang; Redis back (empty: it keeps nothing on disk) -> the instances re-register
and resend their keys, and the answers are whole again.

Each test has its own Redis database number (the controller's config has no key prefix), so the
session's server is shared with the Redis tier tests without either seeing the other's keys.
"""

from __future__ import annotations

import time

import pytest
import redis
from fleet_processes import MODEL, instances, lookup, prompt, route, running_fleet, wait_hits, wait_up
from waiting import wait_until

from kvtier.fleet.http_client import HttpError

N = 64
INDEX_TIMEOUT_S = 0.5


@pytest.fixture
def fleet(tmp_path):
    with running_fleet(tmp_path) as fleet:
        yield fleet


def redis_config(redis_server, db: int) -> dict:
    """A controller config on database `db` of the session's server, emptied first."""
    url = redis_server.url.rsplit("/", 1)[0] + f"/{db}"
    with redis.Redis.from_url(url, socket_timeout=5) as r:
        r.flushdb()
    return {"index": url, "index_timeout_s": INDEX_TIMEOUT_S}


def comparable(client) -> dict:
    """/v1/instances without what moves with the clock."""
    return {i: {k: v for k, v in view.items() if k != "last_heartbeat_s"}
            for i, view in instances(client).items()}


def cpu_chunks(client) -> dict[str, int]:
    """instance id -> chunks in its CPU tier, by its latest heartbeat."""
    return {i: view["tiers"][0]["chunks"] for i, view in instances(client).items()}


@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_two_controllers_on_one_redis_give_identical_answers(fleet, kind, request):
    if kind == "cluster":
        # The cluster has one database and is shared: the controllers' default key prefix is used by
        # no other test, and this test runs once per session.
        config = {"index": request.getfixturevalue("redis_cluster").url, "index_cluster": True,
                  "index_timeout_s": INDEX_TIMEOUT_S}
    else:
        config = redis_config(request.getfixturevalue("redis_server"), 1)
    c1 = fleet.start_controller(config, name="c1")
    c2 = fleet.start_controller(config, name="c2")
    (i1,) = fleet.start_instances(["i1"], controller=c1)
    (i2,) = fleet.start_instances(["i2"], controller=c2)  # each registers with another controller
    a, b = c1.client(), c2.client()
    wait_up(a, ["i1", "i2"])
    wait_up(b, ["i1", "i2"])
    assert i1.store(1, N) == 4 and i2.store(1, N // 2) == 2 and i2.store(2, N) == 4
    wait_hits(a, prompt(1, N), {"i1": N, "i2": N // 2}, "stores reach the index")
    # Usage travels with the next heartbeat, not with the keys: route's free bytes and /v1/instances
    # change when it lands, so wait for it before comparing the two controllers' answers.
    wait_until(lambda: cpu_chunks(a) == {"i1": 4, "i2": 6}, "the stores' usage reaches the index", 20.0)

    for seed in (1, 2, 3):
        tokens = prompt(seed, N)
        assert lookup(a, tokens) == lookup(b, tokens)
        assert route(a, tokens) == route(b, tokens)
    assert lookup(a, prompt(2, N))["hit_tokens"] == N
    assert comparable(a) == comparable(b) and set(comparable(a)) == {"i1", "i2"}

    # A command through either controller reaches an instance registered with the other.
    pinned = b.post("/v1/pin", {"model_id": MODEL, "tokens": prompt(1, N), "instance_id": "i1"})
    assert pinned["results"] == [{"instance_id": "i1", "chunks": 4}]
    assert i1.stats()["pinned"] == 4


def test_redis_down_answers_503_with_a_message_and_recovers_when_it_returns(fleet, redis_server):
    controller = fleet.start_controller(redis_config(redis_server, 2))
    i1, i2 = fleet.start_instances(["i1", "i2"])
    client = controller.client()
    wait_up(client, ["i1", "i2"])
    assert i1.store(10, N) == 4 and i2.store(11, N) == 4
    wait_hits(client, prompt(10, N), {"i1": N, "i2": 0}, "stores reach the index")

    redis_server.stop()
    body = {"model_id": MODEL, "tokens": prompt(10, N)}
    for path, data in [("/v1/lookup", body), ("/v1/route", body), ("/v1/instances", None),
                       ("/v1/pin", body), ("/v1/clear", {}), ("/v1/stats", None)]:
        started = time.monotonic()
        with pytest.raises(HttpError) as err:
            client.post(path, data) if data is not None else client.get(path)
        assert err.value.status == 503, (path, err.value)
        assert err.value.detail and err.value.detail != "null", path  # a message, not an empty body
        assert time.monotonic() - started < 5.0, f"{path} took {time.monotonic() - started:.1f} s"
    status, health, _ = controller.request("GET", "/health")
    assert status == 503 and health["status"] == "unavailable" and health["detail"]
    assert i1.lookup(10, N) == N  # the instances carry on without their controller's index

    redis_server.start()  # same port, empty: a new session
    wait_until(lambda: controller.request("GET", "/health")[0] == 200, "/health is ok again")
    wait_up(client, ["i1", "i2"])
    wait_hits(client, prompt(10, N), {"i1": N, "i2": 0}, "the instances resend their keys")
    wait_hits(client, prompt(11, N), {"i1": 0, "i2": N}, "the instances resend their keys")
