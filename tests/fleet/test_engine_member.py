"""Tests for kvtier/fleet/engine_member.py (and the key listener of the CPU and disk tiers under it):
a real CacheEngine with a CPU tier and a disk tier in tmp_path, as the fleet agent sees it. Every
story replays the listener's events and checks them against `key_snapshot()`, so no store, eviction,
move or clear can change a tier without telling the agent."""

from __future__ import annotations

import dataclasses
import sys
import threading
import types
from collections import defaultdict

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens

from kvtier import storage_admin
from kvtier.config import FleetConfig
from kvtier.fleet.engine_member import EngineMember
from kvtier.fleet.messages import Command, CommandReply, TierUsage
from kvtier.keys import KEY_BYTES
from kvtier.tiers.base import PutItem
from kvtier.tiers.base import TierUsage as LocalUsage

SLAB = 4096  # one CHUNK-token chunk of the small layout
DISK_FILE = 2 * SLAB  # its record file: a header block and the payload


class Recorder:
    """The fleet agent's view: every event, and the key set per tier they add up to."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()  # write threads report disk keys while the test thread reads

    def __call__(self, op: str, tier: str, key: bytes) -> None:
        assert isinstance(key, bytes) and len(key) == KEY_BYTES
        with self.lock:
            self.events.append((op, tier, key))

    def take(self) -> list[tuple[str, str, bytes]]:
        with self.lock:
            events, self.events = self.events, []
        return events

    def of(self, op: str, tier: str) -> list[bytes]:
        with self.lock:
            return [k for o, t, k in self.events if (o, t) == (op, tier)]


def replay(events, start: dict[str, set[bytes]] | None = None) -> dict[str, set[bytes]]:
    held: dict[str, set[bytes]] = defaultdict(set, {t: set(k) for t, k in (start or {}).items()})
    for op, tier, key in events:
        if op == "stored":
            assert key not in held[tier], f"{tier} reported {key.hex()} stored twice"
            held[tier].add(key)
        else:
            assert key in held[tier], f"{tier} reported {key.hex()} evicted without storing it"
            held[tier].discard(key)
    return held


class Fleet:
    """An EngineMember with a Recorder listening from the start, as the agent would set it up."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.member = EngineMember(engine)
        self.start = {t: set(keys) for t, keys in self.member.key_snapshot().items()}
        self.recorder = Recorder()
        self.member.set_key_listener(self.recorder)

    def snapshot(self) -> dict[str, set[bytes]]:
        return {t: set(keys) for t, keys in self.member.key_snapshot().items()}

    def check(self) -> dict[str, set[bytes]]:
        """The events so far add up to what the tiers hold now."""
        self.engine.flush()
        held = replay(self.recorder.events, self.start)
        snapshot = self.snapshot()
        assert list(snapshot) == ["cpu", "disk"]
        assert {t: held.get(t, set()) for t in snapshot} == snapshot
        return snapshot

    def mark(self) -> dict[str, set[bytes]]:
        """Check, then count events from here on (`recorder.of` sees only later ones)."""
        self.start = self.check()
        self.recorder.take()
        return self.start

    def run(self, op: str, keys=(), **fields) -> CommandReply:
        return self.member.run(Command(op=op, keys=[k.hex() for k in keys], **fields))


@pytest.fixture
def fleet(make_engine):
    def make(**overrides) -> Fleet:
        return Fleet(make_engine("cpu_disk", **overrides))

    return make


def prompt(engine, chunks: int, seed: int):
    tokens = seeded_tokens(chunks * CHUNK, seed)
    kv = seeded_kv(engine.layout, chunks * CHUNK, seed)
    return tokens, kv, engine.db.keys(tokens)


# -- describe, usage ------------------------------------------------------------------------------


def test_describe_names_the_engine_namespace_and_geometry(fleet):
    f = fleet(save_partial_chunks="true")
    d = f.member.describe()
    assert (d.kind, d.model_id, d.chunk_size, d.save_partial_chunks) == ("engine", "test-model", CHUNK, True)
    assert d.namespace == f.engine.db.namespace_digest.hex() and len(d.namespace) == 16
    assert d.layout == f.engine.layout.describe()


def test_tier_usage_is_cpu_then_disk_and_counts_what_they_hold(fleet):
    f = fleet(cpu__capacity=f"{8 * SLAB}", disk__capacity=f"{16 * DISK_FILE}")
    tokens, kv, keys = prompt(f.engine, 3, 1)
    f.engine.store(tokens, kv)
    f.engine.flush()
    assert f.member.tier_usage() == [
        TierUsage(name="cpu", chunks=3, bytes_used=3 * SLAB, capacity_bytes=8 * SLAB),
        TierUsage(name="disk", chunks=3, bytes_used=3 * DISK_FILE, capacity_bytes=16 * DISK_FILE)]
    stats = f.run("stats")
    assert stats.chunks == 0 and stats.tiers == f.member.tier_usage()


