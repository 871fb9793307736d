"""The instance side of the fleet under attack or under a busy host: several members in one process,
a controller that forgets the instance forever or answers huge replies, a member that breaks on close,
commands in flight while the instance closes, a huge command beside small ones."""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import threading
import time
import types

import fleet_doubles
import pytest
from fastapi import FastAPI
from fleet_doubles import FakeMember, StandInController, key
from waiting import wait_until

from kvtier.config import FleetConfig
from kvtier.errors import ConfigError
from kvtier.fleet import command_server
from kvtier.fleet.agent import join_fleet, resolve_instance_id
from kvtier.fleet.command_server import CommandServer
from kvtier.fleet.http_client import HttpError, JsonClient, Unreachable
from kvtier.fleet.messages import Command
from kvtier.fleet.serve_thread import ServerThread, bind_socket

controller = fleet_doubles.controller


def config(url: str, **kw) -> FleetConfig:
    return FleetConfig(**{"url": url, "heartbeat_s": 0.05, "timeout_s": 2.0} | kw)


# -- several fleet members in one process ----------------------------------------------------------


def test_two_members_in_one_process_register_under_different_default_ids(controller):
    first = join_fleet(config(controller.url), FakeMember())
    second = join_fleet(config(controller.url), FakeMember())
    try:
        assert first.instance_id == resolve_instance_id(None)
        assert second.instance_id != first.instance_id
        wait_until(lambda: {r.instance_id for r in controller.registrations}
                   == {first.instance_id, second.instance_id}, "both registered")
    finally:
        first.close()
        second.close()


def test_a_configured_id_used_twice_in_one_process_is_refused_until_the_first_leaves(controller):
    first = join_fleet(config(controller.url, instance_id="node-a"), FakeMember())
    try:
        with pytest.raises(ConfigError, match="node-a.*already"):
            join_fleet(config(controller.url, instance_id="node-a"), FakeMember())
    finally:
        first.close()
    again = join_fleet(config(controller.url, instance_id="node-a"), FakeMember())  # free again
    again.close()


# -- a hostile or broken controller ----------------------------------------------------------------


class CountingMember(FakeMember):
    def __init__(self) -> None:
        super().__init__()
        self.snapshots = 0

    def key_snapshot(self):
        self.snapshots += 1
        return super().key_snapshot()


def test_a_controller_that_forgets_the_instance_forever_is_probed_with_a_back_off(controller, caplog):
    """Registration succeeds, every later request answers known=False: without a back-off the agent
    registered again (and took a full key snapshot under the storage lock) every 0.1 s."""
    caplog.set_level(logging.INFO, logger="kvtier.fleet.agent")
    member = CountingMember()
    member.store("cpu", *(key(i) for i in range(100)))
    controller.mode = "unknown"
    started = time.monotonic()
    handle = join_fleet(config(controller.url, instance_id="node-a", heartbeat_s=0.5), member)
    try:
        wait_until(lambda: len(controller.registrations) >= 5, "registrations", timeout_s=10)
        # 0.1 + 0.2 + 0.4 + 0.5 s of back-off between them (10 a second without one).
        assert time.monotonic() - started >= 0.9
        assert member.snapshots <= len(controller.registrations)
        assert len(caplog.records) <= 6  # rate-limited: not a line per registration
        controller.mode = "ok"
        member.store("cpu", key(1000))
        wait_until(lambda: controller.keys("node-a") == member.hex_keys(), "healed once it remembers")
    finally:
        handle.close()


def test_a_controller_reply_far_over_any_agent_reply_is_a_failure_not_memory():
    """The agent's replies are a few hundred bytes: one of megabytes is a broken controller, refused
    before it is read (before: read and parsed up to 64 MiB, every probe)."""
    app = FastAPI()

    @app.post("/v1/instances/register")
    def register():
        return {"heartbeat_timeout_s": 10.0, "session": "s" * (4 << 20)}

    server = ServerThread(app, bind_socket("127.0.0.1", 0), name="huge-controller", grace_s=0.5)
    server.start()
    handle = join_fleet(config(f"http://127.0.0.1:{server.port}", instance_id="node-a"), FakeMember())
    try:
        wait_until(lambda: "over" in (handle.stats().last_error or ""), "the huge reply refused")
        assert not handle.stats().registered
    finally:
        handle.close()
        server.stop()


