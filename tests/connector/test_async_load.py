"""Tests for kvtier/connector/async_load.py and its wiring in the connector's two sides: which loads
are asynchronous (`loads.asynchronous`), the load handed to the worker while its request is in no
step, reported by `get_finished`; cancels, the staging bound, close; the prefetcher wired to
`request_arrived` / `request_finished`. A lower tier whose reads wait on an Event the test sets
(`Gate`) stands for a slow one: no sleeps.
"""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens
from fake_kvikio import FakeCuFile, use_fake_gds
from held_reads import Gate

from kvtier import KVLayout
from kvtier.config import LoadsConfig
from kvtier.connector import ConnectorMetadata, KvtierSchedulerConnector, KvtierWorkerConnector, LoadSpec
from kvtier.connector.scheduler import ScheduledWork
from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.models.presets import PRESETS

CONFIG = PRESETS["llama-tiny"]
LAYOUT = KVLayout(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, torch.float32)
TABLE = [5, 2, 7]  # 48 tokens' blocks of 16, out of order
WAIT_S = 30.0
AUTO = LoadsConfig()


@pytest.fixture
def setup(make_engine):
    """(engine with 48 seeded tokens' KV on disk only, the tokens, their KV, an 8-block paged cache)."""
    engine = make_engine("cpu_disk", LAYOUT)
    tokens, kv = seeded_tokens(48, 3).tolist(), seeded_kv(LAYOUT, 48, 3)
    engine.store(tokens, kv)
    assert engine.flush(timeout=WAIT_S)
    engine.clear("cpu")
    return engine, tokens, kv, PagedKVCache(CONFIG, 8, CHUNK)


@pytest.fixture
def gate(setup, monkeypatch):
    held = Gate(setup[0].storage.lower[0], monkeypatch)
    yield held
    held.open()  # never leave a thread waiting behind a failed test


def sides(engine, cache, loads: LoadsConfig = AUTO):
    scheduler = KvtierSchedulerConnector(engine, CHUNK, loads=loads)
    worker = KvtierWorkerConnector(engine, loads=loads)
    worker.register_kv_caches(cache)
    return scheduler, worker


def leased(engine) -> int:
    return engine.stats()["pool"]["leased_chunks"]


def plan(scheduler, request_id: str, tokens: list[int], table=TABLE) -> tuple[int, bool]:
    """Look the request up and commit to its load, as the engine does at admission."""
    request = SimpleNamespace(request_id=request_id, all_token_ids=tokens)
    hit, asynchronous = scheduler.get_num_new_matched_tokens(request, 0)
    scheduler.update_state_after_alloc(request, table, hit)
    return hit, asynchronous


def queued_behind_first(setup, gate, *tables: list[int]):
    """(scheduler, worker) whose step 1 handed over the loads of `tokens` for "first", its read held
    at `gate`, and for "second", "third", ... (into `tables`), queued behind it."""
    engine, tokens, _, cache = setup
    scheduler, worker = sides(engine, cache)
    for request_id, table in zip(("first", "second", "third"), (TABLE, *tables)):
        plan(scheduler, request_id, tokens, table)
    step(worker, scheduler.build_connector_meta(1, []))
    assert gate.entered.wait(WAIT_S)
    return scheduler, worker


def step(worker, meta: ConnectorMetadata) -> None:
    worker.bind_connector_metadata(meta)
    worker.start_load_kv()
    worker.wait_for_save()
    worker.clear_connector_metadata()


def landed(worker) -> dict[str, int]:
    """Wait for one asynchronous load, then what `get_finished` reports."""
    assert worker.wait_for_async_loads(WAIT_S)
    _, recving = worker.get_finished()
    loaded = worker.get_async_loaded()
    assert set(loaded) == recving
    return loaded


def assert_nothing_held(engine, worker) -> None:
    stats = worker.async_stats()
    assert (stats["async_in_flight"], stats["async_staging_bytes"], leased(engine)) == (0, 0, 0)


# -- which loads are asynchronous ----------------------------------------------------------------


def test_auto_is_asynchronous_exactly_when_a_chunk_needs_a_tier_below_the_cpu(setup):
    engine, tokens, _, cache = setup
    request = SimpleNamespace(request_id="r", all_token_ids=tokens)
    scheduler, _ = sides(engine, cache)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (47, True)  # all on disk
    engine.retrieve(tokens[:32])  # chunks 0-1 promoted to the CPU tier
    assert scheduler.get_num_new_matched_tokens(request, 0) == (47, True)  # chunk 2 still on disk only
    assert scheduler.get_num_new_matched_tokens(request, 32) == (15, True)
    engine.retrieve(tokens)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (47, False)  # the CPU tier holds it all
    small = KvtierSchedulerConnector(engine, CHUNK, loads=LoadsConfig(async_min_bytes=LAYOUT.chunk_bytes(47)))
    assert small.get_num_new_matched_tokens(request, 0) == (47, True)  # large enough on its own
    assert small.get_num_new_matched_tokens(request, 16) == (31, False)
    for mode, expected in (("on", True), ("off", False)):
        connector = KvtierSchedulerConnector(engine, CHUNK, loads=LoadsConfig(asynchronous=mode))
        assert connector.get_num_new_matched_tokens(request, 0) == (47, expected)


