"""Tests for kvtier/metrics.py: counters, snapshot, latency histograms, Prometheus text, isolation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kvtier.metrics import ENGINE_COUNTERS, LATENCY_BUCKETS, OPERATIONS, POOL_GAUGES, TIER_COUNTERS, Metrics

TIERS = ["cpu", "disk"]


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one series in Prometheus text, e.g. sample(t, "x_total", 'tier="cpu"')."""
    series = f"{name}{{{labels}}}" if labels else name
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} missing from the exposition"
    return float(match.group(1))


def test_snapshot_structure_starts_at_zero():
    snap = Metrics(TIERS).snapshot()
    assert set(snap) == {"tiers", "latency", *ENGINE_COUNTERS, *POOL_GAUGES}
    assert set(snap["tiers"]) == set(TIERS)
    for row in snap["tiers"].values():
        assert set(row) == {"chunks", "bytes", "capacity_bytes", *TIER_COUNTERS}
        assert {"hits", "misses", "evictions"} <= set(row)
        assert all(v == 0 for v in row.values())
    assert all(snap[name] == 0 for name in [*ENGINE_COUNTERS, *POOL_GAUGES])
    assert snap["latency"] == {op: {"count": 0, "mean_s": 0.0} for op in OPERATIONS}


def test_tier_counters_are_per_tier():
    m = Metrics(TIERS)
    m.tier_inc("cpu", "hits", 3)
    m.tier_inc("cpu", "hits")
    m.tier_inc("disk", "misses", 2)
    m.tier_inc("disk", "bytes_read", 32 * 2**20)
    m.tier_inc("cpu", "evictions", 0)  # a zero batch is a no-op
    tiers = m.snapshot()["tiers"]
    assert tiers["cpu"]["hits"] == 4 and tiers["disk"]["hits"] == 0
    assert tiers["disk"]["misses"] == 2 and tiers["cpu"]["misses"] == 0
    assert tiers["disk"]["bytes_read"] == 32 * 2**20
    assert tiers["cpu"]["evictions"] == 0


def test_engine_counters():
    m = Metrics(TIERS)
    m.inc("lookup_tokens", 1024)
    m.inc("hit_tokens", 512)
    m.inc("stored_chunks")
    m.inc("stored_chunks")
    m.inc("promotions", 0)
    snap = m.snapshot()
    assert (snap["lookup_tokens"], snap["hit_tokens"], snap["stored_chunks"]) == (1024, 512, 2)
    assert snap["promotions"] == 0


def test_unknown_counter_names_raise():
    m = Metrics(TIERS)
    with pytest.raises(KeyError):
        m.inc("no_such_counter")
    with pytest.raises(KeyError):
        m.tier_inc("cpu", "no_such_counter")


def test_tier_counters_take_only_this_metrics_tiers_and_whole_counts():
    # A count for a tier the Metrics was not made for reached no snapshot; a float is no count of
    # chunks or bytes (the convention in the module docstring).
    m = Metrics(TIERS)
    with pytest.raises(KeyError, match="tier 'redis'"):
        m.tier_inc("redis", "errors")
    with pytest.raises(KeyError, match="known: bytes_read"):
        m.tier_inc("cpu", "error")
    with pytest.raises(TypeError):
        m.tier_inc("disk", "bytes_read", 1.5)
    with pytest.raises(TypeError):
        m.inc("stored_chunks", 2.0)
    m.tier_inc("disk", "bytes_read", np.int64(4096))  # numpy sizes are whole numbers
    m.tier_inc("disk", "errors", True)
    tiers = m.snapshot()["tiers"]
    assert (tiers["disk"]["bytes_read"], tiers["disk"]["errors"]) == (4096, 1)
    assert tiers["cpu"]["errors"] == 0


def test_counters_cannot_go_down():
    with pytest.raises(ValueError):
        Metrics(TIERS).tier_inc("cpu", "hits", -1)


