"""Tests for kvtier/connector/worker.py: loads into and saves out of the engine's paged KV cache, first
against a PagedKVCache and a CacheEngine alone, then end to end through `LLM` with kvtier on.

End to end, the must-show: kvtier changes no token; a new engine (in this process or another one)
loads what an earlier one saved and computes only the rest; a corrupt chunk file or a failing disk
tier costs exactly the recompute of the missing tokens, never a wrong token or a crash; layer-wise
and bulk loads leave the same bits in the cache; every load and save event carries the step of the
scheduler output that planned it; chunks computed during decode are saved too.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import CHUNK, REPO, seeded_kv, seeded_tokens
from kvtier_servers import Client

from kvtier import KVLayout
from kvtier.connector import ConnectorMetadata, KVEvent, KvtierWorkerConnector, LoadSpec, SaveSpec
from kvtier.connector.scheduler import KvtierSchedulerConnector, ScheduledWork
from kvtier_engine import SamplingParams
from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.models.presets import PRESETS

from .conftest import GREEDY, flip_payload_byte, prompt

CONFIG = PRESETS["llama-tiny"]  # 2 layers, 2 kv heads of 16
LAYOUT = KVLayout(CONFIG.num_layers, CONFIG.num_kv_heads, CONFIG.head_dim, torch.float32)
TABLE = [5, 2, 7]  # a request's blocks, deliberately out of order


@pytest.fixture
def setup(make_engine):
    """(kvtier engine with 40 seeded tokens' KV stored (2 whole chunks), a paged cache of 8 blocks of
    16 tokens, the tokens, their KV)."""
    engine = make_engine("cpu", LAYOUT)
    tokens, kv = seeded_tokens(40, 1).tolist(), seeded_kv(LAYOUT, 40, 1)
    engine.store(tokens, kv)
    return engine, PagedKVCache(CONFIG, 8, CHUNK), tokens, kv


def worker_for(engine, cache, layerwise: bool = False) -> KvtierWorkerConnector:
    worker = KvtierWorkerConnector(engine, layerwise)
    worker.register_kv_caches(cache)
    return worker


def run_step(worker: KvtierWorkerConnector, meta: ConnectorMetadata, num_layers: int = CONFIG.num_layers):
    """The worker's calls in one step, as the model runner makes them (no model)."""
    worker.bind_connector_metadata(meta)
    worker.start_load_kv()
    for layer in range(num_layers):
        worker.wait_for_layer_load(layer)
        worker.save_kv_layer(layer)
    worker.wait_for_save()
    finished = worker.get_finished()
    worker.clear_connector_metadata()
    return finished


def leased(engine) -> int:
    return engine.stats()["pool"]["leased_chunks"]


# -- loads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layerwise", [False, True], ids=["bulk", "layerwise"])
def test_a_load_scatters_the_stored_kv_after_the_device_prefix(setup, layerwise):
    engine, cache, tokens, kv = setup
    worker = worker_for(engine, cache, layerwise)
    lease = engine.lease(tokens, 32)
    spec = LoadSpec("r", tokens[:32], TABLE, start=CHUNK, end=31, lease=lease)

    run_step(worker, ConnectorMetadata(3, loads=[spec]))

    assert worker.get_loaded_tokens() == {"r": 31}
    assert torch.equal(cache.gather(TABLE, 31)[:, :, CHUNK:], kv[:, :, CHUNK:31])
    assert not cache.kv[:, :, TABLE[0]].any()  # the device's own block is left alone
    assert not cache.kv[:, :, TABLE[1], 15].any()  # token 31 is the engine's to compute
    assert list(worker.events) == [KVEvent(3, "load", "r", CHUNK, 31)]
    stats = worker.stats
    assert (stats["loads"], stats["loaded_tokens"], stats["load_shortfalls"]) == (1, 15, 0)
    assert leased(engine) == 0  # released once the chunks were read


