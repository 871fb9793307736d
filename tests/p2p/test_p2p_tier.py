"""Tests for kvtier/tiers/p2p.py (P2PTier) and kvtier/p2p/peer_client.py (PeerLink): the reader side.

Holders are real: a StorageManager with its PeerServer (kvtier/p2p/peer_server.py) on 127.0.0.1, so
the TCP path, LEASE / RELEASE and CONNECT are the real server's answers. Stand-ins, each for a reason:
- `StaticDirectory` for PeerDirectory where a test fixes who holds what (the real directory against
  the real controller is tests/p2p/test_p2p_directory.py; here too, for the one-round-trip story);
- `StandInPeer` (the kvtier wire in a thread) for a peer that serves corrupt records, which the real
  server never does (it computes each header over the bytes it sends);
- `silent_peer`, a socket that never answers: a stalled peer;
- `StandInEndpoint` for the NIXL endpoint (copies between two pools' arenas in this process): the
  real one is tested in its own module and end to end (tests/p2p/test_p2p_fleet.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import torch
from conftest import CHUNK, NAMESPACE_MODEL, seeded_kv, seeded_tokens
from p2p_processes import unread_bytes
from p2p_reader_doubles import (
    StandInController,
    StandInEndpoint,
    StandInPeer,
    fleet_config,
    record,
    silent_peer,
    slab,
)
from waiting import wait_until

from kvtier.config import P2PConfig
from kvtier.fleet.messages import PeerHolding
from kvtier.keys import ChunkKey, Namespace
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.p2p.directory import PeerDirectory
from kvtier.p2p.peer_server import PeerServer
from kvtier.storage import StorageManager
from kvtier.tiers import p2p as p2p_tier
from kvtier.tiers.base import TierUsage
from kvtier.tiers.p2p import ByteBudget, P2PTier
from kvtier.wire.frames import Op

TOKEN = "p2p-reader-token-0123456789abcdef"
TIMEOUT_S = 1.0
MARGIN_S = 1.5  # what a busy 2-core machine may add to a deadline


def p2p_config(**overrides) -> P2PConfig:
    # A long back-off: a test sees "not asked again" without a clock.
    return P2PConfig(**{"token": TOKEN, "timeout_s": TIMEOUT_S, "retry_after_s": 30.0, "retry_max_s": 60.0,
                        **overrides})


def count(metrics: Metrics, name: str) -> int:
    return int(metrics.value(f"kvtier_tier_{name}_total", {"tier": "p2p"}))


class StaticDirectory:
    """Stands in for PeerDirectory: `held` maps a peer URL to the keys it holds (all in memory)."""

    def __init__(self, held: dict[str, list[ChunkKey]]):
        self.held = held
        self.calls = 0
        self.closed = False

    def locate(self, keys) -> list[PeerHolding]:
        self.calls += 1
        return [PeerHolding(instance_id=f"peer{n}", p2p_url=url, held=[k in mine for k in keys],
                            in_memory=[k in mine for k in keys])
                for n, (url, mine) in enumerate(self.held.items()) if any(k in mine for k in keys)]

    def close(self) -> None:
        self.closed = True


@dataclass
class Holder:
    manager: StorageManager
    server: PeerServer
    spans: list
    kv: torch.Tensor
    endpoint: StandInEndpoint | None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def keys(self) -> list[ChunkKey]:
        return [s.key for s in self.spans]


@dataclass
class Reader:
    tier: P2PTier
    manager: StorageManager
    metrics: Metrics
    endpoint: StandInEndpoint | None


@pytest.fixture
def make_holder(make_manager, db, layout):
    """A StorageManager holding `chunks` seeded chunks, served by a real PeerServer (NIXL: a
    StandInEndpoint over its pool)."""
    servers = []

    def make(seed: int = 1, chunks: int = 4, nixl: bool = False, **endpoint) -> Holder:
        manager = make_manager(slabs=16, disk=False)
        stand_in = StandInEndpoint(manager.pool, **endpoint) if nixl else None
        ns = Namespace.for_layout(NAMESPACE_MODEL, layout).digest()
        server = PeerServer(P2PConfig(token=TOKEN), ns, manager.metrics, stand_in)
        servers.append(server)
        server.start(manager)
        spans = db.spans(seeded_tokens(chunks * CHUNK, seed))
        kv = seeded_kv(layout, chunks * CHUNK, seed)
        assert manager.put(spans, kv) == chunks
        return Holder(manager, server, spans, kv, stand_in)

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_reader(layout):
    """A P2PTier under a StorageManager of its own (16 one-chunk slabs)."""
    made = []

    def make(directory, nixl: bool = False, own_url: str | None = None, io_threads: int = 1,
             endpoint: dict | None = None, **config) -> Reader:
        metrics = Metrics(["cpu", "p2p"])
        pool = MemoryPool(16 * layout.chunk_bytes(CHUNK), layout.chunk_bytes(CHUNK), pin=False)
        stand_in = StandInEndpoint(pool, **(endpoint or {})) if nixl else None
        ns = Namespace.for_layout(NAMESPACE_MODEL, layout).digest()
        tier = P2PTier(p2p_config(**config), directory, ns, metrics, stand_in, own_url)
        manager = StorageManager(layout, pool, [tier], metrics, io_threads=io_threads)
        made.append(manager)
        return Reader(tier, manager, metrics, stand_in)

    yield make
    for manager in made:
        manager.close()


def load(reader: Reader, holder: Holder) -> tuple[int, torch.Tensor]:
    out = torch.zeros_like(holder.kv)
    return reader.manager.get(holder.spans, out), out


def chunk_dests(holder: Holder) -> list[torch.Tensor]:
    """Buffers outside any registered arena (TCP only)."""
    return [slab(holder.manager.pool.slab_bytes) for _ in holder.keys]


def arena_dests(reader: Reader, n: int) -> list[torch.Tensor]:
    """Slabs of the reader's pool (NIXL can READ into them)."""
    pool = reader.manager.pool
    return [pool.tensor(pool.alloc("test")) for _ in range(n)]