# -- the listener: stores, evictions, moves, clears ---------------------------------------------


def test_stores_and_evictions_are_reported_per_tier(fleet):
    f = fleet(cpu__capacity=f"{4 * SLAB}", disk__capacity=f"{6 * DISK_FILE}")
    tokens, kv, keys = prompt(f.engine, 3, 1)
    f.engine.store(tokens, kv)
    snap = f.check()
    assert f.recorder.of("stored", "cpu") == keys  # in order, once each
    assert sorted(f.recorder.of("stored", "disk")) == sorted(keys)  # write-through
    assert snap == {"cpu": set(keys), "disk": set(keys)}

    more_tokens, more_kv, more = prompt(f.engine, 4, 2)  # 7 chunks: 3 leave host memory, 1 the disk
    f.engine.store(more_tokens, more_kv)
    snap = f.check()
    assert len(f.recorder.of("evicted", "cpu")) == 3 and len(snap["cpu"]) == 4
    evicted = f.recorder.of("evicted", "disk")  # the oldest file (write threads decide which landed first)
    assert len(evicted) == 1 and evicted[0] in keys and len(snap["disk"]) == 6


def test_moves_down_and_up_are_reported(fleet):
    f = fleet(write_through="false")
    tokens, kv, keys = prompt(f.engine, 3, 3)
    f.engine.store(tokens, kv)
    f.mark()

    assert f.engine.move(tokens, "disk") == 3
    snap = f.check()
    assert snap == {"cpu": set(), "disk": set(keys)}
    assert sorted(f.recorder.of("evicted", "cpu")) == sorted(keys)
    assert sorted(f.recorder.of("stored", "disk")) == sorted(keys)
    f.mark()

    assert f.engine.move(tokens, "cpu") == 3
    snap = f.check()
    assert snap == {"cpu": set(keys), "disk": set()}
    assert f.recorder.of("stored", "cpu") == keys and sorted(f.recorder.of("evicted", "disk")) == sorted(keys)


def test_clears_are_reported_for_one_tier_and_for_all(fleet):
    f = fleet()
    tokens, kv, keys = prompt(f.engine, 3, 4)
    f.engine.store(tokens, kv)
    f.check()
    assert f.run("clear", tier="cpu").chunks == 3
    assert f.check() == {"cpu": set(), "disk": set(keys)}
    assert sorted(f.recorder.of("evicted", "cpu")) == sorted(keys)

    f.engine.retrieve(tokens)  # promoted back into host memory: reported stored
    assert f.check() == {"cpu": set(keys), "disk": set(keys)}
    reply = f.run("clear")
    assert reply.chunks == 6 and [(u.name, u.chunks) for u in reply.tiers] == [("cpu", 0), ("disk", 0)]
    assert f.check() == {"cpu": set(), "disk": set()}
    assert f.engine.lookup(tokens) == 0


def test_the_disk_walk_counts_as_stored_for_a_new_engine(make_engine, tmp_path):
    disk = tmp_path / "shared-disk"
    first = make_engine("cpu_disk", disk_path=disk)
    tokens, kv, keys = prompt(first, 3, 5)
    first.store(tokens, kv)
    first.close()

    f = Fleet(make_engine("cpu_disk", disk_path=disk))
    assert f.snapshot() == {"cpu": set(), "disk": set(keys)}  # what the agent's full re-send sends
    f.run("clear", tier="disk")
    assert sorted(f.recorder.of("evicted", "disk")) == sorted(keys)  # they were in the index
    assert f.check() == {"cpu": set(), "disk": set()}


def test_a_listener_set_to_none_hears_nothing_more(fleet):
    f = fleet()
    f.member.set_key_listener(None)
    tokens, kv, _ = prompt(f.engine, 2, 6)
    f.engine.store(tokens, kv)
    f.engine.flush()
    assert f.recorder.events == []


