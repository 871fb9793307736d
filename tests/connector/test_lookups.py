"""Tests for kvtier/connector/lookups.py and its wiring in the scheduler-side connector: a lookup that
would be a round trip to a shared store runs in the background, `get_num_new_matched_tokens` answers
(None, False) until it lands, then the hit, once. Over a real CacheEngine on CPU + disk + a real
kvtier_server (the session's, each test in its own namespace); the server's `has` held on an Event
(`HeldLookups`) stands for a slow one: no sleeps.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens

from kvtier import KVLayout, load_config
from kvtier.config import LoadsConfig
from kvtier.connector import KvtierSchedulerConnector
from kvtier.connector.lookups import Lookups, is_local, remote_tiers
from kvtier.errors import ConfigError
from kvtier.tiers.wrapped import WrappedTier
from kvtier_engine.models.presets import PRESETS

from .held_lookups import HeldLookups

CONFIG = PRESETS["llama-tiny"]
LAYOUT = KVLayout(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, torch.float32)
WAIT_S = 30.0
NO_PREFETCH = LoadsConfig(prefetch=False)


@pytest.fixture
def remote_engine(make_engine, kvtier_server, tmp_path, request):
    """`remote_engine(where="remote")`: an engine on CPU + disk + the kvtier_server, with 48 seeded
    tokens' KV left in `where` only ("remote", "disk" or "cpu"); (engine, tokens)."""

    def make(where: str = "remote"):
        engine = make_engine("remote", LAYOUT, model_id=f"lookups-{request.node.name}",
                             disk__path=str(tmp_path / "disk"), remote__url=kvtier_server.url)
        tokens = seeded_tokens(48, 11).tolist()
        engine.store(tokens, seeded_kv(LAYOUT, 48, 11))
        assert engine.flush(timeout=WAIT_S)
        for tier in {"remote": ("cpu", "disk"), "disk": ("cpu",), "cpu": ()}[where]:
            engine.clear(tier)
        return engine, tokens

    return make


@pytest.fixture
def held(remote_engine, monkeypatch):
    """(engine, tokens, HeldLookups on its remote tier): the KV on the server only, lookups held."""
    engine, tokens = remote_engine()
    lookups = HeldLookups(engine.storage.lower[-1], monkeypatch)
    yield engine, tokens, lookups
    lookups.open()  # never leave a thread waiting behind a failed test


def connector(engine, loads: LoadsConfig | None = NO_PREFETCH) -> KvtierSchedulerConnector:
    return KvtierSchedulerConnector(engine, CHUNK, loads=loads)


def req(request_id: str, tokens) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, all_token_ids=tokens)


def landed(scheduler) -> None:
    assert scheduler.wait_for_lookups(WAIT_S), "no lookup landed"


# -- which tiers are local -----------------------------------------------------------------------


def test_the_disk_tier_is_local_and_the_server_is_not_wrapped_or_not(remote_engine):
    engine, _ = remote_engine()
    disk, remote = engine.storage.lower
    assert (is_local(disk), is_local(remote)) == (True, False)
    assert (is_local(WrappedTier(disk)), is_local(WrappedTier(remote))) == (True, False)
    assert remote_tiers(engine.storage.lower) == [remote]
    says_so = SimpleNamespace(local=True, inner=remote)  # a tier's own word wins over what it wraps
    assert is_local(says_so) and not is_local(SimpleNamespace(local=False, inner=disk))


def test_without_a_remote_tier_or_with_loads_off_every_lookup_answers_at_once(make_engine, remote_engine):
    local = make_engine("cpu_disk", LAYOUT)
    assert connector(local).lookups is None
    engine, tokens = remote_engine()
    assert connector(engine).lookups is not None  # auto
    # no `loads:` (a connector built in code), or loads off (the synchronous baseline): as before
    for loads in (None, LoadsConfig(asynchronous="off", prefetch=False)):
        synchronous = connector(engine, loads)
        assert synchronous.lookups is None
        assert synchronous.get_num_new_matched_tokens(req("r", tokens), 0) == (47, False)
        assert synchronous.stats() == {}


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_a_prompt_the_local_tiers_hold_whole_is_answered_at_once_without_the_server(remote_engine,
                                                                                    monkeypatch, where):
    engine, tokens = remote_engine(where)
    held = HeldLookups(engine.storage.lower[-1], monkeypatch)
    scheduler = connector(engine)
    assert scheduler.get_num_new_matched_tokens(req("r", tokens), 0) == (47, where == "disk")
    stats = scheduler.stats()
    assert (stats["lookups_local"], stats["lookups_background"], held.calls) == (1, 0, 0)
    assert scheduler.close(WAIT_S)


