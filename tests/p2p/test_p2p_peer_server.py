"""Tests for kvtier/p2p/peer_server.py (with peer_connection.py and peer_handlers.py): the holder's
P2P endpoint, on real sockets on 127.0.0.1 over a real StorageManager (host memory + a DiskTier in
tmp_path).

Driven by the remote tier's own client (`kvtier.tiers.remote_client.Client`: HELLO, pipelined
calls, GET payloads straight into destination buffers), so a GET is checked exactly as a reader
receives it from kvtier_server; and by the raw test client of tests/kvtier_servers.py where exact
bytes matter (garbage, malformed frames, one connection surviving a refused request). CONNECT with
an endpoint uses a stand-in object with `geometry()` / `metadata()`: NIXL itself is tested by the
nixl_transport tests.
"""

from __future__ import annotations

import socket
import threading
import time

import p2p_holder_helpers
import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens
from kvtier_servers import Client as RawClient
from kvtier_servers import closed_by_peer, raw_frame
from p2p_holder_helpers import TOKEN, payload, settled, store
from waiting import wait_until

from kvtier.config import P2PConfig
from kvtier.errors import ConfigError, TierUnavailable
from kvtier.keys import ChunkKey
from kvtier.memory import Slab
from kvtier.p2p import peer_connection, peer_handlers, peer_server
from kvtier.p2p.peer_server import PeerServer
from kvtier.record import encode_header, tensor_bytes, verify
from kvtier.tiers.remote_client import Client, GetSink, Refused, Request, RequestRefused
from kvtier.wire.frames import Frame, Op, Status

OTHER_NS = b"\x07" * 8


class StandInEndpoint:
    """What CONNECT asks of a NixlEndpoint, without NIXL."""

    def geometry(self) -> dict[str, int]:
        return {"base": 4096, "stride": 4096, "slot_bytes": 4096, "slots": 16}

    def metadata(self) -> bytes:
        return b"agent-metadata\x00\x01"


class BytesSink:
    """Where a CONNECT reply's one payload lands (the client's sinks are any such callable)."""

    nbytes = 0

    def __init__(self):
        self.buf = bytearray(1 << 12)

    def __call__(self, index: int, size: int) -> memoryview:
        return memoryview(self.buf)[:size]


@pytest.fixture
def manager(make_manager):
    return make_manager(slabs=16)


@pytest.fixture
def serve(manager, db):
    """Start a PeerServer over `manager` (config fields as keywords); stopped at teardown."""
    servers: list[PeerServer] = []

    def start(endpoint=None, **config) -> PeerServer:
        server = PeerServer(P2PConfig(token=TOKEN, **config), db.namespace_digest, manager.metrics, endpoint)
        servers.append(server)
        server.start(manager)
        return server

    yield start
    for server in servers:
        server.stop()


connect = p2p_holder_helpers.connect


def get(client: Client, keys: list[bytes]) -> tuple[Frame, list[torch.Tensor]]:
    dests = [torch.full((8192,), 0xAB, dtype=torch.uint8) for _ in keys]
    sink = GetSink(list(range(len(keys))), dests)
    [reply] = client.call([Request(Frame(Op.GET, 1, keys=list(keys)), sink=sink)])
    return reply, dests


def call(client: Client, op: Op, **fields) -> Frame:
    return client.call([Request(Frame(op, 2, **fields))])[0]


def metric(manager, name: str) -> int:
    return int(manager.metrics.value(f"kvtier_{name}_total"))


def test_get_serves_host_and_disk_chunks_bit_equal_to_what_was_stored(manager, db, layout, serve, connect):
    in_memory, kv1 = store(manager, db, layout, 2, seed=1)
    on_disk, kv2 = store(manager, db, layout, 2, seed=2, disk_only=True)
    missing = ChunkKey(db.namespace_digest, b"\x05" * 16)
    client = connect(serve())

    reply, dests = get(client, [s.key for s in in_memory + on_disk] + [missing])

    assert reply.heads[4] is None
    for span, kv, head, dest in zip(in_memory + on_disk, [kv1, kv1, kv2, kv2], reply.heads, dests):
        n = layout.chunk_bytes(span.num_tokens)
        assert verify(head, tensor_bytes(dest[:n]), span.key).payload_len == n
        assert bytes(dest[:n].numpy()) == payload(kv, span)
    wait_until(lambda: settled(manager), "the GET's chunks let go")
    assert metric(manager, "p2p_served_chunks") == 4
    assert metric(manager, "p2p_served_bytes") == 4 * layout.chunk_bytes(16)
    assert manager.metrics.value("kvtier_promotions_total") == 2  # the disk chunks came up