# -- TCP -----------------------------------------------------------------------------------------


def test_a_load_over_tcp_is_bit_equal_and_counted(make_holder, make_reader):
    holder = make_holder()
    reader = make_reader(StaticDirectory({holder.url: holder.keys}), io_threads=2)
    assert reader.tier.has(holder.keys) == [True] * 4
    n, out = load(reader, holder)
    assert n == 4 and torch.equal(out, holder.kv)
    assert count(reader.metrics, "bytes_read") == holder.kv.numel() * holder.kv.element_size()
    assert count(reader.metrics, "hits") == 4
    assert count(reader.metrics, "errors") == count(reader.metrics, "corrupt") == 0
    assert holder.manager.metrics.value("kvtier_p2p_served_chunks_total") == 4


@pytest.mark.parametrize("budget", [256 << 20, 1])
def test_keys_spread_over_two_peers_all_arrive(make_holder, make_reader, budget):
    """Also with a byte budget smaller than one chunk: each peer's read then goes alone."""
    a, b = make_holder(seed=7), make_holder(seed=7)  # the same chunks, held by two peers
    directory = StaticDirectory({a.url: a.keys[:3], b.url: b.keys[2:]})
    reader = make_reader(directory, max_bytes_in_flight=budget)
    n, out = load(reader, a)
    assert n == 4 and torch.equal(out, a.kv)
    served = [h.manager.metrics.value("kvtier_p2p_served_chunks_total") for h in (a, b)]
    assert served == [3, 1]  # key 2: the peer with the longest leading run


