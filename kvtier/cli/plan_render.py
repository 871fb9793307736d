"""`kvtier plan`'s output for people: rich tables on stdout and a hit-rate-vs-capacity PNG.

Sizes are the model's KV bytes (blocks x block bytes) in binary units; bytes moved are each tier's
blocks written and read (its hits) over the whole trace. The tables are for people and may change;
`--json` (kvtier.sim.plan.plan_dict) is the stable form.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvtier.cli.render import size_text
from kvtier.sim.plan import Plan, Row, Stage

logger = logging.getLogger(__name__)

MAX_SKIPPED_SHOWN = 3


def render_plan(plan: Plan, model: str, trace_path: str, console: Console) -> None:
    _traffic(plan, model, trace_path, console)
    for policy in plan.policies:
        for stage in policy.stages:
            _stage(plan, policy.policy, stage, console)
    _targets(plan, console)


def _traffic(plan: Plan, model: str, trace_path: str, console: Console) -> None:
    s, t = plan.settings, plan.traffic
    # markup off: a path or a skipped line's message may hold [brackets] rich would take for styles
    console.print(f"trace {trace_path}: {t.requests:,} requests, {t.input_tokens:,} input tokens, "
                  f"{t.distinct_blocks:,} distinct blocks of {s.block_tokens} tokens", markup=False)
    console.print(f"model {model}: {size_text(s.block_bytes // s.block_tokens)} of KV a token, "
                  f"{size_text(s.block_bytes)} a block, {size_text(t.distinct_blocks * s.block_bytes)} "
                  f"for every distinct block")
    partial = "stored" if s.store_partial else "not stored (kvtier stores whole chunks only)"
    console.print(f"infinite cache (every block ever stored kept): token hit rate {t.hit_rate:.2%}; "
                  f"a prompt's partial last block: {partial}")
    if plan.skipped:
        hidden = len(plan.skipped) - MAX_SKIPPED_SHOWN
        more = f" (and {hidden} more)" if hidden > 0 else ""
        console.print(Text.assemble((f"skipped {len(plan.skipped)} malformed lines", "yellow"),
                                    f": {'; '.join(plan.skipped[:MAX_SKIPPED_SHOWN])}{more}"))


def _stage(plan: Plan, policy: str, stage: Stage, console: Console) -> None:
    s = plan.settings
    above = ", ".join(f"{name} {_blocks(blocks, s.block_bytes)}" for name, blocks in stage.fixed)
    title = f"{policy}: {stage.tier} alone"
    if stage.fixed:
        title = f"{policy}: {stage.tier} under {above}, which alone hit {stage.fixed_hit_rate:.2%}"
    if not stage.rows:
        console.print(f"\n{title}: no capacity of the sweep is larger than the tier above")
        return
    compressed = stage.rows[0].compressed_hit_rate is not None
    columns = [f"{stage.tier} size", "blocks", "of distinct", "hit rate", "of infinite"]
    columns += [f"hit rate x{s.codec_ratio:g} codec"] if compressed else []
    columns += [f"{name} written / read" for name in stage.rows[0].tiers] + [f"{stage.tier} evicted"]
    table = Table(*columns, title=title, title_justify="left", show_edge=False, pad_edge=False)
    for column in table.columns[1:]:
        column.justify = "right"
    for row in stage.rows:
        table.add_row(*_cells(plan, stage, row, compressed))
    console.print()
    console.print(table)


def _cells(plan: Plan, stage: Stage, row: Row, compressed: bool) -> list[str]:
    s, t = plan.settings, plan.traffic
    of_infinite = f"{row.hit_rate / t.hit_rate:.0%}" if t.hit_rate else "-"
    cells = [size_text(row.capacity * s.block_bytes), f"{row.capacity:,}",
             f"{row.capacity / t.distinct_blocks:.1%}", f"{row.hit_rate:.2%}", of_infinite]
    if compressed:
        cells.append(f"{row.compressed_hit_rate:.2%}")
    cells += [f"{size_text(c.writes * s.block_bytes)} / {size_text(c.hits * s.block_bytes)}"
              for c in row.tiers.values()]
    cells.append(size_text(row.tiers[stage.tier].evictions * s.block_bytes))
    return cells


def _targets(plan: Plan, console: Console) -> None:
    s, t = plan.settings, plan.traffic
    goal = s.target * t.hit_rate
    columns = ["policy", "tier", "under", "blocks", "tokens", "size"]
    compressed = s.codec_ratio != 1
    columns += [f"size with x{s.codec_ratio:g} codec"] if compressed else []
    needless = any(stage.reaches == 0 for policy in plan.policies for stage in policy.stages)
    caption = "not needed: the tiers above reach it alone" if needless else None
    table = Table(*columns, show_edge=False, pad_edge=False, title_justify="left", caption_justify="left",
                  title=f"smallest capacity of the sweep reaching {s.target:.0%} of the infinite hit rate "
                        f"({goal:.2%})", caption=caption)
    for column in table.columns[3:]:
        column.justify = "right"
    for policy in plan.policies:
        for stage in policy.stages:
            under = ", ".join(f"{name} {size_text(b * s.block_bytes)}" for name, b in stage.fixed) or "-"
            cells = [policy.policy, stage.tier, under]
            if stage.reaches is None:
                cells += ["not reached", "", ""]
            elif stage.reaches == 0:
                cells += ["not needed", "", ""]
            else:
                cells += [f"{stage.reaches:,}", f"{stage.reaches * s.block_tokens:,}",
                          size_text(stage.reaches * s.block_bytes)]
            if compressed:
                cells.append(_compressed_cell(stage, s.block_bytes))
            table.add_row(*cells)
    console.print()
    console.print(table)


def _compressed_cell(stage: Stage, block_bytes: int) -> str:
    if stage.tier == "cpu":  # (host memory is never coded)
        return "-"
    if stage.reaches_compressed is None:
        return "not reached"
    blocks = stage.reaches_compressed
    return "not needed" if blocks == 0 else size_text(blocks * block_bytes)


def _blocks(blocks: int, block_bytes: int) -> str:
    return f"{size_text(blocks * block_bytes)} ({blocks:,} block{'' if blocks == 1 else 's'})"


_MARKERS = {"cpu": "o", "disk": "s", "remote": "^"}


def write_plot(plan: Plan, path: str | Path) -> None:
    """Hit rate vs the swept tier's capacity (GiB of the model's KV, log x): a line per policy per
    stage, dotted for the compressed tier of the same bytes, the infinite cache dashed."""
    # A Figure without pyplot renders through Agg on its own: no backend switch in this process.
    from matplotlib.figure import Figure

    s = plan.settings
    figure = Figure(figsize=(10, 6), layout="constrained")
    axes = figure.add_subplot()
    colours = iter(f"C{i}" for i in range(1000))
    for policy in plan.policies:
        colour = next(colours)
        for stage in (st for st in policy.stages if st.rows):
            gib = [r.capacity * s.block_bytes / 2**30 for r in stage.rows]
            marker = _MARKERS.get(stage.tier, "x")
            under = f" under {'+'.join(name for name, _ in stage.fixed)}" if stage.fixed else ""
            axes.plot(gib, [100 * r.hit_rate for r in stage.rows], marker=marker, color=colour,
                      label=f"{policy.policy}: {stage.tier}{under}")
            if stage.rows[0].compressed_hit_rate is not None:
                axes.plot(gib, [100 * r.compressed_hit_rate for r in stage.rows], marker=marker, color=colour,
                          linestyle=":", fillstyle="none", label=f"{policy.policy}: {stage.tier}, "
                          f"x{s.codec_ratio:g} codec")
    axes.axhline(100 * plan.traffic.hit_rate, color="black", linestyle="--", label="infinite cache")
    axes.set_xscale("log")
    axes.set_xlabel(f"capacity of the swept tier (GiB of KV, {s.block_bytes // s.block_tokens:,} B a token)")
    axes.set_ylabel("token hit rate (%)")
    axes.set_title(f"{plan.traffic.requests:,} requests, {plan.traffic.distinct_blocks:,} distinct blocks")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, format="png", dpi=110)
