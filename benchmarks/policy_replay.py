"""Eviction policies on a real trace, model-free: token hit rate per policy at capacities given as a
share of the trace's distinct blocks, beside Belady with bypass (the offline bound) and the
infinite cache.

    .venv/bin/python benchmarks/policy_replay.py            # whole conversation trace: ~3 minutes
    .venv/bin/python benchmarks/policy_replay.py --quick    # smoke run: first 1,000 requests, 2 capacities

Every policy of `kvtier.policy_registry` runs through `kvtier.sim.tiers` (one tier, the storage path's
order of calls) three times: storing every block of a prompt, as the published figures do ("all
blocks"); the same with the CPU tier's `whole` admission rule, which holds a prompt's partial last
block only as the next victim (`kvtier.admission`, kvtier's default; "all blocks, whole admission");
and without a prompt's partial last block, as kvtier stores prompts by default
(`save_partial_chunks: false`; "whole blocks"). benchmarks/README.md has the results and what they say.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from harness import console_and_logging, machine_info, progress_bar, write_results
from rich.console import Console
from rich.table import Table

from kvtier.policy_registry import POLICIES
from kvtier.sim.belady import belady
from kvtier.sim.tiers import TierSpec, replay_tiers
from kvtier.sim.trace import read_trace

logger = logging.getLogger("policy_replay")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = ROOT.parent / "shared" / "workloads" / "mooncake_conversation_trace.jsonl"
FRACTIONS = (0.01, 0.02, 0.05, 0.10, 0.20, 0.40)
# label -> (store_partial, admission rule)
MODES = {"all blocks": (True, "all"), "all blocks, whole admission": (True, "whole"),
         "whole blocks": (False, "all")}


def measure(requests: list, fractions: list[float], policies: list[str], console: Console) -> dict:
    distinct = len({h for r in requests for h in r.hash_ids})
    caps = [max(int(f * distinct), 1) for f in fractions]
    rows: dict[str, dict] = {}
    total = len(caps) * (len(policies) * len(MODES) + 1)
    with progress_bar(console) as progress:
        task = progress.add_task("replays", total=total)
        for name in policies:
            for mode, (partial, admission) in MODES.items():
                rates, seconds = [], []
                for cap in caps:
                    started = time.perf_counter()
                    rates.append(replay_tiers(requests, [TierSpec("cpu", cap, name, admission)],
                                              store_partial=partial).hit_rate)
                    seconds.append(time.perf_counter() - started)
                    progress.update(task, advance=1, refresh=True)
                rows[f"{name} ({mode})"] = {"policy": name, "mode": mode, "hit_rate": rates,
                                            "seconds": seconds}
        rates, seconds = [], []
        for cap in caps:
            started = time.perf_counter()
            rates.append(belady(requests, cap).hit_rate)
            seconds.append(time.perf_counter() - started)
            progress.update(task, advance=1, refresh=True)
        rows["belady with bypass (offline)"] = {"policy": "belady", "mode": "all blocks", "hit_rate": rates,
                                                "seconds": seconds}
    return {"distinct_blocks": distinct, "capacities": caps, "rows": rows,
            "infinite": belady(requests, distinct).hit_rate}


def print_table(console: Console, fractions: list[float], result: dict) -> None:
    distinct = result["distinct_blocks"]
    table = Table(title=f"Token hit rate by capacity (share of {distinct:,} distinct blocks)")
    table.add_column("policy")
    for f, cap in zip(fractions, result["capacities"]):
        table.add_column(f"{f:.0%}\n{cap:,}", justify="right")
    table.add_column("s/replay", justify="right")
    rows = result["rows"]
    lru = {mode: rows[f"lru ({mode})"]["hit_rate"] for mode in MODES if f"lru ({mode})" in rows}
    for label, row in rows.items():
        base = lru.get(row["mode"]) if row["policy"] not in ("lru", "belady") else None
        cells = [f"{r:.2%}" + (f" ({100 * (r - base[i]):+.2f})" if base else "")
                 for i, r in enumerate(row["hit_rate"])]
        table.add_row(label, *cells, f"{max(row['seconds']):.1f}")
    console.print(table)
    console.print(f"infinite cache: {result['infinite']:.2%}. (+x.xx): points above LRU in the same mode.")


def plot(fractions: list[float], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for label, row in result["rows"].items():
        if row["mode"] == "whole blocks" or row["policy"] == "belady":
            ax.plot([100 * f for f in fractions], [100 * r for r in row["hit_rate"]], "o-", label=label)
    ax.axhline(100 * result["infinite"], color="gray", linestyle="--", label="infinite cache")
    ax.set_xscale("log")
    ax.set_xlabel("capacity (% of distinct blocks)")
    ax.set_ylabel("token hit rate (%)")
    ax.set_title("Mooncake conversation trace: hit rate by eviction policy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--quick", action="store_true", help="first 1,000 requests, capacities 5%% and 20%%")
    p.add_argument("--policies", default=",".join(POLICIES), help="registry names, comma-separated")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    policies = [name.strip() for name in args.policies.split(",") if name.strip()]
    if unknown := [name for name in policies if name not in POLICIES]:
        p.error(f"unknown policies {unknown}; known: {sorted(POLICIES)}")
    console = console_and_logging(160, logging.WARNING)
    requests, _ = read_trace(args.trace)
    fractions = [0.05, 0.20] if args.quick else list(FRACTIONS)
    requests = requests[:1000] if args.quick else requests
    started = time.perf_counter()
    result = measure(requests, fractions, policies, console)
    print_table(console, fractions, result)
    report = {"machine": {**machine_info(ROOT), "load_avg_1m_end": os.getloadavg()[0]},
              "settings": {"trace": str(args.trace), "requests": len(requests), "fractions": fractions,
                           "block_tokens": 512},
              **result, "elapsed_s": round(time.perf_counter() - started, 1)}
    write_results(args.out, "policy_replay_quick" if args.quick else "policy_replay", report,
                  lambda path: plot(fractions, result, path))


if __name__ == "__main__":
    main()
