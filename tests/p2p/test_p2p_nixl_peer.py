"""kvtier.p2p.nixl_peer's deadline and abort rules against a scripted agent (no NIXL needed): a
transfer NIXL refuses to cancel is waited for until it settles, and one that never settles drops
the remote agent after the grace; read() never returns while the transfer may still write.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from waiting import wait_until

from kvtier.p2p.nixl_peer import GRACE_MIN_S, NixlPeer, PeerLinks, RemoteAgent

NIXL = SimpleNamespace(NIXL_READ=1, NIXL_SUCCESS=0, NIXL_IN_PROG=1)


class ScriptedAgent:
    """A transfer that is in progress until `settles_at` (monotonic; None: never), whose release
    NIXL refuses while it runs (as NIXL_ERR_REPOST_ACTIVE)."""

    def __init__(self, settles_at: float | None, refuse_release: bool = True):
        self.settles_at = settles_at
        self.refuse_release = refuse_release
        self.released: list[int] = []
        self.requests: list[tuple] = []

    def running(self) -> bool:
        return self.settles_at is None or time.monotonic() < self.settles_at

    def makeXferReq(self, op, local_dlist, local, remote_dlist, remote, notif, backends, merge):
        self.requests.append((op, local_dlist, local, remote_dlist, remote))
        return 7

    def postXferReq(self, handle, notif):
        return NIXL.NIXL_IN_PROG

    def getXferStatus(self, handle):
        return NIXL.NIXL_IN_PROG if self.running() else NIXL.NIXL_SUCCESS

    def releaseXferReq(self, handle):
        if self.refuse_release and self.running():
            raise RuntimeError("NIXL_ERR_REPOST_ACTIVE")
        self.released.append(handle)


def peer_with(agent: ScriptedAgent) -> tuple[NixlPeer, list[RemoteAgent]]:
    torn: list[RemoteAgent] = []
    links = PeerLinks(NIXL, agent, local_dlist=3, local_slots=4, closed=lambda peer: None,
                      tear_down=torn.append)
    return NixlPeer(links, RemoteAgent("holder", slots=4), remote_dlist=5), torn


def test_a_read_uses_the_prepared_lists_by_index():
    agent = ScriptedAgent(settles_at=0.0)
    peer, _ = peer_with(agent)
    assert peer.read([(2, 0), (0, 3)], time.monotonic() + 1)
    assert agent.requests == [(NIXL.NIXL_READ, 3, [2, 0], 5, [0, 3])] and agent.released == [7]
    with pytest.raises(ValueError, match="remote slot"):
        peer.read([(0, 4)], time.monotonic() + 1)


def test_an_uncancellable_transfer_is_waited_for_until_it_settles():
    started = time.monotonic()
    agent = ScriptedAgent(settles_at=started + 0.4)  # past the 0.1 s deadline, within the grace
    peer, torn = peer_with(agent)
    assert not peer.read([(0, 0)], started + 0.1)
    assert time.monotonic() >= agent.settles_at  # it did not return while the transfer could write
    assert agent.released == [7] and torn == []
    assert peer.broken and peer.remote.stale


def test_a_transfer_that_never_settles_drops_the_remote_agent_after_the_grace():
    agent = ScriptedAgent(settles_at=None)
    peer, torn = peer_with(agent)
    started = time.monotonic()
    assert not peer.read([(0, 0)], started + 0.1)
    took = time.monotonic() - started
    assert GRACE_MIN_S <= took < GRACE_MIN_S + 2.0
    assert agent.released == [] and torn == [peer.remote]
    assert not peer.read([(0, 0)], time.monotonic() + 1)  # broken: refused at once


def test_close_waits_for_the_reads_in_flight():
    agent = ScriptedAgent(settles_at=time.monotonic() + 0.3, refuse_release=False)
    closed: list[NixlPeer] = []
    links = PeerLinks(NIXL, agent, local_dlist=3, local_slots=4, closed=closed.append,
                      tear_down=lambda remote: None)
    peer = NixlPeer(links, RemoteAgent("holder", slots=4), remote_dlist=5)
    reading = threading.Thread(target=peer.read, args=([(0, 0)], time.monotonic() + 5))
    reading.start()
    wait_until(lambda: agent.requests, "the read posted its transfer", 5)
    peer.close()
    assert closed == [peer] and peer.in_flight == 0 and agent.released == [7]
    reading.join(5)
    assert not peer.read([(0, 0)], time.monotonic() + 1)  # closed: refused
    peer.close()
    assert closed == [peer]
