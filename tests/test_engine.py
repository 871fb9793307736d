"""Tests for kvtier/engine.py: the CacheEngine API end to end, restart persistence across processes,
namespace separation on a shared disk directory, and a concurrency smoke test."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHUNK, REPO, seeded_kv, seeded_tokens, small_layout

from kvtier import CacheEngine, KVLayout
from kvtier.errors import UnknownTier
from kvtier.invariants import PoolStats
from kvtier.metrics import TIER_COUNTERS

TESTS = Path(__file__).parent


def counters(engine: CacheEngine, name: str) -> dict[str, int]:
    return {tier: row[name] for tier, row in engine.stats()["tiers"].items()}


def chunks_per_tier(engine: CacheEngine) -> dict[str, int]:
    return counters(engine, "chunks")


# -- lookup and retrieve -------------------------------------------------------------------------


def test_lookup_is_chunk_aligned_and_does_no_payload_io(make_engine, layout):
    engine = make_engine("cpu_disk")
    tokens, kv = seeded_tokens(3 * CHUNK + 7, 1), seeded_kv(layout, 3 * CHUNK + 7, 1)
    engine.store(tokens, kv)
    engine.flush()
    engine.clear("cpu")  # the hits below are on disk: a payload read would show in bytes_read
    before = counters(engine, "bytes_read")

    assert engine.lookup(tokens) == 3 * CHUNK
    assert engine.lookup(tokens[: 2 * CHUNK + 3]) == 2 * CHUNK
    assert engine.lookup(tokens[: CHUNK - 1]) == 0
    assert engine.lookup(seeded_tokens(3 * CHUNK, 2)) == 0
    assert engine.lookup([]) == 0

    assert counters(engine, "bytes_read") == before
    assert counters(engine, "hits") == {"cpu": 0, "disk": 0}
    assert chunks_per_tier(engine) == {"cpu": 0, "disk": 3}  # nothing promoted by a lookup
    stats = engine.stats()
    assert stats["lookup_tokens"] == (3 * CHUNK + 7) + (2 * CHUNK + 3) + (CHUNK - 1) + 3 * CHUNK
    assert stats["hit_tokens"] == 3 * CHUNK + 2 * CHUNK and stats["latency"]["lookup"]["count"] == 5


def test_tokens_may_be_a_list_an_array_or_a_tensor(make_engine, layout):
    engine = make_engine("cpu")
    tokens, kv = seeded_tokens(2 * CHUNK, 3), seeded_kv(layout, 2 * CHUNK, 3)
    engine.store(tokens.tolist(), kv)
    assert engine.lookup(tokens) == engine.lookup(tokens.numpy().astype(np.int32)) == 2 * CHUNK
    got, n = engine.retrieve(np.asarray(tokens.tolist(), dtype=np.int64))
    assert n == 2 * CHUNK and torch.equal(got, kv)


def test_retrieve_into_out_fills_the_hit_prefix_and_leaves_the_rest(make_engine, layout):
    engine = make_engine("cpu")
    tokens, kv = seeded_tokens(4 * CHUNK, 4), seeded_kv(layout, 4 * CHUNK, 4)
    engine.store(tokens[: 2 * CHUNK], kv[:, :, : 2 * CHUNK])
    out = torch.full(layout.chunk_shape(4 * CHUNK + 8), -1.0, dtype=layout.dtype)

    got, n = engine.retrieve(tokens, out=out)

    assert n == 2 * CHUNK and got.shape == layout.chunk_shape(2 * CHUNK)
    assert got.data_ptr() == out.data_ptr()  # a narrowed view of `out`, not a copy
    assert torch.equal(out[:, :, :n], kv[:, :, :n])
    assert bool((out[:, :, n:] == -1).all())


def test_retrieve_of_an_unknown_prompt_is_empty(make_engine, layout):
    engine = make_engine("cpu_disk")
    got, n = engine.retrieve(seeded_tokens(2 * CHUNK, 5))
    assert n == 0 and got.shape == layout.chunk_shape(0)
    assert engine.stats()["hit_tokens"] == 0


# -- stores and retrieves from a chunk boundary (the connector's saves and loads) -----------------


def test_store_and_retrieve_from_a_chunk_boundary_are_bit_exact(make_engine, layout):
    engine = make_engine("cpu")
    tokens, kv = seeded_tokens(4 * CHUNK + 5, 30), seeded_kv(layout, 4 * CHUNK + 5, 30)
    assert engine.store(tokens[: 2 * CHUNK], kv[:, :, : 2 * CHUNK]) == 2

    assert engine.store(tokens, kv[:, :, 2 * CHUNK:], start=2 * CHUNK) == 2  # the 5-token tail is not kept
    assert engine.lookup(tokens) == 4 * CHUNK

    for start in (0, CHUNK, 2 * CHUNK, 3 * CHUNK):
        got, n = engine.retrieve(tokens, start=start)
        assert n == 4 * CHUNK and torch.equal(got, kv[:, :, start: 4 * CHUNK])
    out = torch.full(layout.chunk_shape(4 * CHUNK + 5 - CHUNK), -1.0, dtype=layout.dtype)
    got, n = engine.retrieve(tokens, out=out, start=CHUNK)  # len(tokens) - start always suffices
    assert n == 4 * CHUNK and got.data_ptr() == out.data_ptr()
    assert torch.equal(got, kv[:, :, CHUNK: 4 * CHUNK])
    assert engine.stats()["deduplicated_chunks"] == 0


def test_chunks_stored_after_a_missing_prefix_are_not_a_hit(make_engine, layout):
    engine = make_engine("cpu")
    tokens, kv = seeded_tokens(3 * CHUNK, 31), seeded_kv(layout, 3 * CHUNK, 31)
    assert engine.store(tokens, kv[:, :, CHUNK:], start=CHUNK) == 2

    assert engine.lookup(tokens) == 0  # lookups are prefix-only
    got, n = engine.retrieve(tokens, start=CHUNK)
    assert n == 0 and got.shape[2] == 0
    engine.store(tokens[:CHUNK], kv[:, :, :CHUNK])
    assert engine.retrieve(tokens, start=CHUNK)[1] == 3 * CHUNK


@pytest.mark.parametrize("start", [-CHUNK, 1, CHUNK + 3], ids=["negative", "one", "mid-chunk"])
def test_a_start_off_a_chunk_boundary_is_a_value_error(make_engine, layout, start):
    engine = make_engine("cpu")
    tokens, kv = seeded_tokens(3 * CHUNK, 32), seeded_kv(layout, 3 * CHUNK, 32)
    with pytest.raises(ValueError, match=f"start must be a non-negative multiple of {CHUNK}, got {start}"):
        engine.store(tokens, kv[:, :, max(start, 0):], start=start)
    with pytest.raises(ValueError, match="start must be a non-negative multiple"):
        engine.retrieve(tokens, start=start)
    assert engine.stats()["stored_chunks"] == 0


def test_store_from_a_start_wants_the_kv_of_the_tokens_after_it(make_engine, layout):
    engine = make_engine("cpu")
    tokens, kv = seeded_tokens(3 * CHUNK, 33), seeded_kv(layout, 3 * CHUNK, 33)
    with pytest.raises(ValueError):
        engine.store(tokens, kv, start=CHUNK)  # all 48 tokens' KV for the 32 after the start
    assert engine.stats()["stored_chunks"] == 0


# -- leases --------------------------------------------------------------------------------------


def test_a_leased_chunk_is_not_evicted_until_released(make_engine, layout):
    engine = make_engine("cpu", cpu__capacity="16KiB")  # four 4 KiB slabs
    leased_tokens, leased_kv = seeded_tokens(2 * CHUNK, 34), seeded_kv(layout, 2 * CHUNK, 34)
    engine.store(leased_tokens, leased_kv)
    keys = engine.lease(leased_tokens, CHUNK + 1)  # the chunks covering 17 tokens: both
    assert keys == engine.db.keys(leased_tokens) and engine.stats()["pool"]["leased_chunks"] == 2

    engine.store(seeded_tokens(4 * CHUNK, 35), seeded_kv(layout, 4 * CHUNK, 35))  # wants every slab

    got, n = engine.retrieve(leased_tokens)
    assert n == 2 * CHUNK and torch.equal(got, leased_kv)
    assert engine.stats()["tiers"]["cpu"]["rejected"] == 2  # what did not fit beside the lease

    engine.release(keys)
    assert engine.stats()["pool"]["leased_chunks"] == 0
    engine.store(seeded_tokens(4 * CHUNK, 36), seeded_kv(layout, 4 * CHUNK, 36))
    assert engine.lookup(leased_tokens) == 0  # evictable again, and evicted


def test_leases_are_counted_per_caller(make_engine, layout):
    engine = make_engine("cpu", cpu__capacity="16KiB")
    tokens, kv = seeded_tokens(2 * CHUNK, 37), seeded_kv(layout, 2 * CHUNK, 37)
    engine.store(tokens, kv)
    first, second = engine.lease(tokens, 2 * CHUNK), engine.lease(tokens, 2 * CHUNK)

    engine.release(first)
    engine.store(seeded_tokens(4 * CHUNK, 38), seeded_kv(layout, 4 * CHUNK, 38))

    assert engine.lookup(tokens) == 2 * CHUNK  # the second lease still holds both chunks
    engine.release(second)
    assert engine.stats()["pool"]["leased_chunks"] == 0
    assert engine.lease(tokens, 0) == []


def test_releasing_more_than_was_leased_is_a_runtime_error(make_engine, layout):
    engine = make_engine("cpu")
    tokens = seeded_tokens(CHUNK, 39)
    engine.store(tokens, seeded_kv(layout, CHUNK, 39))
    keys = engine.lease(tokens, CHUNK)
    engine.release(keys)
    with pytest.raises(RuntimeError, match="released more often than taken"):
        engine.release(keys)


def store_in_pieces(engine: CacheEngine, tokens: torch.Tensor, kv: torch.Tensor, piece: int) -> None:
    """Store `tokens` `piece` tokens at a time, letting write-through land in between."""
    for start in range(0, len(tokens), piece):
        engine.store(tokens[:start + piece], kv[:, :, start:start + piece], start=start)
        assert engine.flush(timeout=10)


def test_a_leased_prompt_larger_than_the_cpu_tier_is_loaded_whole(make_engine, layout):
    """Bug: a lease pinned every promised chunk in host memory, so the first wave of a retrieve
    filled the CPU tier and the next got no slab: a leased 24-chunk prompt through 16 slabs loaded
    0 chunks."""
    engine = make_engine("cpu_disk", cpu__capacity="64KiB")  # 16 one-chunk slabs
    tokens, kv = seeded_tokens(24 * CHUNK, 60), seeded_kv(layout, 24 * CHUNK, 60)
    store_in_pieces(engine, tokens, kv, 4 * CHUNK)
    assert engine.lookup(tokens) == 24 * CHUNK
    keys = engine.lease(tokens, 24 * CHUNK)

    got, n = engine.retrieve(tokens)

    engine.release(keys)
    assert n == 24 * CHUNK and torch.equal(got, kv)
    assert engine.stats()["pool"]["used_slabs"] <= 16


def test_concurrent_leased_prompts_larger_than_the_cpu_tier_do_not_starve_each_other(make_engine, layout):
    """Bug: two leased long prompts loading at once each held what the other needed; both got 0."""
    engine = make_engine("cpu_disk", cpu__capacity="64KiB")
    prompts = [(seeded_tokens(24 * CHUNK, seed), seeded_kv(layout, 24 * CHUNK, seed)) for seed in (61, 62)]
    for tokens, kv in prompts:
        store_in_pieces(engine, tokens, kv, 4 * CHUNK)
    leases = [engine.lease(tokens, 24 * CHUNK) for tokens, _ in prompts]
    start = threading.Barrier(2)

    def load(tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        start.wait(timeout=10)
        return engine.retrieve(tokens)

    with ThreadPoolExecutor(2) as pool:
        results = [f.result(timeout=30) for f in [pool.submit(load, tokens) for tokens, _ in prompts]]

    for keys in leases:
        engine.release(keys)
    for (got, n), (_, kv) in zip(results, prompts):
        assert n == 24 * CHUNK and torch.equal(got, kv)
    pool_stats = engine.stats()["pool"]
    assert pool_stats["leased_chunks"] == 0 and set(pool_stats["owners"]) <= {"cpu"}


# -- argument validation -------------------------------------------------------------------------


@pytest.mark.parametrize(("kv_shape", "dtype", "message"), [
    ((2, 2, 2 * CHUNK, 32), torch.float32, "dtype"),
    ((2, 3, 2 * CHUNK, 32), torch.float16, "layers=2"),
    ((2, 2, 2 * CHUNK, 64), torch.float16, "expected \\[2, 2, T, 32\\]"),
    ((1, 2, 2 * CHUNK, 32), torch.float16, "does not match the layout"),
    ((2, 2, 2 * CHUNK - 1, 32), torch.float16, "31 tokens but 32 tokens were given"),
], ids=["dtype", "layers", "hidden", "not_kv", "token_count"])
def test_store_rejects_kv_that_does_not_match(make_engine, kv_shape, dtype, message):
    engine = make_engine("cpu")
    tokens = seeded_tokens(2 * CHUNK, 6)
    with pytest.raises(ValueError, match=message):
        engine.store(tokens, torch.zeros(kv_shape, dtype=dtype))
    assert engine.lookup(tokens) == 0 and engine.stats()["stored_chunks"] == 0


@pytest.mark.parametrize(("out_shape", "dtype", "message"), [
    ((2, 2, CHUNK, 32), torch.float16, "holds 16 tokens but 32"),
    ((2, 2, 2 * CHUNK, 32), torch.bfloat16, "dtype"),
    ((2, 2, 2 * CHUNK, 16), torch.float16, "does not match the layout"),
], ids=["too_short", "dtype", "hidden"])
def test_retrieve_rejects_an_out_tensor_that_does_not_match(make_engine, layout, out_shape, dtype, message):
    engine = make_engine("cpu")
    tokens = seeded_tokens(2 * CHUNK, 7)
    engine.store(tokens, seeded_kv(layout, 2 * CHUNK, 7))
    with pytest.raises(ValueError, match=message):
        engine.retrieve(tokens, out=torch.zeros(out_shape, dtype=dtype))


@pytest.mark.parametrize("tokens", [[[1, 2], [3, 4]], [-1, 5], [0.5, 1.5]], ids=["2d", "negative", "float"])
def test_bad_token_ids_raise_value_error(make_engine, tokens):
    engine = make_engine("cpu")
    with pytest.raises(ValueError, match="token"):
        engine.lookup(tokens)


# -- administration ------------------------------------------------------------------------------


def test_pin_and_unpin_return_how_many_chunks_changed(make_engine, layout):
    engine = make_engine("cpu")
    tokens, kv = seeded_tokens(4 * CHUNK, 8), seeded_kv(layout, 4 * CHUNK, 8)
    engine.store(tokens[: 2 * CHUNK], kv[:, :, : 2 * CHUNK])

    assert engine.pin(tokens) == 2  # only the cached prefix
    assert engine.pin(tokens) == 0
    assert engine.pin(seeded_tokens(2 * CHUNK, 9)) == 0
    assert engine.stats()["pool"]["pinned_chunks"] == 2
    assert engine.unpin(tokens) == 2
    assert engine.unpin(tokens) == 0
    assert engine.stats()["pool"]["pinned_chunks"] == 0


def test_move_to_disk_and_back_reports_counts_and_locations(make_engine, layout):
    engine = make_engine("cpu_disk")
    tokens, kv = seeded_tokens(4 * CHUNK, 10), seeded_kv(layout, 4 * CHUNK, 10)
    engine.store(tokens, kv)
    engine.flush()
    assert chunks_per_tier(engine) == {"cpu": 4, "disk": 4}  # write-through

    assert engine.move(tokens, "disk") == 4
    assert chunks_per_tier(engine) == {"cpu": 0, "disk": 4}
    assert engine.stats()["pool"]["used_slabs"] == 0
    assert engine.move(tokens[:CHUNK], "disk") == 0  # nothing left in CPU to move

    assert engine.move(tokens, "cpu") == 4
    assert chunks_per_tier(engine) == {"cpu": 4, "disk": 0}
    assert engine.move(seeded_tokens(2 * CHUNK, 11), "cpu") == 0
    got, n = engine.retrieve(tokens)
    assert n == 4 * CHUNK and torch.equal(got, kv)
    assert counters(engine, "hits") == {"cpu": 4, "disk": 4}  # disk hits came from the move up


def test_clear_one_tier_or_all(make_engine, layout, tmp_path):
    engine = make_engine("cpu_disk")
    tokens, kv = seeded_tokens(3 * CHUNK, 12), seeded_kv(layout, 3 * CHUNK, 12)
    engine.store(tokens, kv)
    engine.pin(tokens)

    engine.clear("cpu")
    assert chunks_per_tier(engine) == {"cpu": 0, "disk": 3}
    assert engine.lookup(tokens) == 3 * CHUNK
    engine.clear("disk")
    assert chunks_per_tier(engine) == {"cpu": 0, "disk": 0}
    assert engine.stats()["pool"]["pinned_chunks"] == 3  # clearing a tier keeps the pins

    engine.store(tokens, kv)
    engine.clear()
    stats = engine.stats()
    assert chunks_per_tier(engine) == {"cpu": 0, "disk": 0}
    pool = stats["pool"]
    assert (pool["used_bytes"], pool["owners"], pool["pinned_chunks"]) == (0, {}, 0)
    assert engine.lookup(tokens) == 0
    assert not list(tmp_path.glob("disk/**/*.kvr"))


@pytest.mark.parametrize("config", ["cpu", "cpu_disk"])
def test_unknown_tier_name_is_a_value_error(make_engine, layout, config):
    engine = make_engine(config)
    tokens = seeded_tokens(CHUNK, 13)
    engine.store(tokens, seeded_kv(layout, CHUNK, 13))
    with pytest.raises(ValueError, match="no tier named 'tape'"):
        engine.move(tokens, "tape")
    with pytest.raises(ValueError, match="no tier named 'tape'"):
        engine.clear("tape")
    assert engine.lookup(tokens) == CHUNK  # the failed calls changed nothing


def test_pool_stats_are_typed_inside_and_the_same_plain_map_in_stats(make_engine, layout):
    engine = make_engine("cpu_disk")
    engine.store(seeded_tokens(CHUNK, 22), seeded_kv(layout, CHUNK, 22))
    typed = engine.storage.pool_stats()
    assert isinstance(typed, PoolStats) and (typed.used_slabs, typed.owners) == (1, {"cpu": 1})
    pool = engine.stats()["pool"]
    assert list(pool) == ["slab_bytes", "slabs", "used_slabs", "used_bytes", "owners", "pinned_chunks",
                          "leased_chunks", "demoting_chunks", "pending_writes", "failed_writes",
                          "pinned_memory", "platform", "capabilities"]
    assert (pool["used_slabs"], pool["owners"], pool["pinned_memory"]) == (1, {"cpu": 1}, False)
    assert (pool["platform"], pool["capabilities"]["gds"]) == ("cpu", False)  # (no GPU here)


def test_tier_names_are_resolved_by_the_engine(make_engine):
    engine = make_engine("cpu_disk")
    assert engine.tier("cpu") is engine.storage.cpu and engine.tier("disk") is engine.storage.lower[0]
    with pytest.raises(UnknownTier, match=r"no tier named 'tape'; this engine has \['cpu', 'disk'\]"):
        engine.tier("tape")


def test_a_retrieve_given_the_hit_asks_no_tier_whether_it_holds_the_chunks(make_engine, layout, monkeypatch):
    engine = make_engine("cpu_disk")
    tokens, kv = seeded_tokens(3 * CHUNK, 21), seeded_kv(layout, 3 * CHUNK, 21)
    engine.store(tokens, kv)
    assert engine.flush(timeout=10)
    engine.clear("cpu")
    engine.store(tokens[:CHUNK], kv[:, :, :CHUNK])  # chunk 0 in CPU, chunks 1-2 on disk only
    hit = engine.lookup(tokens)
    disk, asked = engine.storage.lower[0], []
    monkeypatch.setattr(disk, "has", lambda keys: asked.append(keys) or [False] * len(keys))  # counts only

    got, n = engine.retrieve(tokens, known_hit=hit)

    assert (hit, n, asked) == (3 * CHUNK, 3 * CHUNK, []) and torch.equal(got, kv)
    engine.clear()
    engine.store(tokens[:CHUNK], kv[:, :, :CHUNK])
    got, n = engine.retrieve(tokens, known_hit=hit)  # a hit gone by now: the prefix ends there
    assert n == CHUNK and torch.equal(got, kv[:, :, :CHUNK]) and asked == []
    assert engine.retrieve(tokens, known_hit=CHUNK + 5)[1] == CHUNK  # whole chunks within the hit only


@pytest.mark.parametrize("known_hit, error", [(-CHUNK, ValueError), (True, ValueError),
                                              (2.0 * CHUNK, TypeError), ("32", TypeError)])
def test_a_known_hit_that_is_not_a_token_count_is_refused_not_read_as_a_miss(make_engine, layout, known_hit,
                                                                            error):
    # A negative hit was read as "no chunk" and a float rounded down: a caller's bug passed as a
    # silent miss (the prompt recomputed) instead of an error.
    engine = make_engine("cpu_disk")
    tokens, kv = seeded_tokens(3 * CHUNK, 22), seeded_kv(layout, 3 * CHUNK, 22)
    engine.store(tokens, kv)
    with pytest.raises(error):
        engine.retrieve(tokens, known_hit=known_hit)
    got, n = engine.retrieve(tokens, known_hit=np.int64(2 * CHUNK))  # any integer type will do
    assert n == 2 * CHUNK and torch.equal(got, kv[:, :, :n])
    assert engine.retrieve(tokens, known_hit=0)[1] == 0
    assert engine.flush(timeout=10)
    engine.storage.check_invariants()


def test_cpu_only_engine_has_no_disk_tier(make_engine, layout):
    engine = make_engine("cpu")
    tokens = seeded_tokens(CHUNK, 14)
    engine.store(tokens, seeded_kv(layout, CHUNK, 14))
    with pytest.raises(ValueError, match="no tier named 'disk'"):
        engine.move(tokens, "disk")
    assert engine.move(tokens, "cpu") == 0  # already there


# -- observability -------------------------------------------------------------------------------


def test_stats_have_per_tier_counters_and_occupancy(make_engine, layout):
    engine = make_engine("cpu_disk")
    tokens, kv = seeded_tokens(2 * CHUNK, 15), seeded_kv(layout, 2 * CHUNK, 15)
    engine.store(tokens, kv)
    engine.flush()
    engine.retrieve(tokens)

    stats = engine.stats()
    assert set(stats["tiers"]) == {"cpu", "disk"}
    for row in stats["tiers"].values():
        assert {"chunks", "bytes", "capacity_bytes", "hits", "misses", "evictions"} <= set(row)
        assert set(TIER_COUNTERS) <= set(row)
    cpu, disk = stats["tiers"]["cpu"], stats["tiers"]["disk"]
    assert (cpu["chunks"], cpu["bytes"], cpu["hits"]) == (2, layout.chunk_bytes(2 * CHUNK), 2)
    assert (disk["chunks"], disk["bytes_written"]) == (2, layout.chunk_bytes(2 * CHUNK))
    assert cpu["capacity_bytes"] == 1 << 20
    assert stats["stored_chunks"] == 2 and stats["hit_tokens"] == 2 * CHUNK
    assert {op: row["count"] for op, row in stats["latency"].items()} == {
        "lookup": 0, "store": 1, "retrieve": 1}


def test_prometheus_text_exports_tier_metrics(make_engine, layout):
    engine = make_engine("cpu_disk")
    tokens = seeded_tokens(2 * CHUNK, 16)
    engine.store(tokens, seeded_kv(layout, 2 * CHUNK, 16))
    engine.flush()
    engine.clear("cpu")
    engine.retrieve(tokens)

    text = engine.prometheus_text()

    assert 'kvtier_tier_hits_total{tier="disk"} 2.0' in text
    assert 'kvtier_tier_chunks{tier="cpu"} 2.0' in text  # promoted on the hit
    assert 'kvtier_tier_chunks{tier="disk"} 2.0' in text
    assert 'kvtier_tier_corrupt_total{tier="disk"} 0.0' in text
    assert "kvtier_operation_seconds_count{op=\"retrieve\"} 1.0" in text


def test_prometheus_text_and_stats_export_lease_pin_and_pool_gauges(make_engine, layout):
    engine = make_engine("cpu_disk", cpu__capacity="64KiB")
    tokens = seeded_tokens(3 * CHUNK, 17)
    engine.store(tokens, seeded_kv(layout, 3 * CHUNK, 17))
    engine.pin(tokens[:CHUNK])
    keys = engine.lease(tokens, 2 * CHUNK)

    text, stats = engine.prometheus_text(), engine.stats()

    for line in ["kvtier_leased_chunks 2.0", "kvtier_pinned_chunks 1.0", "kvtier_pool_slabs_used 3.0",
                 "kvtier_pool_slabs_total 16.0", f"kvtier_pool_bytes_used {3 * 4096}.0"]:
        assert line in text.splitlines()
    assert {k: stats[k] for k in ("leased_chunks", "pinned_chunks", "pool_slabs_used", "pool_slabs_total",
                                  "pool_bytes_used")} == {"leased_chunks": 2, "pinned_chunks": 1,
                                                          "pool_slabs_used": 3, "pool_slabs_total": 16,
                                                          "pool_bytes_used": 3 * 4096}
    engine.release(keys)
    assert "kvtier_leased_chunks 0.0" in engine.prometheus_text().splitlines()


def test_context_manager_closes_and_drains_background_writes(make_engine, layout, tmp_path):
    tokens, kv = seeded_tokens(3 * CHUNK, 17), seeded_kv(layout, 3 * CHUNK, 17)
    with make_engine("cpu_disk") as engine:
        assert isinstance(engine, CacheEngine)
        engine.store(tokens, kv)  # no flush: closing must land the writes
    assert len(list(tmp_path.glob("disk/**/*.kvr"))) == 3

    reopened = make_engine("cpu_disk")
    got, n = reopened.retrieve(tokens)
    assert n == 3 * CHUNK and torch.equal(got, kv)


# -- restart persistence -------------------------------------------------------------------------

WRITER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import CHUNK, REPO, seeded_kv, seeded_tokens, small_layout
from kvtier import CacheEngine, load_config

env = {{"KVTIER_DISK__PATH": {disk!r}, "KVTIER_CHUNK_SIZE": str(CHUNK), "KVTIER_CPU__PIN_MEMORY": "off"}}
layout = small_layout()
with CacheEngine(load_config(REPO / "configs" / "cpu_disk.yaml", env=env), layout, "restart") as engine:
    print(engine.store(seeded_tokens(5 * CHUNK, 42), seeded_kv(layout, 5 * CHUNK, 42)))
"""


