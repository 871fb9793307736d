"""Long-document Q&A through the bundled engine: time to first token of cold and warm queries without
kvtier, with kvtier's CPU tier and with its disk tier, beside an engine whose paged cache holds every
document, side by side in one process.

    .venv/bin/python benchmarks/long_doc_qa.py          # full run: 3 x 4,096-token documents, 4 questions
    .venv/bin/python benchmarks/long_doc_qa.py --quick  # smoke run: 1,024-token documents, 3 questions
    .venv/bin/python benchmarks/long_doc_qa.py --quick --model smollm2-135m-instruct  # the trained model

Documents and questions are token ids from a seeded generator; a prompt is a document followed by a
short question, so the document is the shared prefix. Queries go round-robin over the documents
(question 1 of every document, then question 2 of every document, ...): the first query of a
document is cold, the later ones warm. Each query runs on every setup's engine in turn (the order
rotates per query), one request at a time, after every setup's background kvtier writes have landed.
The engines without kvtier keep the device prefix cache on, as a user runs them; all but "resident"
have a paged KV cache too small for every document (`--cache-prompts`), the memory pressure kvtier
exists for. benchmarks/README.md explains each column. This file also holds what multi_round_qa.py
shares with it (setups, one engine per setup, TTFT summaries).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from harness import console_and_logging, machine_info, model_config, progress_bar, scratch_run, write_results
from rich.console import Console
from rich.table import Table

from kvtier import load_config
from kvtier_engine import LLM, SamplingParams

logger = logging.getLogger("long_doc_qa")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "random:llama-small"
BLOCK = 16  # the engine's default block size
TARGET_SPEEDUP = 5.0  # warm p50 TTFT at least 5x below cold, with kvtier (4K-token documents)
# Token ids are drawn below this (and below the model's vocabulary): 32,000 keeps the recorded
# random:llama-small workloads as they were.
TOKEN_ID_BOUND = 32_000


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    kvtier: str | None  # None (no kvtier), "cpu" or "disk" (before each query: flush, clear the CPU tier)
    cache_tokens: int  # the paged KV cache


@dataclass(slots=True)
class Query:
    setup: str
    label: str  # which document / user and question / round
    group: str  # "cold" / "warm", or the round number
    prompt_tokens: int
    ttft_s: float
    wall_s: float  # the generate() call, waiting for the KV saves included
    computed: int  # prompt tokens run through the model
    loaded: int  # prompt tokens loaded from kvtier
    device_cached: int  # prompt tokens found in the device prefix cache
    cpu_hits: int  # kvtier chunks served by each tier during this query
    disk_hits: int


def kv_bytes_per_token(model: str) -> int:
    """What the engine allocates per token of paged cache (fp32 on CPU, bf16 on CUDA: its defaults)."""
    config = model_config(model)
    itemsize = 2 if torch.cuda.is_available() else 4
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * itemsize


def token_ids(rng: np.random.Generator, n: int, model: str) -> list[int]:
    """`n` seeded random token ids, every one inside the model's vocabulary."""
    return rng.integers(0, min(TOKEN_ID_BOUND, model_config(model).vocab_size), n).tolist()


