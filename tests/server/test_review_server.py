"""Regressions found reviewing `kvtier.server` (connection)."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from kvtier.server.budget import ByteBudget
from kvtier.server.connection import RECEIVE_GRACE_S, Connection


def test_a_connection_held_by_the_reply_budget_is_not_closed_as_a_slow_receiver():
    # A connection that reserved a PUT's payload and then found the reply budget full stops
    # reading (back-pressure from other clients' replies). The receive-rate check used to count
    # that time against it, so once the budget stayed full for a window it was closed as a
    # trickler. The window now starts again while a budget holds it; after that, the rate counts.
    loop = asyncio.new_event_loop()
    ours, theirs = socket.socketpair()
    try:
        config = SimpleNamespace(idle_timeout_s=300.0, send_timeout_s=30.0)
        server = SimpleNamespace(loop=loop, config=config, budget=ByteBudget(1 << 30),
                                 replies=ByteBudget(1), stats=SimpleNamespace(bytes_in=0))
        ours.setblocking(False)
        conn = Connection(server, ours, loop.time())
        conn.authenticate(1 << 24)
        assert conn._admit(8 << 20)  # a PUT's payload reserved, its bytes still to come
        server.replies.charge(1)  # the reply budget is full (other connections' replies)
        assert not server.replies.wait_for_room(conn.turn)  # so this one waits its turn
        later = loop.time() + 10 * RECEIVE_GRACE_S
        assert conn.waiting and not conn.stalled(later)
        server.replies.cancel(conn.turn)  # room again: now it must keep the rate
        assert not conn.stalled(later + RECEIVE_GRACE_S / 2)
        assert conn.stalled(later + RECEIVE_GRACE_S)
    finally:
        loop.remove_reader(ours.fileno())
        ours.close()
        theirs.close()
        loop.close()
