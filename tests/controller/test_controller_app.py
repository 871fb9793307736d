"""kvtier_controller's FastAPI app (kvtier/controller/app.py and the routes, auth, errors, commands
and metrics modules under it), in process: FastAPI's TestClient over a MemoryState with an injected
clock, and real HTTP command servers (tests/controller/command_double.py) for pin/unpin/move/clear."""

from __future__ import annotations

import time

import pytest
from command_double import CLEARED, CommandDouble, closed_url, silent_url
from fastapi.testclient import TestClient

from kvtier.config import ControllerConfig
from kvtier.controller.app import build_app
from kvtier.controller.memory_state import MemoryState
from kvtier.controller.state import StateUnavailable
from kvtier.fleet.messages import ErrorReply, Registration, TierUsage
from kvtier.keys import Namespace, TokenDatabase

MODEL = "model-a"
TIMEOUT_S = 10.0  # heartbeat timeout
TOKEN = "controller-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
COMMAND_TOKEN = "c" * 32
COMMAND_TIMEOUT_S = 0.5
TOKENS = list(range(1000, 1100))  # 100 tokens: 6 chunks of 16, 3 of 32


class FlakyState(MemoryState):
    """A MemoryState that raises StateUnavailable while `down` (as RedisState does while Redis is)."""

    down = False

    def __getattribute__(self, name):
        if name in {"instances", "instance", "holders", "index_size", "register", "heartbeat", "apply"} \
                and object.__getattribute__(self, "down"):
            raise StateUnavailable("redis://127.0.0.1:1: connection refused")
        return object.__getattribute__(self, name)


@pytest.fixture
def make_client(clock):
    opened = []

    def make(state=None, **config) -> TestClient:
        config = {"token": TOKEN, "command_timeout_s": COMMAND_TIMEOUT_S, "heartbeat_timeout_s": TIMEOUT_S,
                  **config}
        app = build_app(ControllerConfig(**config), state or MemoryState(TIMEOUT_S), clock=clock)
        client = TestClient(app, headers=AUTH).__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


@pytest.fixture(scope="module")
def double():
    with CommandDouble(COMMAND_TOKEN).running() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_double(request):
    if "double" in request.fixturenames:
        double = request.getfixturevalue("double")
        double.commands.clear()
        double.refuse = None


def namespace(model: str = MODEL) -> Namespace:
    return Namespace(model, "L2xH2xD16 float16")