class BrokenOnClose(FakeMember):
    def set_key_listener(self, listener) -> None:
        if listener is None:
            raise TimeoutError("the member's loop did not answer")
        super().set_key_listener(listener)


def test_close_stops_the_agent_and_the_command_server_when_the_member_cannot_drop_its_listener(
        controller):
    handle = join_fleet(config(controller.url, instance_id="node-a"), BrokenOnClose())
    wait_until(lambda: handle.stats().registered, "registered")
    handle.close()
    assert not handle._thread.is_alive()
    with pytest.raises(Unreachable):
        JsonClient(handle.command_url, "x", timeout_s=1).post("/v1/command", {"op": "stats"})


# -- commands ---------------------------------------------------------------------------------------


class BlockingMember(FakeMember):
    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()
        self.running = False

    def run(self, command: Command):
        if command.op != "pin":
            return super().run(command)
        self.running = True
        self.started.set()
        try:
            self.release.wait(10)
            return super().run(command)
        finally:
            self.running = False


def test_close_waits_for_a_command_in_flight_and_refuses_new_ones():
    """Before: close() returned after uvicorn's 1 s grace while the member still ran the command (a
    CacheEngine then closed its storage under it)."""
    member = BlockingMember()
    server = CommandServer(member, "127.0.0.1", 0)
    server.start()
    replies: list = []
    client = threading.Thread(target=lambda: replies.append(JsonClient(server.url, server.token, 20).post(
        "/v1/command", {"op": "pin", "keys": [key(1).hex()]})))
    client.start()
    wait_until(member.started.is_set, "the command runs")
    closer = threading.Thread(target=server.stop, kwargs={"timeout_s": 20.0})
    closer.start()
    closer.join(2.5)
    try:
        assert closer.is_alive(), "stop() returned while a command was still running"
        with pytest.raises((HttpError, Unreachable)) as refused:  # a new command is not run
            JsonClient(server.url, server.token, 5).post("/v1/command", {"op": "stats"})
        assert not isinstance(refused.value, HttpError) or refused.value.status == 503
    finally:
        member.release.set()
        closer.join(20)
        client.join(20)
    assert not closer.is_alive() and not member.running
    assert replies and replies[0]["chunks"] == 1
    assert [c.op for c in member.commands] == ["pin"]


def test_a_huge_command_is_validated_off_the_event_loop(monkeypatch):
    """A 1M-key Command takes ~0.3 s to validate: on the event loop it held every other command."""
    on_loop: list[bool] = []

    class Spy(Command):
        @classmethod
        def model_validate_json(cls, data, **kw):
            try:
                asyncio.get_running_loop()
                on_loop.append(True)
            except RuntimeError:
                on_loop.append(False)
            return Command.model_validate_json(data, **kw)

    monkeypatch.setattr(command_server, "Command", Spy)
    member = FakeMember()
    server = CommandServer(member, "127.0.0.1", 0)
    server.start()
    try:
        reply = JsonClient(server.url, server.token).post("/v1/command", {"op": "stats"})
        assert reply["chunks"] == 0 and on_loop == [False]
    finally:
        server.stop()


# -- the one HTTP client ----------------------------------------------------------------------------


def test_a_kept_connection_the_server_closed_while_idle_is_reopened_not_a_failure(controller):
    """uvicorn closes a connection idle for 5 s: every heartbeat of an agent with heartbeat_s >= 5 s
    failed (an outage: a re-registration and a full re-send each time), as did a controller's first
    command after a quiet spell."""
    controller._server._server.config.timeout_keep_alive = 0.1  # as 5 s, sooner
    client = JsonClient(controller.url)
    assert client.get("/openapi.json")["info"]
    sock = client._conn.sock
    wait_until(lambda: select.select([sock], [], [], 0)[0], "the server closes the idle connection")
    assert client.get("/openapi.json")["info"]  # sent again on a new connection


