"""Tests for kvtier/sim/plan.py: the capacity planner's traffic figures, stages, compressed rows and
target capacities, on hand-made traces whose answers are worked out in the comments."""

from __future__ import annotations

import json

import pytest

from kvtier.policy_registry import POLICIES
from kvtier.sim.plan import PlanSettings, measure_traffic, plan_dict, replay_count, run_plan
from kvtier.sim.tiers import TierSpec, replay_tiers
from kvtier.sim.trace import TraceRequest


def req(length: int, *ids: int) -> TraceRequest:
    return TraceRequest(0.0, length, 0, ids)


# Three one-token blocks used in a cycle, twice: an LRU cache of fewer than 3 blocks always evicts
# the block asked for next (0 hits); one of 3 holds them all, and the second cycle hits 3 of 6.
CYCLE = [req(1, b) for b in (1, 2, 3, 1, 2, 3)]


def settings(**changes) -> PlanSettings:
    base = dict(policies=("lru",), sweep=(1, 2, 3), cpu=1, block_tokens=1, block_bytes=10)
    return PlanSettings(**{**base, **changes})


def test_traffic_counts_requests_tokens_distinct_blocks_and_the_infinite_hits():
    trace = [req(8, 1, 2), req(10, 1, 2, 3), req(6, 1, 9)]
    traffic = measure_traffic(trace, block_tokens=4)
    # second: blocks 1, 2 seen (8 tokens); third: block 1 (4 tokens of its 6)
    assert (traffic.requests, traffic.input_tokens, traffic.distinct_blocks) == (3, 24, 4)
    assert traffic.infinite_hit_tokens == 12 and traffic.hit_rate == 0.5


def test_without_store_partial_a_prompts_partial_last_block_is_never_kept():
    trace = [req(700, 1, 2), req(700, 1, 2), req(1024, 1, 2)]  # block 2 is partial until the third
    assert measure_traffic(trace, block_tokens=512).infinite_hit_tokens == 700 + 1024
    assert measure_traffic(trace, block_tokens=512, store_partial=False).infinite_hit_tokens == 512 + 512
    plan = run_plan(trace, settings(sweep=(2,), block_tokens=512, store_partial=False))
    assert plan.traffic.infinite_hit_tokens == 1024
    assert plan.policies[0].stages[0].rows[0].hit_rate == 1024 / 2424


@pytest.mark.parametrize("policy", list(POLICIES))
def test_the_infinite_hit_rate_is_what_any_policy_hits_when_every_block_fits(policy):
    trace = [req(1000, 1, 2), req(1300, 1, 2, 3), req(700, 4, 5), req(1100, 1, 2, 6), req(512, 4)]
    traffic = measure_traffic(trace, block_tokens=512)
    result = replay_tiers(trace, [TierSpec("cpu", traffic.distinct_blocks, policy)], block_tokens=512)
    assert result.hit_tokens == traffic.infinite_hit_tokens == 1024 + 1024 + 512


def test_the_cpu_stage_sweeps_host_memory_and_finds_the_smallest_capacity_reaching_the_target():
    plan = run_plan(CYCLE, settings())
    cpu = plan.policies[0].stages[0]
    assert (cpu.tier, cpu.fixed) == ("cpu", ())
    assert [(r.capacity, r.hit_rate) for r in cpu.rows] == [(1, 0.0), (2, 0.0), (3, 0.5)]
    assert cpu.reaches == 3 and cpu.reaches_compressed is None
    # at 3 blocks: 3 stores, 3 hits, nothing evicted; at 1: 6 stores, 5 evictions
    assert [(c.writes, c.hits, c.evictions) for c in (cpu.rows[2].tiers["cpu"], cpu.rows[0].tiers["cpu"])] \
        == [(3, 3, 0), (6, 0, 5)]
    assert cpu.rows[0].compressed_hit_rate is None  # host memory is never coded


def test_the_disk_stage_keeps_host_memory_fixed_and_sweeps_only_larger_disks():
    plan = run_plan(CYCLE, settings(codec_ratio=2.0))
    disk = plan.policies[0].stages[1]
    assert (disk.tier, disk.fixed) == ("disk", (("cpu", 1),))
    assert [(r.capacity, r.hit_rate) for r in disk.rows] == [(2, 0.0), (3, 0.5)]
    # Disk 3: every block written through once; the second cycle reads each from disk and promotes
    # it into the 1-block host memory (3 stores + 3 promotions, 5 evictions there).
    counts = disk.rows[1].tiers
    assert (counts["disk"].writes, counts["disk"].hits, counts["disk"].evictions) == (3, 3, 0)
    assert (counts["cpu"].writes, counts["cpu"].hits, counts["cpu"].evictions) == (6, 0, 5)
    # x2 codec: a 2-block disk of compressed records holds 4 >= 3 blocks, so it hits what infinite does
    assert [r.compressed_hit_rate for r in disk.rows] == [0.5, 0.5]
    assert (disk.reaches, disk.reaches_compressed) == (3, 2)


