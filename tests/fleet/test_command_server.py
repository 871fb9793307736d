"""The instance's command server, over real HTTP: the per-process token, body validation, the
member's refusals, the body bound, counters, a clean stop."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest
from fleet_doubles import FakeMember, key

from kvtier.fleet.command_server import MAX_COMMAND_BYTES, CommandServer
from kvtier.fleet.http_client import HttpError, JsonClient, Unreachable
from kvtier.fleet.messages import CommandReply


@pytest.fixture
def member() -> FakeMember:
    return FakeMember()


@pytest.fixture
def server(member):
    server = CommandServer(member, "127.0.0.1", 0)
    server.start()
    yield server
    server.stop()


def raw(server: CommandServer, body: bytes, headers: dict[str, str]) -> tuple[int, dict, dict]:
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", "/v1/command", body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), json.loads(reply.read() or b"null")
    finally:
        conn.close()


def test_a_command_with_the_token_runs_on_the_member(server, member):
    client = JsonClient(server.url, server.token)
    reply = CommandReply.model_validate(client.post("/v1/command", {"op": "stats"}))
    assert [t.name for t in reply.tiers] == ["cpu", "disk"]
    reply = client.post("/v1/command", {"op": "move", "keys": [key(1).hex()], "tier": "disk", "copy": True})
    assert reply["chunks"] == 1
    assert [c.op for c in member.commands] == ["stats", "move"] and member.commands[1].copy_
    assert server.stats.commands == 2 and server.stats.failed == 0 and server.stats.refused == 0


def test_the_token_is_a_fresh_secret_and_the_url_is_the_real_port(member):
    a, b = CommandServer(member, "127.0.0.1", 0), CommandServer(member, "127.0.0.1", 0)
    try:
        assert a.token != b.token and len(a.token) >= 32
        assert a.url.startswith("http://127.0.0.1:") and not a.url.endswith(":0") and a.url != b.url
    finally:
        a.stop()
        b.stop()


def test_advertise_host_is_the_url_host(member):
    s = CommandServer(member, "127.0.0.1", 0, advertise_host="10.1.2.3")
    try:
        assert s.url.startswith("http://10.1.2.3:")
    finally:
        s.stop()


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc", "Bearer "])
def test_no_or_a_wrong_token_is_401_and_nothing_runs(server, member, auth):
    headers = {"Content-Type": "application/json"} | ({"Authorization": auth} if auth else {})
    status, reply_headers, body = raw(server, b'{"op": "stats"}', headers)
    assert status == 401 and reply_headers.get("www-authenticate") == "Bearer"
    assert "token" in body["detail"]
    assert member.commands == [] and server.stats.refused == 1


def test_the_token_is_checked_before_the_body(server, member):
    status, _, _ = raw(server, b"{not json", {"Content-Type": "application/json"})
    assert status == 401 and server.stats.refused == 1


@pytest.mark.parametrize("body, field", [
    (b"{not json", None),
    (b'{"op": "explode"}', "op"),
    (b'{"op": "pin", "keys": ["xyz"]}', "keys"),
    (b'{"op": "stats", "extra": 1}', "extra"),
])
def test_a_bad_body_is_422_naming_the_field(server, member, body, field):
    status, _, reply = raw(server, body, {"Authorization": f"Bearer {server.token}"})
    assert status == 422
    if field is not None:
        assert any(field in map(str, error["loc"]) for error in reply["detail"])
        assert all(error["loc"][0] == "body" and "input" not in error for error in reply["detail"])
    assert member.commands == [] and server.stats.failed == 1


def test_a_command_the_member_refuses_is_400_with_its_message(server, member):
    client = JsonClient(server.url, server.token)
    with pytest.raises(HttpError) as caught:
        client.post("/v1/command", {"op": "clear", "tier": "tape"})
    assert caught.value.status == 400 and "unknown tier 'tape'" in caught.value.detail
    assert server.stats.failed == 1 and server.stats.commands == 0


def test_a_member_that_breaks_is_500_and_the_server_goes_on(server, member):
    client = JsonClient(server.url, server.token)
    member.fail_with = RuntimeError("boom")
    with pytest.raises(HttpError) as caught:
        client.post("/v1/command", {"op": "stats"})
    assert caught.value.status == 500 and "RuntimeError" in caught.value.detail
    member.fail_with = None
    assert client.post("/v1/command", {"op": "stats"})["chunks"] == 0


def test_a_body_declared_over_the_bound_is_413_before_it_is_sent(server, member):
    # Expect: 100-continue: the client waits for a go-ahead before sending the body (kvtier.body_limit
    # reads a refused body it is sent, so that the client sees the 413 rather than a reset).
    headers = {"Authorization": f"Bearer {server.token}", "Content-Length": str(MAX_COMMAND_BYTES + 1),
               "Expect": "100-continue"}
    parts = urlsplit(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.putrequest("POST", "/v1/command")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()  # and no body: the answer must not wait for it
        assert conn.getresponse().status == 413
    finally:
        conn.close()
    assert member.commands == []


def test_stop_closes_the_port(member):
    s = CommandServer(member, "127.0.0.1", 0)
    s.start()
    client = JsonClient(s.url, s.token, timeout_s=2)
    assert client.post("/v1/command", {"op": "stats"})["chunks"] == 0
    client.close()
    s.stop()
    with pytest.raises(Unreachable):
        client.post("/v1/command", {"op": "stats"})


def test_a_port_in_use_is_an_os_error(server, member):
    with pytest.raises(OSError):
        CommandServer(member, "127.0.0.1", urlsplit(server.url).port)


def test_a_body_sent_over_the_bound_is_413(member, monkeypatch):
    monkeypatch.setattr("kvtier.fleet.command_server.MAX_COMMAND_BYTES", 200)
    s = CommandServer(member, "127.0.0.1", 0)
    s.start()
    try:
        keys = [key(i).hex() for i in range(5)]  # about 270 bytes
        status, _, reply = raw(s, json.dumps({"op": "pin", "keys": keys}).encode(),
                               {"Authorization": f"Bearer {s.token}"})
        assert status == 413 and "200 bytes" in reply["detail"]
        assert member.commands == [] and s.stats.failed == 0  # refused before the app (not counted)
    finally:
        s.stop()