def test_a_new_process_retrieves_what_a_closed_one_stored(make_engine, layout, tmp_path):
    disk = tmp_path / "disk"
    script = WRITER.format(tests=str(TESTS), disk=str(disk))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5"]

    engine = make_engine("cpu_disk", model_id="restart", disk_path=disk)
    tokens, expected = seeded_tokens(5 * CHUNK, 42), seeded_kv(layout, 5 * CHUNK, 42)
    assert engine.lookup(tokens) == 5 * CHUNK
    got, n = engine.retrieve(tokens)

    assert n == 5 * CHUNK and torch.equal(got, expected)
    assert counters(engine, "hits") == {"cpu": 0, "disk": 5}
    assert engine.stats()["tiers"]["disk"]["corrupt"] == 0


# -- namespaces ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("other_model", "other_layout", "other_salt"), [
    ("model-b", small_layout(), ""),
    ("model-a", small_layout(torch.bfloat16), ""),
    ("model-a", KVLayout(num_layers=2, num_kv_heads=4, head_dim=8), ""),  # same bytes per token
    ("model-a", small_layout(), "lora-7"),
], ids=["model_id", "dtype", "geometry", "salt"])
def test_engines_sharing_a_disk_directory_do_not_see_each_others_chunks(
        make_engine, tmp_path, other_model, other_layout, other_salt):
    first = make_engine("cpu_disk", small_layout(), model_id="model-a")
    tokens = seeded_tokens(3 * CHUNK, 18)
    first.store(tokens, seeded_kv(first.layout, 3 * CHUNK, 18))
    first.flush()

    other = make_engine("cpu_disk", other_layout, model_id=other_model, salt=other_salt)

    assert other.storage.lower[0].usage().chunks == 0  # its own namespace directory is empty ...
    assert other.lookup(tokens) == 0  # ... and nothing of the first engine's matches
    got, n = other.retrieve(tokens)
    assert n == 0 and counters(other, "hits") == {"cpu": 0, "disk": 0}
    assert first.lookup(tokens) == 3 * CHUNK
    other.store(tokens, seeded_kv(other_layout, 3 * CHUNK, 19))
    other.flush()
    assert len({p.parent.parent.name for p in tmp_path.glob("disk/**/*.kvr")}) == 2  # two namespaces

    other.clear()  # a clear, like the byte bound, covers the engine's own namespace only
    assert len(list(tmp_path.glob("disk/**/*.kvr"))) == 3
    first.clear("cpu")
    assert first.retrieve(tokens)[1] == 3 * CHUNK


