"""How big each tier should be for a trace's traffic, per eviction policy: `kvtier plan`'s answer.

Every number comes from `kvtier.sim.tiers.replay_tiers` (the storage path's own policies and order
of calls, one block a unit), in three stages per policy, each sweeping one tier's capacity while the
tiers above it stay fixed:

    cpu      host memory alone, over the sweep;
    disk     cpu fixed, a disk tier below it, over the sweep's capacities larger than the cpu tier;
    remote   (when a disk size is given) cpu and disk fixed, a remote tier over the capacities
             larger than the disk.

Per row: the stack's token hit rate, each tier's blocks written, read (its hits) and evicted, and,
for a tier below host memory (the only ones kvtier codes), the hit rate of a compressed tier of the
same bytes: the same replay with `capacity x codec_ratio` blocks. Per stage: the hit rate of the
fixed tiers alone, and the smallest swept capacity whose hit rate reaches `target` x the infinite
cache's (every block ever stored kept): 0 when the fixed tiers reach it alone.

Plain functions over an in-memory trace, no I/O; `on_replay` is called after each replay (a
progress bar), and `replay_count` says beforehand how many there will be.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from kvtier.policy_registry import POLICIES
from kvtier.sim.tiers import TierCounts, TieredResult, TierSpec, replay_tiers
from kvtier.sim.trace import TraceRequest

logger = logging.getLogger(__name__)

DEFAULT_SWEEP = (0.01, 0.02, 0.05, 0.10, 0.20, 0.40, 1.00)  # shares of the distinct blocks
DEFAULT_CPU = 0.05
DEFAULT_DISK = 0.20  # under a remote tier asked for without a disk size
DEFAULT_TARGET = 0.9


@dataclass(frozen=True, slots=True)
class Traffic:
    requests: int
    input_tokens: int
    distinct_blocks: int
    infinite_hit_tokens: int  # what a cache that never evicts would hit

    @property
    def hit_rate(self) -> float:
        return self.infinite_hit_tokens / self.input_tokens if self.input_tokens else 0.0


@dataclass(frozen=True, slots=True)
class PlanSettings:
    policies: tuple[str, ...]
    sweep: tuple[int, ...]  # capacities in blocks, ascending, distinct
    cpu: int  # blocks of host memory above the swept disk (and remote) tier
    disk: int | None = None  # blocks of disk above a swept remote tier; None: no remote stage
    codec_ratio: float = 1.0  # compressed bytes per raw byte, inverted; 1: no compressed column
    target: float = DEFAULT_TARGET  # the share of the infinite hit rate a tier must reach
    block_tokens: int = 512  # tokens a trace block (hash id) stands for
    block_bytes: int = 512 * 128 * 1024  # KV bytes of one block of the model
    # Whether a prompt's partial last block is stored (replay_tiers' store_partial). kvtier stores
    # whole chunks only: exact when a block is a kvtier chunk (its own trace log); for Mooncake's
    # 512-token blocks (two chunks) keeping it is the closer guess (5% LRU on the conversation trace:
    # 19.93% kept, 20.67% dropped, 19.75% replayed in 256-token chunks).
    store_partial: bool = True

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if not self.policies or unknown:
            raise ValueError(f"unknown eviction policy {', '.join(unknown) or '(none given)'}; "
                             f"known: {', '.join(POLICIES)}")
        if not self.sweep or list(self.sweep) != sorted(set(self.sweep)) or self.sweep[0] < 1:
            raise ValueError(f"the sweep must be distinct capacities >= 1 block, ascending: {self.sweep}")
        for name, blocks in (("cpu", self.cpu), ("disk", self.disk)):
            if blocks is not None and blocks < 1:
                raise ValueError(f"the {name} tier must hold at least one block, got {blocks}")
        if not (math.isfinite(self.codec_ratio) and self.codec_ratio >= 1):
            raise ValueError(f"the codec ratio must be >= 1 (1: no codec), got {self.codec_ratio}")
        if not 0 < self.target <= 1:
            raise ValueError(f"the target must be a share of the infinite hit rate in (0, 1], "
                             f"got {self.target}")
        if self.block_tokens < 1 or self.block_bytes < 1:
            raise ValueError(f"a block must have tokens and bytes: {self.block_tokens}, {self.block_bytes}")


@dataclass(frozen=True, slots=True)
class Row:
    capacity: int  # blocks of the swept tier
    hit_rate: float
    tiers: dict[str, TierCounts]  # blocks written, read (hits) and evicted, per tier, top first
    compressed_hit_rate: float | None  # at capacity x codec ratio; None: host memory, or no codec


@dataclass(frozen=True, slots=True)
class Stage:
    tier: str  # the swept one
    fixed: tuple[tuple[str, int], ...]  # the tiers above it, top first, and their blocks
    rows: tuple[Row, ...]
    # The smallest capacity reaching the target (0: the tiers above reach it alone); None: no
    # capacity of the sweep does (or, compressed, no codec).
    reaches: int | None
    reaches_compressed: int | None
    fixed_hit_rate: float | None = None  # the tiers above alone; None in the cpu stage

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(r.capacity for r in self.rows)


@dataclass(frozen=True, slots=True)
class PolicyPlan:
    policy: str
    stages: tuple[Stage, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    settings: PlanSettings
    traffic: Traffic
    policies: tuple[PolicyPlan, ...]
    skipped: tuple[str, ...] = field(default=())  # malformed trace lines left out


def measure_traffic(trace: Sequence[TraceRequest], block_tokens: int, store_partial: bool = True) -> Traffic:
    """Requests, input tokens, distinct blocks and the infinite cache's hits: `replay_tiers` through
    one tier with room for every distinct block, so it never evicts."""
    distinct = len({h for request in trace for h in request.hash_ids})
    infinite = replay_tiers(trace, [TierSpec("cpu", distinct)], store_partial=store_partial,
                            block_tokens=block_tokens)
    return Traffic(len(trace), infinite.input_tokens, distinct, infinite.hit_tokens)


@dataclass(frozen=True, slots=True)
class _StageSpec:
    tier: str
    fixed: tuple[tuple[str, int], ...]
    capacities: tuple[int, ...]


def _stage_specs(settings: PlanSettings) -> list[_StageSpec]:
    sweep, cpu, disk = settings.sweep, settings.cpu, settings.disk
    specs = [_StageSpec("cpu", (), sweep),
             _StageSpec("disk", (("cpu", cpu),), tuple(c for c in sweep if c > cpu))]
    if disk is not None:
        below = tuple(c for c in sweep if c > disk)
        specs.append(_StageSpec("remote", (("cpu", cpu), ("disk", disk)), below))
    return specs


def _compressed_capacity(tier: str, capacity: int, settings: PlanSettings) -> int | None:
    # kvtier codes only tiers below host memory (a tier's `codec:` key); host memory stays raw.
    if tier == "cpu" or settings.codec_ratio == 1:
        return None
    return int(capacity * settings.codec_ratio)


def _covers(previous: _StageSpec | Stage | None, fixed: tuple[tuple[str, int], ...]) -> bool:
    """Whether the previous stage has a row for exactly the tiers `fixed` (no replay needed)."""
    return (previous is not None and bool(fixed) and (*previous.fixed, (previous.tier, fixed[-1][1])) == fixed
            and fixed[-1][1] in previous.capacities)


def replay_count(settings: PlanSettings, traffic: Traffic) -> int:
    """How many replays run_plan will run (for a progress bar)."""
    per_policy, previous = 0, None
    for spec in _stage_specs(settings):
        per_policy += bool(spec.fixed) and not _covers(previous, spec.fixed)
        for capacity in spec.capacities:
            compressed = _compressed_capacity(spec.tier, capacity, settings)
            per_policy += 1 + (compressed is not None and compressed < traffic.distinct_blocks)
        previous = spec
    return per_policy * len(settings.policies)


@dataclass(frozen=True, slots=True)
class _Replay:
    """One policy's replays of the trace: a stack of (tier, blocks), top first -> its result."""

    trace: Sequence[TraceRequest]
    settings: PlanSettings
    policy: str
    on_replay: Callable[[], None] | None

    def __call__(self, tiers: Sequence[tuple[str, int]]) -> TieredResult:
        specs = [TierSpec(name, blocks, self.policy) for name, blocks in tiers]
        result = replay_tiers(self.trace, specs, store_partial=self.settings.store_partial,
                              block_tokens=self.settings.block_tokens)
        if self.on_replay is not None:
            self.on_replay()
        return result