def join(client: TestClient, instance_id: str, url: str = "http://127.0.0.1:9", chunk_size: int = 16,
         used: int = 0, tier_names: tuple[str, ...] = ("cpu", "disk")) -> str:
    """Register an engine of MODEL with a cpu and a disk tier of 1 MiB each, through the API."""
    tiers = [TierUsage(name=name, chunks=0, bytes_used=used, capacity_bytes=1 << 20) for name in tier_names]
    body = Registration(instance_id=instance_id, kind="engine", command_url=url, command_token=COMMAND_TOKEN,
                        model_id=MODEL, namespace=namespace().digest().hex(), chunk_size=chunk_size,
                        tiers=tiers).model_dump(by_alias=True)
    reply = client.post("/v1/instances/register", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["heartbeat_timeout_s"] == TIMEOUT_S
    return reply.json()["session"]


def keys_of(tokens, chunk_size: int = 16, model: str = MODEL) -> list[bytes]:
    return TokenDatabase(namespace(model), chunk_size).keys(tokens)


def send_keys(client: TestClient, instance_id: str, session: str, tier: str, keys, seq: int = 0):
    batch = {"session": session, "seq": seq,
             "events": [{"op": "stored", "tier": tier, "keys": [k.hex() for k in keys]}]}
    reply = client.post(f"/v1/instances/{instance_id}/events", json=batch)
    assert reply.status_code == 200, reply.text
    return reply.json()


def detail(reply) -> str:
    body = reply.json()
    ErrorReply.model_validate(body)  # every error has the documented body
    return body["detail"]


# -- auth, health --------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}])
@pytest.mark.parametrize("method,path", [("GET", "/openapi.json"), ("GET", "/v1/instances"),
                                         ("GET", "/v1/stats"), ("GET", "/metrics"),
                                         ("POST", "/v1/lookup"), ("POST", "/v1/clear"),
                                         ("POST", "/v1/instances/register"),
                                         ("POST", "/v1/instances/a/heartbeat")])
def test_a_missing_or_wrong_token_is_401(client, headers, method, path):
    reply = client.request(method, path, headers={"Authorization": "", **headers}, json={})
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert "token" in detail(reply)


def test_health_needs_no_token_and_says_ok(client):
    reply = client.get("/health", headers={"Authorization": ""})
    assert reply.status_code == 200 and reply.json()["status"] == "ok"


def test_without_a_token_every_request_passes(make_client):
    client = make_client(token=None)
    assert client.get("/v1/instances", headers={"Authorization": ""}).status_code == 200


# -- agents, lookup, route -----------------------------------------------------------------------

def test_lookup_hashes_with_each_instances_own_chunk_size_and_reports_tiers(client):
    a = join(client, "a")  # chunk 16
    b = join(client, "b", chunk_size=32)
    send_keys(client, "a", a, "cpu", keys_of(TOKENS)[:4])
    send_keys(client, "a", a, "disk", keys_of(TOKENS)[2:5], seq=1)
    send_keys(client, "b", b, "disk", keys_of(TOKENS, 32)[:1])
    reply = client.post("/v1/lookup", json={"model_id": MODEL, "tokens": TOKENS})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["num_tokens"] == 100 and body["hit_tokens"] == 80
    assert [(i["instance_id"], i["hit_tokens"], i["chunk_size"], i["tiers"]) for i in body["instances"]] == [
        ("a", 80, 16, ["cpu", "cpu", "cpu", "cpu", "disk"]), ("b", 32, 32, ["disk"])]
    other = client.post("/v1/lookup", json={"model_id": "another-model", "tokens": TOKENS}).json()
    assert other["instances"] == [] and other["hit_tokens"] == 0


def test_route_ranks_by_hit_then_free_bytes(client):
    join(client, "a", used=900)
    join(client, "b", used=100)
    c = join(client, "c", used=500)
    send_keys(client, "c", c, "cpu", keys_of(TOKENS)[:2])
    reply = client.post("/v1/route", json={"model_id": MODEL, "tokens": TOKENS})
    assert [(e["instance_id"], e["hit_tokens"]) for e in reply.json()["instances"]] == [
        ("c", 32), ("b", 0), ("a", 0)]


def test_instances_show_up_and_down_and_never_a_command_token(client, clock):
    session = join(client, "a")
    join(client, "b")
    clock.now += TIMEOUT_S / 2
    beat = client.post("/v1/instances/a/heartbeat", json={"session": session, "tiers": []})
    assert beat.json() == {"known": True}
    clock.now += TIMEOUT_S / 2 + 1  # b's last word was TIMEOUT_S + 1 ago; a's TIMEOUT_S / 2 + 1
    reply = client.get("/v1/instances")
    assert COMMAND_TOKEN not in reply.text
    views = {v["instance_id"]: v for v in reply.json()["instances"]}
    assert views["a"]["up"] and not views["b"]["up"]
    assert views["b"]["last_heartbeat_s"] == pytest.approx(TIMEOUT_S + 1)
    assert views["a"]["address"] == "http://127.0.0.1:9" and views["a"]["chunk_size"] == 16
    stats = client.get("/v1/stats").json()
    assert (stats["instances_up"], stats["instances_down"]) == (1, 1)
    assert stats["requests"]["/v1/instances"] == 1


def test_an_unknown_instance_or_session_is_told_to_register(client):
    assert client.post("/v1/instances/nobody/heartbeat", json={"session": "s", "tiers": []}).json() == {
        "known": False}
    events = client.post("/v1/instances/nobody/events", json={"session": "s", "seq": 0, "events": []})
    assert events.status_code == 200 and events.json()["known"] is False


def test_a_down_instance_leaves_lookups_and_route(client, clock):
    session = join(client, "a")
    send_keys(client, "a", session, "cpu", keys_of(TOKENS))
    clock.now += TIMEOUT_S + 1
    body = client.post("/v1/lookup", json={"model_id": MODEL, "tokens": TOKENS}).json()
    assert body["instances"] == [] and body["hit_tokens"] == 0
    assert client.post("/v1/route", json={"model_id": MODEL, "tokens": TOKENS}).json()["instances"] == []


# -- commands ------------------------------------------------------------------------------------

def test_pin_sends_each_instance_the_prompt_keys_in_its_own_chunk_size(client, double):
    join(client, "a", double.url)
    join(client, "b", double.url, chunk_size=32)
    reply = client.post("/v1/pin", json={"model_id": MODEL, "tokens": TOKENS})
    assert reply.status_code == 200, reply.text
    assert reply.json()["results"] == [{"instance_id": "a", "chunks": 6}, {"instance_id": "b", "chunks": 3}]
    sent = sorted(double.commands, key=lambda c: len(c.keys), reverse=True)
    assert [c.op for c in sent] == ["pin", "pin"]
    assert sent[0].keys == [k.hex() for k in keys_of(TOKENS)]
    assert sent[1].keys == [k.hex() for k in keys_of(TOKENS, 32)]


def test_unpin_and_move_reach_only_the_named_instance(client, double):
    join(client, "a", double.url)
    join(client, "b", double.url)
    unpin = client.post("/v1/unpin", json={"model_id": MODEL, "tokens": TOKENS[:32], "instance_id": "b"})
    assert unpin.json()["results"] == [{"instance_id": "b", "chunks": 2}]
    move = client.post("/v1/move", json={"model_id": MODEL, "tokens": TOKENS, "instance_id": "a",
                                         "to": "disk", "copy": True})
    assert move.json()["results"] == [{"instance_id": "a", "chunks": 6}]
    assert [(c.op, c.tier, c.copy_, len(c.keys)) for c in double.commands] == [
        ("unpin", None, False, 2), ("move", "disk", True, 6)]


def test_clear_goes_to_every_instance_that_is_up(client, double, clock):
    join(client, "gone", double.url)
    clock.now += TIMEOUT_S + 1
    join(client, "a", double.url)
    join(client, "b", double.url)
    reply = client.post("/v1/clear", json={"tier": "cpu"})
    assert sorted(r["instance_id"] for r in reply.json()["results"]) == ["a", "b"]
    assert {r["chunks"] for r in reply.json()["results"]} == {CLEARED}
    assert [(c.op, c.tier) for c in double.commands] == [("clear", "cpu"), ("clear", "cpu")]
    one = client.post("/v1/clear", json={"instance_id": "a"})
    assert one.json()["results"] == [{"instance_id": "a", "chunks": CLEARED}]


def test_a_refusal_in_a_request_to_every_instance_is_its_zero_chunks(client, double):
    join(client, "a", double.url)
    with CommandDouble(COMMAND_TOKEN).running() as refusing:
        refusing.refuse = "a kvtier_server cannot pin"
        join(client, "b", refusing.url)
        reply = client.post("/v1/pin", json={"model_id": MODEL, "tokens": TOKENS})
        assert reply.status_code == 200, reply.text
        assert reply.json()["results"] == [{"instance_id": "a", "chunks": 6},
                                           {"instance_id": "b", "chunks": 0}]
        named = client.post("/v1/pin", json={"model_id": MODEL, "tokens": TOKENS, "instance_id": "b"})
        assert named.status_code == 400 and "cannot pin" in detail(named)


def test_a_clear_of_every_instance_skips_those_without_the_tier(client, double):
    join(client, "a", double.url)
    join(client, "memory-only", double.url, tier_names=("memory",))
    reply = client.post("/v1/clear", json={"tier": "cpu"})
    assert reply.json()["results"] == [{"instance_id": "a", "chunks": CLEARED}]
    everything = client.post("/v1/clear", json={})
    assert sorted(r["instance_id"] for r in everything.json()["results"]) == ["a", "memory-only"]


def test_an_instances_own_4xx_is_a_400_with_its_detail(client, double):
    join(client, "a", double.url)
    double.refuse = "no tier 'gpu' here"
    reply = client.post("/v1/move", json={"model_id": MODEL, "tokens": TOKENS, "instance_id": "a",
                                          "to": "gpu"})
    assert reply.status_code == 400 and "no tier 'gpu' here" in detail(reply)


def test_a_command_for_a_down_instance_is_409_naming_its_last_heartbeat(client, double, clock):
    join(client, "a", double.url)
    clock.now += TIMEOUT_S + 5
    for path, body in [("/v1/pin", {"model_id": MODEL, "tokens": TOKENS, "instance_id": "a"}),
                       ("/v1/clear", {"instance_id": "a"})]:
        reply = client.post(path, json=body)
        assert reply.status_code == 409
        assert detail(reply) == f"instance a is down (last heartbeat {TIMEOUT_S + 5:.0f} s ago)"
    assert double.commands == []


@pytest.mark.parametrize("path,body", [
    ("/v1/pin", {"model_id": MODEL, "tokens": TOKENS, "instance_id": "nobody"}),
    ("/v1/move", {"model_id": MODEL, "tokens": TOKENS, "instance_id": "nobody", "to": "disk"}),
    ("/v1/clear", {"instance_id": "nobody"})])
def test_an_unknown_instance_is_404(client, path, body):
    reply = client.post(path, json=body)
    assert reply.status_code == 404 and "nobody" in detail(reply)


def test_an_unreachable_instance_is_502(client):
    join(client, "a", closed_url())
    reply = client.post("/v1/clear", json={"instance_id": "a"})
    assert reply.status_code == 502 and "instance a is unreachable" in detail(reply)
    assert COMMAND_TOKEN not in reply.text


def test_an_instance_that_never_answers_is_504_within_the_deadline(client, double):
    join(client, "a", double.url)
    with silent_url() as url:
        join(client, "b", url)
        start = time.monotonic()
        reply = client.post("/v1/pin", json={"model_id": MODEL, "tokens": TOKENS})
        elapsed = time.monotonic() - start
    assert reply.status_code == 504 and "instance b did not answer" in detail(reply)
    assert COMMAND_TIMEOUT_S * 0.9 <= elapsed < COMMAND_TIMEOUT_S + 2
    assert [c.op for c in double.commands] == ["pin"]  # the other instance got its command meanwhile


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/lookup", "/v1/route", "/v1/pin", "/v1/clear",
                                  "/v1/instances/register", "/v1/instances/a/events"])
