"""A reviewer's attacks on kvtier_controller (app, routes, MemoryState, commands): what a hostile client,
a broken or hostile instance, or a busy host with many threads does to it. Each test names what it
attacks; each one failed before the fix it pins down. In process (TestClient over a MemoryState with
an injected clock), with tiny HTTP servers standing in for instances that answer garbage."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fleet_states
import pydantic
import pytest
import test_controller_app
from fleet_states import T0, TIMEOUT_S, registration, stored
from test_controller_app import (
    AUTH,
    COMMAND_TOKEN,
    MODEL,
    TOKENS,
    FlakyState,
    detail,
    join,
    keys_of,
    send_keys,
)
from waiting import wait_until

from kvtier.controller import fleet_lookup, memory_state
from kvtier.controller.memory_state import MemoryState
from kvtier.fleet.messages import MAX_EVENT_KEYS, MAX_TIERS

make_state, state = fleet_states.make_state, fleet_states.state  # fixtures: every FleetState
make_client, client = test_controller_app.make_client, test_controller_app.client  # fixtures


# -- /health and auth ----------------------------------------------------------------------------

def test_health_tells_a_caller_without_the_token_nothing_about_the_index(make_client):
    """/health is open to anyone: the index's address and error are for those with the token."""
    state = FlakyState(TIMEOUT_S)
    client = make_client(state)
    state.down = True
    for headers in [{"Authorization": ""}, {"Authorization": "Bearer wrong"}]:
        reply = client.get("/health", headers=headers)
        assert reply.status_code == 503
        assert reply.json() == {"status": "unavailable", "detail": "the fleet index is unavailable"}
    assert "connection refused" in client.get("/health").json()["detail"]  # with the token
    open_client = make_client(state, token=None)  # no token: everyone is trusted
    assert "connection refused" in open_client.get("/health", headers={"Authorization": ""}).text


@pytest.mark.parametrize("header", ["authorization", "AUTHORIZATION"])
def test_the_header_name_and_scheme_are_case_insensitive_the_token_is_not(client, header):
    assert client.get("/v1/stats", headers={header: AUTH["Authorization"]}).status_code == 200
    assert client.get("/v1/stats", headers={header: "bearer controller-secret-token"}).status_code == 200
    wrong_case = {"Authorization": "Bearer CONTROLLER-SECRET-TOKEN"}
    assert client.get("/v1/stats", headers=wrong_case).status_code == 401
    assert client.get("/v1/stats", headers={"Authorization": "Bearer controller-secret-token "}
                      ).status_code in (200, 401)  # h11 strips trailing spaces; never a 5xx


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
def test_no_interactive_docs_are_served(client, path):
    assert client.get(path).status_code == 404  # with the token
    assert client.get(path, headers={"Authorization": ""}).status_code == 401  # without: nothing told


# -- bodies --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [[1, True], [True], [False, 2], [1, 2.0]])
@pytest.mark.parametrize("path", ["/v1/lookup", "/v1/route", "/v1/pin", "/v1/unpin"])
def test_booleans_and_floats_are_not_token_ids(client, path, tokens):
    """JSON Schema's integer is neither `true` nor `2.0`: the schema says integer, so both are 422."""
    reply = client.post(path, json={"model_id": MODEL, "tokens": tokens})
    assert reply.status_code == 422, reply.text
    assert "tokens" in detail(reply)


def test_a_model_id_that_says_true_is_still_a_model_id(client):
    reply = client.post("/v1/lookup", json={"model_id": "true false", "tokens": [1, 2]})
    assert reply.status_code == 200


@pytest.mark.parametrize("path", ["/v1/lookup", "/v1/pin", "/v1/instances/register",
                                  "/v1/instances/a/events"])
def test_deeply_nested_json_is_a_4xx(client, path):
    raw = b'{"model_id": "m", "tokens": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    reply = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= reply.status_code < 500 and detail(reply)


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://127.0.0.1:99999", "http://[::1",
                                 "http://:80"])
def test_a_command_url_that_does_not_parse_is_refused_at_registration(client, url):
    body = registration("a").model_dump(by_alias=True) | {"command_url": url}
    reply = client.post("/v1/instances/register", json=body)
    assert reply.status_code == 422 and "command_url" in detail(reply)