def test_shared_tiers_are_not_reported(make_manager, db, layout):
    class SharedStore:  # a Tier without a local index of its own (Redis, kvtier_server)
        name = "remote"

        def has(self, keys):
            return [False] * len(keys)

        def get(self, keys, dests):
            return [None] * len(keys)

        def put(self, items: list[PutItem]):
            return [True] * len(items)

        def remove(self, keys):
            return 0

        def clear(self):
            pass

        def usage(self):
            return LocalUsage(0, 0, 0)

        def close(self):
            pass

    manager = make_manager(slabs=4)
    manager.lower.append(SharedStore())
    assert [t.name for t in storage_admin.local_tiers(manager)] == ["disk"]
    assert list(storage_admin.key_snapshot(manager)) == ["cpu", "disk"]
    assert [name for name, _ in storage_admin.local_usage(manager)] == ["cpu", "disk"]


# -- commands ---------------------------------------------------------------------------------------


def test_a_pinned_prefix_survives_a_flood_that_evicts_everything_else(fleet):
    f = fleet(cpu__capacity=f"{8 * SLAB}", disk__capacity=f"{12 * DISK_FILE}")
    tokens, kv, keys = prompt(f.engine, 3, 7)
    f.engine.store(tokens, kv)
    assert f.run("pin", keys + prompt(f.engine, 2, 99)[2]).chunks == 3  # only the leading keys held
    flood = [prompt(f.engine, 4, 100 + i) for i in range(10)]  # 40 chunks through 8 slabs, 12 files
    for t, k, _ in flood:
        assert f.engine.store(t, k) == 4
        f.engine.flush()  # (a store does not wait for slabs its write-through still reads)

    assert f.engine.lookup(flood[0][0]) == 0  # the flood's start is gone from every tier
    got, n = f.engine.retrieve(tokens)
    assert n == 3 * CHUNK and torch.equal(got, kv)
    snap = f.check()
    assert set(keys) <= snap["cpu"]
    assert f.recorder.of("evicted", "cpu") and not set(keys) & set(f.recorder.of("evicted", "cpu"))

    assert f.run("unpin", keys).chunks == 3
    for t, k, _ in flood[:4]:
        f.engine.store(t, k)
        f.engine.flush()
    assert f.engine.lookup(tokens) == 0  # unpinned: evicted like the rest


def test_move_to_disk_is_found_by_a_new_engine_over_the_same_directory(make_engine, tmp_path):
    disk = tmp_path / "restart-disk"
    f = Fleet(make_engine("cpu_disk", disk_path=disk, write_through="false"))
    tokens, kv, keys = prompt(f.engine, 3, 8)
    f.engine.store(tokens, kv)
    reply = f.run("move", keys, tier="disk")
    assert reply.chunks == 3 and [(u.name, u.chunks) for u in reply.tiers] == [("cpu", 0), ("disk", 3)]
    assert f.check() == {"cpu": set(), "disk": set(keys)}
    f.engine.close()

    again = Fleet(make_engine("cpu_disk", disk_path=disk))
    assert again.snapshot() == {"cpu": set(), "disk": set(keys)}
    got, n = again.engine.retrieve(tokens)
    assert n == 3 * CHUNK and torch.equal(got, kv)


def test_copy_keeps_both_copies_down_and_up(fleet):
    f = fleet(write_through="false")
    tokens, kv, keys = prompt(f.engine, 3, 9)
    f.engine.store(tokens, kv)
    assert f.run("move", keys, tier="disk", copy=True).chunks == 3
    assert f.check() == {"cpu": set(keys), "disk": set(keys)}

    f.engine.clear("cpu")
    assert f.run("move", keys[:2], tier="cpu", copy=True).chunks == 2
    assert f.check() == {"cpu": set(keys[:2]), "disk": set(keys)}
    assert f.run("move", keys, tier="cpu", copy=True).chunks == 1  # two were there already
    assert f.check() == {"cpu": set(keys), "disk": set(keys)}
    got, n = f.engine.retrieve(tokens)
    assert n == 3 * CHUNK and torch.equal(got, kv)


def test_key_commands_act_like_the_token_calls(fleet):
    f = fleet(write_through="false")
    tokens, kv, keys = prompt(f.engine, 3, 10)
    f.engine.store(tokens[:2 * CHUNK], kv[:, :, :2 * CHUNK])  # the prompt's first two chunks held
    assert f.run("pin", keys).chunks == 2
    assert f.engine.pin(tokens) == 0 and f.engine.unpin(tokens) == 2
    assert f.run("move", keys, tier="disk").chunks == 2
    assert f.engine.move(tokens, "cpu") == 2
    assert f.check() == {"cpu": set(keys[:2]), "disk": set()}


