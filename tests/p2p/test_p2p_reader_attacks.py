"""Attacks on the reader side of P2P (kvtier/tiers/p2p.py, kvtier/p2p/peer_client.py, directory.py,
nixl_transport.py): everything a peer or the controller sends is hostile. Each attack must end as a
miss (never an exception out of the tier, never a wrong record reported), within the deadline, with
bounded memory, and with every lease the reader was granted released.

The hostile peer is `StandInPeer` with a scripted `answer` (the kvtier wire in a thread, unchecked);
its "NIXL" is `StandInEndpoint` (copies between two pools' arenas in this process), so a LEASE reply
can name any slot of the holder's arena. The hostile controller is `StandInController`.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from p2p_reader_doubles import (
    StandInController,
    StandInEndpoint,
    StandInPeer,
    fleet_config,
    record,
)
from test_p2p_tier import StaticDirectory
from waiting import wait_until

from kvtier.config import P2PConfig
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.p2p import directory as directory_module
from kvtier.p2p import peer_client
from kvtier.p2p.directory import PeerDirectory
from kvtier.p2p.nixl_transport import TransportError, _check_remote, nixl_status
from kvtier.tiers.p2p import P2PTier
from kvtier.wire.frames import PREFIX, Frame, Op, encode, reply

NS = b"attacker"
TOKEN = "p2p-attack-token-0123456789abcdef"
SLOT = 8192  # the slab size of both pools
PAYLOAD = 4096  # each record's payload
TIMEOUT_S = 1.0
MARGIN_S = 2.0  # what a busy 2-core machine may add to a deadline


def p2p_config(**overrides) -> P2PConfig:
    return P2PConfig(**{"token": TOKEN, "timeout_s": TIMEOUT_S, "retry_after_s": 30.0, "retry_max_s": 60.0,
                        **overrides})


class Rig:
    """A holder's pool (records 0..3 in slots 1..4) behind a hostile peer, and a reader's pool with
    a P2PTier over a StandInEndpoint: LEASE replies name holder slots, READs copy them."""

    def __init__(self, lease_answer=None, connect_answer=None, get_answer=None, **config):
        self.holder_pool = MemoryPool(8 * SLOT, SLOT, pin=False)
        self.reader_pool = MemoryPool(8 * SLOT, SLOT, pin=False)
        self.holder = StandInEndpoint(self.holder_pool)
        self.reader = StandInEndpoint(self.reader_pool)
        self.records = [record(NS, i, PAYLOAD) for i in range(4)]
        for i, (_, _, payload) in enumerate(self.records):
            self.holder_pool.arena[(i + 1) * self.holder_pool.slab_stride:][:PAYLOAD].copy_(payload)
        self.keys = [k for k, _, _ in self.records]
        self.heads = [h for _, h, _ in self.records]
        self.released: list[int] = []
        self.lease_answer, self.connect_answer, self.get_answer = lease_answer, connect_answer, get_answer
        self.peer = StandInPeer(answer=self._answer)
        self.metrics = Metrics(["cpu", "p2p"])
        self.tier = P2PTier(p2p_config(**config), StaticDirectory({self.peer.url: self.keys}), NS,
                            self.metrics, self.reader, None)

    def _answer(self, frame: Frame) -> list | None:
        if frame.op is Op.CONNECT:
            if self.connect_answer is not None:
                return self.connect_answer(frame)
            return encode(reply(frame, stats=self.holder.geometry(), heads=[b""]), [self.holder.metadata()])
        if frame.op is Op.LEASE and self.lease_answer is not None:
            asked = [self.keys.index(_key(k)) for k in frame.keys]
            heads, slots = self.lease_answer(asked)
            return encode(reply(frame, heads=heads, slots=slots, lease=77))
        if frame.op is Op.RELEASE:
            self.released.append(frame.lease)
            return encode(reply(frame, count=1))
        if frame.op is Op.GET and self.get_answer is not None:
            return self.get_answer(frame)
        return None

    def dests(self, n: int = 4) -> list[torch.Tensor]:
        pool = self.reader_pool
        return [pool.tensor(pool.alloc("test"), pool.slab_stride) for _ in range(n)]

    def count(self, name: str) -> int:
        return int(self.metrics.value(f"kvtier_tier_{name}_total", {"tier": "p2p"}))

    def close(self) -> None:
        self.tier.close()
        self.peer.close()
        self.holder.close()
        self.reader.close()


def _key(raw: bytes):
    from kvtier.keys import ChunkKey

    return ChunkKey.from_bytes(raw)


@pytest.fixture
def rig():
    made: list[Rig] = []

    def make(**kw) -> Rig:
        made.append(Rig(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def timed_get(r: Rig, dests: list[torch.Tensor] | None = None):
    dests = r.dests() if dests is None else dests
    started = time.monotonic()
    got = r.tier.get(r.keys, dests)
    return got, time.monotonic() - started, dests


def assert_only_true_records(r: Rig, got, dests) -> None:
    """Every header reported names its key and the bytes in its dest are that key's payload."""
    for i, header in enumerate(got):
        if header is not None:
            assert header.key == r.keys[i]
            assert torch.equal(dests[i][:PAYLOAD], r.records[i][2])


