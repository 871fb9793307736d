"""join_fleet against a stand-in controller (tests/fleet/fleet_doubles.py): registration, heartbeats,
events in order with seq, the controller down at start, restarted, answering 503, asking for a
resync, stalling; the bounded queue overflowing; close() under a stalled controller."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time

import fleet_doubles
import pytest
from fleet_doubles import FakeMember, StandInController, key
from waiting import wait_until

from kvtier.config import FleetConfig
from kvtier.errors import ConfigError
from kvtier.fleet.agent import join_fleet, resolve_instance_id
from kvtier.fleet.events import batches
from kvtier.fleet.http_client import JsonClient, Unreachable
from kvtier.fleet.serve_thread import bind_socket

ID = "node-a"


controller = fleet_doubles.controller


@pytest.fixture
def member() -> FakeMember:
    return FakeMember()


def config(url: str, **kw) -> FleetConfig:
    return FleetConfig(**{"url": url, "instance_id": ID, "heartbeat_s": 0.05, "timeout_s": 2.0} | kw)


@pytest.fixture
def joined(controller, member):
    handle = join_fleet(config(controller.url), member)
    yield handle
    handle.close()


def index_matches(controller: StandInController, member: FakeMember) -> bool:
    return controller.keys(ID) == member.hex_keys()


def test_registers_with_its_description_and_command_address(joined, controller, member):
    wait_until(lambda: joined.stats().registered, "registered")
    [reg] = controller.registrations
    assert (reg.instance_id, reg.kind, reg.model_id, reg.namespace, reg.chunk_size) == (
        ID, "engine", "test-model", "0123456789abcdef", 16)
    assert reg.command_url == joined.command_url and [t.name for t in reg.tiers] == ["cpu", "disk"]
    # The token it sent is the one its command server takes.
    client = JsonClient(reg.command_url, reg.command_token)
    assert client.post("/v1/command", {"op": "stats"})["chunks"] == 0
    assert member.commands[0].op == "stats" and joined.stats().commands == 1


def test_a_heartbeat_slower_than_the_controller_timeout_is_reported(controller, member, caplog):
    controller.heartbeat_timeout_s = 0.04
    handle = join_fleet(config(controller.url), member)
    try:
        wait_until(lambda: "controller.heartbeat_s is 0.05 s: lower it" in caplog.text, "the warning")
    finally:
        handle.close()


def test_heartbeats_carry_tier_usage(joined, controller, member):
    member.store("cpu", key(1))
    wait_until(lambda: joined.stats().heartbeats >= 3, "three heartbeats")
    wait_until(lambda: controller.heartbeats[-1].tiers[0].chunks == 1, "usage in a heartbeat")
    assert all(beat.session == "session-1" for beat in controller.heartbeats)


def test_events_arrive_in_order_with_seq_plus_one(joined, controller, member):
    wait_until(lambda: joined.stats().resyncs == 1, "the first full re-send")
    member.store("cpu", *(key(i) for i in range(5)))
    member.evict("cpu", key(2))
    member.store("disk", key(2))
    wait_until(lambda: index_matches(controller, member) and controller.keys(ID), "the index has the keys")
    assert controller.keys(ID) == {"cpu": {key(i).hex() for i in (0, 1, 3, 4)}, "disk": {key(2).hex()}}
    seqs = [b.seq for b in controller.batches]
    assert seqs == list(range(len(seqs)))
    sent = [(e.op, e.tier, k) for b in controller.batches for e in b.events for k in e.keys]
    assert sent == ([("stored", "cpu", key(i).hex()) for i in range(5)]
                    + [("evicted", "cpu", key(2).hex()), ("stored", "disk", key(2).hex())])
    wait_until(lambda: joined.stats().batches_sent == len(seqs), "the agent counted the batches")
    stats = joined.stats()
    assert stats.registrations == 1 and stats.events_dropped == 0


def test_controller_down_at_start_then_up_registers_and_sends_everything(member):
    member.store("cpu", key(1), key(2))
    member.store("disk", key(3))
    sock = bind_socket("127.0.0.1", 0, listen=False)  # connections refused until the controller starts
    port = sock.getsockname()[1]
    started = time.monotonic()
    handle = join_fleet(config(f"http://127.0.0.1:{port}"), member)
    controller = StandInController()
    try:
        assert time.monotonic() - started < 1.0  # join_fleet does not wait for the controller
        wait_until(lambda: handle.stats().errors >= 2, "failed attempts")
        stats = handle.stats()
        assert not stats.registered and "Unreachable" in stats.last_error
        member.store("cpu", key(4))  # while the controller is away
        controller.start(sock)
        wait_until(lambda: handle.stats().registered, "registered once the controller is up")
        wait_until(lambda: index_matches(controller, member), "the full key set")
        assert controller.batches[0].events[0].op == "reset" and len(controller.registrations) == 1
        assert len(controller.keys(ID)["cpu"]) == 3
    finally:
        handle.close()
        controller.stop()


def test_controller_restart_re_registers_and_re_sends_the_full_key_set(joined, controller, member):
    member.store("cpu", key(1), key(2))
    wait_until(lambda: index_matches(controller, member) and controller.keys(ID), "keys indexed")
    controller.restart()  # a new session, an empty index
    member.store("disk", key(3))
    wait_until(lambda: joined.stats().registrations == 2, "registered again")
    wait_until(lambda: index_matches(controller, member), "the full key set again")
    assert controller.keys(ID) == {"cpu": {key(1).hex(), key(2).hex()}, "disk": {key(3).hex()}}
    assert controller.registrations[-1].instance_id == ID


def test_known_false_means_register_again(joined, controller, member):
    wait_until(lambda: joined.stats().registered, "registered")
    controller.mode = "unknown"
    wait_until(lambda: len(controller.registrations) >= 2, "registered again")
    controller.mode = "ok"
    member.store("cpu", key(7))
    wait_until(lambda: index_matches(controller, member) and controller.keys(ID), "keys indexed")


def test_503_backs_off_then_registers_again_and_heals(joined, controller, member):
    member.store("cpu", key(1))
    wait_until(lambda: index_matches(controller, member) and controller.keys(ID), "keys indexed")
    controller.mode = "503"
    member.store("cpu", key(2))
    wait_until(lambda: not joined.stats().registered, "the failure noticed")
    assert "503" in joined.stats().last_error and joined.stats().errors >= 1
    controller.mode = "ok"
    wait_until(lambda: joined.stats().registrations == 2, "registered again")
    wait_until(lambda: index_matches(controller, member), "healed")
    assert controller.keys(ID) == {"cpu": {key(1).hex(), key(2).hex()}}


def test_resync_reply_leads_to_a_full_re_send(joined, controller, member):
    wait_until(lambda: joined.stats().resyncs == 1, "first re-send")
    controller.mode = "resync_once"
    member.store("cpu", key(1))
    wait_until(lambda: sum(b.events[0].op == "reset" for b in controller.batches) == 2, "a second re-send")
    wait_until(lambda: index_matches(controller, member), "keys indexed")
    assert joined.stats().registrations == 1 and joined.stats().resyncs == 2


def test_heartbeats_go_on_during_a_long_re_send(controller, member, monkeypatch):
    monkeypatch.setattr("kvtier.fleet.agent.batches", functools.partial(batches, max_keys=1))
    member.store("cpu", *(key(i) for i in range(300)))  # 301 batches of one event each
    handle = join_fleet(config(controller.url), member)
    try:
        wait_until(lambda: index_matches(controller, member), "every key indexed")
        during = controller.received[controller.received.index("events"):]
        during = during[:len(during) - during[::-1].index("events")]
        assert during.count("events") == 301 and during.count("heartbeat") >= 1
        assert handle.stats().registrations == 1
    finally:
        handle.close()


def test_queue_overflow_drops_counts_and_resyncs(controller, member):
    handle = join_fleet(config(controller.url, max_pending_events=10, timeout_s=10.0), member)
    try:
        wait_until(lambda: handle.stats().resyncs == 1, "first re-send")
        controller.mode = "stall"
        wait_until(controller.stalled.is_set, "the agent waits on the controller")
        member.store("cpu", *(key(i) for i in range(25)))  # the agent is stuck: 10 queued, 15 dropped
        assert handle.stats().events_dropped == 15 and handle.stats().events_queued == 10
        controller.mode = "ok"
        controller.release.set()
        wait_until(lambda: handle.stats().resyncs == 2, "a re-send after the drops")
        wait_until(lambda: index_matches(controller, member), "every key indexed")
        assert len(controller.keys(ID)["cpu"]) == 25
        assert handle.stats().registrations == 1  # no failure: the resync came from the drops
    finally:
        handle.close()


def test_join_and_close_return_promptly_while_the_controller_stalls(controller, member):
    controller.mode = "stall"
    started = time.monotonic()
    handle = join_fleet(config(controller.url, timeout_s=1.0), member)
    assert time.monotonic() - started < 1.0  # no request is made on the caller's thread
    wait_until(controller.stalled.is_set, "the registration stalls")
    started = time.monotonic()
    handle.close()
    assert time.monotonic() - started < 3.0  # the request's deadline, and no more
    assert member.listener is None  # no more events queued
    with pytest.raises(Unreachable):  # the command server is gone
        JsonClient(handle.command_url, "x", timeout_s=1).post("/v1/command", {"op": "stats"})
    handle.close()  # idempotent


def test_a_wrong_controller_token_is_an_error_not_a_registration(member):
    controller = StandInController(token="right")
    controller.start()
    handle = join_fleet(config(controller.url, token="wrong"), member)
    try:
        wait_until(lambda: handle.stats().errors >= 1, "refused")
        assert "401" in handle.stats().last_error and not handle.stats().registered
    finally:
        handle.close()
        controller.stop()
    good = StandInController(token="right")
    good.start()
    handle = join_fleet(config(good.url, token="right"), member)
    try:
        wait_until(lambda: handle.stats().registered, "registered with the right token")
    finally:
        handle.close()
        good.stop()


def test_a_configured_instance_id_is_validated():
    assert resolve_instance_id("engine-1.a_b") == "engine-1.a_b"
    for bad in ("", "-x", "a b", "x" * 65, "a\n"):
        with pytest.raises(ConfigError, match=r"controller\.instance_id"):
            resolve_instance_id(bad)


def test_join_fleet_refuses_a_bad_instance_id_before_starting_anything(member):
    with pytest.raises(ConfigError, match=r"controller\.instance_id"):
        join_fleet(dataclasses.replace(config("http://127.0.0.1:9"), instance_id="no spaces"), member)
    assert member.listener is None


def test_the_default_instance_id_is_host_and_pid_made_valid(monkeypatch):
    pattern = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
    assert pattern.fullmatch(resolve_instance_id(None))
    monkeypatch.setattr("socket.gethostname", lambda: "_wéird host!" + "x" * 100)
    made = resolve_instance_id(None)
    assert pattern.fullmatch(made) and made.startswith("w-ird-host-") and made.endswith(f"-{os.getpid()}")
    monkeypatch.setattr("socket.gethostname", lambda: "...")
    assert resolve_instance_id(None).startswith("kvtier-")


def test_a_command_port_in_use_is_a_config_error(joined, member):
    port = int(joined.command_url.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match="command_port"):
        join_fleet(config("http://127.0.0.1:9", command_port=port, instance_id="other"), FakeMember())