@pytest.mark.parametrize("corrupt", ["flipped bit", "another key's record", "short payload"])
def test_a_corrupt_record_from_a_peer_is_a_counted_miss(make_reader, corrupt):
    ns = b"corrupt!"
    (k1, head1, p1), (_, head2, p2) = record(ns, 1), record(ns, 2)
    payload = p1.clone()
    payload[123] ^= 0x10
    served = {"flipped bit": (head1, payload.numpy().tobytes()), "another key's record": (head2, p2.numpy()),
              "short payload": (head1, p1.numpy()[:-8])}[corrupt]
    peer = StandInPeer({k1.to_bytes(): served})
    try:
        reader = make_reader(StaticDirectory({peer.url: [k1]}))
        assert reader.tier.get([k1], [slab(4096)]) == [None]
        assert count(reader.metrics, "corrupt") == 1 and count(reader.metrics, "errors") == 0
        assert peer.ops == [Op.HELLO, Op.GET]  # and no DELETE: the peer's copy is not ours
    finally:
        peer.close()


@pytest.mark.parametrize("silent_keys", [1, 3])  # fewer or more keys than the other peer: either order
def test_a_silent_peer_costs_only_its_keys_within_the_deadline_then_backs_off(make_holder, make_reader,
                                                                            silent_keys):
    holder = make_holder()
    silent = silent_peer()
    silent_url = f"kvtier://127.0.0.1:{silent.getsockname()[1]}"
    try:
        reader = make_reader(StaticDirectory({silent_url: holder.keys[:silent_keys],
                                              holder.url: holder.keys[silent_keys:]}))
        for attempt in range(2):
            dests = chunk_dests(holder)
            start = time.monotonic()
            got = reader.tier.get(holder.keys, dests)
            took = time.monotonic() - start
            assert got[:silent_keys] == [None] * silent_keys and None not in got[silent_keys:]
            assert count(reader.metrics, "errors") == silent_keys  # the first call's; then backing off
            assert took < (TIMEOUT_S + MARGIN_S if attempt == 0 else TIMEOUT_S / 2)
    finally:
        silent.close()


# io_threads 1: P2P as the only tier below host memory (configs/p2p.yaml) with one read thread.
@pytest.mark.parametrize("io_threads", [1, 4])
def test_a_stalled_peer_does_not_hold_the_read_threads_of_another_load(make_holder, make_reader,
                                                                        io_threads):
    """A load from a silent peer (all its chunks on the engine's read threads) and, meanwhile, a
    load from a healthy peer through the same StorageManager: the second does not wait."""
    stalled, healthy = make_holder(seed=11), make_holder(seed=12)
    silent = silent_peer()
    silent_url = f"kvtier://127.0.0.1:{silent.getsockname()[1]}"
    try:
        reader = make_reader(StaticDirectory({silent_url: stalled.keys, healthy.url: healthy.keys}),
                             io_threads=io_threads)
        waiting = threading.Thread(target=load, args=(reader, stalled))
        waiting.start()
        wait_until(lambda: unread_bytes(silent.getsockname()[1]) > 0, "the silent peer got a request")
        start = time.monotonic()
        n, out = load(reader, healthy)
        took = time.monotonic() - start
        waiting.join(TIMEOUT_S + MARGIN_S + 5)
        assert n == 4 and torch.equal(out, healthy.kv)
        assert took < TIMEOUT_S / 2, f"the healthy load waited {took:.2f} s on the silent peer"
    finally:
        silent.close()


def test_a_peer_that_went_away_is_a_miss_and_backs_off_alone(make_holder, make_reader):
    gone, kept = make_holder(), make_holder()
    reader = make_reader(StaticDirectory({gone.url: gone.keys[:2], kept.url: kept.keys[2:]}))
    gone.server.stop()  # connection refused from now on
    for _ in range(2):
        got = reader.tier.get(kept.keys, chunk_dests(kept))
        assert got[:2] == [None, None] and None not in got[2:]
        assert count(reader.metrics, "errors") == 2  # the second call does not ask it


