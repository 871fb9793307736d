"""P2P between real processes on 127.0.0.1: a kvtier_controller and CacheEngine instances
(tests/controller/fleet_instance.py), each with its own CPU tier and its own disk directory and no
shared store (no Redis, no kvtier_server), that serve their chunks to each other through the `p2p:`
section, over NIXL and over TCP.

- what one instance stored, another loads through its p2p tier, bit-equal, then from its own CPU tier;
- a holder SIGKILLed while a read from it is in progress (stalled by SIGSTOP once the request
  reached it; or caught with its chunks on the way: its reply in its send buffer, or a lease out
  while the reader READs): the reader's retrieve ends within its deadline with only verified chunks
  (a miss: the engine recomputes), no hang, no crash, and the surviving peers' leases return to zero;
- a stalled peer (SIGSTOP) does not stall a concurrent load from another peer, and serves again
  after SIGCONT once the reader's back-off lets a probe through.

Where a request or a reply is, is read from the kernel's socket queues (`queued_bytes`) and from a
peer's STATS, never guessed with a fixed wait. The three instances of a transport are shared by the
module's tests (each test stores its own prompts; one that kills starts its own holder), and every
test ends with each instance's leases at zero and its storage invariants holding.
"""

from __future__ import annotations

import itertools
import select
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import seeded_kv, small_layout
from fleet_processes import (
    CHUNK,
    ControllerProcess,
    Fleet,
    InstanceProcess,
    OneShotClient,
    hits,
    prompt,
    running_fleet,
    wait_up,
)
from p2p_processes import (
    MARGIN_S,
    PEER_TIMEOUT_S,
    TRANSPORTS,
    host_port,
    leases,
    p2p_section,
    queued_bytes,
    require,
    unread_bytes,
)
from waiting import wait_until

from kvtier import KVLayout

sys.path.insert(0, str(Path(__file__).parents[1] / "controller"))  # fleet_instance: the digest
from fleet_instance import kv_digest  # noqa: E402

SIZES = {"cpu_capacity": "4MiB", "disk_capacity": "16MiB", "io_threads": 4}  # the disk's default threads
BIG_LAYOUT = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128}  # a 16-token chunk: 2 MiB
BIG_SIZES = {"cpu_capacity": "512MiB", "disk_capacity": "1GiB", "io_threads": 4, "layout": BIG_LAYOUT}
BIG_CHUNKS = 96  # 192 MiB: a transfer long enough to be caught on its way
LEASE_S = 3.0  # a lease granted for a request its reader gave up on ends on its own within this
HEARTBEAT_TIMEOUT_S = 15.0  # a stalled peer stays "up" in the controller for the whole test
INDEX_DEADLINE_S = 20.0
_victims = itertools.count()


def section(transport: str) -> dict:
    return p2p_section(transport, lease_s=LEASE_S)


@dataclass
class P2PFleet:
    transport: str
    fleet: Fleet
    controller: ControllerProcess
    client: OneShotClient
    a: InstanceProcess
    b: InstanceProcess
    c: InstanceProcess

    @property
    def instances(self) -> list[InstanceProcess]:
        return [self.a, self.b, self.c]

    def start(self, instance_id: str) -> InstanceProcess:
        (instance,) = self.fleet.start_instances([instance_id], p2p=self.section(), **SIZES)
        return instance

    def section(self) -> dict:
        return section(self.transport)

    def url(self, instance: InstanceProcess) -> str:
        """The instance's peer endpoint, as it registered it."""
        url = wait_up(self.client, [instance.instance_id])[instance.instance_id]["p2p_url"]
        assert url and url.startswith("kvtier://"), f"{instance} registered no p2p_url: {url!r}"
        return url