# -- concurrency ---------------------------------------------------------------------------------


def test_threads_storing_and_retrieving_overlapping_prompts_get_exact_kv(make_engine, layout):
    # KV is a function of (token, position), so prompts that share a prefix share its KV, as in a
    # real model; every retrieve can then be checked against the KV of the prompt it asked for.
    engine = make_engine("cpu_disk", cpu__capacity="64KiB")  # 16 slabs: eviction and promotion race
    g = torch.Generator().manual_seed(0)
    by_token = torch.randn(2, layout.num_layers, 64, layout.hidden, generator=g).to(layout.dtype)
    by_position = torch.randn(2, layout.num_layers, 4 * CHUNK, layout.hidden, generator=g).to(layout.dtype)
    prefixes = [torch.randint(0, 64, (2 * CHUNK,), generator=g) for _ in range(4)]
    prompts = [torch.cat([p, torch.randint(0, 64, (2 * CHUNK,), generator=g)])
               for p in prefixes for _ in range(3)]

    def kv_of(tokens: torch.Tensor) -> torch.Tensor:
        return by_token[:, :, tokens] + by_position[:, :, : len(tokens)]

    def worker(seed: int) -> int:
        rng = random.Random(seed)
        served = 0
        for _ in range(40):
            tokens = rng.choice(prompts)
            if rng.random() < 0.5:
                engine.store(tokens, kv_of(tokens))
            got, n = engine.retrieve(tokens)
            assert n % CHUNK == 0 and n <= len(tokens)
            assert torch.equal(got, kv_of(tokens)[:, :, :n])
            served += n
        return served

    with ThreadPoolExecutor(4) as pool:
        served = [f.result(timeout=30) for f in [pool.submit(worker, seed) for seed in range(4)]]

    assert sum(served) > 0
    assert engine.flush(timeout=10)
    pool_stats = engine.stats()["pool"]
    assert set(pool_stats["owners"]) <= {"cpu"}  # every read slab was returned or promoted
    assert pool_stats["used_slabs"] == engine.stats()["tiers"]["cpu"]["chunks"]
    assert pool_stats["demoting_chunks"] == 0 and pool_stats["pending_writes"] == 0


def test_a_local_probe_with_no_answer_is_not_timed_as_a_lookup(make_engine, layout):
    """Review: the connector's local probe (`lookup(..., only=local tiers)`) that answers None was
    timed as a lookup, and the full lookup that follows was timed again: two samples per request."""
    engine = make_engine("cpu_disk")
    tokens = seeded_tokens(4 * CHUNK, 21)
    count = lambda: engine.metrics.value("kvtier_operation_seconds_count", {"op": "lookup"})  # noqa: E731
    before = count()
    assert engine.lookup(tokens, only=engine.storage.lower) is None  # nothing held: no answer
    assert count() == before
    engine.store(tokens, seeded_kv(layout, 4 * CHUNK, 21))
    assert engine.lookup(tokens, only=engine.storage.lower) == 4 * CHUNK and count() == before + 1
    assert engine.lookup(tokens) == 4 * CHUNK and count() == before + 2