def test_chunks_evicted_from_host_memory_during_the_local_probe_send_the_lookup_to_the_background(
        remote_engine, monkeypatch):
    """The local answer is one probe, not a check and then a lookup: a chunk evicted in between would
    have sent that lookup to the (here held) server on the scheduler's own thread."""
    engine, tokens = remote_engine("cpu")
    engine.clear("disk")  # the KV in host memory and on the server only
    held = HeldLookups(engine.storage.lower[-1], monkeypatch)
    probe = engine.storage.contains_prefix

    def evicting(keys, lower=True):
        engine.clear("cpu")  # an eviction by another thread, as the scheduler asks
        return probe(keys, lower)

    monkeypatch.setattr(engine.storage, "contains_prefix", evicting)
    scheduler, r = connector(engine), req("r", tokens)
    assert scheduler.get_num_new_matched_tokens(r, 0) == (None, False)  # the held server: not here
    assert held.entered.wait(WAIT_S)
    held.open()
    landed(scheduler)
    assert scheduler.get_num_new_matched_tokens(r, 0) == (47, True)
    assert scheduler.stats()["lookups_local"] == 0 and scheduler.close(WAIT_S)


# -- a lookup in the background ------------------------------------------------------------------


def test_a_slow_lookup_answers_none_until_it_lands_then_its_hit_once(held):
    engine, tokens, lookups = held
    scheduler, r = connector(engine), req("r", tokens)
    before = engine.stats()["hit_tokens"]
    assert scheduler.get_num_new_matched_tokens(r, 0) == (None, False)
    assert lookups.entered.wait(WAIT_S)
    assert scheduler.get_num_new_matched_tokens(r, 0) == (None, False)  # asked again: no second lookup
    stats = scheduler.stats()
    assert (stats["lookups_background"], stats["lookups_in_flight"], stats["lookups_kept"]) == (1, 1, 1)
    assert not scheduler.wait_for_lookups(0.0)
    lookups.open()
    landed(scheduler)
    assert scheduler.get_num_new_matched_tokens(r, 16) == (31, True)  # the hit; the server's: asynchronous
    stats = scheduler.stats()
    assert (stats["lookups_in_flight"], stats["lookups_kept"], lookups.calls) == (0, 0, 1)
    assert engine.stats()["hit_tokens"] - before == 48  # one lookup counted
    assert scheduler.close(WAIT_S)


def test_a_request_finished_while_its_lookup_runs_leaves_nothing_behind(held):
    engine, tokens, lookups = held
    scheduler, r = connector(engine), req("r", tokens)
    assert scheduler.get_num_new_matched_tokens(r, 0) == (None, False)
    assert lookups.entered.wait(WAIT_S)
    assert scheduler.request_finished(r, [], 0) == (False, None)
    assert scheduler.stats()["lookups_kept"] == 0
    lookups.open()
    assert not scheduler.wait_for_lookups(WAIT_S)  # idle, and its answer thrown away
    stats = scheduler.stats()
    assert (stats["lookups_dropped"], stats["lookups_in_flight"], stats["lookups_kept"]) == (1, 0, 0)
    assert engine.stats()["pool"]["leased_chunks"] == 0
    assert scheduler.close(WAIT_S)


def test_a_queued_lookup_of_a_finished_request_never_runs(held):
    engine, tokens, lookups = held
    scheduler = connector(engine)
    assert scheduler.get_num_new_matched_tokens(req("first", tokens), 0)[0] is None
    assert lookups.entered.wait(WAIT_S)
    second = req("second", tokens[:32])
    assert scheduler.get_num_new_matched_tokens(second, 0)[0] is None  # queued behind the held one
    assert scheduler.stats()["lookups_in_flight"] == 2
    scheduler.request_finished(second, [], 0)
    assert scheduler.stats()["lookups_in_flight"] == 1
    lookups.open()
    landed(scheduler)
    assert lookups.calls == 1 and scheduler.stats()["lookups_kept"] == 1  # first's answer, waiting
    assert scheduler.get_num_new_matched_tokens(req("first", tokens), 0) == (47, True)
    assert scheduler.stats()["lookups_kept"] == 0
    assert scheduler.close(WAIT_S)


def test_past_the_bound_a_lookup_starts_at_a_later_step(held):
    engine, tokens, lookups = held
    scheduler = connector(engine, LoadsConfig(prefetch=False, lookup_max_in_flight=1))
    first, second = req("first", tokens), req("second", tokens[:32])
    assert scheduler.get_num_new_matched_tokens(first, 0)[0] is None
    assert lookups.entered.wait(WAIT_S)
    assert scheduler.get_num_new_matched_tokens(second, 0)[0] is None
    stats = scheduler.stats()
    assert (stats["lookups_deferred"], stats["lookups_background"], stats["lookups_kept"]) == (1, 1, 1)
    lookups.open()
    landed(scheduler)
    assert scheduler.get_num_new_matched_tokens(second, 0)[0] is None  # started now
    assert scheduler.get_num_new_matched_tokens(first, 0) == (47, True)
    landed(scheduler)
    assert scheduler.get_num_new_matched_tokens(second, 0) == (31, True)
    assert scheduler.stats()["lookups_background"] == 2
    assert scheduler.close(WAIT_S)