def test_a_peer_that_refuses_our_token_is_a_miss_not_an_exception(make_holder, make_reader):
    holder = make_holder()
    reader = make_reader(StaticDirectory({holder.url: holder.keys}), token="not-the-peers-token-0123456789")
    assert reader.tier.get(holder.keys, chunk_dests(holder)) == [None] * 4
    assert count(reader.metrics, "errors") == 4


@pytest.mark.parametrize("nixl", [False, True])
def test_keys_the_directory_got_wrong_are_plain_misses(make_holder, make_reader, nixl):
    holder = make_holder(nixl=nixl)
    other = make_holder(seed=2)  # chunks `holder` does not have
    reader = make_reader(StaticDirectory({holder.url: other.keys}), nixl=nixl)
    assert reader.tier.get(other.keys, arena_dests(reader, 4)) == [None] * 4
    assert count(reader.metrics, "errors") == count(reader.metrics, "corrupt") == 0
    assert holder.server.stats()["leases_active"] == 0


def test_idle_links_beyond_max_links_are_closed(make_holder, make_reader, monkeypatch):
    monkeypatch.setattr(p2p_tier, "MAX_LINKS", 1)
    a, b = make_holder(), make_holder(seed=2)
    reader = make_reader(StaticDirectory({a.url: a.keys, b.url: b.keys}))
    assert None not in reader.tier.get(a.keys, chunk_dests(a))
    assert a.server.stats()["connections"] == 1
    assert None not in reader.tier.get(b.keys, chunk_dests(b))  # a's link makes room
    wait_until(lambda: a.server.stats()["connections"] == 0, "the evicted link's connection closed")
    assert None not in reader.tier.get(a.keys, chunk_dests(a))  # and is made again when needed


def test_the_own_endpoint_is_never_asked(make_reader):
    own = StandInPeer()
    try:
        k = record(b"own-keys", 1)[0]
        reader = make_reader(StaticDirectory({own.url: [k]}), own_url=own.url)
        assert reader.tier.has([k]) == [False]
        assert reader.tier.get([k], [slab(4096)]) == [None]
        assert own.ops == []
    finally:
        own.close()


def test_has_then_get_costs_one_controller_round_trip(make_holder, make_reader, metrics_p2p):
    holder = make_holder()
    n = len(holder.keys)
    reply = {"peers": [{"instance_id": "holder", "p2p_url": holder.url, "held": [True] * n,
                        "in_memory": [True] * n}]}
    controller = StandInController(lambda body: (200, reply))
    directory = PeerDirectory(fleet_config(controller.url), 60.0, metrics_p2p)
    try:
        reader = make_reader(directory)
        assert reader.tier.has(holder.keys) == [True] * n
        got = reader.tier.get(holder.keys, chunk_dests(holder))
        assert None not in got and len(controller.bodies) == 1
    finally:
        controller.close()


def test_a_dead_controller_means_misses_not_exceptions(make_reader, metrics_p2p):
    directory = PeerDirectory(fleet_config("http://127.0.0.1:9", timeout_s=0.5), 1.0, metrics_p2p)
    reader = make_reader(directory)
    k = record(b"no-ctrl!", 1)[0]
    assert reader.tier.has([k]) == [False]
    assert reader.tier.get([k], [slab(4096)]) == [None]


@pytest.fixture
def metrics_p2p() -> Metrics:
    return Metrics(["cpu", "p2p"])


# -- NIXL (stand-in endpoint) --------------------------------------------------------------------


def test_nixl_leases_reads_and_releases(make_holder, make_reader):
    holder = make_holder(nixl=True)
    reader = make_reader(StaticDirectory({holder.url: holder.keys}), nixl=True, io_threads=2)
    n, out = load(reader, holder)
    assert n == 4 and torch.equal(out, holder.kv)
    assert reader.endpoint.connects == 1  # one CONNECT, shared by the read threads
    assert sorted(len(pairs) for pairs in reader.endpoint.reads) in ([4], [2, 2])  # one READ per call
    assert holder.manager.metrics.value("kvtier_p2p_leases_total") == len(reader.endpoint.reads)
    assert holder.server.stats()["leases_active"] == 0  # both RELEASEd
    assert count(reader.metrics, "bytes_read") == holder.kv.numel() * holder.kv.element_size()