def test_set_usage_is_a_gauge():
    m = Metrics(TIERS)
    m.set_usage("cpu", chunks=3, nbytes=3 * 4096, capacity=10 * 4096)
    m.set_usage("cpu", chunks=2, nbytes=2 * 4096, capacity=10 * 4096)  # occupancy can fall
    cpu = m.snapshot()["tiers"]["cpu"]
    assert (cpu["chunks"], cpu["bytes"], cpu["capacity_bytes"]) == (2, 2 * 4096, 10 * 4096)
    assert m.snapshot()["tiers"]["disk"]["chunks"] == 0


def test_timed_counts_each_operation():
    m = Metrics(TIERS)
    for _ in range(3):
        with m.timed("lookup"):
            pass
    with m.timed("store"):
        pass
    latency = m.snapshot()["latency"]
    assert latency["lookup"]["count"] == 3
    assert latency["store"]["count"] == 1
    assert latency["retrieve"] == {"count": 0, "mean_s": 0.0}
    assert 0.0 <= latency["lookup"]["mean_s"] < 1.0
    assert m.value("kvtier_operation_seconds_bucket", {"op": "lookup", "le": "+Inf"}) == 3
    # Every observation lands in some finite bucket too (nothing here takes 10 s).
    assert m.value("kvtier_operation_seconds_bucket", {"op": "lookup", "le": str(LATENCY_BUCKETS[-1])}) == 3


def test_timed_records_a_failed_operation_and_reraises():
    m = Metrics(TIERS)
    with pytest.raises(RuntimeError, match="boom"), m.timed("retrieve"):
        raise RuntimeError("boom")
    assert m.snapshot()["latency"]["retrieve"]["count"] == 1


def test_timed_measures_its_own_span_and_takes_an_operation_outside_the_usual_three():
    m = Metrics(TIERS)
    timer = m.timed("lookup")
    with timer:
        pass
    with timer:  # one context object, entered twice: two observations
        pass
    with m.timed("recode"):  # no series made at start, but observed all the same
        pass
    assert m.value("kvtier_operation_seconds_count", {"op": "lookup"}) == 2
    assert m.value("kvtier_operation_seconds_count", {"op": "recode"}) == 1
    assert 'op="recode"' in m.prometheus_text()


def test_prometheus_text():
    m = Metrics(TIERS)
    m.tier_inc("cpu", "hits", 7)
    m.tier_inc("disk", "evictions", 2)
    m.inc("stored_chunks", 5)
    m.set_usage("disk", 4, 4 * 2**20, 2**30)
    with m.timed("lookup"):
        pass
    text = m.prometheus_text()
    assert 'kvtier_tier_hits_total{tier="cpu"} 7.0' in text.splitlines()
    assert sample(text, "kvtier_tier_hits_total", 'tier="cpu"') == 7
    assert sample(text, "kvtier_tier_hits_total", 'tier="disk"') == 0  # series exist at zero
    assert sample(text, "kvtier_tier_evictions_total", 'tier="disk"') == 2
    assert sample(text, "kvtier_stored_chunks_total") == 5
    assert sample(text, "kvtier_tier_chunks", 'tier="disk"') == 4
    assert sample(text, "kvtier_tier_capacity_bytes", 'tier="disk"') == 2**30
    assert sample(text, "kvtier_operation_seconds_count", 'op="lookup"') == 1
    assert "# TYPE kvtier_operation_seconds histogram" in text


def test_every_tier_counter_is_exported_for_every_tier_from_the_start():
    text = Metrics(TIERS).prometheus_text()
    for name in TIER_COUNTERS:
        for tier in TIERS:
            assert sample(text, f"kvtier_tier_{name}_total", f'tier="{tier}"') == 0


def test_two_instances_do_not_share_values():
    a, b = Metrics(TIERS), Metrics(["cpu"])
    a.tier_inc("cpu", "hits", 5)
    a.inc("hit_tokens", 256)
    with a.timed("store"):
        pass
    assert b.snapshot()["tiers"]["cpu"]["hits"] == 0
    assert b.snapshot()["hit_tokens"] == 0
    assert b.snapshot()["latency"]["store"]["count"] == 0
    assert sample(b.prometheus_text(), "kvtier_tier_hits_total", 'tier="cpu"') == 0
    assert a.snapshot()["tiers"]["cpu"]["hits"] == 5
    assert a.registry is not b.registry