def test_has_answers_host_memory_and_disk_and_misses_other_namespaces(manager, db, layout, serve, connect):
    in_memory, _ = store(manager, db, layout, 1, seed=3)
    on_disk, _ = store(manager, db, layout, 1, seed=4, disk_only=True)
    foreign = ChunkKey(OTHER_NS, in_memory[0].key.digest)
    missing = ChunkKey(db.namespace_digest, b"\x06" * 16)
    reply = call(connect(serve()), Op.HAS, keys=[in_memory[0].key, foreign, on_disk[0].key, missing])
    assert reply.flags == [1, 0, 1, 0]


def test_other_namespaces_are_misses_and_end_the_run(manager, db, layout, serve, connect):
    spans, _ = store(manager, db, layout, 2, seed=5)
    foreign = ChunkKey(OTHER_NS, spans[1].key.digest)
    client = connect(serve())
    reply, _ = get(client, [spans[0].key, foreign, spans[1].key])
    assert [h is not None for h in reply.heads] == [True, False, False]
    lease = call(client, Op.LEASE, keys=[foreign, spans[0].key])
    assert lease.slots == [None, None] and lease.lease is None
    wait_until(lambda: settled(manager), "let go")


def test_a_lease_holds_slabs_with_the_payload_until_release(manager, db, layout, serve, connect):
    spans, kv = store(manager, db, layout, 3, seed=6)
    on_disk, kv2 = store(manager, db, layout, 1, seed=7, disk_only=True)
    server = serve()
    client = connect(server)

    reply = call(client, Op.LEASE, keys=[s.key for s in spans + on_disk])

    assert reply.lease and None not in reply.slots and len(set(reply.slots)) == 4
    for span, k, head, slot in zip(spans + on_disk, [kv, kv, kv, kv2], reply.heads, reply.slots):
        view = tensor_bytes(manager.pool.tensor(Slab(slot, "peek"), layout.chunk_bytes(span.num_tokens)))
        verify(head, view, span.key)
        assert bytes(view) == payload(k, span)
    assert server.stats()["leases_active"] == 1 and server.stats()["leased_chunks"] == 4
    assert not settled(manager)  # held: not evictable, not freed

    assert call(client, Op.RELEASE, lease=reply.lease).count == 4
    assert call(client, Op.RELEASE, lease=reply.lease).count == 0  # never let go twice
    assert server.stats()["leases_active"] == 0
    assert settled(manager)
    assert metric(manager, "p2p_leases") == 1 and metric(manager, "p2p_served_chunks") == 4


def test_a_reader_that_vanishes_mid_lease_costs_lease_s(manager, db, layout, serve, connect):
    spans, _ = store(manager, db, layout, 2, seed=8)
    server = serve(lease_s=0.3)
    client = connect(server)
    assert call(client, Op.LEASE, keys=[s.key for s in spans]).lease
    client.close()  # gone, without a RELEASE

    wait_until(lambda: server.stats()["leases_active"] == 0, "the lease expired")
    assert settled(manager)
    assert metric(manager, "p2p_leases_expired") == 1 and server.stats()["p2p_leases_expired"] == 1


def test_a_wrong_or_missing_token_is_refused(serve, connect):
    server = serve()
    with pytest.raises(Refused, match="UNAUTHORIZED"):
        call(connect(server, "not-the-token"), Op.PING)
    with pytest.raises(Refused, match="UNAUTHORIZED"):
        call(connect(server, None), Op.PING)
    assert server.stats()["unauthorized"] == 2
    assert call(connect(server), Op.PING).status is Status.OK


