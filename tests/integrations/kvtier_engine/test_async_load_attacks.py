"""Asynchronous kvtier loads and prefetch through the engine, under attack: aborts at every point of a
load, more loads than the staging budget, a stalled or vanished tier, close with loads in flight,
preemption while requests wait for their KV, the same prompt twice at once.

The rule every test holds the engine to: greedy output token-identical to kvtier off, and once the
engine is idle, every lease, staging byte, in-flight load and KV block given back (`assert_idle`).
The tiers below the CPU are wrapped in a `Gate` (conftest.py's `gates`; async_engine.py) so that a
test can hold a read, or a scatter on the loader's thread, on an Event: no sleeps, no wall-clock
asserts. Setting: the tiny Llama checkpoint (fp32 on the CPU), 16-token chunks, the paged cache 1 MiB.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading

import pytest
from connector.conftest import kvtier_config, prompt
from waiting import wait_until

from kvtier import load_config
from kvtier.config import RemoteConfig
from kvtier_engine import LLM, SamplingParams

from .async_engine import (
    ENGINE_OPTIONS,
    MAX_STEPS,
    PARAMS,
    WAIT_S,
    add,
    assert_idle,
    drive,
    step_until,
    tokens_of,
    warm,
    with_loads,
)

BLOCK_BYTES = CHUNK_BYTES = 16 * 2 * 3 * 32 * 4  # 16 tokens x K,V x 3 layers x 2 heads x 16 dims, fp32
ASYNC_THREAD = "kvtier-async-load"


@pytest.fixture(scope="module")
def baseline(model_dir):
    """`baseline(ids, max_tokens=4)`: what the engine generates for `ids` without kvtier (greedy),
    memoised."""
    memo: dict[tuple, list[int]] = {}
    llm = LLM(model_dir, kvtier_config=None, device="cpu", dtype="float32", kv_cache_bytes=1 << 20)

    def tokens(ids: list[int], max_tokens: int = PARAMS.max_tokens) -> list[int]:
        key = (max_tokens, *ids)
        if key not in memo:
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            memo[key] = llm.generate(ids, params)[0].token_ids
        return memo[key]

    yield tokens
    llm.close()


@pytest.fixture
def make_llm(model_dir, tmp_path, gates):
    """`make_llm(config=None, asynchronous="on", prefetch=False, loads=None, **options)`: an LLM with
    kvtier on CPU + disk in tmp_path (or `config`), `loads:` as given (prefetch off unless asked, so
    that a held read is the load's), no device prefix caching (every repeat is a kvtier load) unless
    asked. Closed at teardown (a second close is harmless)."""
    made: list[LLM] = []

    def make(config=None, asynchronous: str = "on", prefetch: bool = False, loads: dict | None = None,
             **options) -> LLM:
        config = with_loads(config or kvtier_config(tmp_path / "disk"), asynchronous=asynchronous,
                            prefetch=prefetch, **(loads or {}))
        made.append(LLM(model_dir, kvtier_config=config, **{**ENGINE_OPTIONS, **options}))
        return made[-1]

    yield make
    for gate in gates:  # before close, which waits for a read in flight
        gate.open()
    for llm in made:
        llm.close()


# -- aborts at every point of a load -------------------------------------------------------------


def _hold_scatter(llm: LLM, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Hold the next scatter made on the asynchronous loader's thread (the forward's are left alone)."""
    entered, release = threading.Event(), threading.Event()
    cache = llm.engine.cache
    real = cache.scatter

    def scatter(*args, **kwargs):
        if threading.current_thread().name == ASYNC_THREAD and not entered.is_set():
            entered.set()
            assert release.wait(WAIT_S), "the test never released the held scatter"
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "scatter", scatter)
    return entered, release