def round_up(tokens: float, multiple: int = BLOCK) -> int:
    return int(-(-tokens // multiple) * multiple)


def setups(longest: int, held: int, cache_prompts: float) -> list[Setup]:
    """`longest`: the largest request (prompt + answer); `held`: how many distinct prefixes recur."""
    small = round_up(cache_prompts * longest)
    return [Setup("no kvtier", None, small), Setup("kvtier cpu", "cpu", small),
            Setup("kvtier disk", "disk", small), Setup("resident", None, round_up((held + 1) * longest))]


class Runner:
    """One setup's engine; runs one prompt at a time and counts what each query cost."""

    def __init__(self, setup: Setup, args: argparse.Namespace, scratch: Path):
        self.setup = setup
        config = None
        if setup.kvtier == "cpu":
            config = load_config(args.cpu_config)
        elif setup.kvtier == "disk":
            config = load_config(args.disk_config)
            config = replace(config, disk=replace(config.disk, path=str(scratch / "disk")))
        self.llm = LLM(args.model, kvtier_config=config, seed=args.seed,
                       kv_cache_bytes=setup.cache_tokens * kv_bytes_per_token(args.model))
        self.kv = self.llm.engine.kvtier
        # The first forward pass of a process pays one-off costs (allocator, kernels): not a cold query.
        # Under one chunk of tokens, so nothing reaches kvtier.
        warm_up = token_ids(np.random.default_rng(args.seed + 1_000_003), 200, args.model)
        self.llm.generate(warm_up, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))

    def _hits(self) -> tuple[int, int]:
        if self.kv is None:
            return 0, 0
        tiers = self.kv.stats()["tiers"]
        return tiers["cpu"]["hits"], tiers["disk"]["hits"] if "disk" in tiers else 0

    def run(self, tokens: list[int], params: SamplingParams, label: str,
            group: str) -> tuple[Query, list[int]]:
        """The query's costs, and the tokens it generated."""
        if self.setup.kvtier == "disk":  # every hit must come from disk: O_DIRECT reads, no page cache
            self.kv.flush()
            self.kv.clear("cpu")
        cpu0, disk0 = self._hits()
        start = time.perf_counter()
        out = self.llm.generate(tokens, params)[0]
        wall = time.perf_counter() - start
        if self.kv is not None:
            self.kv.flush()  # the write-through to disk lands here, not inside the next timed query
        cpu1, disk1 = self._hits()
        m = out.metrics
        query = Query(self.setup.name, label, group, len(tokens), m.ttft_s, wall, m.prefill_tokens_computed,
                      m.tokens_loaded, m.tokens_cached_on_device, cpu1 - cpu0, disk1 - disk0)
        return query, out.token_ids

    def close(self) -> None:
        self.llm.close()


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "mean": float("nan"), "p50": float("nan"), "p90": float("nan")}
    a = np.asarray(values)
    return {"n": len(a), "mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90))}


def totals(queries: list[Query]) -> dict:
    wall = sum(q.wall_s for q in queries)
    prompt = sum(q.prompt_tokens for q in queries)
    loaded = sum(q.loaded for q in queries)
    return {"requests": len(queries), "seconds": wall, "requests_per_s": len(queries) / wall,
            "prompt_tokens": prompt, "prompt_tokens_per_s": prompt / wall, "loaded": loaded,
            "hit_rate": loaded / prompt, **{k: sum(getattr(q, k) for q in queries)
                                            for k in ("computed", "device_cached", "cpu_hits", "disk_hits")}}


def check_disk_hits(queries: list[Query], warm_groups: set[str]) -> None:
    """The disk setup's warm queries must be served by the disk tier (and not by the CPU tier)."""
    warm = [q for q in queries if q.setup == "kvtier disk" and q.group in warm_groups]
    if warm and (any(q.disk_hits == 0 or q.cpu_hits for q in warm)):
        raise RuntimeError(f"disk setup: a warm query was not served from disk: "
                           f"{[(q.label, q.cpu_hits, q.disk_hits) for q in warm]}")


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="smoke run: shorter prompts, fewer requests")
    p.add_argument("--model", default=MODEL,
                   help=f"engine model: random:<preset>, smollm2-135m-instruct, a .gguf file or a "
                        f"Hugging Face folder (default {MODEL})")
    p.add_argument("--seed", type=int, default=0, help="model weights and token ids")
    p.add_argument("--cache-prompts", type=float, default=1.5,
                   help="paged KV cache of the non-resident setups, in longest requests (default 1.5)")
    p.add_argument("--cpu-config", type=Path, default=ROOT / "configs" / "cpu.yaml")
    p.add_argument("--disk-config", type=Path, default=ROOT / "configs" / "cpu_disk.yaml",
                   help="its disk path is replaced by a scratch folder under --dir")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results dir")


def run_all(args: argparse.Namespace, all_setups: list[Setup], console: Console, work) -> list:
    """Engines for every setup (alive together), then `work(runners, progress)`; returns its result."""
    with scratch_run(args.dir) as scratch, progress_bar(console) as progress:
        runners = []
        try:
            for setup in all_setups:
                runners.append(Runner(setup, args, scratch))
            return work(runners, progress)
        finally:
            for r in runners:
                r.close()


# -- long-document Q&A ---------------------------------------------------------------------------