def test_a_load_that_falls_short_says_where_it_stopped(setup):
    engine, cache, tokens, kv = setup
    engine.clear()
    engine.store(tokens[:CHUNK], kv[:, :, :CHUNK])  # the second chunk is gone
    worker = worker_for(engine, cache)

    run_step(worker, ConnectorMetadata(1, loads=[LoadSpec("r", tokens[:32], TABLE, 0, 32,
                                                          engine.lease(tokens, 32))]))

    assert worker.get_loaded_tokens() == {"r": CHUNK}
    assert torch.equal(cache.gather(TABLE, CHUNK), kv[:, :, :CHUNK])
    assert worker.events[-1].end == CHUNK and worker.stats["load_shortfalls"] == 1
    assert leased(engine) == 0


def test_loads_that_fall_short_are_counted_each_time_and_logged_once(setup, caplog):
    # Regression: every request whose load fell short (any tier miss under pressure) logged a
    # warning, so the log grew with the request rate.
    engine, cache, tokens, kv = setup
    engine.clear()
    engine.store(tokens[:CHUNK], kv[:, :, :CHUNK])  # the second chunk is gone for every request
    worker = worker_for(engine, cache)

    with caplog.at_level(logging.WARNING, logger="kvtier.connector.worker"):
        for step in range(20):
            spec = LoadSpec(f"r{step}", tokens[:32], TABLE, 0, 32, engine.lease(tokens, 32))
            run_step(worker, ConnectorMetadata(step + 1, loads=[spec]))

    assert worker.stats["load_shortfalls"] == 20
    assert len([r for r in caplog.records if "kvtier load reached" in r.getMessage()]) == 1
    assert leased(engine) == 0


def test_a_retrieve_that_raises_is_a_miss_not_a_failed_step(setup, monkeypatch):
    engine, cache, tokens, _ = setup
    worker = worker_for(engine, cache)

    def broken(*args, **kwargs):
        raise ConnectionError("injected: a tier failing in a way it should not")

    monkeypatch.setattr(engine, "retrieve", broken)  # only the fault is injected
    run_step(worker, ConnectorMetadata(1, loads=[LoadSpec("r", tokens[:32], TABLE, CHUNK, 32,
                                                          engine.lease(tokens, 32))]))

    assert worker.get_loaded_tokens() == {"r": CHUNK}  # nothing beyond what the device held
    assert not cache.kv.any() and worker.stats["load_shortfalls"] == 1
    assert leased(engine) == 0


def test_loads_a_failed_step_never_reached_give_their_leases_back(setup, monkeypatch):
    # Only `_read` released leases: a step failing before it (no staging memory) leaked them all.
    engine, cache, tokens, _ = setup
    worker = worker_for(engine, cache)

    def no_memory(num_tokens):
        raise MemoryError("injected: no host memory for the staging buffer")

    monkeypatch.setattr(worker, "_staging_for", no_memory)  # only the fault is injected
    worker.bind_connector_metadata(ConnectorMetadata(1, loads=[
        LoadSpec("r", tokens[:32], TABLE, 0, 32, engine.lease(tokens, 32)),
        LoadSpec("s", tokens[:16], [1], 0, 16, engine.lease(tokens, 16))]))
    with pytest.raises(MemoryError):
        worker.start_load_kv()
    worker.clear_connector_metadata()
    assert leased(engine) == 0


def test_a_failed_layerwise_copy_surfaces_in_the_forward_pass(setup):
    engine, cache, tokens, _ = setup

    class BrokenCache:
        block_size, num_layers = cache.block_size, cache.num_layers

        def scatter(self, block_ids, kv, layers=slice(None)):
            raise RuntimeError("injected: the copy failed")

    worker = worker_for(engine, BrokenCache(), layerwise=True)
    worker.bind_connector_metadata(ConnectorMetadata(1, loads=[LoadSpec("r", tokens[:32], TABLE, 0, 32)]))
    worker.start_load_kv()
    with pytest.raises(RuntimeError, match="copying loaded KV into the paged cache failed"):
        worker.wait_for_layer_load(0)


