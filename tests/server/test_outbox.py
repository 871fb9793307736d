"""Tests for kvtier/server/outbox.py: a connection's queued reply bytes, over a real socket pair."""

from __future__ import annotations

import socket

from kvtier.server.budget import ByteBudget
from kvtier.server.outbox import Outbox


def test_queued_replies_are_charged_until_sent_and_their_stall_clock_runs_from_the_last_send(clock):
    ours, theirs = socket.socketpair()
    budget = ByteBudget(1 << 30)
    try:
        ours.setblocking(False)
        out = Outbox(budget, clock)
        out.add([b"header", memoryview(b"x" * 1000)])
        assert out and out.queued == budget.used == 1006

        clock.now += 5.0
        assert out.stalled(clock.now, 5.0)  # queued 5 s ago, nothing taken since
        assert out.send(ours) == 1006 and not out and out.queued == 0
        assert budget.used == 1006  # the caller releases what was sent
        assert not out.stalled(clock.now + 60.0, 5.0)  # nothing queued: never stalled
        assert theirs.recv(2048) == b"header" + b"x" * 1000

        out.add([b"late"])
        assert out.sent_at == clock.now and out.drop() == 4 and not out
    finally:
        ours.close()
        theirs.close()
