"""Attacks on the holder side of P2P (kvtier/p2p/peer_server.py, peer_connection.py,
peer_handlers.py, leases.py, holding.py): peers that lease and never release, flood, read slowly,
send hostile frames and ids, and a holder that stops under them. What must hold: memory pinned by
peers stays bounded (half the pool), the owner keeps storing, no wrong bytes, the accounting comes
back to zero, and nothing waits beyond its documented bound."""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgpack
import p2p_holder_helpers
import pytest
from conftest import CHUNK, NAMESPACE_MODEL, seeded_kv, seeded_tokens
from kvtier_servers import Client as RawClient
from kvtier_servers import closed_by_peer, raw_frame
from p2p_holder_helpers import TOKEN, payload, settled, store
from waiting import wait_until

from kvtier.config import P2PConfig
from kvtier.keys import Namespace, TokenDatabase
from kvtier.layout import KVLayout
from kvtier.memory import MemoryPool, Slab
from kvtier.metrics import Metrics
from kvtier.p2p import peer_connection, peer_handlers, peer_server
from kvtier.p2p.leases import LeaseTable
from kvtier.p2p.peer_handlers import PeerHandlers
from kvtier.p2p.peer_server import PeerServer
from kvtier.record import tensor_bytes, verify
from kvtier.storage import StorageManager
from kvtier.tiers.remote_client import Client, Refused, Request
from kvtier.wire.frames import MAX_KEYS, PROTOCOL_VERSION, Frame, Op, Status


@pytest.fixture
def serve(db):
    servers: list[PeerServer] = []

    def start(manager: StorageManager, namespace: bytes | None = None, **config) -> PeerServer:
        server = PeerServer(P2PConfig(token=TOKEN, **config), namespace or db.namespace_digest,
                            manager.metrics, None)
        servers.append(server)
        server.start(manager)
        return server

    yield start
    for server in servers:
        server.stop()


connect = p2p_holder_helpers.connect


def call(client: Client, op: Op, **fields) -> Frame:
    return client.call([Request(Frame(op, 2, **fields))])[0]


def handlers_for(manager: StorageManager, db: TokenDatabase) -> PeerHandlers:
    leases = LeaseTable(10.0, manager.pool.num_slabs // 2, lambda held: None)
    return PeerHandlers(manager, db.namespace_digest, leases, None, 0.5, lambda name, n: None, dict)


def held_in(answer_buffers: list) -> int:
    """Chunks a GET or LEASE answer carries (non-nil heads)."""
    data = b"".join(bytes(b) for b in answer_buffers)
    (size,) = struct.unpack_from("<I", data)
    header = msgpack.unpackb(data[4:4 + size], raw=False)
    return sum(h is not None for h in header.get("heads", []))


# -- memory pinned by peers stays bounded ---------------------------------------------------------

def test_get_replies_never_sent_cannot_pin_more_than_half_the_pool(make_manager, db, layout):
    # Three peers GET disk-only chunks and never read their replies (a slow reader holds its
    # chunks until the send times out): at most half the pool is theirs, the owner stores the rest.
    manager = make_manager(slabs=16)
    spans, _ = store(manager, db, layout, 12, seed=1, disk_only=True)
    handlers = handlers_for(manager, db)
    answers = [handlers.handle(Frame(Op.GET, i, keys=[s.key for s in spans[4 * i:4 * i + 4]]))
               for i in range(3)]
    assert sum(held_in(a.buffers) for a in answers) <= 8
    fresh = db.spans(seeded_tokens(8 * CHUNK, 99))
    assert manager.put(fresh, seeded_kv(layout, 8 * CHUNK, 99)) == 8  # the owner still stores
    for answer in answers:
        if answer.done is not None:
            answer.done()
    wait_until(lambda: settled(manager), "every GET let go")


def test_concurrent_leases_never_hold_more_than_half_the_pool(make_manager, db, layout, monkeypatch):
    # Four peers LEASE the same MAX run at once: each sees the whole room free before any lease is
    # granted; without a reservation all four hold it (4 x the bound) until grant refuses three.
    manager = make_manager(slabs=16)
    spans, _ = store(manager, db, layout, 8, seed=2)
    handlers = handlers_for(manager, db)
    real_hold, lock, barrier = peer_handlers.hold, threading.Lock(), threading.Barrier(4, timeout=1.0)
    live, peak = [0], [0]

    def hold(storage, keys, deadline):
        held = real_hold(storage, keys, deadline)
        with lock:
            live[0] += len(held)
            peak[0] = max(peak[0], live[0])
        try:
            barrier.wait()  # (all four holds at once; broken when fewer get here)
        except threading.BrokenBarrierError:
            pass
        with lock:
            live[0] -= len(held)
        return held

    monkeypatch.setattr(peer_handlers, "hold", hold)
    frames = [Frame(Op.LEASE, i, keys=[s.key for s in spans]) for i in range(4)]
    answers: list = [None] * 4
    threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, handlers.handle(frames[i])))
               for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert peak[0] <= 8, peak
    assert handlers.leases.active()[1] <= 8
    for lease_id in list(handlers.leases._leases):
        peer_handlers.let_go(manager, handlers.leases.end(lease_id))
    assert settled(manager)