def test_a_layerwise_load_thread_signals_only_its_own_steps_layers(setup):
    """Regression: the load thread's `finally` set `self._layer_ready`, which by then may be the next
    step's events (the forward pass needs only the last layer's event to go on), so that step's
    attention could run before its KV was copied in."""
    engine, cache, _, _ = setup
    worker = worker_for(engine, cache, layerwise=True)
    own = [threading.Event() for _ in range(cache.num_layers)]
    worker._layer_ready = next_step = [threading.Event() for _ in range(cache.num_layers)]

    worker._scatter_layers([], own, {})  # (no scatter to do: what counts is which events it sets)

    assert all(e.is_set() for e in own) and not any(e.is_set() for e in next_step)


# -- saves ---------------------------------------------------------------------------------------


def test_a_save_is_gathered_in_wait_for_save_and_stored_in_the_background(setup):
    engine, cache, _, _ = setup
    engine.clear()
    worker = worker_for(engine, cache)
    tokens = seeded_tokens(48, 2).tolist()
    kv = seeded_kv(LAYOUT, 48, 2)
    cache.scatter(TABLE, kv)
    engine.store(tokens[:CHUNK], kv[:, :, :CHUNK])  # a save starts where kvtier's chunks end
    stored = engine.stats()["stored_chunks"]

    finished = run_step(worker, ConnectorMetadata(4, saves=[SaveSpec("r", tokens[:48], TABLE, CHUNK, 48)]))
    cache.kv.zero_()  # the engine may reuse the blocks as soon as the step is over

    assert worker.drain(timeout=30)
    got, n = engine.retrieve(tokens, start=CHUNK)
    assert n == 48 and torch.equal(got, kv[:, :, CHUNK:])
    assert engine.stats()["stored_chunks"] == stored + 2 and engine.stats()["deduplicated_chunks"] == 0
    assert finished == (set(), set())
    assert list(worker.events) == [KVEvent(4, "save", "r", CHUNK, 48)]
    assert (worker.stats["saves"], worker.stats["saved_tokens"]) == (1, 32)


def test_a_final_save_is_reported_finished_once(setup):
    engine, cache, tokens, _ = setup
    worker = worker_for(engine, cache)
    final = SaveSpec("r", tokens[:40], TABLE, 32, 40, final=True)
    assert run_step(worker, ConnectorMetadata(1, saves=[final])) == ({"r"}, set())
    assert run_step(worker, ConnectorMetadata(2)) == (set(), set())


def test_a_failed_store_is_counted_and_the_step_goes_on(setup, monkeypatch):
    engine, cache, tokens, _ = setup
    worker = worker_for(engine, cache)

    def broken(*args, **kwargs):
        raise OSError("injected: no space left")

    monkeypatch.setattr(engine, "store", broken)  # only the fault is injected
    run_step(worker, ConnectorMetadata(1, saves=[SaveSpec("r", tokens[:32], TABLE, 0, 32)]))
    assert worker.drain(timeout=30)
    assert (worker.stats["saves"], worker.stats["save_failures"]) == (0, 1)


def test_a_failed_step_saves_only_its_final_saves(setup):
    # The KV a failed step computed is not trusted; a final save holds KV of earlier steps, and its
    # request's blocks are held until it is gathered.
    engine, cache, tokens, kv = setup
    engine.clear()
    worker = worker_for(engine, cache)
    cache.scatter(TABLE, kv)
    meta = ConnectorMetadata(3, saves=[SaveSpec("r", tokens[:32], TABLE, 0, 32),
                                       SaveSpec("f", tokens[:40], TABLE, 0, 40, final=True)])
    worker.bind_connector_metadata(meta)
    worker.wait_for_save(discard={"r", "f"})
    worker.clear_connector_metadata()
    assert worker.drain(timeout=30)
    assert [e.request_id for e in worker.events] == ["f"]
    assert worker.get_finished() == ({"f"}, set())


def test_a_save_that_cannot_be_gathered_still_releases_its_request(setup, monkeypatch):
    # wait_for_save raised, so the failed step never reported its final saves: their requests'
    # blocks stayed held and the engine never became idle again.
    engine, cache, tokens, _ = setup
    worker = worker_for(engine, cache)

    def broken(*args, **kwargs):
        raise RuntimeError("injected: the device is lost")

    monkeypatch.setattr(cache, "gather", broken)  # only the fault is injected
    finished = run_step(worker, ConnectorMetadata(1, saves=[SaveSpec("f", tokens[:40], TABLE, 32, 40,
                                                                     final=True)]))
    assert finished == ({"f"}, set()) and worker.stats["save_failures"] == 1


