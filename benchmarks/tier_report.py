"""Reporting for benchmarks/tier_throughput.py: each result beside its limit, targets, tables, chart.

Pure presentation over finished measurements: no timing and no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

TARGET_RATIO = 0.8
END_TO_END_RETRIEVE_RATIO = 0.9  # a cold disk retrieve into `out` against the raw read limit


@dataclass(slots=True)
class Row:
    """One measurement: what (`level` is "limit", "tier" or "end-to-end"), then its result."""

    subject: str
    op: str
    level: str
    mode: str  # "memory", "O_DIRECT" or "buffered"
    threads: int
    geometry: str = ""
    nbytes: int = 0
    seconds: list[float] = field(default_factory=list)
    gbps: float = 0.0
    limit_gbps: float | None = None
    ratio: float | None = None
    target: float | None = None
    passed: bool | None = None


# The end-to-end retrieve with the checksum in the disk tier and a plain copy out (issue 15, fourth
# session: what the fused check replaced), measured in the same runs.
TWO_PASSES = "disk tier, 2 passes"


def judge(rows: list[Row], tier_mode: str) -> None:
    """Give each tier row its limit (the fastest limit row of the same geometry, I/O mode and
    direction) and ratio; targets: cpu retrieve, tier-level disk store/retrieve and the end-to-end
    disk retrieve in `tier_mode`."""
    directions = {"copy": ("store", "retrieve"), "write": ("store",), "read": ("retrieve",)}
    limits: dict[tuple[str, str, str], float] = {}
    for r in rows:
        for op in directions[r.op] if r.level == "limit" else ():
            limits[(r.geometry, r.mode, op)] = max(limits.get((r.geometry, r.mode, op), 0.0), r.gbps)
    for r in rows:
        if r.level == "limit" or (r.geometry, r.mode, r.op) not in limits:
            continue
        r.limit_gbps = limits[(r.geometry, r.mode, r.op)]
        r.ratio = r.gbps / r.limit_gbps
        if (r.subject == "cpu tier" and r.op == "retrieve") or (
                r.subject == "disk tier" and r.level == "tier" and r.mode == tier_mode):
            r.target, r.passed = TARGET_RATIO, r.ratio >= TARGET_RATIO
        elif (r.subject == "disk tier" and r.level == "end-to-end" and r.op == "retrieve"
              and r.mode == tier_mode):  # issue 15, item 4 (the two-pass row is there to compare)
            r.target, r.passed = END_TO_END_RETRIEVE_RATIO, r.ratio >= END_TO_END_RETRIEVE_RATIO


def verdict(passed: bool | None) -> str:
    return "" if passed is None else "[green]PASS[/]" if passed else "[red]FAIL[/]"


def table(title: str, header: str, rows: list[list[str]]) -> Table:
    """A rich table; columns are `header` split on "|", numeric ones (marked "#") right-aligned."""
    out = Table(title=title)
    for col in header.split("|"):
        out.add_column(col.strip("#"), justify="right" if col.startswith("#") else "left")
    for row in rows:
        out.add_row(*row)
    return out


def spread(r: Row) -> str:
    return f"{r.nbytes / max(r.seconds) / 1e9:.1f}-{r.nbytes / min(r.seconds) / 1e9:.1f}"


def print_tables(console: Console, rows: list[Row], lookups: list[dict]) -> None:
    if rows:
        print_throughput(console, rows)
    if lookups:
        print_lookups(console, lookups)


def print_throughput(console: Console, rows: list[Row]) -> None:
    console.print(table("Throughput (GB/s = 1e9 B/s of payload, median of the runs; min-max beside it)",
                        "geometry|measurement|op|level|I/O|#thr|#runs|#GB/s|#min-max|#limit|#ratio|target",
                        [[r.geometry, r.subject, r.op, r.level, r.mode, str(r.threads), str(len(r.seconds)),
                          f"{r.gbps:.2f}", spread(r), f"{r.limit_gbps:.2f}" if r.limit_gbps else "",
                          f"{r.ratio:.2f}x" if r.ratio else "",
                          f">= {r.target}x {verdict(r.passed)}" if r.target else ""] for r in rows]))


def print_lookups(console: Console, lookups: list[dict]) -> None:
    n = lookups[0]["index_chunks"]
    console.print(table(f"lookup(): prompts of 32K and 128K tokens (128, 512 chunks), index of {n} chunks",
                        "case|#tokens|#p50 ms|#p99 ms|#mean ms|target",
                        [[r["case"], str(r["tokens"]), f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}",
                          f"{r['mean_ms']:.3f}",
                          f"p50 < {r['target_ms']} ms {verdict(r['passed'])}" if r["target_ms"] else ""]
                         for r in lookups]))


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    geos = list(dict.fromkeys(r.geometry for r in rows))
    fig, axes = plt.subplots(len(geos), 1, figsize=(11, 4.2 * len(geos)), squeeze=False)
    for ax, geo in zip(axes[:, 0], geos):
        shown = [r for r in rows if r.geometry == geo and r.limit_gbps]
        x = np.arange(len(shown))
        ax.bar(x - 0.2, [r.gbps for r in shown], 0.4, label="kvtier")
        ax.bar(x + 0.2, [r.limit_gbps for r in shown], 0.4, label="limit, same run", hatch="//",
               color="lightgray", edgecolor="gray")
        for xi, r in zip(x, shown):
            ax.annotate(f"{r.ratio:.2f}x", (xi - 0.2, r.gbps), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [f"{r.subject} {r.op}\n{r.level}\n{r.mode}" for r in shown], fontsize=7)
        ax.set_ylabel("GB/s (1e9 B/s)")
        ax.set_title(f"{geo}: kvtier vs the physical limit measured in the same run")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