def test_a_connector_built_without_a_loads_config_loads_within_the_step(setup):
    engine, tokens, _, _ = setup
    request = SimpleNamespace(request_id="r", all_token_ids=tokens)
    connector = KvtierSchedulerConnector(engine, CHUNK)
    assert connector.get_num_new_matched_tokens(request, 0) == (47, False)
    assert connector.prefetcher is None


# -- the load across steps -----------------------------------------------------------------------


def test_an_asynchronous_load_reaches_the_worker_unscheduled_and_lands_in_its_blocks(setup):
    engine, tokens, kv, cache = setup
    scheduler, worker = sides(engine, cache)
    assert plan(scheduler, "r", tokens) == (47, True)
    meta = scheduler.build_connector_meta(1, [])  # the request is in no step
    assert [(s.request_id, s.start, s.end, s.asynchronous) for s in meta.loads] == [("r", 0, 47, True)]

    step(worker, meta)
    assert worker.get_loaded_tokens() == {}  # nothing loads within the step

    assert landed(worker) == {"r": 47}
    assert torch.equal(cache.gather(TABLE, 47), kv[:, :, :47])
    assert worker.get_finished() == (set(), set()) and worker.get_async_loaded() == {}  # reported once
    assert [(e.step, e.kind, e.end) for e in worker.events] == [(1, "load", 47)]
    assert worker.stats["loaded_tokens"] == 47 and worker.async_stats()["async_loads"] == 1
    assert_nothing_held(engine, worker)
    assert scheduler.build_connector_meta(2, []).loads == []  # handed over once
    worker.close()


def test_with_gds_an_asynchronous_load_stages_on_the_device_and_its_disk_chunks_skip_host_memory(
        make_engine, monkeypatch):
    use_fake_gds(monkeypatch)  # (GDS stood in: tests/fake_kvikio.py; the CPU plays the GPU)
    engine = make_engine("cpu_disk", LAYOUT)
    tokens, kv = seeded_tokens(48, 3).tolist(), seeded_kv(LAYOUT, 48, 3)
    engine.store(tokens, kv)
    assert engine.flush(timeout=WAIT_S)
    engine.clear("cpu")
    cache = PagedKVCache(CONFIG, 8, CHUNK)
    scheduler, worker = sides(engine, cache)
    assert worker._async._staging.device == cache.kv.device  # staged on the cache's device, not the host
    assert plan(scheduler, "r", tokens) == (47, True)
    step(worker, scheduler.build_connector_meta(1, []))
    assert landed(worker) == {"r": 47}
    assert torch.equal(cache.gather(TABLE, 47), kv[:, :, :47])
    assert len(FakeCuFile.opened) == 3 and engine.stats()["tiers"]["cpu"]["chunks"] == 0


def test_while_a_load_is_held_other_steps_run_and_it_holds_its_lease(setup, gate):
    engine, tokens, kv, cache = setup
    scheduler, worker = sides(engine, cache)
    plan(scheduler, "r", tokens)
    step(worker, scheduler.build_connector_meta(1, []))
    assert gate.entered.wait(WAIT_S)

    for n in range(2, 5):  # steps go on, each returning at once, while the load waits on the tier
        step(worker, scheduler.build_connector_meta(n, []))
        assert worker.get_finished() == (set(), set())
    assert worker.async_stats()["async_in_flight"] == 1 and leased(engine) == 3
    assert worker.async_stats()["async_staging_bytes"] == LAYOUT.chunk_bytes(48)

    gate.open()
    assert landed(worker) == {"r": 47}
    assert torch.equal(cache.gather(TABLE, 47), kv[:, :, :47])
    assert_nothing_held(engine, worker)
    worker.close()


