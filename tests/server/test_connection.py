"""Tests for kvtier/server/connection.py (and the server's connection policy in app.py, budget.py):
the handshake, slots for authenticated clients, timeouts, memory held for peers, half-close.

A real `kvtier_server` process over loopback; attackers are raw sockets sending exactly the bytes
of the attack. Waits read sockets with a timeout or poll STATS against a deadline; nothing sleeps.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import msgpack
import pytest
from kvtier_servers import HELLO, TIMEOUT_S, Client, closed_by_peer, raw_frame, record, wait_for, wire

from kvtier.wire.frames import PROTOCOL_VERSION, Frame, Op, PutResult, Status

DEADLINE_S = 20.0


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)


@pytest.fixture
def ns() -> bytes:
    return os.urandom(8)


# -- item 10: slowloris ----------------------------------------------------------------------------


@pytest.mark.parametrize("idle, config", [(16, {}), (40, {"max_handshakes": 8})],
                         ids=["within max_handshakes", "beyond max_handshakes"])
def test_idle_unauthenticated_sockets_do_not_lock_out_authenticated_clients(start_kvtier_server, idle,
                                                                            config):
    server = start_kvtier_server(token="s3cret", max_connections=4, **config)
    idlers = [connect(server.port) for _ in range(idle)]  # connected, never a byte

    started = time.monotonic()
    good = Client(server.port, token="s3cret")  # asserts the HELLO is answered OK

    assert good.call(Op.PING).status is Status.OK
    assert time.monotonic() - started < 5.0  # not after some idler timed out
    stats = good.stats()
    assert stats["connections"] == 1 and stats["refused"] == 0
    assert stats["handshakes"] <= config.get("max_handshakes", 64)
    for sock in idlers:
        sock.close()
    good.close()


def test_a_connection_that_never_completes_its_hello_is_closed_at_the_handshake_deadline(
        start_kvtier_server):
    server = start_kvtier_server(handshake_timeout_s=0.5)
    silent, trickle = connect(server.port), connect(server.port)
    trickle.sendall(HELLO[:3])  # a slowloris: part of a HELLO, the rest never comes
    started = time.monotonic()

    assert closed_by_peer(silent) and closed_by_peer(trickle)

    assert 0.4 < time.monotonic() - started < 5.0
    c = Client(server.port)
    assert c.stats()["handshake_timeouts"] == 2
    c.close()


def test_an_authenticated_connection_idle_past_the_idle_timeout_is_closed(start_kvtier_server):
    server = start_kvtier_server(idle_timeout_s=0.5)
    idle = Client(server.port)
    assert idle.call(Op.PING).status is Status.OK

    assert closed_by_peer(idle.sock)

    c = Client(server.port)
    assert c.stats()["idle_timeouts"] == 1
    c.close()


def test_a_client_that_stops_reading_its_replies_is_closed_at_the_idle_timeout(start_kvtier_server, ns):
    server = start_kvtier_server(idle_timeout_s=0.5)
    key, head, payload = record(ns, 1, size=1 << 20)
    stuck, watcher = Client(server.port), Client(server.port)
    stuck.put([(key, head, payload)])
    for _ in range(100):  # 100 MiB of replies it never reads: the server pauses it at 64 MiB queued
        stuck.send(Op.GET, keys=[key])

    wait_for(watcher, lambda s: s["idle_timeouts"] >= 1)  # (the watcher's own pings keep it alive)

    assert closed_by_peer(stuck.sock)
    stuck.close()
    watcher.close()


def test_the_first_frame_must_be_a_hello_of_this_protocol_version(kvtier_server):
    for first in (wire(Frame(Op.PING, 1)), wire(Frame(Op.HELLO, 1, version=PROTOCOL_VERSION + 1)),
                  raw_frame({"op": int(Op.HELLO), "id": 1})):
        c = Client(kvtier_server.port, hello=False)
        c.sock.sendall(first)
        answer = c.receive()
        assert answer.status is Status.BAD_REQUEST and c.receive() is None, answer
        c.close()


def test_requests_sent_with_the_hello_in_one_write_are_all_answered(kvtier_server, ns):
    key, head, payload = record(ns, 1, size=200_000)
    burst = HELLO + wire(Frame(Op.PUT, 1, keys=[key], heads=[head]), [payload]) + wire(
        Frame(Op.GET, 2, keys=[key]))
    c = Client(kvtier_server.port, hello=False)
    c.sock.sendall(burst)

    assert c.receive().op is Op.HELLO
    assert c.receive().flags == [PutResult.STORED]
    got = c.receive()
    assert got.heads == [head] and bytes(got.payloads[0]) == payload
    c.close()


# -- item 11: memory held for unauthenticated peers ----------------------------------------------


def test_unauthenticated_peers_get_no_payload_buffers(start_kvtier_server, ns):
    server = start_kvtier_server(token="s3cret", max_frame_bytes="64MiB")
    key, head, _ = record(ns, 1)
    size = 16 << 20
    header = raw_frame({"op": int(Op.PUT), "id": 1, "keys": [bytes(key)], "heads": [head], "lens": [size]})
    chunk = bytes(1 << 20)
    rss_before = server.rss_bytes()
    peers = []
    for _ in range(8):  # each claims 16 MiB and sends all of it but the last byte, without a token
        sock = connect(server.port)
        peers.append(sock)
        try:
            sock.sendall(header)
            for _ in range(size // len(chunk) - 1):
                sock.sendall(chunk)
            sock.sendall(chunk[:-1])
        except OSError:  # the server refused the frame and closed: what it should do
            pass

    grown = server.rss_bytes() - rss_before
    assert grown < 16 << 20, f"the server holds {grown >> 20} MiB for peers without the token"
    for sock in peers:
        sock.close()


def test_payload_bytes_being_received_are_bounded_over_all_connections(start_kvtier_server, ns):
    server = start_kvtier_server(receive_bytes="8MiB")
    big = [record(ns, i, size=6 << 20) for i in range(2)]
    first, second, watcher = Client(server.port), Client(server.port), Client(server.port)
    frames = [wire(Frame(Op.PUT, 1, keys=[k], heads=[h]), [p]) for k, h, p in big]
    half = len(frames[0]) // 2
    first.sock.sendall(frames[0][:half])  # admitted: 6 MiB reserved, half of it received
    wait_for(watcher, lambda s: s["receiving_bytes"] == 6 << 20)
    sender = threading.Thread(target=second.sock.sendall, args=(frames[1],))
    sender.start()  # 6 MiB more would exceed 8 MiB: this connection waits, unread

    stats = wait_for(watcher, lambda s: s["receive_waits"] == 1)
    assert stats["receiving_bytes"] == 6 << 20

    first.sock.sendall(frames[0][half:])
    assert first.receive().flags == [PutResult.STORED]
    assert second.receive().flags == [PutResult.STORED]  # back-pressure, not failure
    sender.join()
    assert watcher.stats()["receiving_bytes"] == 0
    for c in (first, second, watcher):
        c.close()


# -- item 15: half-close ---------------------------------------------------------------------------


def test_a_client_that_half_closes_after_sending_still_gets_every_reply(kvtier_server, ns):
    key, head, payload = record(ns, 1, size=1 << 20)
    c = Client(kvtier_server.port)
    assert c.put([(key, head, payload)]) == [PutResult.STORED]
    gets = [c.send(Op.GET, keys=[key]) for _ in range(32)]  # 32 MiB of replies: more than the
    c.sock.shutdown(socket.SHUT_WR)  # socket buffers hold, so most are still queued at the EOF

    for rid in gets:
        got = c.receive()
        assert got is not None and got.request_id == rid and bytes(got.payloads[0]) == payload
    assert c.receive() is None  # then the server closes
    c.close()


# -- item 12 over the wire -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [200 << 10, 8 << 20], ids=["200KiB", "8MiB"])
def test_a_header_of_a_million_unknown_fields_gets_a_short_error_without_stalling_others(
        kvtier_server, size):
    fields = {f"f{i}": 0 for i in range(size // 9)}  # ~9 bytes per field
    bomb = raw_frame(fields)
    attacker, other = Client(kvtier_server.port), Client(kvtier_server.port)
    sender = threading.Thread(target=_send_ignoring_close, args=(attacker.sock, bomb))
    started = time.monotonic()
    sender.start()

    answer = attacker.receive()
    pinged = other.call(Op.PING)

    assert time.monotonic() - started < 2.0
    assert answer is not None and answer.status is Status.BAD_REQUEST
    assert len(answer.error) <= 200 and pinged.status is Status.OK
    sender.join()
    attacker.close()
    other.close()


def _send_ignoring_close(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the server answered and closed before taking it all
        pass


def test_reply_to_a_get_of_too_many_keys_is_an_error_reply_not_a_silent_close(kvtier_server, ns):
    key, head, payload = record(ns, 1)
    c = Client(kvtier_server.port)
    c.put([(key, head, payload)])
    # 250,000 copies of one stored key: a 6.5 MB request whose reply header would be 17.5 MB.
    keys = msgpack.packb([bytes(key)] * 250_000, use_bin_type=True)
    header = b"\x83" + msgpack.packb("op") + msgpack.packb(int(Op.GET)) + msgpack.packb("id") + \
        msgpack.packb(9) + msgpack.packb("keys") + keys
    sender = threading.Thread(target=_send_ignoring_close,
                              args=(c.sock, struct.pack("<I", len(header)) + header))
    sender.start()

    answer = c.receive()

    assert answer is not None and answer.status is Status.BAD_REQUEST and len(answer.error) <= 200
    sender.join()
    c.close()
