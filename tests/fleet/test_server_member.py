"""Tests for kvtier/fleet/server_member.py (and the key listener of kvtier_server's store and spill):
the store lives on an event loop in its own thread, as in kvtier_server, and the test thread calls
the member as the fleet agent and the command server would, from other threads. Then `serve()`
joins a fleet in a real kvtier_server process (with a stand-in agent) and leaves it on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections import defaultdict

import pytest
from conftest import REPO

from kvtier.config import SpillConfig
from kvtier.fleet import server_member
from kvtier.fleet.messages import Command, TierUsage
from kvtier.fleet.server_member import ServerMember
from kvtier.keys import ChunkKey
from kvtier.record import HEADER_SIZE, encode_header
from kvtier.record_files import BLOCK
from kvtier.server.store import RECORD_OVERHEAD, RecordStore

NS = b"ns-fleet"
SIZE = 1000
RECORD = HEADER_SIZE + SIZE + RECORD_OVERHEAD  # what one record costs the store
SPILLED = 2 * BLOCK  # ... and the spill
FLOAT16 = 1  # kvtier.dtypes code of float16 (no torch in these tests)


def record(i: int) -> tuple[bytes, bytes, memoryview]:
    key = ChunkKey(NS, i.to_bytes(16, "little"))
    payload = memoryview(bytearray(os.urandom(SIZE)))
    return bytes(key), encode_header(key, (2, 1, 1, SIZE // 2), FLOAT16, payload), payload


class LoopThread:
    """An event loop running in its own thread: kvtier_server's, for the store's calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, fn, *args):
        async def run():
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bytes]] = []
        self.threads: set[int] = set()

    def __call__(self, op, tier, key) -> None:
        self.threads.add(threading.get_ident())
        self.events.append((op, tier, key))

    def held(self) -> dict[str, set[bytes]]:
        held: dict[str, set[bytes]] = defaultdict(set)
        for op, tier, key in self.events:
            assert (key in held[tier]) == (op == "evicted"), (op, tier, key.hex())
            (held[tier].discard if op == "evicted" else held[tier].add)(key)
        return held


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def member(loop_thread, tmp_path):
    """A member over a store of 2 records in memory and 4 in the spill, its listener set."""
    spill = SpillConfig(str(tmp_path / "spill"), 4 * SPILLED, "off")
    store = loop_thread.call(RecordStore, 2 * RECORD, spill)
    m = ServerMember(store, loop_thread.loop)
    m.listener = Listener()
    m.set_key_listener(m.listener)
    m.put = lambda *ids: [loop_thread.call(store.put, *record(i)) for i in ids]
    yield m
    loop_thread.call(store.close)


def snapshot(m: ServerMember) -> dict[str, set[bytes]]:
    return {tier: set(keys) for tier, keys in m.key_snapshot().items()}


def keys(*ids: int) -> set[bytes]:
    return {record(i)[0] for i in ids}


def test_describe_says_server_with_no_namespace():
    d = ServerMember(None, asyncio.new_event_loop()).describe()
    assert (d.kind, d.model_id, d.namespace, d.chunk_size) == ("server", None, None, 1)


def test_stores_evictions_spills_and_promotions_are_reported_on_the_loop_thread(member, loop_thread):
    member.put(1, 2, 3, 4)  # memory holds 2: 1 and 2 spill
    assert snapshot(member) == {"memory": keys(3, 4), "spill": keys(1, 2)}
    assert member.listener.held() == snapshot(member)
    assert member.listener.threads == {loop_thread.thread.ident}

    assert loop_thread.call(member.store.get, record(1)[0]) is not None  # a spill hit: promoted
    assert snapshot(member) == {"memory": keys(4, 1), "spill": keys(2, 3)}
    member.put(5, 6, 7, 8)  # the spill holds 4: the oldest spilled leave it
    assert member.listener.held() == snapshot(member)
    assert ("evicted", "spill", record(2)[0]) in member.listener.events
    assert loop_thread.call(member.store.delete, [record(8)[0]]) == 1
    assert member.listener.held() == snapshot(member) == {"memory": keys(7), "spill": keys(4, 1, 5, 6)}