def test_a_compressed_row_is_the_replay_at_capacity_times_the_ratio():
    trace = [req(1, b) for b in (1, 2, 3, 4, 5) * 3]
    plan = run_plan(trace, settings(sweep=(2, 3), codec_ratio=1.5))
    rows = plan.policies[0].stages[1].rows
    for row in rows:  # 2 -> 3 blocks, 3 -> 4 blocks: both below the 5 distinct, so replayed
        expected = replay_tiers(trace, [TierSpec("cpu", 1), TierSpec("disk", int(row.capacity * 1.5))],
                                block_tokens=1)
        assert row.compressed_hit_rate == expected.hit_rate
    assert [r.compressed_hit_rate for r in rows] == [0.0, 0.0]  # a 5-block cycle beats LRU below 5


def test_the_remote_stage_runs_under_a_fixed_cpu_and_disk():
    plan = run_plan(CYCLE, settings(disk=2))
    remote = plan.policies[0].stages[2]
    assert (remote.tier, remote.fixed) == ("remote", (("cpu", 1), ("disk", 2)))
    assert [(r.capacity, r.hit_rate) for r in remote.rows] == [(3, 0.5)]
    assert list(remote.rows[0].tiers) == ["cpu", "disk", "remote"]
    hits = {name: c.hits for name, c in remote.rows[0].tiers.items()}
    assert sum(hits.values()) == 3 and hits["remote"] >= 1


def test_a_tier_is_not_needed_when_the_tiers_above_reach_the_target_alone():
    calls = []
    s = settings(sweep=(1, 2, 3, 4), cpu=3, codec_ratio=2.0)
    plan = run_plan(CYCLE, s, on_replay=lambda: calls.append(1))
    disk = plan.policies[0].stages[1]
    assert disk.fixed_hit_rate == 0.5  # the cpu stage's 3-block row, not replayed again
    assert [r.capacity for r in disk.rows] == [4] and (disk.reaches, disk.reaches_compressed) == (0, 0)
    assert len(calls) == 4 + 1  # cpu 1..4, disk 4 (its x2 codec holds every block: no replay)


def test_the_tiers_above_are_replayed_alone_when_no_row_has_them():
    plan = run_plan(CYCLE, settings(sweep=(1, 3), cpu=2))
    disk = plan.policies[0].stages[1]
    assert disk.fixed_hit_rate == 0.0 and disk.reaches == 3


def test_a_stage_with_no_capacity_above_the_tier_over_it_is_empty_and_not_reached():
    plan = run_plan(CYCLE, settings(sweep=(1, 2), cpu=2))
    disk = plan.policies[0].stages[1]
    assert disk.rows == () and disk.reaches is None


def test_a_trace_without_reuse_reaches_no_target():
    plan = run_plan([req(1, 1), req(1, 2)], settings(sweep=(1, 2)))
    assert plan.traffic.hit_rate == 0.0
    assert all(stage.reaches is None for stage in plan.policies[0].stages)


@pytest.mark.parametrize("changes", [dict(), dict(codec_ratio=1.5), dict(codec_ratio=6.0, disk=2),
                                     dict(policies=tuple(POLICIES), disk=1, sweep=(1, 2, 3, 4)),
                                     dict(cpu=4, disk=6, sweep=(1, 2, 3, 5, 7), codec_ratio=1.2)])
def test_replay_count_says_how_many_replays_run(changes):
    trace = [req(1, b) for b in (1, 2, 3, 4, 5, 1, 2)]
    s = settings(**changes)
    calls = []
    plan = run_plan(trace, s, on_replay=lambda: calls.append(1))
    assert len(calls) == replay_count(s, plan.traffic) > 0


@pytest.mark.parametrize("changes, words", [
    (dict(policies=("lru", "nope")), "unknown eviction policy nope"),
    (dict(policies=()), "unknown eviction policy"),
    (dict(sweep=(3, 1)), "ascending"),
    (dict(sweep=(0, 1)), ">= 1 block"),
    (dict(cpu=0), "cpu tier"),
    (dict(disk=0), "disk tier"),
    (dict(codec_ratio=0.5), "codec ratio"),
    (dict(target=0.0), "target"),
    (dict(block_tokens=0), "tokens and bytes"),
])
def test_bad_settings_are_refused(changes, words):
    with pytest.raises(ValueError, match=words):
        settings(**changes)


def test_plan_dict_has_every_number_with_bytes_and_tokens():
    plan = run_plan(CYCLE, settings(codec_ratio=2.0, block_tokens=4, block_bytes=100), skipped=["t:3: bad"])
    data = json.loads(json.dumps(plan_dict(plan), allow_nan=False))
    assert data["traffic"]["infinite_hit_rate"] == 0.5
    assert data["skipped_lines"] == {"count": 1, "lines": ["t:3: bad"]}
    assert data["settings"]["cpu"] == {"blocks": 1, "tokens": 4, "bytes": 100}
    disk = data["policies"]["lru"][1]
    assert disk["reaches_target"] == {"blocks": 3, "tokens": 12, "bytes": 300}
    assert disk["reaches_target_compressed"]["blocks"] == 2
    row = disk["rows"][1]
    assert row["capacity"]["bytes"] == 300 and row["compressed_hit_rate"] == 0.5
    assert row["tiers"]["disk"] == {"blocks_written": 3, "blocks_read": 3, "blocks_evicted": 0,
                                    "bytes_written": 300, "bytes_read": 300, "bytes_evicted": 0}