def run_plan(trace: Sequence[TraceRequest], settings: PlanSettings, traffic: Traffic | None = None,
             on_replay: Callable[[], None] | None = None, skipped: Sequence[str] = ()) -> Plan:
    """Every stage of every policy in `settings` over `trace` (see the module docstring); `skipped`
    (the trace's malformed lines left out) goes into the plan as it is."""
    traffic = traffic or measure_traffic(trace, settings.block_tokens, settings.store_partial)
    policies = []
    for policy in settings.policies:
        replay, stages = _Replay(trace, settings, policy, on_replay), []
        for spec in _stage_specs(settings):
            stages.append(_run_stage(replay, traffic, spec, stages[-1] if stages else None))
        policies.append(PolicyPlan(policy, tuple(stages)))
    return Plan(settings, traffic, tuple(policies), tuple(skipped))


def _run_stage(replay: _Replay, traffic: Traffic, spec: _StageSpec, previous: Stage | None) -> Stage:
    fixed_rate = None
    if previous is not None and _covers(previous, spec.fixed):  # (the row is there: no replay)
        fixed_rate = next(r.hit_rate for r in previous.rows if r.capacity == spec.fixed[-1][1])
    elif spec.fixed:
        fixed_rate = replay(spec.fixed).hit_rate
    rows = []
    for capacity in spec.capacities:
        result = replay((*spec.fixed, (spec.tier, capacity)))
        compressed = _compressed_rate(replay, traffic, spec, capacity)
        rows.append(Row(capacity, result.hit_rate, result.tiers, compressed))
    goal = replay.settings.target * traffic.hit_rate
    if fixed_rate is not None and goal > 0 and fixed_rate >= goal:
        # The tiers above reach the target without this one: the capacity it needs is none at all.
        coded = _compressed_capacity(spec.tier, 1, replay.settings) is not None
        return Stage(spec.tier, spec.fixed, tuple(rows), 0, 0 if coded else None, fixed_rate)
    return Stage(spec.tier, spec.fixed, tuple(rows), _smallest(rows, goal, "hit_rate"),
                 _smallest(rows, goal, "compressed_hit_rate"), fixed_rate)