@pytest.mark.parametrize("point", ["queued", "reading", "scattering", "landed"])
def test_an_abort_at_every_point_of_a_load_frees_everything(make_llm, gates, baseline, monkeypatch, point):
    """The aborted request never runs, its blocks come back only once its load has landed (nothing
    writes freed blocks), and the requests beside it answer as with kvtier off."""
    llm = make_llm()
    a, b, c = prompt(64, 1), prompt(64, 2), prompt(40, 3)
    warm(llm.engine, a, b)
    engine, disk = llm.engine, gates[0]
    victim = {"queued": "b", "reading": "a", "scattering": "a", "landed": "a"}[point]
    release = disk.release
    if point in ("queued", "reading", "landed"):
        disk.arm(engine.kvtier.db.keys(a))
    elif point == "scattering":
        entered, release = _hold_scatter(llm, monkeypatch)
    add(llm.engine, {"a": a, "b": b, "c": c})
    outputs: dict = {}
    if point == "landed":  # a's load done on the loader's thread, not yet reported to the scheduler
        step_until(llm.engine, disk.entered.is_set, "a's load to be read", outputs)
        disk.release.set()
        assert engine.connector.wait_for_async_loads(WAIT_S)
    else:
        held = disk.entered if point != "scattering" else entered
        step_until(llm.engine, held.is_set, "a's load to be held", outputs)
        if point == "queued":
            wait_until(lambda: engine.connector.async_stats()["async_in_flight"] == 2, "b queued behind a")
    parked = engine.scheduler.loading[victim]  # waiting for its KV, with its blocks
    assert engine.scheduler.pool.holds(victim)

    engine.abort(victim)
    assert engine.scheduler.pool.holds(victim) and victim in engine.scheduler.loading  # until reported
    release.set()
    drive(llm.engine, outputs)

    assert victim not in outputs and parked.status.value == "abort" and not parked.output_token_ids
    assert not any(victim in record.request_ids for record in engine.step_log)  # never scheduled
    expected = {rid: baseline(ids) for rid, ids in {"a": a, "b": b, "c": c}.items() if rid != victim}
    assert {rid: toks for rid, toks in tokens_of(outputs).items() if rid != victim} == expected
    if point == "queued":  # b's load never started: the tier never read its chunks
        assert not set(engine.kvtier.db.keys(b)) & set(disk.read_keys)
        assert engine.connector.async_stats()["async_cancelled"] == 1
    assert_idle(llm.engine)
    assert llm.generate(b, PARAMS)[0].token_ids == baseline(b)  # and the engine goes on as before
    assert_idle(llm.engine)


def test_an_abort_after_the_load_is_reported_but_before_the_request_runs(make_llm, gates, baseline):
    """max_num_seqs=1 and a long request running: the landed request waits in `ready` with its
    blocks; aborted there, it gives them back at once and never runs."""
    llm = make_llm(max_num_seqs=1)
    a, long = prompt(64, 5), prompt(40, 6)
    warm(llm.engine, a)
    engine, disk = llm.engine, gates[0]
    disk.arm(engine.kvtier.db.keys(a))  # a lands only once long runs (else long may finish first)
    add(llm.engine, {"a": a})  # parked at once (the seat is free to land in), then long takes it
    engine.add_request(long, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), request_id="long")
    outputs: dict = {}
    step_until(engine, lambda: disk.entered.is_set() and engine.scheduler.running, "a held, long running",
               outputs)
    disk.release.set()
    assert engine.connector.wait_for_async_loads(WAIT_S)
    step_until(engine, lambda: [r.request_id for r in engine.scheduler.ready] == ["a"], "a to be ready",
               outputs)
    assert "long" in [r.request_id for r in engine.scheduler.running]

    engine.abort("a")
    assert not engine.scheduler.pool.holds("a")
    drive(llm.engine, outputs)

    assert set(outputs) == {"long"} and outputs["long"].token_ids == baseline(long, 16)
    assert_idle(llm.engine)


def test_every_parked_request_aborted_with_nothing_else_to_run(make_llm, gates):
    """Only parked requests, all aborted while one load is read and one queued: the engine still
    hears of both loads (steps with nothing scheduled) and ends idle."""
    llm = make_llm()
    a, b = prompt(64, 7), prompt(64, 8)
    warm(llm.engine, a, b)
    disk, engine = gates[0], llm.engine
    disk.arm(engine.kvtier.db.keys(a))
    add(llm.engine, {"a": a, "b": b})
    step_until(llm.engine, disk.entered.is_set, "a's load to be read")
    engine.abort("a")
    engine.abort("b")
    disk.release.set()
    assert drive(llm.engine) == {}
    assert_idle(llm.engine)


