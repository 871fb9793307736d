"""Smoke tests of benchmarks/async_load.py's pieces on the tiny random preset (the benchmark itself
runs random:llama-small for minutes): the setups' configs, the step classes and the summaries on
made-up numbers, and the whole benchmark end to end against the disk tier and a real kvtier_server
process (every long request loads its whole prefix from the lower tier; every decoded gap is timed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import async_load as bench  # noqa: E402

MODEL = "random:llama-tiny"
PREFIXES = (128, 192)
DECODERS, DECODE = 3, 8


def test_each_setup_configures_its_loads_section(tmp_path):
    args = bench.parse_args(["--quick", "--chunk-size", "64"])
    by_name = {s.name: s for s in bench.SETUPS}
    sync = bench.kvtier_config("disk", by_name["sync"], args, tmp_path / "a", None)
    prefetch = bench.kvtier_config("server", by_name["async + prefetch"], args, tmp_path / "b",
                                   "kvtier://127.0.0.1:7000")
    assert sync.disk is not None and sync.remote is None and sync.chunk_size == 64
    assert prefetch.disk is None and prefetch.remote.url == "kvtier://127.0.0.1:7000"
    if hasattr(sync, "loads"):  # issue 15's `loads:` section
        assert (sync.loads.asynchronous, sync.loads.prefetch) == ("off", False)
        assert (prefetch.loads.asynchronous, prefetch.loads.prefetch) == ("on", True)


def test_a_step_is_compute_over_pending_over_quiet():
    assert bench.step_kind(set(), set()) == "quiet"
    assert bench.step_kind({"a"}, set()) == "pending"
    assert bench.step_kind({"a", "b"}, {"b"}) == "compute"


def run(setup: str, itl: list[float], kinds: list[str], backend: str = "disk") -> bench.RunResult:
    return bench.RunResult(backend, setup, itl_s=itl, itl_kind=kinds, ttft_s=[1.0], loaded=[64],
                           tier_hits={"disk": 1})


def test_rounds_pool_and_the_lost_time_is_split_by_step_class():
    floor = [run("no loads", [0.010] * 10, ["quiet"] * 10), run("no loads", [0.010] * 10, ["quiet"] * 10)]
    slow = run("async", [0.010] * 8 + [0.030, 0.050], ["quiet"] * 8 + ["pending", "compute"])
    rows = {r["setup"]: r for r in bench.summarise([*floor, slow])}
    assert rows["no loads"]["rounds"] == 2 and rows["no loads"]["itl_n"] == 20
    assert rows["async"]["lost_pending_s"] == pytest.approx(0.020)
    assert rows["async"]["lost_compute_s"] == pytest.approx(0.040)
    assert rows["async"]["lost_pending_share"] == pytest.approx(1 / 3)
    assert rows["async"]["itl_p99_quiet_ms"] == pytest.approx(10.0)


def test_targets_compare_p99_with_sync_and_with_no_loads():
    def tail(setup: str, seconds: float, kind: str) -> bench.RunResult:  # 97 quiet gaps of 10 ms, 3 slower
        return run(setup, [0.010] * 97 + [seconds] * 3, ["quiet"] * 97 + [kind] * 3)

    rows = bench.summarise([run("no loads", [0.010] * 100, ["quiet"] * 100), tail("sync", 0.100, "compute"),
                            tail("async", 0.014, "pending"), tail("async + prefetch", 0.060, "compute")])
    verdicts = bench.targets(rows)
    assert verdicts["disk / async"]["pass"] and verdicts["disk / async"]["vs_sync"] < 0.5
    assert not verdicts["disk / async + prefetch"]["pass"]  # 0.6x sync, 6x no loads


def test_targets_judge_against_resident_and_show_no_loads_beside_it():
    def tail(setup: str, seconds: float, kind: str) -> bench.RunResult:  # 97 quiet gaps of 10 ms, 3 slower
        return run(setup, [0.010] * 97 + [seconds] * 3, ["quiet"] * 97 + [kind] * 3)

    # The long requests' own question steps (40 ms) are in resident as in every loading setup.
    rows = bench.summarise([run("no loads", [0.010] * 100, ["quiet"] * 100),
                            tail("resident", 0.040, "compute"), tail("sync", 0.200, "compute"),
                            tail("async", 0.050, "compute")])
    verdict = bench.targets(rows)["disk / async"]
    assert verdict["baseline"] == "resident"
    assert verdict["vs_resident"] == pytest.approx(1.25, rel=0.05)
    assert verdict["vs_no_loads"] == pytest.approx(5.0, rel=0.05)
    assert verdict["vs_baseline"] == verdict["vs_resident"] and verdict["pass"]  # failing against no loads
    by_setup = {r["setup"]: r for r in rows}
    assert by_setup["async"]["p99_vs_resident"] == pytest.approx(verdict["vs_resident"])
    assert by_setup["resident"]["p99_vs_no_loads"] == pytest.approx(4.0, rel=0.05)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The whole benchmark, --quick, on the tiny model, against the disk tier and a kvtier_server."""
    out = tmp_path_factory.mktemp("async_load")
    argv = ["--quick", "--model", MODEL, "--chunk-size", "64", "--decoders", str(DECODERS),
            "--decode-tokens", str(DECODE), "--prompt-tokens", "16", "--prefix-tokens", *map(str, PREFIXES),
            "--arrivals", "1", "3", "--dir", str(out / "dir"), "--out", str(out)]
    assert bench.main(argv) == 0
    assert (out / "async_load_quick.png").stat().st_size > 0
    return json.loads((out / "async_load_quick.json").read_text())