def test_close_is_prompt_while_a_request_waits_on_a_stalled_controller(controller):
    """Before: close() waited out the request's deadline (timeout_s, 5 s by default; here 10 s), so a
    CacheEngine took that long to close whenever its controller hung."""
    controller.mode = "stall"
    handle = join_fleet(config(controller.url, instance_id="node-a", timeout_s=10.0), FakeMember())
    wait_until(controller.stalled.is_set, "the registration stalls")
    started = time.monotonic()
    handle.close()
    assert time.monotonic() - started < 2.0
    assert not handle._thread.is_alive()


def test_an_engine_whose_command_port_is_taken_raises_and_leaves_nothing_running(make_engine, controller):
    taken = bind_socket("127.0.0.1", 0)
    before = set(threading.enumerate())
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            make_engine("cpu_disk", controller__url=controller.url, controller__instance_id="eng-a",
                        controller__command_port=taken.getsockname()[1])
    finally:
        taken.close()
    wait_until(lambda: set(threading.enumerate()) <= before, "the engine's threads stopped")
    engine = make_engine("cpu_disk", controller__url=controller.url, controller__instance_id="eng-a")
    wait_until(lambda: engine._fleet.stats().registered, "the id is free again: it joins")
    engine.close()
    engine.close()  # twice: nothing happens
    assert not engine._fleet


class ResyncForever(StandInController):
    """Answers resync=True to every batch that does not begin with a reset (a controller that always
    sees a gap: a bug, or two processes configured with one instance id)."""

    def _apply(self, instance_id, batch):
        self.mode = "resync_once"
        return super()._apply(instance_id, batch)


def test_a_controller_that_asks_for_a_resync_at_every_batch_gets_one_per_heartbeat():
    """Before: a full key snapshot and re-send at every event tick (0.1 s) while keys kept changing."""
    controller = ResyncForever()
    controller.start()
    member = CountingMember()
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.wait(0.01):
            member.store("cpu", key(i))
            i += 1

    handle = join_fleet(config(controller.url, instance_id="node-a", heartbeat_s=0.5), member)
    churner = threading.Thread(target=churn)
    churner.start()
    try:
        wait_until(lambda: handle.stats().resyncs >= 1, "the first re-send")
        started = time.monotonic()
        wait_until(lambda: handle.stats().resyncs >= 4, "three more re-sends")
        assert time.monotonic() - started >= 1.4  # one per heartbeat_s at most
        stop.set()
        churner.join()
        wait_until(lambda: controller.keys("node-a") == member.hex_keys(), "the keys still arrive")
    finally:
        stop.set()
        handle.close()
        controller.stop()


def test_a_client_that_stalls_mid_body_holds_no_other_command():
    member = FakeMember()
    server = CommandServer(member, "127.0.0.1", 0)
    server.start()
    stalled = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    try:
        stalled.sendall(f"POST /v1/command HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"op\":".encode())
        started = time.monotonic()
        assert JsonClient(server.url, server.token, 5).post("/v1/command", {"op": "stats"})["chunks"] == 0
        assert time.monotonic() - started < 1.0
    finally:
        stalled.close()
        server.stop()


def test_an_agent_thread_that_cannot_start_leaves_nothing_behind(controller, monkeypatch):
    member = FakeMember()

    class Refused(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    # The agent's thread only (the command server's starts as before).
    monkeypatch.setattr("kvtier.fleet.agent.threading", types.SimpleNamespace(Thread=Refused,
                                                                              Event=threading.Event))
    with pytest.raises(RuntimeError):
        join_fleet(config(controller.url, instance_id="node-a"), member)
    monkeypatch.undo()
    assert member.listener is None  # the engine does not keep feeding a queue nobody reads
    join_fleet(config(controller.url, instance_id="node-a"), member).close()  # the id is free


def test_close_is_prompt_while_a_heartbeat_on_a_kept_connection_stalls(controller):
    """The aborted request must not be sent again on a new connection (where it would stall again)."""
    handle = join_fleet(config(controller.url, instance_id="node-a", timeout_s=10.0), FakeMember())
    wait_until(lambda: handle.stats().heartbeats >= 2, "heartbeats on the kept connection")
    controller.mode = "stall"
    wait_until(controller.stalled.is_set, "a heartbeat stalls")
    started = time.monotonic()
    handle.close()
    assert time.monotonic() - started < 2.0
