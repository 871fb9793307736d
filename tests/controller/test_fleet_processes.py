"""The fleet as real processes: kvtier_controller, CacheEngine instances (tests/controller/
fleet_instance.py) and a kvtier_server, each in its own process, talking HTTP.

What an instance holds is asked of the instance itself (its lookup, its tiers, its stats) and of the
controller (/v1/lookup, /v1/route, /v1/instances): commands sent over REST must change the first,
and the key events the instances send must bring the second along, within the heartbeat interval.
"""

from __future__ import annotations

import select
import signal
import time

import pytest
from fleet_processes import (
    HEARTBEAT_TIMEOUT_S,
    MODEL,
    hits,
    instances,
    lookup,
    prompt,
    route,
    running_fleet,
    wait_hits,
    wait_up,
)
from waiting import wait_until

from kvtier.fleet.http_client import HttpError, JsonClient

N = 64  # tokens per test prompt: 4 chunks of 16


@pytest.fixture
def fleet(tmp_path):
    with running_fleet(tmp_path) as fleet:
        yield fleet


def by_id(reply: dict) -> dict[str, int]:
    """An AdminReply as instance id -> chunks."""
    return {r["instance_id"]: r["chunks"] for r in reply["results"]}


def lookup_tiers(client, tokens: list[int], instance_id: str) -> list[str] | None:
    entry = [i for i in lookup(client, tokens)["instances"] if i["instance_id"] == instance_id]
    return entry[0]["tiers"] if entry else None