# -- LEASE replies that lie ----------------------------------------------------------------------

BIG = record(NS, 0, 2 * SLOT)  # key 0 with a payload longer than a slot


@pytest.mark.parametrize("attack,hits,why", [
    ("honest", 4, "the rig itself works"),
    ("slot out of range", 0, "a slot beyond the holder's arena"),
    ("slot 2**63", 0, "a slot that overflows any address"),
    ("duplicate slots", 1, "every key leased to record 0's slot"),
    ("heads of other keys", 0, "each head names the next key"),
    ("payload over the slot", 0, "a head whose payload_len exceeds the slot"),
    ("wrong checksum", 0, "slots shifted: each holds another record's bytes"),
    ("more entries", 0, "one slot more than keys asked"),
    ("fewer entries", 0, "one slot fewer than keys asked"),
])
def test_a_lease_reply_that_lies_is_misses_and_the_lease_released(rig, attack, hits, why):
    def lease(asked: list[int]):
        heads, slots = [r.heads[i] for i in asked], [i + 1 for i in asked]
        if attack == "slot out of range":
            slots[-1] = 1000
        elif attack == "slot 2**63":
            slots[0] = 2**63
        elif attack == "duplicate slots":
            slots = [1] * len(asked)
        elif attack == "heads of other keys":
            heads = heads[1:] + heads[:1]
        elif attack == "payload over the slot":
            heads = [BIG[1]] * len(asked)
        elif attack == "wrong checksum":
            slots = slots[1:] + slots[:1]
        elif attack == "more entries":
            heads, slots = heads + heads[:1], slots + slots[:1]
        elif attack == "fewer entries":
            heads, slots = heads[:-1], slots[:-1]
        return heads, slots

    r = rig(lease_answer=lease)
    got, took, dests = timed_get(r)
    assert sum(h is not None for h in got) == hits, why
    assert_only_true_records(r, got, dests)
    assert took < TIMEOUT_S + MARGIN_S
    assert r.released == [77]  # released whatever the reply was
    assert r.tier._budget.in_flight == 0


# -- CONNECT replies that lie --------------------------------------------------------------------


@pytest.mark.parametrize("geometry", [
    {"base": 1 << 20, "stride": SLOT, "slot_bytes": SLOT, "slots": 2**40},  # 24 TiB of descriptors
    {"base": 1 << 20, "stride": SLOT, "slot_bytes": SLOT, "slots": 2**26},  # 1.5 GiB of them
    {"base": 2**64 - SLOT, "stride": SLOT, "slot_bytes": SLOT, "slots": 8},  # addresses wrap
    {"base": 1 << 20, "stride": 0, "slot_bytes": SLOT, "slots": 8},
    {"base": 0, "stride": SLOT, "slot_bytes": SLOT, "slots": 8},
    {"base": 1 << 20, "stride": SLOT, "slot_bytes": SLOT, "slots": -1},
    {"base": 1 << 20, "stride": SLOT, "slot_bytes": SLOT},
])
def test_a_geometry_that_lies_is_refused_before_anything_is_allocated(geometry):
    # NixlEndpoint.connect builds one descriptor per remote slot (24 bytes each) before NIXL can say
    # the slots lie outside what the holder registered: the count must be bounded first.
    with pytest.raises(TransportError):
        _check_remote(geometry, SLOT)