def test_writes_are_refused_and_the_connection_serves_on(manager, db, layout, serve):
    spans, kv = store(manager, db, layout, 1, seed=9)
    server = serve()
    raw = RawClient(server.port, TOKEN)
    key, body = spans[0].key, payload(kv, spans[0])
    head = encode_header(key, layout.chunk_shape(16), layout.dtype, body)
    for op, fields, payloads in [(Op.PUT, {"keys": [key], "heads": [head]}, [body]),
                                 (Op.DELETE, {"keys": [key]}, []), (Op.EXISTS, {"keys": [key]}, []),
                                 (Op.CLEAR, {"namespaces": [key.namespace]}, [])]:
        reply = raw.call(op, payloads, **fields)
        assert reply.status is Status.BAD_REQUEST and "read-only" in reply.error, op
    assert raw.call(Op.HAS, keys=[key]).flags == [1]  # the same connection, still serving
    raw.close()
    assert manager.contains_prefix([key]) == 1


def test_malformed_frames_are_answered_and_garbage_costs_only_its_connection(manager, db, layout, serve,
                                                                             connect):
    spans, _ = store(manager, db, layout, 1, seed=10)
    server = serve()
    raw = RawClient(server.port, TOKEN)
    raw.sock.sendall(raw_frame({"op": 0, "id": 7, "bogus": 1}))  # decodable, not valid: skipped
    assert raw.receive().status is Status.BAD_REQUEST
    assert raw.call(Op.HELLO, token=TOKEN, version=1).status is Status.BAD_REQUEST  # already authenticated
    assert raw.call(Op.PING).status is Status.OK
    raw.sock.sendall(b"\xff\xff\xff\x7f" + b"garbage" * 100)  # a length nobody can trust: fatal
    assert raw.receive().status is Status.BAD_REQUEST
    assert closed_by_peer(raw.sock)
    raw.close()
    before_hello = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    before_hello.sendall(b"\x00\x00\x00\x00garbage")
    assert closed_by_peer(before_hello)
    before_hello.close()

    reply, _ = get(connect(server), [spans[0].key])  # the next client is served
    assert reply.heads[0] is not None
    assert server.stats()["bad_frames"] >= 3


def test_beyond_max_connections_a_peer_gets_busy(serve, connect):
    server = serve(max_connections=1)
    first = connect(server)
    assert call(first, Op.PING).status is Status.OK
    with pytest.raises(TierUnavailable, match="BUSY"):
        call(connect(server), Op.PING)
    first.close()
    wait_until(lambda: server.stats()["connections"] == 0, "the first connection closed")
    assert call(connect(server), Op.PING).status is Status.OK
    assert server.stats()["refused"] == 1


def test_stop_with_active_leases_returns_and_lets_go(manager, db, layout, serve, connect):
    spans, _ = store(manager, db, layout, 3, seed=11)
    server = serve()
    client = connect(server)
    assert call(client, Op.LEASE, keys=[s.key for s in spans]).lease
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=5)  # in handshake

    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < peer_server.STOP_WAIT_S
    assert settled(manager) and server.stats()["leases_active"] == 0
    assert closed_by_peer(idle)
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5)


def test_connect_gives_the_endpoint_or_says_tcp_only(serve, connect):
    with pytest.raises(RequestRefused, match="TCP only"):
        call(connect(serve()), Op.CONNECT)
    sink = BytesSink()
    client = connect(serve(endpoint=StandInEndpoint()))
    [reply] = client.call([Request(Frame(Op.CONNECT, 3), sink=sink)])
    assert reply.stats == StandInEndpoint().geometry() and reply.heads == [b""]
    assert bytes(sink.buf[:reply.lengths[0]]) == StandInEndpoint().metadata()


def test_a_get_reply_is_cut_at_the_reply_bound(manager, db, layout, serve, connect, monkeypatch):
    monkeypatch.setattr(peer_handlers, "REPLY_BYTES", 2 * manager.pool.slab_bytes)
    spans, _ = store(manager, db, layout, 4, seed=12)
    server = serve()
    reply, _ = get(connect(server), [s.key for s in spans])
    assert [h is not None for h in reply.heads] == [True, True, False, False]
    assert server.stats()["reply_cuts"] == 2
    wait_until(lambda: settled(manager), "let go")