def test_the_controller_sees_what_each_instance_and_a_server_hold(fleet):
    controller = fleet.start_controller()
    server = fleet.start_server("server-1")
    # i3 has the kvtier_server as a tier below its disk: what it stores, the server holds too.
    i1, i2 = fleet.start_instances(["i1", "i2"])
    (i3,) = fleet.start_instances(["i3"], remote=server.url)
    client = controller.client()
    known = wait_up(client, ["i1", "i2", "i3", "server-1"])
    for instance in (i1, i2, i3):
        view = known[instance.instance_id]
        assert (view["kind"], view["model_id"], view["chunk_size"]) == ("engine", MODEL, 16)
        assert view["namespace"] == instance.info["namespace"]
        assert [t["name"] for t in view["tiers"]] == ["cpu", "disk"]
        assert view["address"].startswith("http://127.0.0.1:")
    assert known["server-1"]["kind"] == "server"
    assert "command_token" not in str(client.get("/v1/instances"))

    assert i1.store(1, N) == 4 and i2.store(1, N // 2) == 2
    tokens = prompt(1, N)
    wait_hits(client, tokens, {"i1": N, "i2": N // 2, "i3": 0}, "stores reach the index")
    reply = lookup(client, tokens)
    assert reply["hit_tokens"] == N and reply["num_tokens"] == N
    engines = [i for i in reply["instances"] if i["instance_id"] in ("i1", "i2", "i3")]
    assert [i["instance_id"] for i in engines] == ["i1", "i2", "i3"]  # longest hit first
    assert engines[0]["tiers"] == ["cpu"] * 4 and engines[1]["tiers"] == ["cpu"] * 2
    assert [r["instance_id"] for r in route(client, tokens)] == ["i1", "i2", "i3"]
    assert [r["hit_tokens"] for r in route(client, tokens)] == [N, N // 2, 0]

    # A partial last chunk is no hit: 70 tokens still hit the 64 that i1 holds.
    assert hits(client, prompt(1, N + 6))["i1"] == N
    # The server holds what i3 wrote through to it, in i3's namespace: a lookup names it.
    assert i3.store(2, N) == 4
    wait_hits(client, prompt(2, N), {"i3": N, "server-1": N}, "the server's keys reach the index")
    # A clear of every instance empties the server too.
    assert "server-1" in by_id(client.post("/v1/clear", {}))
    wait_until(lambda: "server-1" not in hits(client, prompt(2, N)), "the cleared server leaves the index")
    # An unknown model has no instances.
    assert lookup(client, tokens, "no-such-model")["instances"] == []


def fleet_with_a_server(fleet) -> tuple:
    """A controller, i1, i2 (the server below its disk) and server-1, all holding prompt(3, N)."""
    controller = fleet.start_controller()
    server = fleet.start_server("server-1")
    i1, i2 = fleet.start_instances(["i1"]) + fleet.start_instances(["i2"], remote=server.url)
    client = controller.client()
    wait_up(client, ["i1", "i2", "server-1"])
    assert i1.store(3, N) == 4 and i2.store(3, N) == 4
    wait_hits(client, prompt(3, N), {"i1": N, "i2": N, "server-1": N}, "stores reach the index")
    return client, i1, i2


def test_a_pin_or_unpin_of_every_instance_is_not_failed_by_a_server_holding_the_prompt(fleet):
    client, i1, i2 = fleet_with_a_server(fleet)

    # The engines' chunks are pinned; a server (shared records: it cannot pin) is no reason to fail
    # the request, nor to answer an error after the engines were pinned anyway.
    for op, pinned in (("pin", 4), ("unpin", 0)):
        reply = by_id(client.post(f"/v1/{op}", {"model_id": MODEL, "tokens": prompt(3, N)}))
        assert reply.get("i1") == 4 and reply.get("i2") == 4 and reply.get("server-1", 0) == 0, reply
        assert i1.stats()["pinned"] == pinned and i2.stats()["pinned"] == pinned


def test_a_clear_of_the_cpu_tier_of_every_instance_is_not_failed_by_a_server(fleet):
    client, i1, i2 = fleet_with_a_server(fleet)
    # The server has no tier called cpu ("memory", "spill"): it has nothing to clear there, which
    # is no error for a clear of every instance.
    reply = by_id(client.post("/v1/clear", {"tier": "cpu"}))
    assert reply.get("i1") == 4 and reply.get("i2") == 4 and reply.get("server-1", 0) == 0, reply
    assert i1.tiers(3, N)["cpu"] == [False] * 4 and i2.tiers(3, N)["cpu"] == [False] * 4


def test_pin_through_rest_keeps_a_prompt_through_a_flood_and_unpin_lets_it_go(fleet):
    controller = fleet.start_controller()
    i1, i2 = fleet.start_instances(["i1", "i2"])
    client = controller.client()
    wait_up(client, ["i1", "i2"])
    for instance in (i1, i2):
        assert instance.store(10, N) == 4 and instance.store(11, N) == 4
    wait_hits(client, prompt(10, N), {"i1": N, "i2": N}, "stores reach the index")

    assert by_id(client.post("/v1/pin", {"model_id": MODEL, "tokens": prompt(10, N)})) == {"i1": 4, "i2": 4}
    assert i1.stats()["pinned"] == 4 and i2.stats()["pinned"] == 4
    i1.flood(60)  # 240 chunks through a 16-chunk cpu tier and a 32-chunk disk tier
    assert i1.lookup(10, N) == N, "the pinned prompt was evicted"
    assert i1.lookup(11, N) == 0, "the flood did not evict the unpinned prompt"
    wait_hits(client, prompt(11, N), {"i1": 0, "i2": N}, "evictions reach the index")
    assert hits(client, prompt(10, N)) == {"i1": N, "i2": N}

    reply = client.post("/v1/unpin", {"model_id": MODEL, "tokens": prompt(10, N), "instance_id": "i1"})
    assert by_id(reply) == {"i1": 4}
    assert i1.stats()["pinned"] == 0 and i2.stats()["pinned"] == 4  # only the instance named
    i1.flood(60)
    assert i1.lookup(10, N) == 0
    wait_hits(client, prompt(10, N), {"i1": 0, "i2": N}, "the unpinned prompt leaves the index")


def test_move_to_disk_then_restart_the_instance_and_the_index_says_disk(fleet):
    controller = fleet.start_controller()
    (i1,) = fleet.start_instances(["i1"])
    client = controller.client()
    address = wait_up(client, ["i1"])["i1"]["address"]
    tokens = prompt(20, N)
    assert i1.store(20, N) == 4
    wait_until(lambda: lookup_tiers(client, tokens, "i1") == ["cpu"] * 4, "stored in cpu, indexed")

    reply = client.post("/v1/move", {"model_id": MODEL, "tokens": tokens, "instance_id": "i1", "to": "disk"})
    assert by_id(reply) == {"i1": 4}
    assert i1.tiers(20, N) == {"cpu": [False] * 4, "disk": [True] * 4}
    wait_until(lambda: lookup_tiers(client, tokens, "i1") == ["disk"] * 4, "the move reaches the index")

    i1.restart()  # same id, same disk folder: a new process with a new command address
    wait_until(lambda: instances(client)["i1"]["address"] != address, "i1 registers again")
    assert i1.lookup(20, N) == N
    wait_until(lambda: lookup_tiers(client, tokens, "i1") == ["disk"] * 4,
               "the restarted instance's disk keys reach the index")

    # And back up: a copy into cpu leaves the disk copy where it is.
    reply = client.post("/v1/move", {"model_id": MODEL, "tokens": tokens, "instance_id": "i1", "to": "cpu",
                                     "copy": True})
    assert by_id(reply) == {"i1": 4}
    assert i1.tiers(20, N) == {"cpu": [True] * 4, "disk": [True] * 4}
    wait_until(lambda: lookup_tiers(client, tokens, "i1") == ["cpu"] * 4, "the copy up reaches the index")

    with pytest.raises(HttpError) as err:
        client.post("/v1/move", {"model_id": MODEL, "tokens": tokens, "instance_id": "i1", "to": "nvme"})
    assert err.value.status == 400 and "nvme" in err.value.detail


def test_clear_through_rest_one_tier_of_one_instance_then_everything(fleet):
    controller = fleet.start_controller()
    i1, i2 = fleet.start_instances(["i1", "i2"])
    client = controller.client()
    wait_up(client, ["i1", "i2"])
    tokens = prompt(30, N)
    for instance in (i1, i2):
        assert instance.store(30, N) == 4
    wait_hits(client, tokens, {"i1": N, "i2": N}, "stores reach the index")

    assert by_id(client.post("/v1/clear", {"instance_id": "i1", "tier": "cpu"})) == {"i1": 4}
    assert i1.tiers(30, N) == {"cpu": [False] * 4, "disk": [True] * 4}
    assert i2.tiers(30, N) == {"cpu": [True] * 4, "disk": [True] * 4}
    wait_until(lambda: lookup_tiers(client, tokens, "i1") == ["disk"] * 4, "the clear reaches the index")

    assert set(by_id(client.post("/v1/clear", {}))) == {"i1", "i2"}
    for instance in (i1, i2):
        assert instance.lookup(30, N) == 0
        assert all(t["chunks"] == 0 for t in instance.stats()["tiers"].values())
    wait_hits(client, tokens, {"i1": 0, "i2": 0}, "clearing everything empties the index")
    assert lookup(client, tokens)["hit_tokens"] == 0


def test_a_sigkilled_instance_leaves_lookup_and_route_within_the_heartbeat_timeout(fleet):
    controller = fleet.start_controller()
    i1, i2 = fleet.start_instances(["i1", "i2"])
    client = controller.client()
    wait_up(client, ["i1", "i2"])
    tokens = prompt(40, N)
    for instance in (i1, i2):
        assert instance.store(40, N) == 4
    wait_hits(client, tokens, {"i1": N, "i2": N}, "stores reach the index")
    assert {r["instance_id"] for r in route(client, tokens)} == {"i1", "i2"}

    i2.kill()
    killed = time.monotonic()

    def gone() -> bool:
        routed = {r["instance_id"] for r in route(client, tokens)}
        return "i2" not in hits(client, tokens) and "i2" not in routed

    wait_until(gone, "i2 leaves /v1/lookup and /v1/route", HEARTBEAT_TIMEOUT_S + 5.0)
    took = time.monotonic() - killed
    assert took <= HEARTBEAT_TIMEOUT_S + 1.0, f"i2 left the index {took:.2f} s after SIGKILL"
    assert [r["instance_id"] for r in route(client, tokens)] == ["i1"]

    with pytest.raises(HttpError) as err:
        client.post("/v1/pin", {"model_id": MODEL, "tokens": tokens, "instance_id": "i2"})
    assert err.value.status == 409 and "i2" in err.value.detail and "down" in err.value.detail
    # The instance in front carries on: stores, lookups, its events reach the index.
    assert i1.store(41, N) == 4 and i1.lookup(40, N) == N
    wait_hits(client, prompt(41, N), {"i1": N}, "the live instance's stores reach the index")
    assert by_id(client.post("/v1/pin", {"model_id": MODEL, "tokens": tokens})) == {"i1": 4}


def test_a_stopped_instance_is_down_then_rejoins_with_its_keys_when_it_continues(fleet):
    controller = fleet.start_controller()
    i1, i2 = fleet.start_instances(["i1", "i2"])
    client = controller.client()
    wait_up(client, ["i1", "i2"])
    tokens = prompt(42, N)
    for instance in (i1, i2):
        assert instance.store(42, N) == 4
    wait_hits(client, tokens, {"i1": N, "i2": N}, "stores reach the index")

    i2.proc.send_signal(signal.SIGSTOP)  # hung, not dead: its command server accepts and never answers
    try:
        wait_until(lambda: "i2" not in hits(client, tokens), "the silent i2 leaves the index",
                   HEARTBEAT_TIMEOUT_S + 5.0)
        started = time.monotonic()
        with pytest.raises(HttpError) as err:
            client.post("/v1/unpin", {"model_id": MODEL, "tokens": tokens, "instance_id": "i2"})
        assert err.value.status == 409 and "down" in err.value.detail
        assert time.monotonic() - started < 2.0  # answered, not waited for
        assert by_id(client.post("/v1/clear", {"tier": "cpu"})) == {"i1": 4}  # only those up
    finally:
        i2.proc.send_signal(signal.SIGCONT)
    # Its next heartbeat is refused (known: false): it registers again and resends its keys.
    wait_hits(client, tokens, {"i1": N, "i2": N}, "i2 rejoins with its keys")
    assert lookup_tiers(client, tokens, "i2") == ["cpu"] * 4  # the clear was not sent to it
    assert lookup_tiers(client, tokens, "i1") == ["disk"] * 4


def test_a_sigkilled_server_leaves_the_index_and_the_engine_in_front_of_it_sees_no_error(fleet):
    controller = fleet.start_controller()
    server = fleet.start_server("server-1")
    (i1,) = fleet.start_instances(["i1"], remote=server.url)  # the server is i1's tier below disk
    client = controller.client()
    wait_up(client, ["i1", "server-1"])
    assert i1.store(45, N) == 4
    wait_hits(client, prompt(45, N), {"i1": N, "server-1": N}, "the server's keys reach the index")

    server.kill()
    killed = time.monotonic()
    wait_until(lambda: "server-1" not in hits(client, prompt(45, N)), "the server leaves /v1/lookup",
               HEARTBEAT_TIMEOUT_S + 5.0)
    assert time.monotonic() - killed <= HEARTBEAT_TIMEOUT_S + 1.0
    # The engine in front: stores, lookups and evictions go on without an error (the line protocol
    # fails the test on any exception), its own tiers still answer.
    assert i1.store(46, N) == 4 and i1.lookup(45, N) == N and i1.lookup(46, N) == N
    i1.flood(10)
    wait_hits(client, prompt(46, N), {"i1": i1.lookup(46, N)}, "the engine's events still reach the index")


def test_a_restarted_controller_gets_its_whole_index_back_with_no_manual_step(fleet):
    controller = fleet.start_controller()
    server = fleet.start_server("server-1")
    i1, i2 = fleet.start_instances(["i1"]) + fleet.start_instances(["i2"], remote=server.url)
    client = controller.client()
    wait_up(client, ["i1", "i2", "server-1"])
    assert i1.store(50, N) == 4 and i2.store(51, N) == 4 and i2.store(50, N // 2) == 2
    before = {50: {"i1": N, "i2": N // 2, "server-1": N // 2}, 51: {"i1": 0, "i2": N, "server-1": N}}
    for seed, expected in before.items():
        wait_hits(client, prompt(seed, N), expected, "stores reach the index")

    controller.kill()  # SIGKILL: the in-memory index is gone
    controller.start()  # same port
    client = controller.client()
    wait_up(client, ["i1", "i2", "server-1"])
    for seed, expected in before.items():
        wait_hits(client, prompt(seed, N), expected, "the instances re-send their keys")
    assert lookup_tiers(client, prompt(50, N), "i1") == ["cpu"] * 4


# -- keep-alive: uvicorn closes a connection idle for 5 s (its timeout_keep_alive) -----------------

def test_a_client_idle_past_the_controllers_keep_alive_timeout_still_gets_its_answer(fleet):
    controller = fleet.start_controller()
    client = JsonClient(controller.url, controller.token)
    assert client.get("/v1/instances") == {"instances": []}
    sock = client._conn.sock  # the kept-alive connection: wait for the server to close it

    def closed_by_server() -> bool:
        return bool(select.select([sock], [], [], 0)[0])  # readable with nothing sent: EOF

    wait_until(closed_by_server, "the controller closes the idle connection", 15.0)
    # A request on it would meet a closed socket: the client opens a new one and gets its answer.
    assert client.get("/v1/instances") == {"instances": []}
    client.close()


def test_an_instance_heartbeating_slower_than_the_keep_alive_timeout_stays_registered(fleet):
    controller = fleet.start_controller({"heartbeat_timeout_s": 30.0})
    fleet.start_instances(["i1"], heartbeat_s=6.0)  # a valid setting: beyond uvicorn's 5 s keep-alive
    client = controller.client()
    wait_up(client, ["i1"])
    heartbeats = "/v1/instances/{instance_id}/heartbeat"

    def requests() -> dict[str, int]:
        return client.get("/v1/stats")["requests"]

    # Two heartbeats answered (12 s): each one reached the controller, and none made i1 register
    # again and resend every key (what a failed heartbeat leads to).
    wait_until(lambda: requests().get(heartbeats, 0) >= 2, "two heartbeats of i1 answered", 25.0)
    assert requests()["/v1/instances/register"] == 1