def test_a_lookup_that_raises_is_a_miss_and_is_counted(remote_engine, monkeypatch):
    engine, tokens = remote_engine()

    def broken(keys):
        raise RuntimeError("the store's client broke")

    monkeypatch.setattr(engine.storage.lower[-1], "has", broken)
    scheduler, r = connector(engine), req("r", tokens)
    assert scheduler.get_num_new_matched_tokens(r, 0) == (None, False)
    landed(scheduler)
    assert scheduler.get_num_new_matched_tokens(r, 0) == (0, False)  # recomputed
    stats = scheduler.stats()
    assert (stats["lookup_failures"], stats["lookups_kept"]) == (1, 0)
    assert scheduler.close(WAIT_S)


def test_an_answer_for_other_tokens_is_not_used(held):
    engine, tokens, lookups = held
    lookups.open()
    scheduler = connector(engine)
    assert scheduler.get_num_new_matched_tokens(req("r", tokens[:32]), 0)[0] is None
    landed(scheduler)
    assert scheduler.get_num_new_matched_tokens(req("r", tokens), 0)[0] is None  # preempted since, say
    assert scheduler.stats()["lookups_background"] == 2
    landed(scheduler)
    assert scheduler.get_num_new_matched_tokens(req("r", tokens), 0) == (47, True)
    assert scheduler.stats()["lookups_kept"] == 0
    assert scheduler.close(WAIT_S)


def test_an_arrival_starts_its_lookup_and_the_prefetch_follows_the_landing(held):
    engine, tokens, lookups = held
    scheduler, r = connector(engine, LoadsConfig()), req("r", tokens)
    scheduler.request_arrived(r)
    assert lookups.entered.wait(WAIT_S)
    scheduler.build_connector_meta(1, [])
    assert scheduler.stats()["prefetch_requests"] == 0  # not landed yet: nothing to prefetch
    lookups.open()
    landed(scheduler)
    scheduler.build_connector_meta(2, [])
    assert scheduler.prefetcher.wait_idle(WAIT_S)
    assert engine.storage.cpu_prefix(engine.db.keys(tokens)) == 3
    scheduler.build_connector_meta(3, [])
    stats = scheduler.stats()
    assert (stats["prefetch_requests"], stats["prefetch_chunks"], stats["lookups_background"]) == (1, 3, 1)
    assert scheduler.get_num_new_matched_tokens(r, 0) == (47, False)  # its arrival's answer: one lookup
    assert scheduler.stats()["lookups_background"] == 1
    assert scheduler.close(WAIT_S)


def test_close_drops_the_queued_lookups_and_waits_for_the_running_one(held):
    engine, tokens, lookups = held
    scheduler = connector(engine)
    scheduler.get_num_new_matched_tokens(req("first", tokens), 0)
    assert lookups.entered.wait(WAIT_S)
    scheduler.get_num_new_matched_tokens(req("second", tokens[:32]), 0)
    closing = threading.Thread(target=scheduler.close, args=(WAIT_S,))
    closing.start()
    lookups.open()
    closing.join(WAIT_S)
    assert not closing.is_alive() and lookups.calls == 1
    stats = scheduler.stats()
    assert (stats["lookups_in_flight"], stats["lookups_kept"]) == (0, 0)
    third = req("third", tokens)
    assert scheduler.get_num_new_matched_tokens(third, 0) == (None, False)
    assert scheduler.get_num_new_matched_tokens(third, 0) == (0, False)  # closed: a miss, never waiting
    stats = scheduler.stats()
    assert (stats["lookup_failures"], stats["lookups_kept"], lookups.calls) == (1, 0, 1)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_the_bound_must_be_a_positive_int(remote_engine, bad):
    engine, _ = remote_engine()
    with pytest.raises(ValueError, match="max_in_flight"):
        Lookups(engine, bad)


def test_the_bound_is_a_loads_key_validated_like_the_others(tmp_path):
    assert load_config(env={}).loads.lookup_max_in_flight == 64
    path = tmp_path / "kvtier.yaml"
    path.write_text("loads:\n  lookup_max_in_flight: 8\n")
    assert load_config(path, env={}).loads.lookup_max_in_flight == 8
    assert load_config(env={"KVTIER_LOADS__LOOKUP_MAX_IN_FLIGHT": "3"}).loads.lookup_max_in_flight == 3
    for bad, why in (("0", "must be >= 1"), ("100000", "must be <= 65536"), ("many", "")):
        with pytest.raises(ConfigError, match=f"loads.lookup_max_in_flight: {why}"):
            load_config(env={"KVTIER_LOADS__LOOKUP_MAX_IN_FLIGHT": bad})