def _compressed_rate(replay: _Replay, traffic: Traffic, spec: _StageSpec, capacity: int) -> float | None:
    compressed = _compressed_capacity(spec.tier, capacity, replay.settings)
    if compressed is None:
        return None
    if compressed >= traffic.distinct_blocks:
        # A tier that holds every block never evicts, and write-through puts every stored block in
        # it: the stack hits exactly what the infinite cache hits. No replay needed.
        return traffic.hit_rate
    return replay((*spec.fixed, (spec.tier, compressed))).hit_rate


def _smallest(rows: list[Row], goal: float, attribute: str) -> int | None:
    if goal <= 0:  # a trace with no reuse: no capacity buys anything
        return None
    return next((r.capacity for r in rows if (rate := getattr(r, attribute)) is not None and rate >= goal),
                None)


def plan_dict(plan: Plan) -> dict:
    """Every number of `plan` as JSON-ready data, with bytes (blocks x block_bytes) and tokens."""
    s = plan.settings

    def sized(blocks: int | None) -> dict | None:
        if blocks is None:
            return None
        return {"blocks": blocks, "tokens": blocks * s.block_tokens, "bytes": blocks * s.block_bytes}

    def row(r: Row) -> dict:
        tiers = {name: {"blocks_written": c.writes, "blocks_read": c.hits, "blocks_evicted": c.evictions,
                        "bytes_written": c.writes * s.block_bytes, "bytes_read": c.hits * s.block_bytes,
                        "bytes_evicted": c.evictions * s.block_bytes} for name, c in r.tiers.items()}
        return {"capacity": sized(r.capacity), "hit_rate": r.hit_rate,
                "compressed_hit_rate": r.compressed_hit_rate, "tiers": tiers}

    def stage(st: Stage) -> dict:
        return {"tier": st.tier, "fixed": [{"tier": n, **sized(b)} for n, b in st.fixed],
                "fixed_hit_rate": st.fixed_hit_rate,
                "rows": [row(r) for r in st.rows], "reaches_target": sized(st.reaches),
                "reaches_target_compressed": sized(st.reaches_compressed)}

    traffic = {**asdict(plan.traffic), "infinite_hit_rate": plan.traffic.hit_rate}
    settings = {**asdict(s), "policies": list(s.policies), "sweep": [sized(b) for b in s.sweep],
                "cpu": sized(s.cpu), "disk": sized(s.disk)}
    return {"settings": settings,
            "traffic": traffic, "skipped_lines": {"count": len(plan.skipped), "lines": list(plan.skipped)},
            "policies": {p.policy: [stage(st) for st in p.stages] for p in plan.policies}}