@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2", b'{"model_id": NaN}'])
def test_malformed_json_is_400_with_a_message(client, path, raw):
    reply = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code in (400, 422)
    assert "JSON" in detail(reply) or "body" in detail(reply)
    if raw.startswith(b"{not"):
        assert reply.status_code == 400


@pytest.mark.parametrize("body,words", [
    ([1, 2], "JSON object"),
    ({"model_id": MODEL}, "missing field"),
    ({"model_id": MODEL, "tokens": [1], "extra": 1}, "unknown field"),
    ({"model_id": "", "tokens": [1]}, "model_id"),
    ({"model_id": 5, "tokens": [1]}, "model_id"),
    ({"model_id": MODEL, "tokens": "123"}, "list of integers"),
    ({"model_id": MODEL, "tokens": [1, 2.5]}, "list of integers"),
    ({"model_id": MODEL, "tokens": [1, "2"]}, "list of integers"),
    ({"model_id": MODEL, "tokens": [[1], [2]]}, "list of integers"),
    ({"model_id": MODEL, "tokens": [1, [2]]}, "list of integers"),
    ({"model_id": MODEL, "tokens": [1, None]}, "list of integers"),
    ({"model_id": MODEL, "tokens": [-1]}, "[0, 4294967296)"),
    ({"model_id": MODEL, "tokens": [2**32]}, "[0, 4294967296)"),
    ({"model_id": MODEL, "tokens": [2**70]}, "list of integers")])