def test_a_load_cancelled_before_it_starts_is_reported_at_its_start_with_its_lease_back(setup, gate):
    engine = setup[0]
    scheduler, worker = queued_behind_first(setup, gate, [1, 3, 4])  # "second" queued behind "first"

    scheduler.cancel_load("second")
    step(worker, scheduler.build_connector_meta(2, []))
    assert landed(worker) == {"second": 0}
    assert leased(engine) == 3 and worker.async_stats()["async_cancelled"] == 1
    scheduler.cancel_load("first")  # being read: it lands anyway
    step(worker, scheduler.build_connector_meta(3, []))
    gate.open()
    assert landed(worker) == {"first": 47}
    assert_nothing_held(engine, worker)
    worker.close()


def test_a_cancelled_load_counts_as_a_cancel_not_a_shortfall(setup, gate):
    # Regression: a load cancelled by an abort (or dropped by close) counted as a `load_shortfall`.
    engine = setup[0]
    scheduler, worker = queued_behind_first(setup, gate, [1, 3, 4], [0, 6, 8])

    scheduler.cancel_load("second")
    step(worker, scheduler.build_connector_meta(2, []))
    assert landed(worker) == {"second": 0}
    closing = threading.Thread(target=worker.close)  # drops "third", lets "first" land
    closing.start()
    assert landed(worker) == {"third": 0}
    gate.open()
    closing.join(WAIT_S)
    assert not closing.is_alive() and landed(worker) == {"first": 47}
    stats = worker.stats
    counted = (stats["loads"], stats["load_cancels"], stats["load_shortfalls"], stats["loaded_tokens"])
    assert counted == (3, 2, 0, 47)
    assert worker.async_stats()["async_cancelled"] == 2
    assert_nothing_held(engine, worker)


def test_a_load_larger_than_the_staging_bound_is_cut_there_and_counted(setup):
    engine, tokens, kv, cache = setup
    loads = LoadsConfig(asynchronous="on", async_max_bytes_in_flight=LAYOUT.chunk_bytes(2 * CHUNK + 5))
    scheduler, worker = sides(engine, cache, loads)
    plan(scheduler, "r", tokens)
    step(worker, scheduler.build_connector_meta(1, []))

    assert landed(worker) == {"r": 2 * CHUNK}  # the whole chunks that fit; the rest is recomputed
    assert torch.equal(cache.gather(TABLE[:2], 2 * CHUNK), kv[:, :, :2 * CHUNK])
    assert worker.async_stats()["async_cut"] == 1 and worker.stats["load_shortfalls"] == 1
    assert_nothing_held(engine, worker)
    worker.close()


def test_a_load_whose_read_raises_is_reported_at_its_start(setup, monkeypatch):
    engine, tokens, _, cache = setup
    scheduler, worker = sides(engine, cache)

    def broken(*args, **kwargs):
        raise OSError("injected: I/O error")

    monkeypatch.setattr(engine.storage.lower[0], "get", broken)
    plan(scheduler, "r", tokens)
    step(worker, scheduler.build_connector_meta(1, []))
    assert landed(worker) == {"r": 0}
    assert not cache.kv.any() and worker.stats["load_shortfalls"] == 1
    assert_nothing_held(engine, worker)
    worker.close()


def test_close_drops_queued_loads_and_lets_the_one_being_read_land(setup, gate):
    engine, tokens = setup[0], setup[1]
    scheduler, worker = queued_behind_first(setup, gate, [1, 3, 4])

    closing = threading.Thread(target=worker.close)
    closing.start()
    assert landed(worker) == {"second": 0}  # dropped at once, while "first" is still held
    gate.open()
    closing.join(WAIT_S)
    assert not closing.is_alive()
    assert worker.get_finished()[1] == {"first"} and worker.get_async_loaded() == {"first": 47}
    assert_nothing_held(engine, worker)
    # A load handed over after close is dropped at once, its lease given back.
    worker.bind_connector_metadata(ConnectorMetadata(2, loads=[
        LoadSpec("late", tokens, TABLE, 0, 47, engine.lease(tokens, 47), asynchronous=True)]))
    worker.start_load_kv()
    assert worker.get_finished()[1] == {"late"} and leased(engine) == 0


# -- prefetch wiring -----------------------------------------------------------------------------


def test_a_request_arriving_prefetches_its_hit_below_the_cpu_tier(setup):
    engine, tokens, _, cache = setup
    scheduler, _ = sides(engine, cache)
    assert engine.storage.cpu_prefix(engine.db.keys(tokens)) == 0
    scheduler.request_arrived(SimpleNamespace(request_id="r", all_token_ids=tokens + [1, 2]))
    assert scheduler.prefetcher.wait_idle(WAIT_S)
    assert engine.storage.cpu_prefix(engine.db.keys(tokens)) == 3
    assert scheduler.stats()["prefetch_chunks"] == 3
    scheduler.request_arrived(SimpleNamespace(request_id="s", all_token_ids=tokens))  # all in the CPU now
    assert scheduler.stats()["prefetch_requests"] == 1
    assert scheduler.close(WAIT_S)


