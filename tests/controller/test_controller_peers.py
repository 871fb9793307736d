"""POST /v1/peers (kvtier/controller/fleet_lookup.py `peers`, kvtier/controller/agent_routes.py): which
up instances with a P2P endpoint hold given keys, over every FleetState (memory, Redis, Redis
Cluster), and through the in-process app (auth, bounds, the OpenAPI document, /v1/instances)."""

from __future__ import annotations

import fleet_states
import pytest
from fastapi.testclient import TestClient
from fleet_states import T0, TIMEOUT_S, registration, stored

from kvtier.config import ControllerConfig
from kvtier.controller.app import build_app
from kvtier.controller.fleet_lookup import peers
from kvtier.controller.memory_state import MemoryState
from kvtier.fleet.messages import MAX_PEER_KEYS

make_state, state = fleet_states.make_state, fleet_states.state  # fixtures: every FleetState

TOKEN = "controller-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEYS = [bytes([i]) * 24 for i in range(1, 6)]


def peer(state, instance_id: str, held: dict[str, list[bytes]], p2p: bool = True, now: float = T0) -> None:
    """Register an engine (cpu, disk) with a P2P endpoint unless `p2p` is False; report `held` keys."""
    reg = registration(instance_id)
    if p2p:
        reg = reg.model_copy(update={"p2p_url": f"kvtier://127.0.0.1:{7000 + len(instance_id)}"})
    state.register(reg, now)
    state.apply(instance_id, state.session, 1, [stored(tier, keys) for tier, keys in held.items()], now)


def summary(reply) -> list[tuple[str, list[bool], list[bool]]]:
    return [(p.instance_id, p.held, p.in_memory) for p in reply.peers]


def test_peers_are_ranked_by_leading_keys_then_memory_then_id(state):
    peer(state, "b-two-leading-disk", {"disk": KEYS[:2]})
    peer(state, "a-two-leading-cpu", {"cpu": KEYS[:2]})
    peer(state, "c-three-leading", {"disk": KEYS[:3]})
    peer(state, "d-tail-only", {"cpu": KEYS[3:]})  # holds 2 keys, none leading
    peer(state, "e-nothing", {})
    got = summary(peers(state, KEYS, None, T0))
    t, f = True, False
    assert got == [
        ("c-three-leading", [t, t, t, f, f], [f, f, f, f, f]),
        ("a-two-leading-cpu", [t, t, f, f, f], [t, t, f, f, f]),
        ("b-two-leading-disk", [t, t, f, f, f], [f, f, f, f, f]),
        ("d-tail-only", [f, f, f, t, t], [f, f, f, t, t]),
    ]
    assert peers(state, KEYS, None, T0).peers[0].p2p_url == "kvtier://127.0.0.1:7015"


def test_a_key_in_memory_and_on_disk_counts_as_in_memory(state):
    peer(state, "p1", {"cpu": KEYS[:1], "disk": KEYS[:2]})
    assert summary(peers(state, KEYS[:2], None, T0)) == [("p1", [True, True], [True, False])]


def test_the_asker_down_instances_and_those_without_p2p_are_left_out(state):
    peer(state, "asker", {"cpu": KEYS})
    peer(state, "no-endpoint", {"cpu": KEYS}, p2p=False)
    peer(state, "stale", {"cpu": KEYS}, now=T0 - 2 * TIMEOUT_S)  # no heartbeat since: down
    peer(state, "other", {"disk": KEYS[:1]})
    assert [p.instance_id for p in peers(state, KEYS, "asker", T0).peers] == ["other"]
    assert [p.instance_id for p in peers(state, KEYS, None, T0).peers] == ["asker", "other"]
    assert peers(state, KEYS[1:], "asker", T0).peers == []


@pytest.fixture
def client(clock):
    app = build_app(ControllerConfig(token=TOKEN, heartbeat_timeout_s=TIMEOUT_S), MemoryState(TIMEOUT_S),
                    clock=clock)
    with TestClient(app, headers=AUTH) as client:
        yield client


def join(client: TestClient, instance_id: str, p2p_url: str | None, keys: list[bytes]) -> None:
    body = registration(instance_id).model_copy(update={"p2p_url": p2p_url}).model_dump(by_alias=True)
    reply = client.post("/v1/instances/register", json=body)
    assert reply.status_code == 200, reply.text
    batch = {"session": reply.json()["session"], "seq": 0,
             "events": [{"op": "stored", "tier": "cpu", "keys": [k.hex() for k in keys]}]}
    assert client.post(f"/v1/instances/{instance_id}/events", json=batch).json()["known"]


def test_the_app_answers_peers_and_shows_p2p_urls(client):
    join(client, "holder", "kvtier://127.0.0.1:7201", KEYS[:2])
    join(client, "asker", "kvtier://127.0.0.1:7202", [])
    join(client, "plain", None, KEYS)
    reply = client.post("/v1/peers", json={"keys": [k.hex() for k in KEYS[:3]], "exclude": "asker"})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"peers": [{"instance_id": "holder", "p2p_url": "kvtier://127.0.0.1:7201",
                                       "held": [True, True, False], "in_memory": [True, True, False]}]}
    urls = {v["instance_id"]: v["p2p_url"] for v in client.get("/v1/instances").json()["instances"]}
    assert urls == {"holder": "kvtier://127.0.0.1:7201", "asker": "kvtier://127.0.0.1:7202", "plain": None}


@pytest.mark.parametrize("body", [
    {"keys": []},
    {"keys": ["00" * 24] * (MAX_PEER_KEYS + 1)},
    {"keys": ["zz" * 24]},
    {"keys": ["00" * 24], "exclude": "../x"},
    {"keys": ["00" * 24], "extra": 1},
])
def test_bad_peer_questions_are_422(client, body):
    reply = client.post("/v1/peers", json=body)
    assert reply.status_code == 422, reply.text


def test_peers_needs_the_token_and_is_in_the_document(client):
    body = {"keys": ["00" * 24]}
    assert client.post("/v1/peers", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/peers", json={"keys": ["00" * 24] * MAX_PEER_KEYS}).json() == {"peers": []}
    document = client.get("/openapi.json").json()
    assert "/v1/peers" in document["paths"] and "PeersRequest" in document["components"]["schemas"]


def test_a_registration_with_a_p2p_url_of_another_scheme_is_refused(client):
    body = registration("x").model_dump(by_alias=True)
    body["p2p_url"] = "http://127.0.0.1:7000"
    assert client.post("/v1/instances/register", json=body).status_code == 422
