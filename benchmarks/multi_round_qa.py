"""Multi-round chat through the bundled engine: time to first token per round without kvtier, with
kvtier's CPU tier and with its disk tier, beside an engine whose paged cache holds every conversation,
side by side in one process.

    .venv/bin/python benchmarks/multi_round_qa.py          # full run: 4 users x 4 rounds, 1,536-token context
    .venv/bin/python benchmarks/multi_round_qa.py --quick  # smoke run: 512-token contexts, 3 rounds
    .venv/bin/python benchmarks/multi_round_qa.py --quick --model smollm2-135m-instruct  # the trained model

Each user holds a conversation: a context of its own (a system prompt and documents, seeded token
ids), then per round a question of 50-100 tokens; the prompt of round r is the whole conversation so
far (context, every earlier question and the answer the same engine generated, then the new
question). Users take turns round-robin (round 1 of every user, then round 2 ...), so with a paged
cache too small for every conversation (`--cache-prompts`) a user's history has been evicted from
the device by the time the user is back. Engines, setups and the order of setups per request are
those of long_doc_qa.py. benchmarks/README.md explains each column.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import long_doc_qa as shared  # setups, one engine per setup, summaries
import numpy as np
from harness import console_and_logging, machine_info, write_results
from rich.console import Console
from rich.table import Table

from kvtier_engine import SamplingParams

logger = logging.getLogger("multi_round_qa")

QUESTION_TOKENS = (50, 100)


def measure(args: argparse.Namespace, all_setups: list[shared.Setup], console: Console) -> list[shared.Query]:
    rng = np.random.default_rng(args.seed)
    contexts = [shared.token_ids(rng, args.context_tokens, args.model) for _ in range(args.users)]
    lo, hi = QUESTION_TOKENS
    questions = [[shared.token_ids(rng, int(rng.integers(lo, hi + 1)), args.model)
                  for _ in range(args.rounds)] for _ in range(args.users)]
    params = SamplingParams(max_tokens=args.answer_tokens, temperature=0, ignore_eos=True)
    order = [(r, u) for r in range(args.rounds) for u in range(args.users)]  # round-robin over users

    def work(runners: list[shared.Runner], progress) -> list[shared.Query]:
        # Each setup's conversations grow with that engine's own answers (equal lengths everywhere).
        history = {(r.setup.name, u): list(contexts[u]) for r in runners for u in range(args.users)}
        task = progress.add_task("requests", total=len(order) * len(runners))
        queries = []
        for i, (rnd, u) in enumerate(order):
            for runner in runners[i % len(runners):] + runners[:i % len(runners)]:
                conversation = history[(runner.setup.name, u)]
                conversation += questions[u][rnd]
                query, answer = runner.run(list(conversation), params, f"user {u} round {rnd + 1}",
                                           str(rnd + 1))
                conversation += answer
                queries.append(query)
                progress.update(task, advance=1, refresh=True)
        return queries

    return shared.run_all(args, all_setups, console, work)


def summarise(queries: list[shared.Query], all_setups: list[shared.Setup],
              rounds: int) -> tuple[list[dict], list[dict]]:
    """(one row per round and setup, one row per setup over the whole run)."""
    per_round = []
    for rnd in range(1, rounds + 1):
        for s in all_setups:
            mine = [q for q in queries if q.setup == s.name and q.group == str(rnd)]
            per_round.append({"round": rnd, "setup": s.name, "ttft": shared.stats([q.ttft_s for q in mine]),
                              **shared.totals(mine)})
    overall = []
    for s in all_setups:
        mine = [q for q in queries if q.setup == s.name]
        overall.append({"setup": s.name, "kvtier": s.kvtier, "cache_tokens": s.cache_tokens,
                        "ttft": shared.stats([q.ttft_s for q in mine]),
                        "ttft_later_rounds": shared.stats([q.ttft_s for q in mine if q.group != "1"]),
                        **shared.totals(mine)})
    return per_round, overall


def print_tables(console: Console, per_round: list[dict], overall: list[dict],
                 args: argparse.Namespace) -> None:
    t = Table(title=f"Multi-round chat: TTFT (s) per round, {args.users} users x {args.rounds} rounds, "
                    f"{args.context_tokens:,}-token contexts, {args.model}")
    for col in ("round|setup|#prompt tokens|#TTFT mean|#p50|#p90|#vs no kvtier|#kvtier hit rate|"
                "#device cached|#disk hits").split("|"):
        t.add_column(col.strip("#"), justify="right" if col.startswith("#") else "left")
    base = {r["round"]: r["ttft"]["mean"] for r in per_round if r["setup"] == "no kvtier"}
    rows = [(str(r["round"]), r, base[r["round"]]) for r in per_round]
    base_all = next(r["ttft"]["mean"] for r in overall if r["setup"] == "no kvtier")
    rows += [("all", r, base_all) for r in overall]
    for i, (label, r, b) in enumerate(rows):
        x = r["ttft"]
        t.add_row(label, r["setup"], f"{r['prompt_tokens'] / r['requests']:,.0f}", f"{x['mean']:.3f}",
                  f"{x['p50']:.3f}", f"{x['p90']:.3f}", f"{b / x['mean']:.1f}x", f"{r['hit_rate']:.3f}",
                  f"{r['device_cached']:,}", f"{r['disk_hits']:,}",
                  end_section=(i + 1) % len(overall) == 0)
    console.print(t)
    console.print(shared.work_table("Multi-round chat: work and throughput over the run", overall))


def plot(per_round: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for name in dict.fromkeys(r["setup"] for r in per_round):
        mine = [r for r in per_round if r["setup"] == name]
        ax.errorbar([r["round"] for r in mine], [r["ttft"]["p50"] for r in mine], marker="o", capsize=3,
                    yerr=[[0] * len(mine), [r["ttft"]["p90"] - r["ttft"]["p50"] for r in mine]], label=name)
    ax.set_xticks(range(1, args.rounds + 1))
    ax.set_xlabel("round")
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, p50; whisker: p90; log scale)")
    ax.set_title(f"Multi-round chat, {args.model}, {args.users} users, {args.context_tokens:,}-token "
                 "contexts: TTFT by round", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared.common_args(p)
    p.add_argument("--users", type=int, default=4, help="conversations (default 4)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per user (default 4; --quick 3)")
    p.add_argument("--context-tokens", type=int, default=None,
                   help="per-user context before round 1 (default 1536; --quick 512)")
    p.add_argument("--answer-tokens", type=int, default=None,
                   help="tokens per answer (default 32; --quick 16)")
    p.add_argument("--dir", type=Path, default=shared.ROOT / ".kvtier-cache" / "multi_round_qa",
                   help="disk tier dir")
    args = p.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 4)
    args.context_tokens = args.context_tokens or (512 if args.quick else 1536)
    args.answer_tokens = args.answer_tokens or (16 if args.quick else 32)
    return args


def main() -> None:
    args = parse_args()
    console = console_and_logging(150, logging.WARNING)
    longest = args.context_tokens + args.rounds * (QUESTION_TOKENS[1] + args.answer_tokens)
    all_setups = shared.setups(longest, args.users, args.cache_prompts)
    info = machine_info(args.dir.resolve())
    logger.info("%d users x %d rounds, %d-token contexts; paged cache %d tokens (resident: %d); load %.2f",
                args.users, args.rounds, args.context_tokens, all_setups[0].cache_tokens,
                all_setups[-1].cache_tokens, info["load_avg_1m"])
    started = time.perf_counter()
    queries = measure(args, all_setups, console)
    elapsed = time.perf_counter() - started
    shared.check_disk_hits(queries, {str(r) for r in range(2, args.rounds + 1)})
    per_round, overall = summarise(queries, all_setups, args.rounds)
    print_tables(console, per_round, overall, args)
    load_end = os.getloadavg()
    console.print(f"{elapsed:.0f} s; load average {info['load_avg_1m']:.2f} at the start, "
                  f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} (1/5/15 min) at the end")
    report = {"machine": {**info, "load_avg_end": list(load_end)},
              "settings": {"model": args.model, "seed": args.seed, "users": args.users, "rounds": args.rounds,
                           "context_tokens": args.context_tokens, "question_tokens": list(QUESTION_TOKENS),
                           "answer_tokens": args.answer_tokens, "quick": args.quick,
                           "kv_bytes_per_token": shared.kv_bytes_per_token(args.model),
                           "cpu_config": str(args.cpu_config), "disk_config": str(args.disk_config),
                           "setups": [asdict(s) for s in all_setups]},
              "per_round": per_round, "summary": overall, "queries": [asdict(q) for q in queries],
              "elapsed_s": round(elapsed, 1)}
    name = "multi_round_qa_quick" if args.quick else "multi_round_qa"
    write_results(args.out, name, report, lambda path: plot(per_round, args, path))


if __name__ == "__main__":
    main()