def test_every_setup_runs_on_both_backends_and_every_gap_is_timed(report):
    rows = report["summary"]
    assert {(r["backend"], r["setup"]) for r in rows} == {(b, s.name) for b in bench.BACKENDS
                                                          for s in bench.SETUPS}
    for r in rows:
        assert r["itl_n"] == DECODERS * (DECODE - 1)  # every decoding request's gaps, one round
        assert r["itl_p50_ms"] > 0 and r["itl_p99_ms"] >= r["itl_p50_ms"]
    assert report["machine"]["cores"] >= 1 and "load_avg_end" in report["machine"]


def test_the_long_requests_load_their_whole_prefix_from_the_lower_tier(report):
    for r in report["summary"]:
        if r["setup"] == "no loads":
            assert r["loaded"] == 0 and r["steps_compute"] == 0 and r["steps_pending"] == 0
            continue
        if r["setup"] == "resident":  # loads nothing: its own test below
            continue
        lower = "disk" if r["backend"] == "disk" else "remote"
        assert r["loaded"] == sum(PREFIXES)
        assert r["tier_hits"][lower] > 0
        if r["setup"] == "sync":  # each load ran inside the step that admitted its request
            assert r["steps_compute"] == len(PREFIXES) and r["steps_pending"] == 0
        elif r["parks_loads"]:  # the others stepped while a load was in flight (two may land together)
            assert r["steps_pending"] >= 1 and 1 <= r["steps_compute"] <= len(PREFIXES)
    for alone in report["copies_alone"]:
        assert alone["bytes"] == sum(PREFIXES) * report["settings"]["kv_bytes_per_token"]
        assert alone["wall_s"] >= alone["read_wall_s"] > 0  # the reads, then the scatters into blocks


def test_resident_long_requests_are_whole_prefix_device_hits_and_load_nothing(report):
    resident = [r for r in report["summary"] if r["setup"] == "resident"]
    assert {r["backend"] for r in resident} == set(bench.BACKENDS)
    for r in resident:
        assert r["on_device"] == sum(PREFIXES) and r["loaded"] == 0
        assert r["computed"] == len(PREFIXES) * 16  # only each question ran through the model
        assert r["steps_compute"] == len(PREFIXES) and r["steps_pending"] == 0  # admitted and run at once
        assert r["itl_n"] == DECODERS * (DECODE - 1)
    for run_ in report["runs"]:
        if run_["setup"] == "resident":  # per long request, not only in sum
            assert sorted(run_["on_device"]) == sorted(PREFIXES) and run_["loaded"] == [0] * len(PREFIXES)
        elif run_["setup"] != "no loads":  # the loading setups found nothing on the device
            assert run_["on_device"] == [0] * len(PREFIXES)
    for verdict in report["targets"]["pass"].values():
        assert verdict["baseline"] == "resident" and "vs_no_loads" in verdict