def test_a_move_up_by_keys_leaves_a_possibly_partial_last_chunk_where_it_is(fleet):
    f = fleet(save_partial_chunks="true", write_through="false")
    tokens = seeded_tokens(2 * CHUNK + 5, 11)
    kv = seeded_kv(f.engine.layout, 2 * CHUNK + 5, 11)
    f.engine.store(tokens, kv)
    keys = f.engine.db.keys(tokens)
    assert f.run("move", keys, tier="disk").chunks == 3
    assert f.run("move", keys, tier="cpu").chunks == 2  # the partial one's length is unknown
    assert f.check() == {"cpu": set(keys[:2]), "disk": {keys[2]}}  # and it was not dropped
    got, n = f.engine.retrieve(tokens)
    assert n == 2 * CHUNK + 5 and torch.equal(got, kv)


@pytest.mark.parametrize("command", [Command(op="move", keys=[], tier="tape"),
                                     Command(op="move", keys=[]),
                                     Command(op="clear", tier="tape")])
def test_an_unknown_or_missing_tier_is_a_value_error_and_changes_nothing(fleet, command):
    f = fleet()
    tokens, kv, keys = prompt(f.engine, 2, 12)
    f.engine.store(tokens, kv)
    before = f.check()
    with pytest.raises(ValueError):
        f.member.run(command.model_copy(update={"keys": [k.hex() for k in keys]}))
    assert f.check() == before == {"cpu": set(keys), "disk": set(keys)}


# -- the engine joins a fleet when configured ------------------------------------------------------


@pytest.fixture
def fake_agent(monkeypatch):
    """kvtier.fleet.agent replaced: join_fleet records its member, its handle records the close."""
    log: list = []

    class Handle:
        def close(self) -> None:
            log.append(("close", storage_open(member.engine)))

    def join_fleet(config, m):
        nonlocal member
        member = m
        log.append(("join", config))
        return Handle()

    member = None
    monkeypatch.setitem(sys.modules, "kvtier.fleet.agent", types.SimpleNamespace(join_fleet=join_fleet))
    return log


def storage_open(engine) -> bool:
    return not engine.storage._gate.closed


def test_an_engine_with_a_controller_section_joins_and_leaves_first_on_close(make_engine, fake_agent):
    plain = make_engine("cpu_disk")
    assert fake_agent == []  # no controller: no fleet
    section = FleetConfig(instance_id="engine-a")
    from kvtier import CacheEngine

    engine = CacheEngine(dataclasses.replace(plain.config, controller=section), plain.layout, "test-model")
    assert fake_agent == [("join", section)]
    engine.close()
    assert fake_agent[1] == ("close", True)  # the agent stopped while the storage still served
    assert not storage_open(engine)
    engine.close()
    assert len(fake_agent) == 2  # once


def test_a_clear_of_everything_leaves_the_shared_store_that_other_engines_use(make_engine, kvtier_server):
    # A fleet-wide "clear" reaches every engine; a kvtier_server (or Redis) behind them holds other
    # engines' chunks too, so only the engine's own tiers are cleared unless the store is named.
    f = Fleet(make_engine("remote", model_id="clear-shared", disk="null", remote__url=kvtier_server.url))
    tokens, kv, keys = prompt(f.engine, 3, 6)
    f.engine.store(tokens, kv)
    f.engine.flush()
    remote = f.engine.tier("remote")
    assert remote.has(keys) == [True] * 3
    assert f.run("clear").chunks == 3
    assert f.snapshot() == {"cpu": set()}
    assert remote.has(keys) == [True] * 3
    f.run("clear", tier="remote")
    assert remote.has(keys) == [False] * 3


def test_a_move_up_by_keys_with_the_prompt_length_takes_the_partial_last_chunk_too(fleet):
    # The controller's commands carry the prompt's length, so the last chunk's shape is known.
    f = fleet(save_partial_chunks="true", write_through="false")
    tokens = seeded_tokens(2 * CHUNK + 5, 12)
    kv = seeded_kv(f.engine.layout, 2 * CHUNK + 5, 12)
    f.engine.store(tokens, kv)
    keys = f.engine.db.keys(tokens)
    assert f.run("move", keys, tier="disk", num_tokens=len(tokens)).chunks == 3
    assert f.run("move", keys, tier="cpu", num_tokens=len(tokens)).chunks == 3
    assert f.check() == {"cpu": set(keys), "disk": set()}
    got, n = f.engine.retrieve(tokens)
    assert n == 2 * CHUNK + 5 and torch.equal(got, kv)
    with pytest.raises(ValueError, match="do not fit"):
        f.run("move", keys, tier="cpu", num_tokens=2 * CHUNK)  # 3 keys cannot be 32 tokens