def workload(args: argparse.Namespace) -> tuple[list[list[int]], list[list[list[int]]]]:
    rng = np.random.default_rng(args.seed)
    docs = [token_ids(rng, args.doc_tokens, args.model) for _ in range(args.docs)]
    questions = [[token_ids(rng, int(rng.integers(32, 65)), args.model) for _ in range(args.questions)]
                 for _ in range(args.docs)]
    return docs, questions


def measure(args: argparse.Namespace, all_setups: list[Setup], console: Console) -> list[Query]:
    docs, questions = workload(args)
    params = SamplingParams(max_tokens=args.answer_tokens, temperature=0, ignore_eos=True)
    order = [(d, q) for q in range(args.questions) for d in range(args.docs)]  # round-robin over documents

    def work(runners: list[Runner], progress) -> list[Query]:
        task = progress.add_task("queries", total=len(order) * len(runners))
        queries = []
        for i, (d, q) in enumerate(order):
            for runner in runners[i % len(runners):] + runners[:i % len(runners)]:
                query, _ = runner.run(docs[d] + questions[d][q], params, f"doc {d + 1} q {q + 1}",
                                      "cold" if q == 0 else "warm")
                queries.append(query)
                progress.update(task, advance=1, refresh=True)
        return queries

    return run_all(args, all_setups, console, work)


def summarise(queries: list[Query], all_setups: list[Setup]) -> list[dict]:
    rows = []
    for s in all_setups:
        mine = [q for q in queries if q.setup == s.name]
        cold = stats([q.ttft_s for q in mine if q.group == "cold"])
        warm = stats([q.ttft_s for q in mine if q.group == "warm"])
        rows.append({"setup": s.name, "kvtier": s.kvtier, "cache_tokens": s.cache_tokens, "cold": cold,
                     "warm": warm, "speedup_p50": cold["p50"] / warm["p50"], **totals(mine)})
    return rows


def print_tables(console: Console, rows: list[dict], args: argparse.Namespace) -> None:
    t = Table(title=f"Long-document Q&A: TTFT (s), {args.docs} documents of {args.doc_tokens:,} tokens, "
                    f"{args.questions} questions each, {args.model}")
    for col in ("setup|#paged cache|#cold n|#cold mean|#cold p50|#cold p90|#warm n|#warm mean|#warm p50|"
                "#warm p90|#speedup p50").split("|"):
        t.add_column(col.strip("#"), justify="right" if col.startswith("#") else "left")
    for r in rows:
        c, w = r["cold"], r["warm"]
        t.add_row(r["setup"], f"{r['cache_tokens']:,}", str(c["n"]), f"{c['mean']:.3f}", f"{c['p50']:.3f}",
                  f"{c['p90']:.3f}", str(w["n"]), f"{w['mean']:.3f}", f"{w['p50']:.3f}", f"{w['p90']:.3f}",
                  f"{r['speedup_p50']:.1f}x")
    console.print(t)
    console.print(work_table("Long-document Q&A: work and throughput over the run", rows))


def work_table(title: str, rows: list[dict]) -> Table:
    t = Table(title=title)
    for col in ("setup|#requests|#req/s|#prompt tok/s|#prompt tokens|#computed|#loaded|#device cached|"
                "#hit rate|#cpu hits|#disk hits|#seconds").split("|"):
        t.add_column(col.strip("#"), justify="right" if col.startswith("#") else "left")
    for r in rows:
        t.add_row(r["setup"], str(r["requests"]), f"{r['requests_per_s']:.3f}",
                  f"{r['prompt_tokens_per_s']:,.0f}", f"{r['prompt_tokens']:,}", f"{r['computed']:,}",
                  f"{r['loaded']:,}", f"{r['device_cached']:,}", f"{r['hit_rate']:.3f}", f"{r['cpu_hits']:,}",
                  f"{r['disk_hits']:,}", f"{r['seconds']:.1f}")
    return t