# -- round trips to a shared store --------------------------------------------------------------


def store_lookups_and_reads(kind: str, server) -> tuple[int, int]:
    """(lookup commands, read commands) the shared store has answered so far, from its own counters:
    Redis's commandstats (STRLEN answers `has`, GETRANGE serves `get`) or kvtier_server's STATS."""
    if kind == "redis":
        with server.client() as client:
            calls = {name: n["calls"] for name, n in client.info("commandstats").items()}
        return calls.get("cmdstat_strlen", 0), calls.get("cmdstat_getrange", 0)
    client = Client(server.port)
    try:
        stats = client.stats()
    finally:
        client.close()
    return stats.get("requests_has", 0), stats.get("requests_get", 0)


@pytest.mark.parametrize("kind", ["redis", "kvtier_server"])
def test_a_load_does_not_ask_the_shared_store_again_what_the_lookup_found(kind, request, make_engine):
    # Regression: `retrieve` looked the prefix up again (a Redis STRLEN / kvtier_server HAS round
    # trip per load) though the scheduler side's lookup had just found it and leased it.
    server = request.getfixturevalue("redis_server" if kind == "redis" else "kvtier_server")
    config, url = ("redis", "redis__url") if kind == "redis" else ("remote", "remote__url")
    engine = make_engine(config, LAYOUT, model_id=f"round-trips-{kind}", disk="null", **{url: server.url})
    tokens, kv = seeded_tokens(48, 7).tolist(), seeded_kv(LAYOUT, 48, 7)
    engine.store(tokens, kv)
    assert engine.flush(timeout=30)
    engine.clear("cpu")  # the chunks are in the shared store only
    scheduler = KvtierSchedulerConnector(engine, CHUNK)
    req = SimpleNamespace(request_id="r", all_token_ids=tokens)
    hit, _ = scheduler.get_num_new_matched_tokens(req, 0)  # the lookup: one round trip
    scheduler.update_state_after_alloc(req, TABLE, hit)
    meta = scheduler.build_connector_meta(1, [ScheduledWork(req, TABLE, hit)])
    cache = PagedKVCache(CONFIG, 8, CHUNK)
    worker = worker_for(engine, cache)

    lookups, reads = store_lookups_and_reads(kind, server)
    run_step(worker, meta)
    lookups_after, reads_after = store_lookups_and_reads(kind, server)

    assert worker.get_loaded_tokens() == {"r": 47}
    assert torch.equal(cache.gather(TABLE, 47), kv[:, :, :47])
    assert lookups_after - lookups == 0, "the load asked the store again what the lookup had found"
    assert reads_after > reads
    assert leased(engine) == 0


# -- end to end through LLM ----------------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["device-cache", "no-device-cache"])
def test_generation_with_kvtier_is_token_identical_to_without(make_llm, baseline, prefix_caching):
    shared = prompt(40, seed=10)
    batch = [shared, shared[:35] + prompt(12, seed=11), prompt(23, seed=12), shared + prompt(9, seed=13)]
    llm = make_llm("disk", enable_prefix_caching=prefix_caching, max_num_batched_tokens=32)

    first = llm.generate(batch, GREEDY)
    second = llm.generate(batch, GREEDY)

    expected = [baseline(p) for p in batch]
    assert [o.token_ids for o in first] == [o.token_ids for o in second] == expected
    if not prefix_caching:  # every hit of the second round came from kvtier
        assert [o.metrics.tokens_loaded for o in second] == [32, 32, 16, 48]
    assert llm.engine.connector.stats["load_shortfalls"] == 0