@pytest.mark.parametrize("path", ["/v1/lookup", "/v1/route"])
def test_a_bad_prompt_body_is_422_naming_the_field(client, path, body, words):
    reply = client.post(path, json=body)
    assert reply.status_code == 422 and words in detail(reply)


@pytest.mark.parametrize("path,body,words", [
    ("/v1/pin", {"model_id": MODEL, "tokens": [-1]}, "tokens"),
    ("/v1/move", {"model_id": MODEL, "tokens": [1], "instance_id": "a"}, "to"),
    ("/v1/clear", {"tier": "Not A Tier"}, "tier"),
    ("/v1/clear", {"instance_id": "../etc"}, "instance_id"),
    ("/v1/instances/register", {"instance_id": "a"}, "kind")])
def test_bad_admin_and_agent_bodies_are_422_naming_the_field(client, path, body, words):
    reply = client.post(path, json=body)
    assert reply.status_code == 422 and words in detail(reply)


def test_a_bad_instance_id_in_the_path_is_422(client):
    reply = client.post("/v1/instances/..%2Fx/heartbeat", json={"session": "s", "tiers": []})
    assert reply.status_code in (404, 422) and detail(reply)


def test_an_empty_prompt_is_an_empty_answer(client):
    join(client, "a")
    body = client.post("/v1/lookup", json={"model_id": MODEL, "tokens": []}).json()
    assert body["num_tokens"] == 0 and body["instances"][0]["hit_tokens"] == 0


