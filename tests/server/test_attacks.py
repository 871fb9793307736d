"""Attacks on a real `kvtier_server` process over loopback by authenticated peers that follow the
protocol but not its spirit: trickling a large frame to hold the receive budget, and asking for more
replies than they read, dropping large frames half-way, opening connections until the server runs
out of file descriptors, driving evictions into a spill that fails every write.
(Peers without the token are in test_connection.py.)

Attackers are raw sockets sending exactly the bytes of the attack, from bounded loops that stop by
themselves. Waits read sockets with a timeout or poll STATS against a deadline; nothing sleeps for
synchronisation (the trickle's pauses are the attack itself, not a wait).
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time

import pytest
from kvtier_servers import TIMEOUT_S, Client, authenticated, closed_by_peer, record, wait_for, wire
from waiting import wait_until

from kvtier.server.connection import HIGH_WATER
from kvtier.wire.frames import PROTOCOL_VERSION, Frame, Op, PutResult, Status

DEADLINE_S = 20.0
MiB = 1 << 20


@pytest.fixture
def ns() -> bytes:
    return os.urandom(8)


def trickle(sock: socket.socket, data: bytes, every_s: float, stop: threading.Event) -> None:
    """Send `data` a byte per `every_s` (often enough never to look idle) until the server closes
    the socket, `stop` is set or the data runs out."""
    for i in range(len(data)):
        if stop.wait(every_s):
            return
        try:
            sock.sendall(data[i:i + 1])
        except OSError:
            return


def test_a_client_trickling_a_large_put_cannot_hold_the_receive_budget_forever(start_kvtier_server, ns):
    # Two peers announce 3 MiB PUTs, send half, then a byte every 50 ms: never idle, never done,
    # and together they hold the whole 6 MiB receive budget. Before the fix a good client's PUT
    # waited behind them for as long as they kept trickling (here: its 10 s socket timeout).
    server = start_kvtier_server(receive_bytes="6MiB", idle_timeout_s=1.0)
    stop = threading.Event()
    attackers, threads = [], []
    for i in range(2):
        key, head, payload = record(ns, 100 + i, size=3 * MiB)
        frame = wire(Frame(Op.PUT, 1, keys=[key], heads=[head]), [payload])
        sock = authenticated(server.port)
        sock.sendall(frame[:len(frame) // 2])
        attackers.append(sock)
        threads.append(threading.Thread(target=trickle, args=(sock, frame[len(frame) // 2:], 0.05, stop)))
        threads[-1].start()
    good = Client(server.port)
    wait_for(good, lambda s: s["receiving_bytes"] == 6 * MiB)  # the budget is theirs

    started = time.monotonic()
    try:
        assert good.put([record(ns, 1, size=MiB)]) == [PutResult.STORED]
        waited = time.monotonic() - started
        stats = wait_for(good, lambda s: s["receive_timeouts"] == 2 and s["receiving_bytes"] == 0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    # Under 1 MiB/s over a window of min(idle_timeout_s, 10 s) = 1 s; swept within 0.25 s.
    assert waited < 5.0 and stats["receive_waits"] >= 1
    assert all(closed_by_peer(sock) for sock in attackers)
    assert stats["connections"] == 1 and stats["idle_timeouts"] == 0
    good.close()


def test_a_client_streaming_a_put_at_a_fair_rate_is_not_timed_out(start_kvtier_server, ns):
    # The receive-rate check must not catch a slow but honest client: 4 MiB sent in 32 pieces over
    # ~1 s (past the 0.3 s idle timeout, so over several 0.3 s windows; ~4 MiB/s in each).
    server = start_kvtier_server(idle_timeout_s=0.3)
    key, head, payload = record(ns, 1, size=4 * MiB)
    frame = wire(Frame(Op.PUT, 1, keys=[key], heads=[head]), [payload])
    slow = Client(server.port)
    pace = threading.Event()  # never set: its wait is the pace of the sender
    piece = -(-len(frame) // 32)
    for i in range(0, len(frame), piece):
        slow.sock.sendall(frame[i:i + piece])
        pace.wait(0.03)

    answer = slow.receive()

    assert answer is not None and answer.status is Status.OK and answer.flags == [PutResult.STORED]
    assert slow.stats()["receive_timeouts"] == 0
    slow.close()


def test_one_get_of_many_spilled_records_does_not_read_them_all_into_memory(start_kvtier_server, tmp_path,
                                                                          ns):
    # 8 MiB of memory, 256 MiB of records in the spill. One GET of all 256 keys from a peer that
    # never reads: before the fix the server read every record back from the spill into fresh
    # memory for that one reply (RSS +256 MiB, 32x the capacity; MAX_KEYS x the record size in
    # general). Now a GET reply carries at most HIGH_WATER of records, the rest are misses.
    spill = {"path": str(tmp_path / "spill"), "capacity": "400MiB"}
    server = start_kvtier_server(capacity="8MiB", spill=spill)
    good = Client(server.port)
    recs = [record(ns, i, size=MiB) for i in range(256)]
    for i in range(0, len(recs), 8):
        assert good.put(recs[i:i + 8]) == [PutResult.STORED] * 8
    base = wait_for(good, lambda s: s["spill_records"] >= 248)
    rss_before = server.rss_bytes()

    greedy = authenticated(server.port)
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    greedy.sendall(wire(Frame(Op.GET, 1, keys=[r[0] for r in recs])))
    stats = wait_for(good, lambda s: s["requests_get"] == base["requests_get"] + 1)
    grown = server.rss_bytes() - rss_before

    assert grown < 160 * MiB, f"RSS grew by {grown >> 20} MiB for one unread GET"
    assert stats["reply_cuts"] == 256 - HIGH_WATER // MiB
    # What a reply does carry is right, and a client asking in smaller batches gets everything.
    got = good.call(Op.GET, keys=[r[0] for r in recs[:80]])
    sent = [bytes(p) if p is not None else None for p in got.payloads]
    assert sent == [r[2] for r in recs[:64]] + [None] * 16
    assert [bytes(p) for p in good.call(Op.GET, keys=[r[0] for r in recs[64:80]]).payloads] == \
        [r[2] for r in recs[64:80]]
    greedy.close()
    wait_for(good, lambda s: s["connections"] == 1 and s["receiving_bytes"] == 0)
    good.close()


def test_running_out_of_file_descriptors_pauses_accepting_instead_of_spinning(start_kvtier_server):
    # At EMFILE the listener stays readable, so before the fix the loop called accept() again at
    # once, forever: a core spent and ~30,000 "accept failed" log lines a second, until some
    # connection closed. Now accepting pauses (ACCEPT_RETRY_S) and the failure is logged once a minute.
    server = start_kvtier_server()
    soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (48, hard))
    peers = []
    for _ in range(60):  # HELLOs sent, not awaited: past ~40 of them accept() fails
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S)
        sock.sendall(wire(Frame(Op.HELLO, 0, version=PROTOCOL_VERSION)))
        peers.append(sock)
    wait_until(lambda: "accept failed" in server.log.read_text(), "the server never ran out of descriptors",
               DEADLINE_S)
    lines = len(server.log.read_text().splitlines())
    threading.Event().wait(1.0)  # an observation window: how much the server logs while stuck

    assert len(server.log.read_text().splitlines()) - lines < 10
    for sock in peers[:30]:
        sock.close()
    good = Client(server.port)  # served once descriptors are free again
    stats = good.stats()
    assert stats["accept_errors"] >= 1 and stats["connections"] <= 31
    good.close()
    for sock in peers[30:]:
        sock.close()
    resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))


def test_a_peer_that_drops_large_puts_half_way_leaves_no_memory_behind(start_kvtier_server, ns):
    # Each peer sends 15 MiB of a PUT and disconnects. The receive budget went back to 0, but the
    # received bytes stayed in the server: the connection and its decoder reference each other, so
    # its payload buffers waited for the cyclic garbage collector (8 peers: +120 MiB, for good).
    server = start_kvtier_server()
    good = Client(server.port)
    key, head, payload = record(ns, 1, size=15 * MiB)
    frame = wire(Frame(Op.PUT, 1, keys=[key], heads=[head]), [payload])
    rss_before = server.rss_bytes()
    received = good.stats()["bytes_in"]
    for _ in range(8):
        peer = authenticated(server.port)
        peer.sendall(frame[:-1024])
        received += len(frame) - 1024
        wait_for(good, lambda s, n=received: s["bytes_in"] >= n)  # all of it in the server's buffers
        peer.close()

    stats = wait_for(good, lambda s: s["connections"] == 1 and s["receiving_bytes"] == 0)

    grown = server.rss_bytes() - rss_before
    assert grown < 48 * MiB, f"RSS grew by {grown >> 20} MiB after 8 dropped PUTs of 15 MiB"
    assert stats["records"] == 0
    good.close()


def test_memory_of_records_read_back_from_the_spill_goes_back_to_the_os(start_kvtier_server, tmp_path, ns):
    # Three peers GET 64 spilled 1 MiB records each and never read the replies, then go. The
    # records came back from the spill in 1 MiB bytearrays: malloc kept their memory after they
    # were freed, and the server stayed ~190 MiB larger for good, with 8 MiB of capacity.
    spill = {"path": str(tmp_path / "spill"), "capacity": "200MiB"}
    server = start_kvtier_server(capacity="8MiB", spill=spill)
    good = Client(server.port)
    recs = [record(ns, i, size=MiB) for i in range(128)]
    for i in range(0, len(recs), 8):
        assert good.put(recs[i:i + 8]) == [PutResult.STORED] * 8
    base = good.stats()
    rss_before = server.rss_bytes()

    greedy = []
    for first in (0, 64, 0):
        sock = authenticated(server.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(wire(Frame(Op.GET, 1, keys=[r[0] for r in recs[first:first + 64]])))
        greedy.append(sock)
    wait_for(good, lambda s: s["requests_get"] == base["requests_get"] + 3)
    for sock in greedy:
        sock.close()  # with unread replies: a reset, which the server notices on its next send
    stats = wait_for(good, lambda s: s["connections"] == 1)

    grown = server.rss_bytes() - rss_before
    assert grown < 48 * MiB, f"RSS stayed {grown >> 20} MiB larger after the readers left"
    assert stats["spill_hits"] - base["spill_hits"] >= 3 * 56
    good.close()


def test_a_spill_that_fails_every_write_logs_once_not_once_per_eviction(start_kvtier_server, tmp_path, ns):
    # A namespace folder planted as a symlink (the disk tier never follows one): every eviction of
    # that namespace fails. Before the fix each failure was a warning line, so clients' PUTs drove
    # the log (here 56 lines; thousands a second on a busy server, onto the disk that failed).
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "spill").mkdir()
    (tmp_path / "spill" / ns.hex()).symlink_to(outside)
    server = start_kvtier_server(capacity="1MiB", spill={"path": str(tmp_path / "spill"), "capacity": "8MiB"})
    good = Client(server.port)
    recs = [record(ns, i, size=256 << 10) for i in range(60)]
    for i in range(0, len(recs), 4):
        assert good.put(recs[i:i + 4]) == [PutResult.STORED] * 4

    stats = good.stats()

    assert stats["spill_errors"] >= 50 and stats["spills"] == 0 and not list(outside.iterdir())
    assert server.log.read_text().count("cannot write") <= 2
    good.close()


def test_a_server_killed_mid_spill_restarts_on_its_spill_and_serves_only_valid_records(start_kvtier_server,
                                                                                    tmp_path, ns):
    # (An attack that held: a guard.) kill -9 while PUTs evict into the spill, wherever it lands,
    # then a restart on the same directory: it adopts what is complete, serves it bit-exact, and
    # its counters match the files.
    spill = tmp_path / "spill"
    server = start_kvtier_server(capacity="2MiB", spill={"path": str(spill), "capacity": "256MiB"})
    recs = [record(ns, i, size=256 << 10) for i in range(200)]
    writer = Client(server.port)
    for i in range(0, 120, 4):
        writer.put(recs[i:i + 4])
    for i in range(120, 200, 4):  # the kill lands among these puts and their spills
        writer.send(Op.PUT, [r[2] for r in recs[i:i + 4]], keys=[r[0] for r in recs[i:i + 4]],
                    heads=[r[1] for r in recs[i:i + 4]])
    server.proc.kill()
    server.proc.wait()
    writer.close()
    server.proc.stdout.close()

    server.start()
    good = Client(server.port)
    stats = good.stats()
    files = len(list(spill.rglob("*.kvr")))
    got = good.call(Op.GET, keys=[r[0] for r in recs[:60]])

    assert stats["spill_records"] == files >= 100
    assert [bytes(p) for p in got.payloads] == [r[2] for r in recs[:60]]
    assert good.stats()["spill_errors"] == 0
    good.close()