@pytest.mark.parametrize(("seed", "options"), [
    (0, {}), (1, {}), (2, {"enable_prefix_caching": True, "kv_cache_bytes": 20 * BLOCK_BYTES})])
def test_an_abort_storm_leaves_the_survivors_exact(make_llm, gates, baseline, seed, options):
    """Ten requests (half of them kvtier loads, reads slowed to one a step so that loads span steps),
    a seeded random abort every few steps (with the device prefix cache and a cache small enough to
    preempt, in one variant): the survivors answer as with kvtier off, and everything comes back."""
    rng = random.Random(seed)
    llm = make_llm(prefetch=True, max_num_seqs=4, **options)
    prompts = {f"r{i}": prompt(rng.randrange(20, 90), 100 + i) for i in range(10)}
    warm(llm.engine, *[ids for i, ids in enumerate(prompts.values()) if i % 2])
    disk = gates[0]
    disk.permits = threading.Semaphore(0)
    add(llm.engine, prompts)
    outputs: dict = {}
    aborted = set()
    for _ in range(MAX_STEPS):
        if not llm.engine.has_unfinished():
            break
        live = sorted(set(prompts) - set(outputs) - aborted)
        if live and rng.random() < 0.4:
            victim = rng.choice(live)
            llm.engine.abort(victim)
            aborted.add(victim)
        for out in llm.engine.step():
            if out.finished:
                outputs[out.request_id] = out
        disk.permits.release()
    disk.permits.release(1000)
    drive(llm.engine, outputs)
    assert aborted and set(outputs) == set(prompts) - aborted
    assert tokens_of(outputs) == {rid: baseline(prompts[rid]) for rid in outputs}
    assert_idle(llm.engine)


# -- more loads at once than max_num_seqs ----------------------------------------------------------


@pytest.mark.parametrize("max_num_seqs", [1, 3])
def test_a_burst_of_asynchronous_hits_parks_no_more_than_max_num_seqs(make_llm, gates, baseline,
                                                                       max_num_seqs):
    """Eight disk hits at once, reads slowed to one a step: a request parks only while running +
    loading + ready leaves it a seat (checked after every step; every request here loads, so that
    sum is every request holding blocks), the cap is reached, and all answer as with kvtier off."""
    llm = make_llm(max_num_seqs=max_num_seqs)
    prompts = {f"r{i}": prompt(40 + 5 * i, 200 + i) for i in range(8)}
    warm(llm.engine, *prompts.values())
    disk, scheduler = gates[0], llm.engine.scheduler
    disk.permits = threading.Semaphore(0)
    add(llm.engine, prompts)
    outputs: dict = {}
    most_parked = 0
    for _ in range(MAX_STEPS):
        if not llm.engine.has_unfinished():
            break
        outputs.update((out.request_id, out) for out in llm.engine.step() if out.finished)
        parked = len(scheduler.loading) + len(scheduler.ready)
        assert len(scheduler.running) + parked <= max_num_seqs, (scheduler.running, scheduler.loading,
                                                                  scheduler.ready)
        most_parked = max(most_parked, parked)
        disk.permits.release()
    disk.permits.release(1000)
    drive(llm.engine, outputs)
    assert most_parked == max_num_seqs
    assert tokens_of(outputs) == {rid: baseline(ids) for rid, ids in prompts.items()}
    assert llm.engine.connector.async_stats()["async_loads"] == 8
    assert all(out.metrics.tokens_loaded > 0 for out in outputs.values())
    assert_idle(llm.engine)


# -- more than the staging budget ---------------------------------------------------------------


@pytest.mark.parametrize(("staging", "prefetch"), [(2 * CHUNK_BYTES, False), (2 * CHUNK_BYTES, True),
                                                   (CHUNK_BYTES - 1, False)])
