"""The bound on reply bytes a real `kvtier_server` holds for its clients (`reply_bytes`, kept in
`kvtier.server.budget`) and the send-stall timeout (`send_timeout_s`, in `kvtier.server.connection`):
peers that ask for records and never read the replies, and a reader that is slow but steady.

Attackers are raw sockets with a tiny receive buffer that send their GETs and read nothing. Waits
poll STATS against a deadline (a STATS call itself may wait its turn for reply room: that is the
back-pressure under test); the reader's pauses are its pace, not a wait.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
from kvtier_servers import Client, authenticated, record, wait_for, wire

from kvtier.wire.frames import Frame, Op, PutResult

MiB = 1 << 20


@pytest.fixture
def ns() -> bytes:
    return os.urandom(8)


class PeakRss:
    """Samples a server's RSS every 10 ms on a thread (a measurement, not a wait) until stopped."""

    def __init__(self, server):
        self.server, self._stop = server, threading.Event()
        self.first = self.peak = server.rss_bytes()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.server.rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def test_peers_that_get_large_records_and_never_read_cannot_pin_unbounded_reply_memory(start_kvtier_server,
                                                                                      tmp_path, ns):
    # 128 records of 1 MiB, 8 MiB of memory, the rest spilled: every GET reads its records back
    # into fresh buffers, which its queued reply then holds. Four peers send three GETs of 32 MiB
    # each and never read. Before the fix each one held ~96 MiB of replies (2 x HIGH_WATER at
    # most) until the idle timeout (300 s): 384 MiB here, 32 GiB with 256 connections. Now
    # replies over all connections stay within reply_bytes plus one reply, and a peer whose
    # replies drain nothing for send_timeout_s is closed and its buffers dropped.
    spill = {"path": str(tmp_path / "spill"), "capacity": "200MiB"}
    server = start_kvtier_server(capacity="8MiB", spill=spill, reply_bytes="64MiB", send_timeout_s=0.5)
    good = Client(server.port)
    recs = [record(ns, i, size=MiB) for i in range(128)]
    for i in range(0, len(recs), 8):
        assert good.put(recs[i:i + 8]) == [PutResult.STORED] * 8
    base = good.stats()
    rss = PeakRss(server)
    try:
        greedy = []
        for i in range(4):
            sock = authenticated(server.port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for j in range(3):  # keys rotate through all 128: each GET is served from the spill
                first = (3 * i + j) * 32 % len(recs)
                sock.sendall(wire(Frame(Op.GET, j + 1, keys=[r[0] for r in recs[first:first + 32]])))
            greedy.append(sock)
        # At least two GETs of each peer (64 MiB) get answered: all peers at once before the fix;
        # now one peer at a time, closed in turn (a third GET when the kernel took some replies).
        wait_for(good, lambda s: s["requests_get"] >= base["requests_get"] + 8)
        got = good.call(Op.GET, keys=[r[0] for r in recs[:4]])  # served, after back-pressure
        stats = wait_for(good, lambda s: s["connections"] == 1 and s["sending_bytes"] == 0)
    finally:
        grown = rss.stop() - rss.first

    assert grown < 128 * MiB, f"RSS grew by {grown >> 20} MiB for 4 peers that never read"
    assert [bytes(p) for p in got.payloads] == [r[2] for r in recs[:4]]
    # Closed by the send timeout (not drained here: through a 4 KiB window that takes minutes).
    assert stats["send_timeouts"] == 4 and stats["idle_timeouts"] == 0 and stats["reply_waits"] >= 3
    for sock in greedy:
        sock.close()
    good.close()


def test_a_slow_but_steady_reader_is_not_cut_off_by_the_send_timeout(start_kvtier_server, ns):
    # 12 MiB of replies read 128 KiB every 25 ms (~5 MiB/s): ~2.4 s, over two send timeouts and
    # three times the reply budget. The server's sends stall while the kernel's send buffer (up to
    # tcp_wmem's 4 MiB) drains to a third, ~0.3 s at this pace: under send_timeout_s, so the reader
    # is never cut off and gets every byte; the reply budget goes back to 0 once it has.
    server = start_kvtier_server(reply_bytes="4MiB", send_timeout_s=1.0)
    good = Client(server.port)
    recs = [record(ns, i, size=MiB) for i in range(12)]
    assert good.put(recs) == [PutResult.STORED] * 12
    slow = Client(server.port)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    rid = slow.send(Op.GET, keys=[r[0] for r in recs])
    pace = threading.Event()  # never set: its wait is the pace of the reader

    reply = None
    for _ in range(2000):  # 12 MiB / 128 KiB = 96 reads, and then some for short ones
        if (reply := slow.decoder.next_frame()) is not None:
            break
        n = slow.sock.recv_into(slow.decoder.get_buffer()[:128 << 10])
        assert n, f"the server closed the slow reader: {good.stats()}"
        slow.decoder.advance(n)
        pace.wait(0.025)

    assert reply is not None and reply.request_id == rid
    assert [bytes(p) for p in reply.payloads] == [r[2] for r in recs]
    stats = wait_for(good, lambda s: s["sending_bytes"] == 0)
    assert stats["send_timeouts"] == 0 and stats["connections"] == 2
    slow.close()
    good.close()
