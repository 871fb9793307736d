"""Attacks on POST /v1/peers (kvtier/controller/fleet_lookup.py `peers`): what a token holder (or a
confused member) can make the controller name as a P2P peer, and how big the answer can grow."""

from __future__ import annotations

import json
import time

from fleet_states import T0, TIMEOUT_S, registration, stored

from kvtier.controller import fleet_lookup
from kvtier.controller.fleet_lookup import peers
from kvtier.controller.memory_state import MemoryState
from kvtier.fleet.messages import MAX_PEER_KEYS

KEYS = [bytes([i]) * 24 for i in range(1, 6)]


def join(state, instance_id: str, keys: list[bytes], kind: str = "engine", p2p: bool = True,
         now: float = T0) -> None:
    reg = registration(instance_id, kind=kind, model=None if kind == "server" else "model-a")
    if p2p:
        reg = reg.model_copy(update={"p2p_url": f"kvtier://127.0.0.1:{7000 + len(instance_id)}"})
    state.register(reg, now)
    state.apply(instance_id, state.session, 1, [stored("cpu", keys)], now)


def test_a_kvtier_server_with_a_p2p_url_is_never_named():
    # A kvtier_server speaks no LEASE/CONNECT and holds many namespaces: a reader sent to it would
    # only fail and back off. Only engines are P2P peers, whatever a registration claims.
    state = MemoryState(TIMEOUT_S)
    join(state, "store", KEYS, kind="server")
    join(state, "plain-store", KEYS, kind="server", p2p=False)
    join(state, "engine", KEYS[:1])
    assert [p.instance_id for p in peers(state, KEYS, None, T0).peers] == ["engine"]


def test_unknown_exclude_and_down_instances():
    state = MemoryState(TIMEOUT_S)
    join(state, "down", KEYS, now=T0 - 2 * TIMEOUT_S)
    join(state, "up", KEYS[:2])
    assert [p.instance_id for p in peers(state, KEYS, "nobody-by-this-name", T0).peers] == ["up"]
    assert peers(state, KEYS, "up", T0).peers == []


def test_the_answer_is_bounded_in_peers_whatever_the_fleet_size():
    # 4096 keys held by many instances: without a bound the reply carries 2 x 4096 flags per
    # instance (tens of MB of JSON for a few hundred instances); a reader only ever uses a few.
    state = MemoryState(TIMEOUT_S)
    keys = [i.to_bytes(24, "big") for i in range(MAX_PEER_KEYS)]
    instances = 3 * fleet_lookup.MAX_PEERS
    for i in range(instances):
        join(state, f"peer-{i:03d}", keys[:MAX_PEER_KEYS - i])
    start = time.monotonic()
    reply = peers(state, keys, None, T0)
    elapsed = time.monotonic() - start
    assert len(reply.peers) == fleet_lookup.MAX_PEERS
    assert [p.instance_id for p in reply.peers[:2]] == ["peer-000", "peer-001"]  # longest runs kept
    assert len(json.dumps(reply.model_dump())) < fleet_lookup.MAX_PEERS * MAX_PEER_KEYS * 16
    assert elapsed < 10.0