def test_a_stored_record_with_an_unusable_command_url_is_a_502_naming_the_instance(make_client, clock):
    """A registration stored before the check (Redis of an older controller) fails its commands as
    the instance's fault (502), not the caller's (400), and no thread dies with an unread error."""
    state = MemoryState(TIMEOUT_S)
    client = make_client(state)
    bad = registration("a").model_copy(update={"command_url": "http://h:abc"})  # not validated
    state.register(bad, clock.now)
    reply = client.post("/v1/clear", json={"instance_id": "a"})
    assert reply.status_code == 502 and "instance a" in detail(reply)
    assert COMMAND_TOKEN not in reply.text


def test_an_event_batch_is_bounded_by_its_keys_all_events_together(client):
    session = join(client, "a")
    keys = [os.urandom(24).hex() for _ in range(MAX_EVENT_KEYS // 2 + 1)]
    batch = {"session": session, "seq": 0,
             "events": [{"op": "stored", "tier": "cpu", "keys": keys},
                        {"op": "stored", "tier": "disk", "keys": keys}]}
    reply = client.post("/v1/instances/a/events", json=batch)
    assert reply.status_code == 422 and "keys" in detail(reply)
    assert client.get("/v1/stats").json()["index_chunks"] == 0
    batch["events"] = batch["events"][:1]  # one event of that size is fine
    assert client.post("/v1/instances/a/events", json=batch).json()["known"] is True


def test_an_event_batch_holds_at_most_one_cleared_event_per_possible_tier(client):
    # A `cleared` walks every key of the instance: 64K of them over 1M keys held the index for hours.
    session = join(client, "a")
    many = {"session": session, "seq": 0, "events": [{"op": "cleared", "tier": "cpu"}] * (MAX_TIERS + 1)}
    reply = client.post("/v1/instances/a/events", json=many)
    assert reply.status_code == 422 and "cleared" in detail(reply)
    many["events"] = many["events"][:MAX_TIERS]
    assert client.post("/v1/instances/a/events", json=many).json()["known"] is True


def test_a_bug_that_raises_a_validation_error_is_a_500_not_the_callers_400(monkeypatch, make_client, caplog):
    def broken(*_):
        pydantic.TypeAdapter(int).validate_python("not an int")  # a reply the code built wrong

    monkeypatch.setattr(fleet_lookup, "lookup", broken)
    client = make_client()
    with caplog.at_level(logging.ERROR):
        reply = client.post("/v1/lookup", json={"model_id": MODEL, "tokens": [1]})
    assert reply.status_code == 500 and detail(reply) == "internal error"
    assert "POST /v1/lookup failed" in caplog.text


# -- agents --------------------------------------------------------------------------------------

def test_taking_over_a_live_instances_id_is_logged_with_both_addresses(client, caplog):
    """Anyone with the controller token may register any id (a restarted instance must): a takeover
    of an instance that is up is allowed, and shows in the log, never with a command token."""
    join(client, "a", url="http://127.0.0.1:9")
    with caplog.at_level(logging.WARNING, logger="kvtier.controller"):
        join(client, "a", url="http://10.0.0.66:9")
    assert "http://127.0.0.1:9" in caplog.text and "http://10.0.0.66:9" in caplog.text
    assert COMMAND_TOKEN not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvtier.controller"):
        join(client, "a", url="http://10.0.0.66:9")  # the same address again: a restart, not worth a word
    assert caplog.text == ""


def test_events_for_unknown_tiers_and_other_namespaces_do_not_reach_lookups(client):
    session = join(client, "a")
    other = keys_of(TOKENS, model="model-b")
    batch = {"session": session, "seq": 0, "events": [
        {"op": "stored", "tier": "gpu", "keys": [k.hex() for k in keys_of(TOKENS)]},
        {"op": "stored", "tier": "cpu", "keys": [k.hex() for k in other]}]}
    assert client.post("/v1/instances/a/events", json=batch).json() == {"known": True, "resync": False}
    assert client.post("/v1/lookup", json={"model_id": MODEL, "tokens": TOKENS}).json()["hit_tokens"] == 0


@pytest.mark.parametrize("seq", [-1, 2**63, "1", 1.5, True])
def test_a_bad_seq_is_422(client, seq):
    session = join(client, "a")
    reply = client.post("/v1/instances/a/events", json={"session": session, "seq": seq, "events": []})
    assert reply.status_code == 422


def test_a_seq_gap_or_replay_asks_for_a_resync(client):
    session = join(client, "a")
    assert send_keys(client, "a", session, "cpu", [], seq=5)["resync"] is False  # the first batch sets it
    assert send_keys(client, "a", session, "cpu", [], seq=5)["resync"] is True  # a replay
    assert send_keys(client, "a", session, "cpu", [], seq=9)["resync"] is True  # a gap


def test_the_path_id_is_the_only_instance_an_event_batch_touches(client):
    a, b = join(client, "a"), join(client, "b")
    send_keys(client, "b", b, "cpu", keys_of(TOKENS))
    send_keys(client, "a", a, "cpu", [], seq=0)
    wipe = {"session": a, "seq": 1, "events": [{"op": "reset"}]}
    assert client.post("/v1/instances/a/events", json=wipe).json()["known"] is True
    views = {v["instance_id"]: v["chunks_indexed"] for v in client.get("/v1/instances").json()["instances"]}
    assert views == {"a": 0, "b": len(keys_of(TOKENS))}


# -- down instances: late words after a sweep ----------------------------------------------------

def test_a_heartbeat_stamped_before_a_sweep_does_not_revive_the_swept_instance(state):
    """A request thread reads the clock, then the sweeper (a later `now`) finds the instance down and
    drops its keys, then the heartbeat lands: it must be refused (register and resend), else the
    instance is up again with an empty index entry and never resends."""
    state.register(registration("a"), T0)
    state.apply("a", state.session, 0, [stored("cpu", [os.urandom(24)])], T0)
    assert state.sweep(T0 + TIMEOUT_S + 0.5) == 1
    assert state.heartbeat("a", state.session, [], T0 + TIMEOUT_S - 0.1) is False
    assert state.apply("a", state.session, 1, [], T0 + TIMEOUT_S - 0.1).known is False
    record = state.instance("a", T0 + TIMEOUT_S)
    assert not record.up or record.chunks_indexed == 0
    state.register(registration("a"), T0 + TIMEOUT_S + 1)  # registering again heals it
    assert state.heartbeat("a", state.session, [], T0 + TIMEOUT_S + 2) is True


def test_events_parsed_while_a_sweep_drops_the_instance_are_not_applied(monkeypatch):
    """MemoryState parses hex outside its lock: a sweep may drop the instance meanwhile."""
    state = MemoryState(TIMEOUT_S)
    state.register(registration("a"), T0)
    parse = memory_state.parse_events

    def parse_then_sweep(events, bits):
        parsed = parse(events, bits)
        state.sweep(T0 + TIMEOUT_S + 1)
        return parsed

    monkeypatch.setattr(memory_state, "parse_events", parse_then_sweep)
    reply = state.apply("a", state.session, 0, [stored("cpu", [os.urandom(24)])], T0 + TIMEOUT_S)
    assert reply.known is False
    assert state.index_size()[0] == 0 and state.instance("a", T0 + TIMEOUT_S + 1).chunks_indexed == 0


# -- many threads on one MemoryState -------------------------------------------------------------

KEYS = [bytes([n]) * 24 for n in range(4)]
BITS = {"cpu": 1, "disk": 2}


class _Fleet:
    """Threads playing agents, readers and the sweeper over one MemoryState with a shared clock that
    only the sweeper moves. Each agent keeps what it told the state since its last registration, as
    the real agent assumes the index holds: it must, for as long as the state says `known`."""

    def __init__(self, state: MemoryState):
        self.state = state
        self.now = T0
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.ids = [f"i{n}" for n in range(6)]
        self.mine: dict[str, dict[bytes, int] | None] = dict.fromkeys(self.ids)  # None: must register
        self.seq = dict.fromkeys(self.ids, 0)
        self.silent_until = dict.fromkeys(self.ids, T0)
        self.refusals = 0
        self.swept = 0

    def run(self, target, *args) -> threading.Thread:
        def guarded():
            try:
                while not self.stop.is_set():
                    target(*args)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        return thread

    def agent(self, instance_id: str, rng: random.Random) -> None:
        # A request reads the clock, then waits for the lock: its `now` may be older than the sweep's.
        state, now = self.state, self.now - rng.uniform(0, TIMEOUT_S / 5)
        if self.now < self.silent_until[instance_id]:
            return
        if rng.random() < 0.01:  # silent past its timeout: down, swept, refused, registers again
            self.silent_until[instance_id] = self.now + TIMEOUT_S * 1.2
        if self.mine[instance_id] is None:
            state.register(registration(instance_id), now)
            self.mine[instance_id], self.seq[instance_id] = {}, 0
        elif not state.heartbeat(instance_id, state.session, [], now):
            self.mine[instance_id], self.refusals = None, self.refusals + 1
            return
        keys, tier = rng.sample(KEYS, 2), rng.choice(["cpu", "disk"])
        op = rng.choice([fleet_states.stored, fleet_states.evicted])
        reply = state.apply(instance_id, state.session, self.seq[instance_id], [op(tier, keys)], now)
        self.seq[instance_id] += 1
        assert not reply.resync
        if not reply.known:
            self.mine[instance_id], self.refusals = None, self.refusals + 1
            return
        mine = self.mine[instance_id]
        for key in keys:
            mask = mine.get(key, 0)
            mask = mask | BITS[tier] if op is fleet_states.stored else mask & ~BITS[tier]
            if mask:
                mine[key] = mask
            else:
                mine.pop(key, None)

    def reader(self) -> None:
        self.state.instances(self.now)
        for held in self.state.holders(KEYS):
            for instance_id, mask in held.items():
                assert 0 < mask < 4 and instance_id in self.mine, (instance_id, mask)
        entries, nbytes = self.state.index_size()
        assert 0 <= entries <= len(KEYS) * len(self.ids) and nbytes >= 0

    def sweeper(self) -> None:
        self.now += TIMEOUT_S / 50  # an agent held off the GIL for 50 sweeps is down
        self.swept += self.state.sweep(self.now)

    def check_agents(self) -> None:
        """Quiet now: every agent the state still calls up holds exactly what it was told."""
        held = self.state.holders(KEYS)
        for instance_id, mine in self.mine.items():
            if mine is not None and self.state.instance(instance_id, self.now).up:
                indexed = {k: h[instance_id] for k, h in zip(KEYS, held) if instance_id in h}
                assert indexed == mine, instance_id


def test_many_threads_on_a_memory_state_keep_its_invariants():
    state = MemoryState(TIMEOUT_S, forget_after_s=TIMEOUT_S * 2)
    fleet = _Fleet(state)
    threads = [fleet.run(fleet.agent, instance_id, random.Random(instance_id)) for instance_id in fleet.ids]
    threads += [fleet.run(fleet.reader) for _ in range(3)]
    threads.append(fleet.run(fleet.sweeper))
    wait_until(lambda: fleet.errors or (fleet.swept > 5 and fleet.refusals > 5), "sweeps and refusals",
               timeout_s=30)
    fleet.stop.set()
    for thread in threads:
        thread.join(10)
    assert fleet.errors == []
    fleet.check_agents()
    records = state.instances(fleet.now)
    assert state.index_size()[0] == sum(r.chunks_indexed for r in records)
    state.sweep(fleet.now + TIMEOUT_S + 1)  # everyone silent: every key leaves, no record is up
    assert state.index_size()[0] == 0
    assert not any(r.up or r.chunks_indexed for r in state.instances(fleet.now + TIMEOUT_S + 1))


# -- instances that answer commands badly --------------------------------------------------------

@contextmanager
def bad_instance(status: int, body: bytes, headers: dict[str, str] | None = None) -> Iterator[str]:
    """An HTTP server that answers every POST with `status`, `headers` and `body`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("status,body,headers,words", [
    (200, b"<html>not json</html>", None, "not JSON"),
    (200, b'{"chunks": -3}', None, "malformed"),
    (200, b'{"chunks": 1, "token": "x"}', None, "malformed"),
    (200, b"[1, 2]", None, "malformed"),
    (302, b"{}", {"Location": "http://127.0.0.1:1/"}, "malformed"),
    (200, b'{"chunks": 1, "tiers": []}' + b" " * (2 << 20), None, "limit"),
    (500, b'{"detail": "boom"}', None, "boom")])
def test_an_instance_answering_garbage_is_a_502_without_the_command_token(client, caplog, status, body,
                                                                          headers, words):
    with bad_instance(status, body, headers) as url:
        join(client, "a", url)
        with caplog.at_level(logging.DEBUG):
            reply = client.post("/v1/clear", json={"instance_id": "a"})
    assert reply.status_code == 502, reply.text
    assert "instance a" in detail(reply) and words in detail(reply)
    assert COMMAND_TOKEN not in reply.text and COMMAND_TOKEN not in caplog.text


# -- metrics -------------------------------------------------------------------------------------

def test_random_paths_ids_and_methods_do_not_grow_the_metrics(client):
    rng = random.Random(7)
    session = join(client, "a")
    for n in range(200):
        path = rng.choice([f"/x{n}", f"/v1/instances/id{n}/heartbeat", f"/v1/instances/id{n}/events",
                           f"/v1/{n}", f"/metrics/{n}", "/v1/lookup"])
        client.request(rng.choice(["GET", "POST", "PUT", "DELETE", "OPTIONS"]), path,
                       json={"session": session, "tiers": []},
                       headers=rng.choice([AUTH, {"Authorization": ""}]))
    text = client.get("/metrics").text
    series = [line for line in text.splitlines() if line.startswith("kvtier_controller_requests_total{")]
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in series}
    assert endpoints <= {"other", "/v1/lookup", "/metrics", "/v1/instances/register",
                         "/v1/instances/{instance_id}/heartbeat", "/v1/instances/{instance_id}/events"}
    assert len(series) <= 40
    assert "id1" not in text and "/x1" not in text


class _CountingLock:
    def __init__(self):
        self.lock, self.holds = threading.Lock(), 0

    def __enter__(self):
        self.lock.acquire()
        self.holds += 1

    def __exit__(self, *exc):
        self.lock.release()


def test_a_huge_lookup_lets_heartbeats_in_between():
    """A 1M-token prompt at chunk size 1 probes 1M keys (over a second at 8 instances): the lock is
    let go every HOLDERS_SLICE keys, not held throughout while heartbeats wait and time out."""
    state = MemoryState(TIMEOUT_S)
    state.register(registration("a", chunk_size=1), T0)
    keys = [os.urandom(24) for _ in range(5 * memory_state.HOLDERS_SLICE)]
    state.apply("a", state.session, 0, [stored("cpu", keys[-3:])], T0)
    state._lock = counting = _CountingLock()
    held = state.holders(keys)
    assert counting.holds >= 5
    assert held[-1] == {"a": 1} and held[0] == {} and len(held) == len(keys)


@pytest.mark.parametrize("path", ["/v1/pin", "/v1/instances/register", "/v1/instances/a/events"])
def test_a_chunked_body_over_the_limit_is_413_on_pydantic_routes_too(make_client, path):
    client = make_client(max_body_bytes=1024)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 100

    reply = client.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413 and "1024 bytes" in detail(reply)


@pytest.mark.parametrize("path", ["/v1/pin", "/v1/move", "/v1/clear", "/v1/instances/register",
                                  "/v1/instances/a/events", "/v1/lookup"])
def test_the_token_is_checked_before_the_body_is_read(client, path, monkeypatch):
    """FastAPI parses a route's body before its dependencies: without a gate in front, anyone could
    have the controller parse 64 MB of JSON (or learn it is malformed: a 400) before the 401."""
    for body in [b"{not json", b"[" + b"0," * 100_000 + b"0]"]:
        reply = client.post(path, content=body,
                            headers={"Authorization": "", "Content-Type": "application/json"})
        assert reply.status_code == 401, reply.text
        assert reply.headers["WWW-Authenticate"] == "Bearer" and "token" in detail(reply)
    assert client.post("/nowhere", content=b"{", headers={"Authorization": ""}).status_code == 401
    assert client.get("/health", headers={"Authorization": ""}).status_code == 200