def test_many_loads_beyond_the_staging_budget_answer_as_with_kvtier_off(make_llm, baseline, staging,
                                                                       prefetch):
    """Six loads at once with staging room for two chunks (or less than one): each load is cut to
    what fits (the rest recomputed, counted), none waits forever, none writes past its own blocks."""
    llm = make_llm(prefetch=prefetch, loads={"async_max_bytes_in_flight": staging})
    prompts = {f"r{i}": prompt(70 + 3 * i, 10 + i) for i in range(6)}
    warm(llm.engine, *prompts.values())

    add(llm.engine, prompts)
    outputs = drive(llm.engine)

    assert tokens_of(outputs) == {rid: baseline(ids) for rid, ids in prompts.items()}
    stats = llm.engine.connector.async_stats()
    assert stats["async_loads"] == 6 and stats["async_cut"] == 6
    fits = staging // CHUNK_BYTES * 16
    assert all(out.metrics.tokens_loaded == fits for out in outputs.values())
    assert_idle(llm.engine)


def test_synchronous_and_asynchronous_loads_in_one_batch(make_llm, baseline):
    """auto: a hit in host memory loads within its step, a disk hit in the background, a miss
    computes; all three in the same steps."""
    llm = make_llm(asynchronous="auto")
    in_memory, on_disk, fresh = prompt(64, 80), prompt(64, 81), prompt(50, 82)
    warm(llm.engine, on_disk)
    llm.generate(in_memory, PARAMS)
    assert llm.engine.wait_for_saves(WAIT_S)
    add(llm.engine, {"mem": in_memory, "disk": on_disk, "fresh": fresh})
    outputs = drive(llm.engine)
    assert tokens_of(outputs) == {"mem": baseline(in_memory), "disk": baseline(on_disk),
                                  "fresh": baseline(fresh)}
    assert llm.engine.connector.async_stats()["async_loads"] == 1
    assert outputs["mem"].metrics.tokens_loaded == outputs["disk"].metrics.tokens_loaded == 63
    assert_idle(llm.engine)


# -- the same prompt twice at once ----------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_the_same_prompt_twice_at_once(make_llm, baseline, prefix_caching):
    llm = make_llm(enable_prefix_caching=prefix_caching)
    a = prompt(80, 20)
    warm(llm.engine, a)
    add(llm.engine, {"first": a, "second": a})
    outputs = drive(llm.engine)
    assert tokens_of(outputs) == {"first": baseline(a), "second": baseline(a)}
    assert all(out.metrics.tokens_loaded + out.metrics.tokens_cached_on_device >= 64
               for out in outputs.values())
    assert_idle(llm.engine)


# -- a load that starts inside a chunk ---------------------------------------------------------------


def test_a_load_that_starts_inside_a_chunk(make_llm, baseline, tmp_path):
    """32-token chunks over 16-token blocks: the device holds the prompt's first block (another
    prompt shared it), kvtier the whole prompt; the load stages from the chunk's start and scatters
    from the device hit on, into the right blocks."""
    config = kvtier_config(tmp_path / "disk32", chunk_size=32)
    a = prompt(100, 95)
    writer = make_llm(config)
    warm(writer.engine, a)
    writer.close()
    llm = make_llm(config, enable_prefix_caching=True)
    opener = a[:16] + prompt(30, 96)
    assert llm.generate(opener, PARAMS)[0].token_ids == baseline(opener)  # the device caches a[:16]
    add(llm.engine, {"a": a})
    outputs = drive(llm.engine)
    assert outputs["a"].token_ids == baseline(a)
    m = outputs["a"].metrics
    assert (m.tokens_cached_on_device, m.tokens_loaded) == (16, 96 - 16)
    assert llm.engine.connector.async_stats()["async_loads"] == 1
    assert_idle(llm.engine)