def test_a_failed_nixl_read_is_a_miss_its_lease_released_and_the_peer_dropped(make_holder, make_reader):
    holder = make_holder(nixl=True)
    reader = make_reader(StaticDirectory({holder.url: holder.keys}), nixl=True,
                         endpoint={"fail_reads": True})
    n, _ = load(reader, holder)
    assert n == 0
    assert count(reader.metrics, "errors") == 4 and len(reader.endpoint.reads) == 1
    assert holder.server.stats()["leases_active"] == 0
    assert reader.endpoint.peers_closed == 1  # the next use connects anew


def test_a_record_corrupted_on_the_nixl_way_is_a_counted_miss(make_holder, make_reader):
    holder = make_holder(nixl=True)
    reader = make_reader(StaticDirectory({holder.url: holder.keys}), nixl=True,
                         endpoint={"corrupt_reads": True})
    assert reader.tier.get(holder.keys, arena_dests(reader, 4)) == [None] * 4
    assert count(reader.metrics, "corrupt") == 4 and count(reader.metrics, "errors") == 0
    assert holder.server.stats()["leases_active"] == 0


@pytest.mark.parametrize("holder_side", ["no endpoint", "other slot size"])
def test_a_peer_without_matching_nixl_is_read_over_tcp(make_holder, make_reader, holder_side):
    holder = (make_holder() if holder_side == "no endpoint"
              else make_holder(nixl=True, slot_bytes=4096 * 3))
    reader = make_reader(StaticDirectory({holder.url: holder.keys}), nixl=True)
    n, out = load(reader, holder)
    assert n == 4 and torch.equal(out, holder.kv)
    assert None not in reader.tier.get(holder.keys, arena_dests(reader, 4))  # asked once: TCP from then on
    assert reader.endpoint.connects == 0 and reader.endpoint.reads == []
    assert count(reader.metrics, "errors") == 0


def test_dests_outside_the_arena_go_over_tcp(make_holder, make_reader):
    holder = make_holder(nixl=True)
    reader = make_reader(StaticDirectory({holder.url: holder.keys}), nixl=True)
    got = reader.tier.get(holder.keys, chunk_dests(holder))
    assert None not in got and reader.endpoint.reads == [] and reader.endpoint.connects == 0


# -- the byte budget, the rest of the protocol ---------------------------------------------------


def test_the_byte_budget_waits_for_room_until_its_deadline():
    budget = ByteBudget(100)
    assert budget.acquire(60, time.monotonic() + 1)
    assert not budget.acquire(60, time.monotonic() + 0.05)  # no room before its deadline
    got = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire(60, time.monotonic() + 30)))
    waiter.start()
    budget.release(60)
    waiter.join(30)
    assert got == [True] and budget.in_flight == 60
    budget.release(60)
    assert budget.acquire(500, time.monotonic())  # larger than the budget: it goes alone
    assert not budget.acquire(1, time.monotonic())
    budget.release(500)
    assert budget.in_flight == 0


def test_a_read_only_tier(make_reader):
    directory = StaticDirectory({})
    reader = make_reader(directory)
    tier = reader.tier
    assert (tier.name, tier.writable) == ("p2p", False)
    assert tier.put([object(), object()]) == [False, False]
    assert tier.remove([record(b"readonly", 1)[0]]) == 0
    tier.clear()
    assert tier.usage() == TierUsage(0, 0, 0)
    assert tier.has([]) == [] and tier.get([], []) == []
    reader.manager.close()
    wait_until(lambda: directory.closed, "closing the storage closes the tier and its directory")