def test_a_new_engine_loads_what_an_earlier_one_saved_and_computes_only_the_rest(make_llm, baseline):
    shared = prompt(40, seed=20)
    with make_llm("disk") as first:
        first.generate(shared, GREEDY)
    second = make_llm("disk")
    other = shared[:35] + prompt(12, seed=21)

    out = second.generate(other, GREEDY)[0]

    hit = 32  # two whole chunks in common
    assert (out.metrics.tokens_loaded, out.metrics.tokens_cached_on_device) == (hit, 0)
    assert out.metrics.prefill_tokens_computed == len(other) - hit
    assert out.token_ids == baseline(other)
    stats = second.engine.kvtier.stats()["tiers"]
    assert stats["disk"]["hits"] == 2 and stats["disk"]["corrupt"] == 0  # read from the first's disk


def test_within_one_engine_without_device_prefix_caching_kvtier_serves_the_prefix(make_llm, baseline):
    llm = make_llm("cpu", enable_prefix_caching=False)
    shared = prompt(50, seed=22)
    llm.generate(shared, GREEDY)
    other = shared[:48] + prompt(5, seed=23)

    out = llm.generate(other, GREEDY)[0]

    assert out.metrics.tokens_loaded == 48 and out.metrics.prefill_tokens_computed == len(other) - 48
    assert out.token_ids == baseline(other)


def test_a_fully_cached_prompt_loads_all_but_its_last_token(make_llm, baseline):
    shared = prompt(48, seed=24)
    with make_llm("disk") as first:
        first.generate(shared, GREEDY)
    second = make_llm("disk")

    out = second.generate(shared, GREEDY)[0]

    assert (out.metrics.tokens_loaded, out.metrics.prefill_tokens_computed) == (47, 1)
    assert second.engine.connector.stats["load_shortfalls"] == 0
    assert out.token_ids == baseline(shared)


GENERATE = """
from kvtier import load_config
from kvtier_engine import LLM, SamplingParams

env = {{"KVTIER_CHUNK_SIZE": "{chunk}", "KVTIER_DISK__PATH": {disk!r}, "KVTIER_CPU__CAPACITY": "4MiB",
       "KVTIER_CPU__PIN_MEMORY": "off"}}
config = load_config({config!r}, env=env)
with LLM({model!r}, kvtier_config=config, device="cpu", dtype="float32", kv_cache_bytes=1 << 20) as llm:
    out = llm.generate({prompt!r}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
print(*out.token_ids)
"""


def test_another_process_loads_what_this_one_saved(make_llm, model_dir, tmp_path):
    shared = prompt(40, seed=25)
    script = GENERATE.format(chunk=CHUNK, disk=str(tmp_path / "disk"), model=model_dir, prompt=shared,
                             config=str(REPO / "configs" / "cpu_disk.yaml"))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = [int(t) for t in done.stdout.split()]

    out = make_llm("disk").generate(shared, GREEDY)[0]

    assert (out.metrics.tokens_loaded, out.metrics.prefill_tokens_computed) == (32, 8)
    assert out.token_ids == theirs


# -- faults --------------------------------------------------------------------------------------


def test_a_corrupt_chunk_file_is_recomputed_exactly_and_the_output_is_unchanged(make_llm, baseline):
    shared = prompt(64, seed=30)
    with make_llm("disk") as first:
        first.generate(shared, GREEDY)  # chunks 0-3 on disk
    second = make_llm("disk")
    kvtier = second.engine.kvtier
    flip_payload_byte(kvtier.storage.lower[0].path_for(kvtier.db.keys(shared)[1]))

    out = second.generate(shared, GREEDY)[0]

    assert (out.metrics.tokens_loaded, out.metrics.prefill_tokens_computed) == (CHUNK, len(shared) - CHUNK)
    assert kvtier.stats()["tiers"]["disk"]["corrupt"] == 1
    assert second.engine.connector.stats["load_shortfalls"] == 1
    assert out.token_ids == baseline(shared)


def test_a_chunk_lost_to_corruption_is_saved_again_by_the_request_that_recomputed_it(make_llm, baseline):
    shared = prompt(64, seed=32)
    with make_llm("disk") as first:
        first.generate(shared, GREEDY)
    with make_llm("disk") as second:
        kvtier = second.engine.kvtier
        flip_payload_byte(kvtier.storage.lower[0].path_for(kvtier.db.keys(shared)[1]))
        assert second.generate(shared, GREEDY)[0].metrics.tokens_loaded == CHUNK  # fell short at chunk 1

    out = make_llm("disk").generate(shared, GREEDY)[0]

    assert (out.metrics.tokens_loaded, out.metrics.prefill_tokens_computed) == (len(shared) - 1, 1)
    assert out.token_ids == baseline(shared)