def test_a_whole_prompt_in_kvtier_with_a_partial_last_chunk(make_llm, baseline, tmp_path):
    """save_partial_chunks: the hit is the whole prompt (its last chunk partial); the load stops one
    token short (the last prompt token is always computed), in the background as in line."""
    config = kvtier_config(tmp_path / "partial", save_partial=True)
    a = prompt(70, 97)
    outputs = {}
    for mode in ("on", "off"):
        llm = make_llm(config, asynchronous=mode)
        if mode == "on":  # one token generated: the final save is the prompt, its last chunk partial
            llm.generate(a, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            warm(llm.engine)
        add(llm.engine, {mode: a})
        outputs.update(drive(llm.engine))
        assert outputs[mode].metrics.tokens_loaded == 69
        assert_idle(llm.engine)
        llm.close()
    assert tokens_of(outputs) == {"on": baseline(a), "off": baseline(a)}


# -- preemption while requests wait for their KV ---------------------------------------------------


def test_preemption_pressure_while_requests_wait_for_their_kv(make_llm, gates, baseline):
    """A small paged cache: two loads parked with their blocks while fresh requests grow and preempt
    each other; nobody deadlocks on the parked blocks, everyone answers as with kvtier off."""
    llm = make_llm(kv_cache_bytes=14 * BLOCK_BYTES)
    loads = {"l1": prompt(64, 30), "l2": prompt(64, 31)}
    warm(llm.engine, *loads.values())
    fresh = {"f1": prompt(40, 32), "f2": prompt(40, 33), "f3": prompt(30, 34)}
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    disk = gates[0]
    disk.arm()  # the first load stays parked until the fresh requests have filled the cache
    for rid, ids in {**loads, **fresh}.items():
        llm.engine.add_request(ids, params if rid in fresh else PARAMS, request_id=rid)
    outputs: dict = {}
    step_until(llm.engine, lambda: disk.entered.is_set() and llm.engine.scheduler.pool.num_free == 0,
               "the cache to fill while a load is held", outputs)
    disk.release.set()
    drive(llm.engine, outputs)

    expected = {rid: baseline(ids) for rid, ids in loads.items()}
    expected.update({rid: baseline(ids, params.max_tokens) for rid, ids in fresh.items()})
    assert tokens_of(outputs) == expected
    assert sum(out.metrics.num_preemptions for out in outputs.values()) > 0
    assert_idle(llm.engine)


# -- a stalled tier, a vanished server ---------------------------------------------------------------


def remote_config(tmp_path, url: str, timeout_s: float):
    config = kvtier_config(None)
    return dataclasses.replace(config, remote=RemoteConfig(url=url, timeout_s=timeout_s, retry_after_s=0.0))


def test_a_server_that_stalls_past_the_read_deadline_is_recomputed(make_llm, start_kvtier_server, gates,
                                                                  baseline, tmp_path):
    """kvtier_server stopped (SIGSTOP) once a's load has started reading: the read times out, a
    computes its prompt, and a request decoding meanwhile keeps stepping."""
    server = start_kvtier_server()
    llm = make_llm(remote_config(tmp_path, server.url, timeout_s=0.5))
    a, other = prompt(64, 40), prompt(40, 41)
    warm(llm.engine, a)
    remote = gates[0]
    llm.engine.add_request(other, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           request_id="other")
    llm.engine.step()  # other's prefill: it decodes while a waits
    remote.arm()
    add(llm.engine, {"a": a})
    outputs: dict = {}
    step_until(llm.engine, remote.entered.is_set, "a's load to reach the server", outputs)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        remote.release.set()
        drive(llm.engine, outputs)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert outputs["a"].token_ids == baseline(a)
    assert outputs["other"].token_ids == baseline(other, 12)
    waited = [r for r in llm.engine.step_log if r.num_loading and "other" in r.request_ids]
    assert waited, "other never stepped while a waited for its KV"
    assert_idle(llm.engine)


def test_a_server_killed_mid_load_is_recomputed(make_llm, start_kvtier_server, gates, baseline, tmp_path):
    server = start_kvtier_server()
    llm = make_llm(remote_config(tmp_path, server.url, timeout_s=2.0))
    a = prompt(64, 50)
    warm(llm.engine, a)
    remote = gates[0]
    remote.arm()
    add(llm.engine, {"a": a})
    outputs: dict = {}
    step_until(llm.engine, remote.entered.is_set, "a's load to reach the server", outputs)
    server.kill()
    remote.release.set()
    drive(llm.engine, outputs)
    assert outputs["a"].token_ids == baseline(a)
    assert outputs["a"].metrics.tokens_loaded == 0
    assert_idle(llm.engine)


# -- close with loads in flight -------------------------------------------------------------------


@pytest.mark.parametrize("held", ["load", "prefetch"])
def test_close_with_loads_in_flight_is_bounded_and_leaks_nothing(make_llm, gates, held):
    """A read held in a's load (b's queued behind it), or in a's prefetch (a waits for a seat behind
    a running request): close waits for the read in flight, drops the rest, releases every lease."""
    before = set(threading.enumerate())  # other tests' engines may still have threads of their own
    llm = make_llm(prefetch=held == "prefetch", max_num_seqs=1 if held == "prefetch" else 64)
    a, b = prompt(64, 60), prompt(64, 61)
    warm(llm.engine, a, b)
    disk, engine = gates[0], llm.engine
    disk.arm(engine.kvtier.db.keys(a))
    if held == "prefetch":
        engine.add_request(prompt(30, 62), PARAMS, request_id="seated")  # takes the only seat
    add(llm.engine, {"a": a, "b": b})
    if held == "prefetch":  # one step queues it; more could seat `a`, whose load would then read
        first = engine.scheduler.step + 1
        step_until(llm.engine, lambda: engine.scheduler.step >= first, "one step")
        assert disk.entered.wait(WAIT_S), "a's prefetch never read"
    else:
        step_until(llm.engine, disk.entered.is_set, "a's load to be read")
    assert (engine.scheduler.connector.stats().get("prefetch_requests", 0) > 0) == (held == "prefetch")
    closer = threading.Thread(target=llm.close)
    closer.start()
    disk.release.set()  # the read in flight lands; close waits for it, nothing more
    closer.join(WAIT_S)
    assert not closer.is_alive(), "close never returned"
    assert engine.kvtier.storage.pins.num_leased == 0
    alive = [t.name for t in set(threading.enumerate()) - before
             if t.name.startswith("kvtier-") and t.is_alive()]
    assert not [n for n in alive if n in (ASYNC_THREAD, "kvtier-prefetch", "kvtier-load")], alive


def test_loads_and_prefetch_from_a_config_file(tmp_path, make_llm, baseline):
    """The `loads:` section read from YAML: prefetch on, auto mode; a disk hit loads asynchronously."""
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"chunk_size: 16\ncpu: {{capacity: 4MiB, pin_memory: 'off'}}\n"
                    f"disk: {{path: {tmp_path / 'disk2'}}}\nloads: {{asynchronous: auto, prefetch: true}}\n")
    llm = make_llm(load_config(path, env={}), asynchronous="auto", prefetch=True, max_num_seqs=1)
    a, seated = prompt(64, 70), prompt(30, 71)
    warm(llm.engine, a)
    add(llm.engine, {"seated": seated, "a": a})  # a waits for the seat: its chunks are prefetched meanwhile
    outputs = drive(llm.engine)
    assert outputs["a"].token_ids == baseline(a) and outputs["a"].metrics.tokens_loaded == 63
    assert outputs["seated"].token_ids == baseline(seated)
    # (whether a's load went asynchronous depends on whether the prefetch had landed by then)
    assert llm.engine.scheduler.connector.stats()["prefetch_requests"] == 1
    assert_idle(llm.engine)