def test_a_body_over_the_limit_is_413_before_it_is_read(make_client):
    client = make_client(max_body_bytes=1024)
    big = {"model_id": MODEL, "tokens": list(range(1000))}
    for path in ["/v1/lookup", "/v1/pin", "/v1/instances/register"]:
        reply = client.post(path, json=big)
        assert reply.status_code == 413 and "1024 bytes" in detail(reply)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 100

    streamed = client.post("/v1/lookup", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "1024 bytes" in detail(streamed)
    assert client.post("/v1/lookup", json={"model_id": MODEL, "tokens": [1]}).status_code == 200


# -- state unavailable, metrics, OpenAPI ---------------------------------------------------------

def test_an_unavailable_index_is_503_and_health_says_so(make_client):
    state = FlakyState(TIMEOUT_S)
    client = make_client(state)
    state.down = True
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert "connection refused" in health.json()["detail"]
    for method, path, body in [("POST", "/v1/lookup", {"model_id": MODEL, "tokens": [1]}),
                               ("POST", "/v1/route", {"model_id": MODEL, "tokens": [1]}),
                               ("GET", "/v1/instances", None), ("GET", "/v1/stats", None),
                               ("POST", "/v1/clear", {}),
                               ("POST", "/v1/instances/a/heartbeat", {"session": "s", "tiers": []})]:
        reply = client.request(method, path, json=body)
        assert reply.status_code == 503, path
        assert "the fleet index is unavailable" in detail(reply)
    assert client.get("/metrics").status_code == 200  # the last numbers, not a failed scrape
    state.down = False
    assert client.get("/health").status_code == 200


def test_metrics_count_requests_per_route_and_instances(client, clock):
    session = join(client, "a")
    join(client, "b")
    send_keys(client, "a", session, "cpu", keys_of(TOKENS))
    clock.now += TIMEOUT_S + 1
    client.post("/v1/instances/a/heartbeat", json={"session": session, "tiers": []})
    client.post("/v1/lookup", json={"model_id": MODEL, "tokens": TOKENS})
    client.post("/v1/lookup", json={"model_id": MODEL})
    text = client.get("/metrics").text
    assert 'kvtier_controller_requests_total{endpoint="/v1/lookup",status="200"} 1.0' in text
    assert 'kvtier_controller_requests_total{endpoint="/v1/lookup",status="422"} 1.0' in text
    assert 'endpoint="/v1/instances/{instance_id}/heartbeat",status="200"' in text  # a template, not "a"
    assert 'kvtier_controller_request_seconds_count{endpoint="/v1/lookup"} 2.0' in text
    assert 'kvtier_controller_instances{state="down"} 2.0' in text
    assert "kvtier_controller_index_entries" in text


def test_the_openapi_document_lists_every_reply_and_error(client):
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    assert set(paths) == {"/health", "/metrics", "/v1/instances", "/v1/stats", "/v1/lookup", "/v1/route",
                          "/v1/pin", "/v1/unpin", "/v1/move", "/v1/compress", "/v1/decompress",
                          "/v1/clear", "/v1/instances/register",
                          "/v1/instances/{instance_id}/heartbeat", "/v1/instances/{instance_id}/events",
                          "/v1/peers"}
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "200" in responses, (method, path)
            for status, response in responses.items():
                if status.startswith(("4", "5")) and path != "/health":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorReply"}, (path, status)
            if path != "/health":
                assert "401" in responses and operation["security"] == [{"HTTPBearer": []}]
    lookup = paths["/v1/lookup"]["post"]
    assert lookup["requestBody"]["content"]["application/json"]["schema"]["title"] == "PromptRequest"
    assert {"400", "422", "503"} <= set(lookup["responses"])
    assert {"404", "409", "502", "504"} <= set(paths["/v1/pin"]["post"]["responses"])


def test_registrations_beyond_max_instances_are_429_and_known_ids_may_come_back(make_client):
    # Down instances stay registered (shown down) for an hour: without a bound, ids that never come
    # back (a crash loop under <host>-<pid>, or a token holder) grow the registry and every lookup.
    client = make_client(max_instances=2)
    join(client, "a")
    join(client, "b")
    body = Registration(instance_id="c", kind="engine", command_url="http://127.0.0.1:9",
                        command_token=COMMAND_TOKEN, model_id=MODEL, namespace=namespace().digest().hex(),
                        chunk_size=16, tiers=[]).model_dump(by_alias=True)
    refused = client.post("/v1/instances/register", json=body)
    assert refused.status_code == 429 and "max_instances" in refused.json()["detail"]
    assert sorted(i["instance_id"] for i in client.get("/v1/instances").json()["instances"]) == ["a", "b"]
    join(client, "a", url="http://127.0.0.1:10")  # a restart under a known id is always taken