def test_many_peers_leasing_max_keys_and_never_releasing(make_manager, db, layout, serve, connect):
    manager = make_manager(slabs=16)
    spans, _ = store(manager, db, layout, 16, seed=3)
    keys = [s.key for s in spans] * (MAX_KEYS // 16)
    server = serve(manager, lease_s=0.5)
    clients = [connect(server) for _ in range(6)]
    for _ in range(3):
        for client in clients:
            reply = call(client, Op.LEASE, keys=keys)
            assert len(reply.slots) == len(keys)
            assert server.stats()["leased_chunks"] <= 8
    fresh = db.spans(seeded_tokens(8 * CHUNK, 98))
    assert manager.put(fresh, seeded_kv(layout, 8 * CHUNK, 98)) == 8  # the owner still stores
    wait_until(lambda: server.stats()["leases_active"] == 0, "every lease expired")
    assert settled(manager)
    assert manager.pool.free_slabs + len(manager.cpu) == manager.pool.num_slabs


def test_duplicate_keys_in_one_lease_are_held_and_let_go_once_each(make_manager, db, layout, serve, connect):
    manager = make_manager(slabs=16)
    host, kv = store(manager, db, layout, 1, seed=4)
    disk, kv2 = store(manager, db, layout, 1, seed=5, disk_only=True)
    client = connect(serve(manager))
    keys = [host[0].key] * 3 + [disk[0].key] * 3
    reply = call(client, Op.LEASE, keys=keys)
    assert None not in reply.slots
    for key, span, k, head, slot in zip(keys, host * 3 + disk * 3, [kv] * 3 + [kv2] * 3, reply.heads,
                                        reply.slots):
        view = tensor_bytes(manager.pool.tensor(Slab(slot, "peek"), layout.chunk_bytes(CHUNK)))
        verify(head, view, key)
        assert bytes(view) == payload(k, span)
    assert call(client, Op.RELEASE, lease=reply.lease).count == 6
    assert settled(manager)


def test_release_of_unknown_zero_and_reused_ids_ends_nothing_else(make_manager, db, layout, serve, connect):
    manager = make_manager(slabs=16)
    spans, _ = store(manager, db, layout, 2, seed=6)
    server = serve(manager)
    owner, stranger = connect(server), connect(server)
    lease = call(owner, Op.LEASE, keys=[s.key for s in spans]).lease
    for bogus in (0, 1, (1 << 64) - 1, lease ^ 1):
        assert call(stranger, Op.RELEASE, lease=bogus).count == 0
    assert server.stats()["leased_chunks"] == 2
    assert call(owner, Op.RELEASE, lease=lease).count == 2
    assert call(owner, Op.RELEASE, lease=lease).count == 0  # reused
    assert settled(manager)


def test_leased_disk_chunks_keep_their_bytes_while_the_owner_stores_at_full_speed(make_manager, db, layout,
                                                                                 serve, connect):
    manager = make_manager(slabs=8)
    spans, kv = store(manager, db, layout, 4, seed=7, disk_only=True)
    client = connect(serve(manager))
    reply = call(client, Op.LEASE, keys=[s.key for s in spans])
    assert None not in reply.slots
    for i in range(20):  # the pool turns over many times: a leased slab reused would change
        manager.put(db.spans(seeded_tokens(4 * CHUNK, 200 + i)), seeded_kv(layout, 4 * CHUNK, 200 + i))
    for span, head, slot in zip(spans, reply.heads, reply.slots):
        view = tensor_bytes(manager.pool.tensor(Slab(slot, "peek"), layout.chunk_bytes(CHUNK)))
        verify(head, view, span.key)
        assert bytes(view) == payload(kv, span)
    assert call(client, Op.RELEASE, lease=reply.lease).count == 4
    wait_until(lambda: settled(manager), "the lease let go")


# -- stopping under leases --------------------------------------------------------------------------

def test_stop_keeps_leased_slabs_until_their_reader_releases(make_manager, db, layout, serve, connect):
    # A reader mid-READ when the holder stops: its slabs must not be let go (and reused) under the
    # READ; it can still RELEASE, and stop() returns as soon as it did.
    manager = make_manager(slabs=16)
    spans, _ = store(manager, db, layout, 3, seed=8)
    server = serve(manager, timeout_s=3.0)
    client, late = connect(server), connect(server)
    call(late, Op.PING)
    lease = call(client, Op.LEASE, keys=[s.key for s in spans]).lease
    stopper = threading.Thread(target=server.stop)
    start = time.monotonic()
    stopper.start()
    wait_until(lambda: server.stopping, "stopping")
    assert not settled(manager)  # still leased
    reply = call(late, Op.GET, keys=[spans[0].key])  # nothing new is held while stopping
    assert reply.heads == [None]
    try:  # (stop() closes the connections as soon as the lease ended: the reply may not make it)
        assert call(client, Op.RELEASE, lease=lease).count == 3
    except ConnectionError:
        pass
    stopper.join(peer_server.STOP_WAIT_S + 1)
    assert server.stats()["released_chunks"] == 3  # ended by its reader, not by stop()
    assert not stopper.is_alive() and time.monotonic() - start < 3.0
    assert settled(manager) and server.stats()["leases_active"] == 0


def test_stop_without_release_waits_for_the_readers_deadline_only(make_manager, db, layout, serve, connect):
    manager = make_manager(slabs=16)
    spans, _ = store(manager, db, layout, 2, seed=9)
    server = serve(manager, timeout_s=0.5)
    client = connect(server)
    start = time.monotonic()
    assert call(client, Op.LEASE, keys=[s.key for s in spans]).lease
    server.stop()
    assert 0.5 <= time.monotonic() - start < peer_server.STOP_WAIT_S
    assert settled(manager) and server.stats()["leases_active"] == 0


# -- hostile peers ---------------------------------------------------------------------------------

def test_a_slow_reader_of_a_big_get_is_cut_off_and_its_chunks_let_go(db, serve, monkeypatch):
    monkeypatch.setattr(peer_connection, "SEND_TIMEOUT_S", 0.3)
    monkeypatch.setattr(peer_connection, "MIN_SEND_RATE", 1 << 40)
    big = KVLayout(num_layers=16, num_kv_heads=8, head_dim=128)  # 1 MiB chunks
    bytes_ = big.chunk_bytes(CHUNK)
    pool = MemoryPool(16 * bytes_, bytes_, pin=False)
    manager = StorageManager(big, pool, [], Metrics(["cpu"]), io_threads=1)
    try:
        bdb = TokenDatabase(Namespace.for_layout(NAMESPACE_MODEL, big), CHUNK)
        spans = bdb.spans(seeded_tokens(16 * CHUNK, 10))
        assert manager.put(spans, seeded_kv(big, 16 * CHUNK, 10)) == 16
        server = serve(manager, namespace=bdb.namespace_digest)
        raw = RawClient(server.port, TOKEN)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.send(Op.GET, keys=[s.key for s in spans[:8]])  # 8 MiB, never read
        wait_until(lambda: server.stats()["connections"] == 0, "the slow reader cut off", 10)
        wait_until(lambda: settled(manager), "its chunks let go", 10)
        raw.close()
    finally:
        manager.close()


def test_hello_with_a_huge_token_or_another_version_is_refused(make_manager, serve):
    server = serve(make_manager(slabs=4))
    raw = RawClient(server.port, hello=False)
    huge = {"op": int(Op.HELLO), "id": 1, "version": PROTOCOL_VERSION, "token": "x" * (1 << 20)}
    raw.sock.sendall(raw_frame(huge))  # over the handshake's frame bound: closed
    assert closed_by_peer(raw.sock)
    raw.close()
    raw = RawClient(server.port, hello=False)
    reply = raw.call(Op.HELLO, token=TOKEN, version=PROTOCOL_VERSION + 1)
    assert reply.status is Status.BAD_REQUEST and "version" in reply.error
    assert closed_by_peer(raw.sock)
    raw.close()
    with pytest.raises(Refused, match="UNAUTHORIZED"):
        Client("127.0.0.1", server.port, 5.0, "x" * 4000, 1).call([Request(Frame(Op.PING, 1))])


def test_a_put_is_refused_on_its_header_before_its_payload_arrives(make_manager, db, layout, serve):
    server = serve(make_manager(slabs=4))
    raw = RawClient(server.port, TOKEN)
    key = db.spans(seeded_tokens(CHUNK, 11))[0].key
    size = 60 << 20  # announced, never sent: the refusal must come before it
    raw.sock.sendall(raw_frame({"op": int(Op.PUT), "id": 5, "keys": [bytes(key)], "heads": [b"h" * 40],
                                "lens": [size]}))
    reply = raw.receive()
    assert reply is not None and reply.status is Status.BAD_REQUEST
    raw.close()
    raw = RawClient(server.port, TOKEN)
    raw.sock.sendall(struct.pack("<I", 1 << 30) + b"\x00" * 64)  # a header length nobody can trust
    assert raw.receive().status is Status.BAD_REQUEST
    assert closed_by_peer(raw.sock)
    raw.close()


def test_connection_floods_before_and_after_hello(make_manager, serve, connect, monkeypatch):
    monkeypatch.setattr(peer_server, "MAX_HANDSHAKES", 8)
    server = serve(make_manager(slabs=4), max_connections=4)
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(40)]
    wait_until(lambda: server.stats()["handshakes"] <= 8 and server.stats().get("connections_total", 0) >= 8,
               "handshakes bounded")
    held = [connect(server) for _ in range(4)]

    def served(client: Client) -> bool:
        try:  # (a handshake slot frees once the oldest silent one had HANDSHAKE_GRACE_S)
            return call(client, Op.PING).status is Status.OK
        except ConnectionError:
            return False

    for client in held:
        wait_until(lambda client=client: served(client), "served past the silent ones")
    with pytest.raises(Exception, match="BUSY"):
        call(connect(server), Op.PING)
    assert server.stats()["connections"] == 4 and server.stats()["handshakes"] <= 8
    for sock in silent:
        sock.close()


def test_a_drained_table_grants_nothing_and_wakes_on_the_last_release(make_manager, db, layout):
    manager = make_manager(slabs=8)
    spans, _ = store(manager, db, layout, 2, seed=12)
    reads: list[float] = []
    table = LeaseTable(10.0, 4, lambda held: None, clock=lambda: reads.append(0.0) or 0.0)  # (time stops)
    held = peer_handlers.hold(manager, [s.key for s in spans], time.monotonic() + 1)
    lease = table.grant(held[:1])
    left: list[int] = []
    drainer = threading.Thread(target=lambda: left.append(table.drain(100.0, 100.0)))
    drainer.start()
    wait_until(lambda: len(reads) > 1, "draining")
    assert table.grant(held[1:]) is None
    peer_handlers.let_go(manager, table.end(lease))
    drainer.join(5)
    assert left == [0] and not drainer.is_alive()
    peer_handlers.let_go(manager, held[1:])
    wait_until(lambda: settled(manager), "let go")