def test_a_disk_tier_that_raises_on_get_means_recompute_not_a_crash(make_llm, baseline, monkeypatch):
    shared = prompt(40, seed=31)
    with make_llm("disk") as first:
        first.generate(shared, GREEDY)
    second = make_llm("disk")

    def broken_get(keys, dests, *copies):
        raise OSError("injected: I/O error")

    monkeypatch.setattr(second.engine.kvtier.storage.lower[0], "get", broken_get)  # only the fault
    out = second.generate(shared, GREEDY)[0]

    assert (out.metrics.tokens_loaded, out.metrics.prefill_tokens_computed) == (0, len(shared))
    assert second.engine.connector.stats["load_shortfalls"] == 1
    assert out.token_ids == baseline(shared)


# -- layer-wise loads, events, decode saves ------------------------------------------------------


def loaded_kv(llm, token_ids: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The paged-cache KV of a request right after its prefill step (with its load), and its tokens."""
    engine = llm.engine
    request_id = engine.add_request(token_ids, GREEDY)
    engine.step()
    table = engine.scheduler.pool.block_table(request_id)
    kv = engine.cache.gather(table, len(token_ids))
    while engine.has_unfinished():
        outputs = [o for o in engine.step() if o.request_id == request_id]
    return kv, outputs[-1].token_ids


def test_layerwise_and_bulk_loads_leave_the_same_kv_and_the_same_output(make_llm):
    shared = prompt(56, seed=40)
    with make_llm("disk") as first:
        first.generate(shared, GREEDY)
    bulk, layerwise = make_llm("disk"), make_llm("disk")
    layerwise.engine.connector.layerwise = True  # what a GPU gets by default

    kv_bulk, tokens_bulk = loaded_kv(bulk, shared)
    kv_layerwise, tokens_layerwise = loaded_kv(layerwise, shared)

    for llm in (bulk, layerwise):
        assert llm.engine.connector.stats["loaded_tokens"] == 48
    assert torch.equal(kv_layerwise, kv_bulk) and tokens_layerwise == tokens_bulk
    kvtier = bulk.engine.kvtier
    stored, _ = kvtier.retrieve(shared)
    assert torch.equal(kv_bulk[:, :, :48], stored)  # what was loaded is what the first engine saved


def test_every_kv_event_carries_the_step_of_the_scheduler_output_that_planned_it(make_llm):
    llm = make_llm("cpu", enable_prefix_caching=False, max_num_batched_tokens=16)
    engine = llm.engine
    planned: dict[int, ConnectorMetadata] = {}
    schedule = engine.scheduler.schedule

    def recording():
        out = schedule()
        planned[out.step] = out.connector_meta
        return out

    engine.scheduler.schedule = recording
    shared = prompt(40, seed=41)
    llm.generate(shared, GREEDY)
    llm.generate([shared[:36] + prompt(10, seed=42), shared], GREEDY)

    events = list(engine.connector.events)
    assert {e.kind for e in events} == {"load", "save"}
    for e in events:
        meta = planned[e.step]
        assert meta.step == e.step
        specs = meta.loads if e.kind == "load" else meta.saves
        assert (e.request_id, e.start) in [(s.request_id, s.start) for s in specs], e
    assert sum(len(m.loads) + len(m.saves) for m in planned.values()) == len(events)
    assert [e.step for e in events] == sorted(e.step for e in events)


def test_chunks_computed_during_decode_are_saved_too(make_llm):
    llm = make_llm("cpu")
    shared = prompt(20, seed=43)

    out = llm.generate(shared, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]

    saved = [(e.start, e.end) for e in llm.engine.connector.events if e.kind == "save"]
    assert saved == [(0, 16), (16, 32), (32, 48)]  # 20 prompt + 29 fed back tokens computed
    sequence = out.prompt_token_ids + out.token_ids
    assert llm.engine.kvtier.lookup(sequence) == 48