# -- prefetch through the engine ------------------------------------------------------------------


def test_a_prefetched_request_loads_from_host_memory(make_llm, gates, baseline):
    """auto: a request waiting for a seat has its disk chunks prefetched; once seated, its hit is all
    in the CPU tier, so its load is synchronous and reads nothing from disk again."""
    llm = make_llm(asynchronous="auto", prefetch=True, max_num_seqs=1)
    a, seated = prompt(64, 72), prompt(30, 73)
    warm(llm.engine, a)
    disk, engine = gates[0], llm.engine
    add(llm.engine, {"seated": seated, "a": a})
    outputs: dict = {}
    first = engine.scheduler.step + 1  # warm() ran steps of its own
    step_until(llm.engine, lambda: engine.scheduler.step >= first, "one step", outputs)
    assert engine.scheduler.connector.prefetcher.wait_idle(WAIT_S)
    drive(llm.engine, outputs)

    assert tokens_of(outputs) == {"seated": baseline(seated), "a": baseline(a)}
    keys = engine.kvtier.db.keys(a)[:4]
    assert sorted(disk.read_keys) == sorted(keys)  # once each, by the prefetch
    assert engine.scheduler.connector.stats()["prefetch_chunks"] == 4
    assert engine.connector.async_stats()["async_loads"] == 0 and outputs["a"].metrics.tokens_loaded == 63
    assert_idle(llm.engine)