def test_a_plausible_geometry_passes():
    geometry = {"base": 1 << 20, "stride": SLOT, "slot_bytes": SLOT, "slots": 1 << 16}
    assert _check_remote(geometry, SLOT) == geometry
    as_many_as_ours = {**geometry, "slots": 1 << 22}  # a peer configured as we are is never refused
    assert _check_remote(as_many_as_ours, SLOT, max_slots=1 << 22) == as_many_as_ours


@pytest.mark.skipif(nixl_status() is not None, reason=f"NIXL unusable: {nixl_status()}")
@pytest.mark.parametrize("metadata", [b"", b"junk" * 100, bytes(range(256)) * 8])
def test_junk_nixl_metadata_is_a_transport_error_not_a_crash(metadata):
    from kvtier.p2p.nixl_transport import NixlEndpoint

    arena = torch.zeros(8 * SLOT, dtype=torch.uint8)
    endpoint = NixlEndpoint("attack-reader", arena, SLOT, SLOT, 8)
    try:
        with pytest.raises(TransportError):
            endpoint.connect(metadata, {"base": 1 << 20, "stride": SLOT, "slot_bytes": SLOT, "slots": 8})
    finally:
        endpoint.close()


@pytest.mark.parametrize("nbytes", [1 << 30, 2**60])
def test_a_connect_reply_announcing_huge_metadata_is_a_miss(rig, nbytes):
    r = rig(connect_answer=lambda frame: _announce(frame, r.holder.geometry(), nbytes))
    got, took, _ = timed_get(r)
    assert got == [None] * 4 and took < TIMEOUT_S + MARGIN_S


def _announce(frame: Frame, geometry: dict, nbytes: int) -> list:
    """A CONNECT reply header that announces `nbytes` of metadata, and no bytes."""
    import msgpack

    header = msgpack.packb({"op": int(frame.op), "id": frame.request_id, "status": 0, "stats": geometry,
                            "heads": [b""], "lens": [nbytes]}, use_bin_type=True)
    return [PREFIX.pack(len(header)) + header]


def test_a_connect_reply_that_never_ends_costs_the_deadline_once(rig):
    stall = threading.Event()
    r = rig(connect_answer=lambda frame: _stalled(stall))
    try:
        got, took, _ = timed_get(r)
        assert got == [None] * 4 and took < TIMEOUT_S + MARGIN_S
    finally:
        stall.set()


# -- GET replies (TCP) that lie ------------------------------------------------------------------


def _get_header(frame: Frame, lens: list[int | None], heads: list) -> bytes:
    import msgpack

    header = msgpack.packb({"op": int(frame.op), "id": frame.request_id, "status": 0, "heads": heads,
                            "lens": lens}, use_bin_type=True)
    return PREFIX.pack(len(header)) + header


@pytest.mark.parametrize("attack", ["2**60 bytes", "over the dest", "1 GiB never sent"])
def test_a_get_reply_that_lies_about_its_size_is_a_miss(rig, attack):
    def get(frame: Frame) -> list:
        n = len(frame.keys)
        heads = [rig_heads[i] for i in range(n)]
        if attack == "2**60 bytes":
            return [_get_header(frame, [2**60] * n, heads)]
        if attack == "1 GiB never sent":
            return [_get_header(frame, [1 << 30] * n, heads)]
        big = b"\0" * (2 * SLOT)
        return encode(reply(frame, heads=heads), [big] * n)

    r = rig(get_answer=get)
    rig_heads = r.heads
    dests = [torch.zeros(SLOT, dtype=torch.uint8) for _ in range(4)]  # outside the arena: TCP
    got, took, _ = timed_get(r, dests)
    assert got == [None] * 4 and took < TIMEOUT_S + MARGIN_S
    assert r.tier._budget.in_flight == 0