def targets(console: Console, rows: list[dict], args: argparse.Namespace) -> dict[str, bool]:
    verdicts = {}
    for r in rows:
        if r["kvtier"] is None:
            continue
        ok = verdicts[r["setup"]] = r["speedup_p50"] >= TARGET_SPEEDUP
        console.print(f"{r['setup']}: warm p50 TTFT {r['warm']['p50']:.3f} s vs cold "
                      f"{r['cold']['p50']:.3f} s: "
                      f"{r['speedup_p50']:.1f}x, target >= {TARGET_SPEEDUP:.0f}x "
                      f"({args.doc_tokens:,}-token documents; the target is set for 4,096): "
                      + ("[green]PASS[/]" if ok else "[red]FAIL[/]"))
    return verdicts


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    x = np.arange(len(rows))
    for offset, kind, color in ((-0.2, "cold", "tab:red"), (0.2, "warm", "tab:green")):
        p50 = [r[kind]["p50"] for r in rows]
        bars = ax.bar(x + offset, p50, 0.4, color=color, label=f"{kind} (p50; whisker: p90)",
                      yerr=[[0] * len(rows), [r[kind]["p90"] - r[kind]["p50"] for r in rows]], capsize=3)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in p50], fontsize=8, label_type="center", color="white")
    ax.set_xticks(x, [f"{r['setup']}\n{r['speedup_p50']:.1f}x" for r in rows])
    ax.set_yscale("log")
    ax.set_ylim(top=8 * max(r["cold"]["p90"] for r in rows))  # room for the legend
    ax.set_ylabel("time to first token (s, log scale)")
    ax.set_title(f"Long-document Q&A, {args.model}, {args.docs} x {args.doc_tokens:,}-token documents: "
                 f"TTFT cold vs warm", fontsize=10)
    ax.legend(loc="upper right", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    p.add_argument("--docs", type=int, default=3, help="documents (default 3)")
    p.add_argument("--doc-tokens", type=int, default=None,
                   help="tokens per document (default 4096; --quick 1024)")
    p.add_argument("--questions", type=int, default=None,
                   help="questions per document (default 4; --quick 3)")
    p.add_argument("--answer-tokens", type=int, default=8, help="tokens generated per query (default 8)")
    p.add_argument("--dir", type=Path, default=ROOT / ".kvtier-cache" / "long_doc_qa", help="disk tier dir")
    args = p.parse_args()
    args.doc_tokens = args.doc_tokens or (1024 if args.quick else 4096)
    args.questions = args.questions or (3 if args.quick else 4)
    return args


def main() -> None:
    args = parse_args()
    console = console_and_logging(150, logging.WARNING)
    longest = args.doc_tokens + 64 + args.answer_tokens
    all_setups = setups(longest, args.docs, args.cache_prompts)
    info = machine_info(args.dir.resolve())
    logger.info("%d documents x %d tokens, %d questions each; paged cache %d tokens (resident: %d); "
                "load %.2f",
                args.docs, args.doc_tokens, args.questions, all_setups[0].cache_tokens,
                all_setups[-1].cache_tokens, info["load_avg_1m"])
    started = time.perf_counter()
    queries = measure(args, all_setups, console)
    elapsed = time.perf_counter() - started
    check_disk_hits(queries, {"warm"})
    rows = summarise(queries, all_setups)
    print_tables(console, rows, args)
    verdicts = targets(console, rows, args)
    load_end = os.getloadavg()
    console.print(f"{elapsed:.0f} s; load average {info['load_avg_1m']:.2f} at the start, "
                  f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} (1/5/15 min) at the end")
    report = {"machine": {**info, "load_avg_end": list(load_end)},
              "settings": {"model": args.model, "seed": args.seed, "docs": args.docs,
                           "doc_tokens": args.doc_tokens, "questions": args.questions,
                           "question_tokens": [32, 64],
                           "answer_tokens": args.answer_tokens, "quick": args.quick,
                           "kv_bytes_per_token": kv_bytes_per_token(args.model),
                           "cpu_config": str(args.cpu_config), "disk_config": str(args.disk_config),
                           "setups": [asdict(s) for s in all_setups]},
              "summary": rows, "targets": {"speedup_p50": TARGET_SPEEDUP, "pass": verdicts},
              "queries": [asdict(q) for q in queries], "elapsed_s": round(elapsed, 1)}
    name = "long_doc_qa_quick" if args.quick else "long_doc_qa"
    write_results(args.out, name, report, lambda path: plot(rows, args, path))


if __name__ == "__main__":
    main()
