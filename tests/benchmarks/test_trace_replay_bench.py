"""Tests for benchmarks/trace_replay.py: on the first requests of the Mooncake conversation trace
(600 CPU only, 300 CPU + disk: a disk replay writes a file per chunk, ~8 s for 300 requests here), a
real CacheEngine and the model-free simulator (`kvtier.sim.tiers.replay_tiers`) count the same hit
tokens within MAX_DIFF_POINTS, at capacities that evict most of what is stored, under every
registered eviction policy (the engine's tiers built from the config's `policy` keys); and the
command line's capacity and policy forms.

The simulator runs on the engine's own key values (`engine_chunks`) and makes room for a store's
or a retrieve's chunks before indexing them, as the CPU tier does, so the two count exactly the same
tokens here (0.000 points under every policy, measured). Exact equality is asserted for the CPU tier
alone; with a disk tier the order in which its I/O threads land a request's writes may vary, and so
may its policy's order, so there the bound is MAX_DIFF_POINTS.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import trace_replay as bench  # noqa: E402

from kvtier.policy_registry import POLICIES  # noqa: E402

TRACE = Path(__file__).resolve().parents[3] / "shared" / "workloads" / "mooncake_conversation_trace.jsonl"
REQUESTS = {"cpu": 600, "cpu+disk": 300}  # 13,712 and 7,814 distinct blocks; the longest prompt 473 chunks
MAX_DIFF_POINTS = 0.5


@pytest.fixture(scope="module")
def trace():
    if not TRACE.exists():
        pytest.skip(f"no trace at {TRACE}")
    return bench.load_trace(TRACE, max(REQUESTS.values())), bench.Prompts()


def capacity(requests, text: str) -> int:
    return bench.parse_capacity(text).resolve(bench.distinct_blocks(requests))


@pytest.mark.parametrize("policy", list(POLICIES))  # every policy registered when the tests are collected
@pytest.mark.parametrize("config", ["cpu", "cpu+disk"])
def test_the_engine_hits_what_the_simulator_hits(trace, tmp_path, policy, config):
    requests, prompts = trace
    requests = requests[:REQUESTS[config]]
    chunked = bench.engine_chunks(requests, prompts)
    if config == "cpu":  # 1,370 chunks: every prompt fits, and most of what is stored is evicted
        result = bench.Result("cpu", policy, "5%", capacity(requests, "5%"))
    else:  # 156 chunks of CPU (the longest prompts stream through in waves) over 780 on disk
        result = bench.Result("cpu+disk", policy, "1%", capacity(requests, "1%"),
                              "5%", capacity(requests, "5%"))
    bench.run(requests, chunked, prompts, result, tmp_path)
    print(f"{config} {policy}: engine {result.hit_tokens} tokens, simulator {result.sim_hit_tokens}, "
          f"{result.diff_points:+.3f} points")
    assert result.requests == len(requests) and result.hit_tokens > 0
    assert result.cpu_evictions > 0.8 * result.sim_tiers["cpu"]["writes"]  # small enough to evict a lot
    assert result.cpu_evictions == result.sim_tiers["cpu"]["evictions"] or config == "cpu+disk"
    if config == "cpu+disk":
        assert result.disk_hits > 0 and result.sim_tiers["disk"]["evictions"] > 0
    assert abs(result.diff_points) <= MAX_DIFF_POINTS
    if config == "cpu":
        assert result.hit_tokens == result.sim_hit_tokens  # token for token
    assert not (tmp_path / f"disk-{policy}").exists()  # each run's disk folder is removed after it


def test_capacities_are_tokens_or_a_share_of_the_distinct_blocks():
    assert bench.parse_capacity("64K").resolve(1000) == 64 * 1024
    assert bench.parse_capacity("4096").resolve(1000) == 4096
    five = bench.parse_capacity("5%")
    assert five.resolve(13_712) == 685 * 2 * 256  # int(5 % of the blocks) blocks, two chunks each
    assert bench.parse_capacity("0.5%").resolve(1000) == 5 * 2 * 256
    for bad in ("100", "0", "-5%", "x%", "64Q"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_capacity(bad)
    with pytest.raises(SystemExit, match="not one chunk"):
        bench.parse_capacity("0.01%").resolve(1000)


def test_policies_default_to_every_registered_one_and_unknown_names_are_refused():
    assert bench.parse_args([]).policies == list(POLICIES)
    assert bench.parse_args(["--policies", "lru"]).policies == ["lru"]
    with pytest.raises(argparse.ArgumentTypeError, match="known: lru"):
        bench.parse_policies("lru,belady")
    quick = bench.parse_args(["--quick"])
    assert (quick.limit, [c.text for c in quick.capacities]) == (600, ["5%"])