def _stalled(stop: threading.Event):
    """A reply that never comes (StandInPeer sends what this yields: nothing until `stop`)."""
    stop.wait(30)
    yield from ()


def _trickled(buffers: list, stop: threading.Event):
    """A reply sent a byte every 50 ms (StandInPeer sends each item as it is yielded)."""
    data = b"".join(bytes(memoryview(b)) for b in buffers)
    for i in range(len(data)):
        if stop.wait(0.05):
            return
        yield data[i:i + 1]


def test_a_get_reply_trickled_a_byte_at_a_time_ends_at_the_deadline(rig):
    stop = threading.Event()

    def get(frame: Frame):
        n = len(frame.keys)
        payloads = [p.numpy() for _, _, p in r.records[:n]]
        return _trickled(encode(reply(frame, heads=r.heads[:n]), payloads), stop)

    r = rig(get_answer=get)
    try:
        got, took, _ = timed_get(r, [torch.zeros(SLOT, dtype=torch.uint8) for _ in range(4)])
        assert got == [None] * 4 and took < TIMEOUT_S + MARGIN_S
    finally:
        stop.set()


def test_a_peer_that_never_answers_hello_costs_the_deadline(rig):
    never = threading.Event()
    r = rig()
    r.peer.answer = lambda frame: _stalled(never) if frame.op is Op.HELLO else None
    try:
        got, took, _ = timed_get(r, [torch.zeros(SLOT, dtype=torch.uint8) for _ in range(4)])
        assert got == [None] * 4 and took < TIMEOUT_S + MARGIN_S
    finally:
        never.set()


def test_a_non_kvtier_port_is_a_miss():
    http = StandInController(lambda body: (200, {}))  # an HTTP server where a peer should be
    try:
        url = http.url.replace("http://", "kvtier://")
        tier = P2PTier(p2p_config(), StaticDirectory({url: [record(NS, 0)[0]]}), NS, Metrics(["cpu", "p2p"]),
                       None, None)
        started = time.monotonic()
        assert tier.get([record(NS, 0)[0]], [torch.zeros(SLOT, dtype=torch.uint8)]) == [None]
        assert time.monotonic() - started < TIMEOUT_S + MARGIN_S
        tier.close()
    finally:
        http.close()


# -- the connect lock ----------------------------------------------------------------------------


class _SlowEndpoint(StandInEndpoint):
    """An endpoint whose connect blocks until released: NIXL's connect is native code that no
    deadline of ours can interrupt (loading metadata, making the UCX connection)."""

    def __init__(self, pool, release: threading.Event):
        super().__init__(pool)
        self.release = release
        self.entered = threading.Event()

    def connect(self, metadata, geometry):
        self.entered.set()
        self.release.wait(30)
        return super().connect(metadata, geometry)


def test_reads_waiting_for_a_stuck_nixl_connect_end_at_their_own_deadline(rig):
    r = rig()
    release = threading.Event()
    slow = _SlowEndpoint(r.reader_pool, release)
    link = peer_client.PeerLink(r.peer.url, p2p_config(), slow)
    first_dests, second_dests = r.dests(2), r.dests(2)
    first = threading.Thread(target=lambda: _swallow(link.read, r.keys[:2], first_dests,
                                                     time.monotonic() + 30))
    first.start()
    try:
        assert slow.entered.wait(10)
        ended: list[float] = []

        def second() -> None:
            started = time.monotonic()
            _swallow(link.read, r.keys[2:], second_dests, started + 0.5)
            ended.append(time.monotonic() - started)

        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(0.5 + MARGIN_S)
        assert ended and ended[0] < 0.5 + MARGIN_S, "a read waited past its deadline for another connect"
    finally:
        release.set()
        first.join(30)
        link.close()
        slow.close()


def _swallow(fn, *args):
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - the tier's guard would count it; here only the time matters
        return None


# -- the controller's answers --------------------------------------------------------------------


def _peers(n: int, keys: int, url=lambda i: f"kvtier://127.0.0.1:{1000 + i}") -> dict:
    return {"peers": [{"instance_id": f"fake{i}", "p2p_url": url(i), "held": [True] * keys,
                       "in_memory": [True] * keys} for i in range(n)]}