def test_a_finished_request_cancels_its_queued_prefetch(setup, gate):
    engine, tokens, _, cache = setup
    scheduler, _ = sides(engine, cache)
    first = SimpleNamespace(request_id="first", all_token_ids=tokens)
    scheduler.request_arrived(first)
    assert gate.entered.wait(WAIT_S)
    second = SimpleNamespace(request_id="second", all_token_ids=tokens[:32])
    scheduler.request_arrived(second)
    scheduler.request_finished(second, [], 0)
    assert scheduler.stats()["prefetch_cancelled"] == 1
    gate.open()
    assert scheduler.prefetcher.wait_idle(WAIT_S)
    assert scheduler.stats()["prefetch_requests"] == 2 and leased(engine) == 0
    assert scheduler.close(WAIT_S)


def test_prefetch_off_starts_nothing(setup):
    engine, tokens, _, cache = setup
    scheduler, _ = sides(engine, cache, dataclasses.replace(AUTO, prefetch=False))
    scheduler.request_arrived(SimpleNamespace(request_id="r", all_token_ids=tokens))
    assert scheduler.stats() == {} and engine.storage.cpu_prefix(engine.db.keys(tokens)) == 0
    assert scheduler.close()


def test_a_load_whose_staging_buffer_cannot_be_had_is_reported_at_its_start_with_its_lease_back(
        setup, monkeypatch):
    engine, tokens, _, cache = setup
    scheduler, worker = sides(engine, cache)

    def no_memory(self, num_tokens):
        raise RuntimeError("injected: cannot allocate pinned memory")

    monkeypatch.setattr("kvtier.connector.load_read.StagingBuffer.get", no_memory)
    plan(scheduler, "r", tokens)
    step(worker, scheduler.build_connector_meta(1, []))
    assert landed(worker) == {"r": 0}
    assert worker.async_stats()["async_failures"] == 1 and not cache.kv.any()
    assert_nothing_held(engine, worker)
    worker.close()


def test_after_an_asynchronous_load_fell_short_the_chunks_from_there_are_saved_again(setup):
    # Regression (found running vLLM's load-failure-recovery story against the vLLM connector): vLLM
    # allocates a request again, with no lookup, when its asynchronous load has landed, and that
    # second allocation counted the whole hit as saved again, so the chunks the load did not bring
    # were recomputed and never saved (a lost one stayed lost).
    engine, tokens, _, cache = setup
    loads = LoadsConfig(asynchronous="on", async_max_bytes_in_flight=LAYOUT.chunk_bytes(2 * CHUNK + 5))
    scheduler, worker = sides(engine, cache, loads)
    request = SimpleNamespace(request_id="r", all_token_ids=tokens)
    plan(scheduler, "r", tokens)
    step(worker, scheduler.build_connector_meta(1, []))
    reached = landed(worker)
    assert reached == {"r": 2 * CHUNK}
    assert scheduler.update_connector_output(reached) == {"r"}

    scheduler.update_state_after_alloc(request, TABLE, 0)  # back from waiting for its KV
    meta = scheduler.build_connector_meta(2, [ScheduledWork(request, TABLE, 48)])
    assert [(s.start, s.end) for s in meta.saves] == [(2 * CHUNK, 48)]
    worker.close()


def test_a_reset_clears_the_schedulers_engine_now_and_a_workers_own_engine_next_step(setup, make_engine):
    # Split processes (no leases from the scheduler side): the worker's engine is another one.
    engine, tokens, kv, cache = setup
    worker_engine = make_engine("cpu", LAYOUT)
    worker_engine.store(tokens, kv)
    scheduler = KvtierSchedulerConnector(engine, CHUNK, loads=LoadsConfig(asynchronous="off"), lease=False)
    worker = KvtierWorkerConnector(worker_engine)
    worker.register_kv_caches(cache)
    request = SimpleNamespace(request_id="r", all_token_ids=tokens)
    plan(scheduler, "r", tokens)  # a live request: its chunks are counted as in kvtier

    scheduler.reset()
    assert engine.lookup(tokens) == 0 and worker_engine.lookup(tokens) == 48
    meta = scheduler.build_connector_meta(1, [ScheduledWork(request, TABLE, 48)])
    assert meta.reset and [(s.start, s.end) for s in meta.saves] == [(0, 48)]  # saved again
    worker.bind_connector_metadata(meta)
    assert worker_engine.lookup(tokens) == 0
    worker.clear_connector_metadata()
    assert not scheduler.build_connector_meta(2, []).reset  # once
    worker.close()