@pytest.mark.parametrize("ends", ["aborted", "seated"])
def test_a_waiting_request_that_is_aborted_or_seated_has_its_prefetch_cancelled(make_llm, gates, baseline,
                                                                                 ends):
    """a's prefetch (one chunk a piece) is held on its first piece; then `a` is aborted, or seated
    (its own load reads the rest). Either way the prefetch stops after the piece in flight."""
    llm = make_llm(prefetch=True, max_num_seqs=1, loads={"prefetch_max_bytes_in_flight": CHUNK_BYTES})
    a, seated = prompt(64, 74), prompt(30, 75)
    warm(llm.engine, a)
    disk, engine = gates[0], llm.engine
    keys = engine.kvtier.db.keys(a)[:4]
    disk.arm(keys)
    add(llm.engine, {"seated": seated, "a": a})
    outputs: dict = {}
    # One step seats `seated` and queues a's prefetch; no more until its read is held, so that `a`
    # cannot be seated (and load) first.
    first = engine.scheduler.step + 1  # warm() ran steps of its own
    step_until(llm.engine, lambda: engine.scheduler.step >= first, "one step", outputs)
    assert disk.entered.wait(WAIT_S), "a's prefetch never read"
    if ends == "aborted":  # a was waiting: request_finished cancels its prefetch
        engine.abort("a")
    else:  # seated once `seated` is done: its load is asynchronous (on), the prefetch cancelled
        step_until(llm.engine, lambda: "a" in engine.scheduler.loading, "a to be seated", outputs)
    disk.release.set()
    drive(llm.engine, outputs)

    expected = {"seated": baseline(seated)} | ({"a": baseline(a)} if ends == "seated" else {})
    assert tokens_of(outputs) == expected
    stats = engine.scheduler.connector.stats()
    assert (stats["prefetch_cancelled"], stats["prefetch_chunks"]) == (1, 1)
    assert disk.read_keys[0] == keys[0]  # the prefetch's piece; then a's own load, if seated
    assert disk.read_keys[1:] == [] if ends == "aborted" else set(disk.read_keys[1:]) <= set(keys)
    assert_idle(llm.engine)


def test_the_id_of_a_request_aborted_mid_load_given_to_a_new_request(make_llm, gates, baseline):
    """Re-adding an aborted request's id while its load is in flight is either refused at once
    (ValueError from add_request) or served: never a step that raises."""
    llm = make_llm()
    a = prompt(64, 90)
    warm(llm.engine, a)
    disk, engine = gates[0], llm.engine
    disk.arm(engine.kvtier.db.keys(a))
    add(llm.engine, {"a": a})
    step_until(llm.engine, disk.entered.is_set, "a's load to be read")
    engine.abort("a")
    try:
        add(llm.engine, {"a": a})
        refused = False
    except ValueError:
        refused = True
    outputs: dict = {}
    try:
        for _ in range(3):
            outputs.update({o.request_id: o for o in engine.step() if o.finished})
    finally:
        disk.release.set()
    drive(llm.engine, outputs)
    assert refused or outputs["a"].token_ids == baseline(a)
    assert_idle(llm.engine)