def test_a_controller_naming_thousands_of_peers_costs_bounded_memory():
    keys = [record(NS, i)[0] for i in range(64)]
    stand_in = StandInController(lambda body: (200, _peers(10_000, len(body["keys"]))))
    directory = PeerDirectory(fleet_config(stand_in.url), 10.0, Metrics(["cpu", "p2p"]))
    try:
        found = directory.locate(keys)
        assert 0 < len(found) <= directory_module.MAX_PEERS
        cached = sum(len(holders) for _, holders in directory._cache.values())
        assert cached <= directory_module.MAX_PEERS * len(keys)
    finally:
        directory.close()
        stand_in.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1:80", "kvtier://host:1/path", "kvtier://" + "h" * 10_000,
                                 "kvtier://a b:1", "", "kvtier://@evil:1"])
def test_a_peer_url_that_is_not_a_kvtier_url_is_ignored(url):
    keys = [record(NS, i)[0] for i in range(2)]
    good = "kvtier://127.0.0.1:1234"
    stand_in = StandInController(lambda body: (200, {"peers": [
        {"instance_id": "bad", "p2p_url": url, "held": [True, True], "in_memory": [True, True]},
        {"instance_id": "good", "p2p_url": good, "held": [True, False], "in_memory": [True, False]}]}))
    directory = PeerDirectory(fleet_config(stand_in.url), 10.0, Metrics(["cpu", "p2p"]))
    try:
        assert [p.p2p_url for p in directory.locate(keys)] == [good]
    finally:
        directory.close()
        stand_in.close()


def test_the_directory_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(directory_module, "MAX_CACHED_KEYS", 100)
    stand_in = StandInController(lambda body: (200, _peers(1, len(body["keys"]))))
    directory = PeerDirectory(fleet_config(stand_in.url), 60.0, Metrics(["cpu", "p2p"]))
    try:
        for start in range(0, 1000, 250):
            directory.locate([record(NS, i)[0] for i in range(start, start + 250)])
        assert len(directory._cache) <= 100
    finally:
        directory.close()
        stand_in.close()


# -- many fake peers: links and threads bounded --------------------------------------------------


def test_ten_thousand_fake_peers_keep_links_and_threads_bounded(monkeypatch):
    from kvtier.fleet.messages import PeerHolding
    from kvtier.tiers import p2p as p2p_tier

    monkeypatch.setattr(p2p_tier, "MAX_LINKS", 8)
    keys = [record(NS, i)[0] for i in range(256)]
    urls = [f"kvtier://127.0.0.1:{1 + i}" for i in range(10_000)]  # ports that refuse at once

    class ManyPeers:
        def locate(self, asked):
            asked = list(asked)
            return [PeerHolding(instance_id=f"p{j}", p2p_url=urls[(j + base[0]) % len(urls)],
                                held=[i == j for i in range(len(asked))],
                                in_memory=[i == j for i in range(len(asked))]) for j in range(len(asked))]

        def close(self):
            pass

    base = [0]
    threads_before = threading.active_count()
    tier = P2PTier(p2p_config(timeout_s=0.5), ManyPeers(), NS, Metrics(["cpu", "p2p"]), None, None)
    try:
        for round_ in range(4):
            base[0] = round_ * len(keys)
            got = tier.get(keys, [torch.zeros(64, dtype=torch.uint8) for _ in keys])
            assert got == [None] * len(keys)
            assert len(tier._peers) <= 8
        assert threading.active_count() - threads_before <= p2p_tier.FANOUT_THREADS
    finally:
        tier.close()
    wait_until(lambda: threading.active_count() <= threads_before, "the fan-out threads end at close")


# -- the byte budget under load ------------------------------------------------------------------