@pytest.fixture(scope="module", params=TRANSPORTS)
def p2p_fleet(request, tmp_path_factory):
    require(request.param)
    with running_fleet(tmp_path_factory.mktemp(f"p2p-{request.param}")) as fleet:
        controller = fleet.start_controller({"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S})
        ids = ["a", "b", "c"]
        a, b, c = fleet.start_instances(ids, p2p=section(request.param), **SIZES)
        client = controller.client()
        wait_up(client, ids)
        yield P2PFleet(request.param, fleet, controller, client, a, b, c)


@pytest.fixture
def p2p(p2p_fleet):
    """The module's fleet, every instance running; a test's SIGSTOP never outlives it."""
    for instance in p2p_fleet.instances:
        assert instance.alive(), f"{instance} died in an earlier test:\n{instance.log_text()}"
    try:
        yield p2p_fleet
    finally:
        for instance in p2p_fleet.instances:
            instance.resume()


def expected_digest(seed: int, num_tokens: int, hit: int, layout: KVLayout | None = None) -> str:
    """The digest of a zeroed buffer holding the first `hit` tokens of what `store` stored."""
    stored = seeded_kv(layout or small_layout(), num_tokens, seed)  # what fleet_instance's `store` stores
    out = stored.new_zeros(stored.shape)
    out[:, :, :hit] = stored[:, :, :hit]
    return kv_digest(out)


def store_and_index(p2p: P2PFleet, holder: InstanceProcess, seed: int, num_tokens: int) -> None:
    """`holder` stores prompt(seed, n); wait until the controller's index says it holds all of it."""
    assert holder.store(seed, num_tokens) == num_tokens // CHUNK
    tokens = prompt(seed, num_tokens)
    wait_until(lambda: hits(p2p.client, tokens).get(holder.instance_id) == num_tokens,
               f"{holder}'s prompt {seed} in the controller's index", INDEX_DEADLINE_S)


def settle(p2p: P2PFleet, instances: list[InstanceProcess]) -> None:
    """Every lease ended (a lease for a request its reader gave up on within LEASE_S), and each
    instance's storage accounting holds (no held slab left behind by a lease or a read)."""
    for instance in instances:
        url = p2p.url(instance)
        wait_until(lambda url=url: leases(url) == 0, f"{instance}'s leases back at zero", LEASE_S + 5.0)
        instance.check()


def p2p_counts(instance: InstanceProcess) -> dict[str, int]:
    return instance.stats()["tiers"]["p2p"]


def test_second_instance_loads_bit_equal_through_p2p_alone_then_from_its_own_cpu(p2p):
    seed, n = 101, 8 * CHUNK
    store_and_index(p2p, p2p.a, seed, n)
    assert set(p2p.b.stats()["tiers"]) == {"cpu", "disk", "p2p"}  # no shared store in between
    held = p2p.b.tiers(seed, n)
    assert not any(held["cpu"]) and not any(held["disk"]) and all(held["p2p"])

    assert p2p.b.lookup(seed, n) == n
    before, served = p2p_counts(p2p.b), p2p.a.stats()
    first = p2p.b.digest(seed, n)
    assert first["hit"] == n
    assert first["digest"] == expected_digest(seed, n, n) == p2p.a.digest(seed, n)["digest"]
    after = p2p_counts(p2p.b)
    assert after["hits"] - before["hits"] == n // CHUNK
    assert after["bytes_read"] - before["bytes_read"] == n // CHUNK * small_layout().chunk_bytes(CHUNK)
    assert after["corrupt"] == before["corrupt"] and after["errors"] == before["errors"]
    holder = p2p.a.stats()
    assert holder["p2p_served_chunks"] - served["p2p_served_chunks"] == n // CHUNK
    leased = holder["p2p_leases"] - served["p2p_leases"]  # NIXL reads leased slabs; TCP replies
    assert leased >= 1 if p2p.transport == "nixl" else leased == 0

    assert all(p2p.b.tiers(seed, n)["cpu"])  # promoted on the hit
    cpu_before = p2p.b.stats()["tiers"]["cpu"]["hits"]
    second = p2p.b.digest(seed, n)
    assert second["hit"] == n and second["digest"] == first["digest"]
    stats = p2p.b.stats()["tiers"]
    assert stats["p2p"]["hits"] == after["hits"] and stats["cpu"]["hits"] - cpu_before == n // CHUNK
    settle(p2p, p2p.instances)


def test_holder_killed_mid_read_is_a_miss_within_the_deadline_and_survivors_release_their_leases(p2p):
    victim = p2p.start(f"victim-{next(_victims)}")
    warm, big, other, n = 201, 202, 203, 16 * CHUNK
    store_and_index(p2p, victim, warm, CHUNK)
    store_and_index(p2p, victim, big, n)
    store_and_index(p2p, p2p.c, other, n)
    _, port = host_port(p2p.url(victim))
    # The reader's connection to the victim (and its NIXL connection) made by a first read: the read
    # below is a request on an open connection, the holder's answer still to come.
    assert p2p.b.digest(warm, CHUNK)["hit"] == CHUNK
    misses = p2p_counts(p2p.b)["misses"]

    victim.pause()
    p2p.b.begin("big", f"digest {big} {n}")
    wait_until(lambda: unread_bytes(port) > 0, "the reader's request reached the stalled holder", 10.0)
    victim.kill()
    got = p2p.b.end("big", PEER_TIMEOUT_S + 20.0)
    assert got["seconds"] <= PEER_TIMEOUT_S + MARGIN_S, got
    assert got["hit"] == 0 and got["digest"] == expected_digest(big, n, 0)
    assert p2p_counts(p2p.b)["misses"] - misses >= n // CHUNK

    # The reader goes on: the surviving peer serves it, and ends every lease it granted.
    assert p2p.b.lookup(other, n) == n
    served = p2p.b.digest(other, n)
    assert served["hit"] == n and served["digest"] == expected_digest(other, n, n)
    assert p2p.b.digest(big, n)["hit"] == 0  # the dead holder's chunks: a miss, at once or by deadline
    settle(p2p, p2p.instances)


def test_holder_killed_while_its_chunks_are_on_the_way_costs_the_reader_its_deadline_at_most(p2p):
    k = next(_victims)
    holder, reader = p2p.fleet.start_instances([f"big-holder-{k}", f"big-reader-{k}"], p2p=p2p.section(),
                                               **BIG_SIZES)
    seed, n = 401, BIG_CHUNKS * CHUNK
    store_and_index(p2p, holder, seed, n)
    url = p2p.url(holder)
    _, port = host_port(url)

    reader.begin("big", f"digest {seed} {n}")

    def on_the_way() -> bool:
        """The holder is sending (TCP: its reply in its send buffer) or a lease is out (NIXL: the
        reader READs the leased slots)."""
        if select.select([reader.proc.stdout], [], [], 0)[0]:
            pytest.fail("the whole transfer ended before it was seen on its way: make it longer")
        return queued_bytes(port)[0] > 0 or leases(url) > 0

    wait_until(on_the_way, "the holder's chunks on their way to the reader", 20.0)
    holder.kill()
    got = reader.end("big", PEER_TIMEOUT_S + 20.0)
    assert got["seconds"] <= PEER_TIMEOUT_S + MARGIN_S, got
    # Whatever arrived before the kill and was verified may be used, and nothing else.
    assert got["hit"] % CHUNK == 0 and got["digest"] == expected_digest(seed, n, got["hit"],
                                                                         KVLayout(**BIG_LAYOUT)), got
    again = reader.digest(seed, n)  # the dead holder: a miss (or the promoted prefix), no hang
    assert again["hit"] == got["hit"] and again["seconds"] <= PEER_TIMEOUT_S + MARGIN_S, again
    settle(p2p, [reader, *p2p.instances])  # the reader: no slab left to a transfer that was cut off
    reader.exit()  # a clean close after it: the endpoint's reads all settled


def test_a_stalled_peer_does_not_stall_a_load_from_another_and_serves_again_after_its_back_off(p2p):
    x, y, n = 301, 302, 4 * CHUNK
    store_and_index(p2p, p2p.b, x, n)  # X: held by b only
    store_and_index(p2p, p2p.a, y, n)  # Y: held by a only
    _, port = host_port(p2p.url(p2p.a))

    p2p.a.pause()
    try:
        p2p.c.begin("y", f"digest {y} {n}")
        wait_until(lambda: unread_bytes(port) > 0, "c's request for Y reached the stalled peer", 10.0)
        got_x = p2p.c.digest(x, n)  # while c's read of Y waits on the stalled peer
        got_y = p2p.c.end("y", PEER_TIMEOUT_S + 20.0)
    finally:
        p2p.a.resume()
    assert got_x["hit"] == n and got_x["digest"] == expected_digest(x, n, n)
    assert got_x["seconds"] < PEER_TIMEOUT_S / 2, f"the load from b waited on the stalled peer: {got_x}"
    assert got_y["hit"] == 0 and got_y["seconds"] <= PEER_TIMEOUT_S + MARGIN_S, got_y

    def served() -> dict | None:
        got = p2p.c.digest(y, n)
        return got if got["hit"] else None

    got = wait_until(served, "the resumed peer serves again after its back-off", 10.0)
    assert got["hit"] == n and got["digest"] == expected_digest(y, n, n)
    settle(p2p, p2p.instances)