def test_usage_and_stats_name_memory_then_spill(member):
    member.put(1, 2, 3)
    usage = [TierUsage(name="memory", chunks=2, bytes_used=2 * RECORD, capacity_bytes=2 * RECORD),
             TierUsage(name="spill", chunks=1, bytes_used=SPILLED, capacity_bytes=4 * SPILLED)]
    assert member.tier_usage() == usage
    reply = member.run(Command(op="stats"))
    assert reply.chunks == 0 and reply.tiers == usage


def test_clear_one_tier_then_all(member):
    member.put(1, 2, 3, 4, 5)
    assert member.run(Command(op="clear", tier="spill")).chunks == 3
    assert snapshot(member) == {"memory": keys(4, 5), "spill": set()}
    member.put(6)  # 4 spills
    reply = member.run(Command(op="clear", tier="memory"))
    assert reply.chunks == 2 and [(u.name, u.chunks) for u in reply.tiers] == [("memory", 0), ("spill", 1)]
    assert snapshot(member) == {"memory": set(), "spill": keys(4)}  # dropped, not spilled
    member.put(7)
    assert member.run(Command(op="clear")).chunks == 2
    assert snapshot(member) == {"memory": set(), "spill": set()} == member.listener.held()


@pytest.mark.parametrize("command", [Command(op="clear", tier="disk"), Command(op="pin", keys=["0" * 48]),
                                     Command(op="unpin"), Command(op="move", tier="memory")])
def test_what_a_server_cannot_do_is_a_value_error_and_changes_nothing(member, command):
    member.put(1, 2, 3)
    before = snapshot(member)
    with pytest.raises(ValueError):
        member.run(command)
    assert snapshot(member) == before


def test_without_a_spill_there_is_only_memory(loop_thread):
    m = ServerMember(loop_thread.call(RecordStore, 2 * RECORD), loop_thread.loop)
    assert [u.name for u in m.tier_usage()] == ["memory"] and list(m.key_snapshot()) == ["memory"]
    with pytest.raises(ValueError, match="no tier named 'spill'"):
        m.run(Command(op="clear", tier="spill"))


def test_a_call_on_the_loop_thread_runs_at_once(member, loop_thread):
    member.put(1)
    assert loop_thread.call(member.key_snapshot) == {"memory": [record(1)[0]], "spill": []}


def test_a_loop_that_does_not_answer_fails_the_call_instead_of_hanging(member, loop_thread, monkeypatch):
    monkeypatch.setattr(server_member, "LOOP_WAIT_S", 0.05)
    release = threading.Event()
    loop_thread.loop.call_soon_threadsafe(release.wait, 10)  # the loop is stuck (a hung spill disk)
    try:
        with pytest.raises(TimeoutError, match="did not answer"):
            member.run(Command(op="clear"))
    finally:
        release.set()
    assert snapshot(member) == {"memory": set(), "spill": set()}  # nothing ran late
    member.put(1)
    assert snapshot(member)["memory"] == keys(1)


# -- kvtier_server joins its fleet: a real process, the agent replaced ----------------------------

SERVER = """
import asyncio, sys, types
from kvtier.config import load_server_config
from kvtier.fleet.messages import Command
from kvtier.server.app import serve

class Handle:
    def __init__(self, member):
        self.member = member
    def close(self):
        # The loop still runs: a last call from this (non-loop) thread is answered.
        print("close", self.member.run(Command(op="stats")).tiers[0].name, flush=True)

def join_fleet(config, member):
    print("join", config.instance_id, member.describe().kind, sorted(member.key_snapshot()), flush=True)
    member.set_key_listener(lambda op, tier, key: print("event", op, tier, flush=True))
    return Handle(member)

sys.modules["kvtier.fleet.agent"] = types.SimpleNamespace(join_fleet=join_fleet)
config = load_server_config(None, env={"KVTIER_SERVER_PORT": "0", "KVTIER_SERVER_SPILL__PATH": sys.argv[1],
                                       "KVTIER_SERVER_CONTROLLER__INSTANCE_ID": "server-a"})
asyncio.run(serve(config, ready=lambda address: print("ready", "torch" in sys.modules, flush=True)))
print("torch", "torch" in sys.modules, flush=True)
"""


def test_kvtier_server_joins_its_fleet_and_leaves_it_on_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path / "spill")], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().split() == ["join", "server-a", "server", "['memory',", "'spill']"]
        assert proc.stdout.readline().split() == ["ready", "False"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.split("\n")[:2] == ["close memory", "torch False"]