def test_max_bytes_in_flight_holds_under_eight_threads_of_32_mib(monkeypatch):
    record_bytes = 32 << 20
    in_flight, peak, lock = [0], [0], threading.Lock()
    started = threading.Barrier(2, timeout=10)

    def read(self, keys, dests, deadline, superseded=lambda: False):
        n = sum(d.numel() for d in dests)
        with lock:
            in_flight[0] += n
            peak[0] = max(peak[0], in_flight[0])
        try:
            started.wait() if n else None  # two reads meet: the budget lets two 32 MiB reads overlap
        except threading.BrokenBarrierError:
            pass
        with lock:
            in_flight[0] -= n
        return [None] * len(keys)

    monkeypatch.setattr(peer_client.PeerLink, "read", read)
    urls = [f"kvtier://127.0.0.1:{2000 + i}" for i in range(8)]
    keys = [record(NS, i)[0] for i in range(8)]
    tier = P2PTier(p2p_config(max_bytes_in_flight=2 * record_bytes, timeout_s=5.0),
                   StaticDirectory({u: [k] for u, k in zip(urls, keys)}), NS, Metrics(["cpu", "p2p"]), None,
                   None)
    dest = torch.empty(record_bytes, dtype=torch.uint8)  # one buffer: only its size matters here
    try:
        workers = [threading.Thread(target=tier.get, args=([k], [dest])) for k in keys]
        for w in workers:
            w.start()
        for w in workers:
            w.join(30)
        assert peak[0] <= 2 * record_bytes and tier._budget.in_flight == 0
    finally:
        tier.close()


# -- a closed tier -------------------------------------------------------------------------------


def test_a_read_after_close_is_a_miss_that_opens_nothing(rig):
    r = rig()
    r.tier.close()
    got = r.tier.get(r.keys, [torch.zeros(SLOT, dtype=torch.uint8) for _ in range(4)])
    assert got == [None] * 4
    assert not r.tier._peers, "a link opened after close is never closed"



def test_a_controller_trickling_its_answer_costs_the_fleet_timeout_not_more():
    stop = threading.Event()
    listener = _trickling_http(stop)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    directory = PeerDirectory(fleet_config(url, timeout_s=TIMEOUT_S), 10.0, Metrics(["cpu", "p2p"]))
    try:
        started = time.monotonic()
        assert directory.locate([record(NS, 0)[0]]) == []
        assert time.monotonic() - started < TIMEOUT_S + MARGIN_S, "a trickled answer held the lookup path"
    finally:
        stop.set()
        directory.close()
        listener.close()


def _trickling_http(stop: threading.Event) -> socket.socket:
    """An HTTP server whose every answer announces 1 MB of JSON and sends a byte every 50 ms."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(1 << 16)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000000\r\n\r\n")
            while not stop.wait(0.05):
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    return listener


# -- the engine's read threads -------------------------------------------------------------------


def test_a_peer_backing_off_stays_backed_off_when_its_link_is_closed_for_room(monkeypatch):
    """More peers than MAX_LINKS: a dead peer's link is closed to make room, but its back-off must
    outlive the link, or each load would pay that peer's failure again."""
    from kvtier.tiers import p2p as p2p_tier

    monkeypatch.setattr(p2p_tier, "MAX_LINKS", 1)
    dead, other = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    dead_url = f"kvtier://127.0.0.1:{dead.getsockname()[1]}"
    dead.close()  # connection refused from now on
    other_url = f"kvtier://127.0.0.1:{other.getsockname()[1]}"
    other.close()
    k1, k2 = record(NS, 1)[0], record(NS, 2)[0]
    metrics = Metrics(["cpu", "p2p"])
    tier = P2PTier(p2p_config(), StaticDirectory({dead_url: [k1], other_url: [k2]}), NS, metrics, None, None)
    errors = lambda: int(metrics.value("kvtier_tier_errors_total", {"tier": "p2p"}))  # noqa: E731
    try:
        assert tier.get([k1], [torch.zeros(64, dtype=torch.uint8)]) == [None] and errors() == 1
        assert tier.get([k2], [torch.zeros(64, dtype=torch.uint8)]) == [None] and errors() == 2
        assert dead_url not in tier._peers  # its link was closed for the other's
        assert tier.get([k1], [torch.zeros(64, dtype=torch.uint8)]) == [None]
        assert errors() == 2, "a peer backing off was asked again once its link had been closed"
    finally:
        tier.close()