def test_binding_and_the_advertised_url(manager, db, serve):
    server = serve()
    assert server.url == f"kvtier://127.0.0.1:{server.port}" and server.port > 0
    with pytest.raises(ConfigError, match="p2p.host/p2p.port"):
        PeerServer(P2PConfig(port=server.port), db.namespace_digest, manager.metrics, None)
    config = P2PConfig(advertise_host="peer-3.internal")
    other = PeerServer(config, db.namespace_digest, manager.metrics, None)
    assert other.url == f"kvtier://peer-3.internal:{other.port}"
    other.stop()  # never started: closes its socket


def test_stats_counts_requests_and_connections(manager, db, layout, serve, connect):
    spans, _ = store(manager, db, layout, 1, seed=13)
    client = connect(serve())
    get(client, [spans[0].key])
    stats = call(client, Op.STATS).stats
    assert stats["connections"] == 1 and stats["requests"] == 2 and stats["connections_total"] == 1
    assert stats["leases_active"] == 0 and stats["p2p_served_chunks"] == 1


def test_handshakes_beyond_the_cap_push_out_the_oldest(serve, connect, monkeypatch):
    monkeypatch.setattr(peer_server, "MAX_HANDSHAKES", 2)
    server = serve()
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
    wait_until(lambda: server.stats()["handshakes"] == 2, "two connections in handshake")

    def served():
        try:
            return call(connect(server), Op.PING).status is Status.OK
        except OSError:  # closed at once: the oldest handshake is younger than HANDSHAKE_GRACE_S
            return False

    wait_until(served, "a real client served past the silent ones")
    assert server.stats()["handshakes_dropped"] >= 1
    assert closed_by_peer(silent[0])
    for sock in silent:
        sock.close()


def test_silent_peers_are_closed_before_and_after_the_handshake(serve, connect, monkeypatch):
    monkeypatch.setattr(peer_connection, "HELLO_TIMEOUT_S", 0.2)
    monkeypatch.setattr(peer_connection, "IDLE_TIMEOUT_S", 0.2)
    server = serve()
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    assert closed_by_peer(silent)  # no HELLO in time
    silent.close()
    raw = RawClient(server.port, TOKEN)
    assert closed_by_peer(raw.sock)  # authenticated, then idle
    raw.close()
    wait_until(lambda: server.stats()["connections"] == 0, "forgotten")


def test_concurrent_readers_with_evictions_leave_the_accounting_whole(make_manager, db, layout, serve,
                                                                      connect):
    # Four peers GET, LEASE and RELEASE chunks that live on disk and in a pool too small for all of
    # them (holds promote, evict and wait), while the owner stores more: every hold is let go once.
    manager = make_manager(slabs=8)
    chunks = [store(manager, db, layout, 2, seed=20 + i, disk_only=True) for i in range(4)]
    server = PeerServer(P2PConfig(token=TOKEN), db.namespace_digest, manager.metrics, None)
    server.start(manager)
    failures: list[BaseException] = []

    def peer(i: int) -> None:
        client = Client("127.0.0.1", server.port, 5.0, TOKEN, 1)
        try:
            for round_ in range(15):
                spans, kv = chunks[(i + round_) % 4]
                reply, dests = get(client, [s.key for s in spans])
                for span, head, dest in zip(spans, reply.heads, dests):
                    if head is not None:
                        assert bytes(dest[:len(payload(kv, span))].numpy()) == payload(kv, span)
                lease = call(client, Op.LEASE, keys=[s.key for s in spans])
                if lease.lease is not None:
                    assert call(client, Op.RELEASE, lease=lease.lease).count == sum(
                        s is not None for s in lease.slots)
        except BaseException as exc:  # (reported by the main thread)
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for i in range(5):  # (some may be rejected: every slab held by a peer for a moment)
        manager.put(db.spans(seeded_tokens(CHUNK, 40 + i)), seeded_kv(layout, CHUNK, 40 + i))
    for thread in threads:
        thread.join(60)
    server.stop()
    assert not failures, failures
    assert settled(manager)
    assert metric(manager, "p2p_served_chunks") > 0
