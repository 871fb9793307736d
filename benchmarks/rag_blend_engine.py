"""CacheBlend end to end through the bundled engine (issue 14): time to first token, work done and
answers of RAG prompts whose passages come back in new orders, without kvtier, with kvtier's prefix
caching and with kvtier's `blend:`, each its own `kvtier_engine.LLM` in one process.

    .venv/bin/python benchmarks/rag_blend_engine.py          # 4 passage sets x 3 orders (5-8 passages)
    .venv/bin/python benchmarks/rag_blend_engine.py --quick  # smoke run: 2 sets x 2 orders of 4 passages

Prompts are rag_blend.py's (SmolLM2's chat format: system prompt head, passages of stdlib pydoc pages
each after the separator "\\n\\n## ", a question about a function named in one of them), given to the
engine as token ids; the `blend:` section takes the separator as ids (`separator_ids`).

Workload, the same request sequence on every setup:
- warm-up: the pool shuffled and cut into prompts of about 6 passages, so every passage is seen once.
  The engine computes them in context and, with `blend:`, saves each passage's KV under its own
  segment keys (K moved to segment position 0). Not measured.
- measured: `--sets` passage sets (5-8 passages of the pool), each asked `--orders` times in a new
  shuffled order with a new question: prefix caching holds only the head (and, by chance, a passage
  that comes first again), blending finds every passage.

Setups (model SmolLM2-135M-Instruct, float32; device prefix caching on, as users run the engine):
`no kvtier`, `kvtier prefix` (CPU tier, no blend), `kvtier blend 0.15` (check layer 1, the issue's
defaults) and `kvtier blend 1.0` (every row recomputed: a sanity row whose answers must equal no
kvtier's). Requests go one at a time, the order of the setups rotated per prompt, every setup's
kvtier saves awaited (`engine.wait_for_saves`) before the next prompt.

Per setup, over the measured prompts: TTFT p50 / mean (engine-measured: arrival to first token, so
scheduling, kvtier reads, the blend and its scatter into paged blocks are in it), speedups vs no
kvtier and vs kvtier prefix (ratios of the p50s), prompt tokens computed / loaded / found on the
device, the blend metrics (segments hit, tokens reused and recomputed), and against no kvtier's
greedy answer (32 tokens, temperature 0, to end-of-turn) the share identical and the share with the
same first token. The model-level TTFT of rag_blend.json (same prompts' shape, passages prefilled
alone, no engine) is put beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from harness import console_and_logging, machine_info, progress_bar, write_results
from rag_blend import CHECK_LAYER, SEPARATOR, Passage, Prompt, build_prompt, passage_pool
from rich.console import Console
from rich.table import Table

from kvtier.config import BlendConfig, CpuConfig, KvtierConfig
from kvtier_engine import LLM, SamplingParams
from kvtier_engine.demo import MODEL
from kvtier_engine.tokenizer import load_tokenizer

logger = logging.getLogger("rag_blend_engine")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
ANSWER_TOKENS = 32
CHUNK = 256
WARM_UP_PASSAGES = 6  # per warm-up prompt
# Room for one whole prompt in a step: a blend computes the prompt after its head in one step.
BATCHED_TOKENS = 4096
# Setup -> the rag_blend.json method whose model-level TTFT sits beside it.
MODEL_LEVEL = {"no kvtier": "full", "kvtier prefix": "prefix", "kvtier blend 0.15": "blend 0.15",
               "kvtier blend 1.0": "blend 1"}


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    kvtier: bool
    blend_ratio: float | None  # None: no `blend:` section


SETUPS = (Setup("no kvtier", False, None), Setup("kvtier prefix", True, None),
          Setup("kvtier blend 0.15", True, 0.15), Setup("kvtier blend 1.0", True, 1.0))


@dataclass(slots=True)
class Query:
    setup: str
    phase: str  # "warm-up" / "measured"
    prompt: int  # index in the request sequence
    passage_set: int  # -1 for warm-up prompts
    tokens: int
    passages: int
    ttft_s: float
    computed: int  # prefill_tokens_computed
    loaded: int  # tokens_loaded (kvtier's prefix)
    device_cached: int  # tokens_cached_on_device
    segments_hit: int
    reused: int
    recomputed: int
    answer: list[int]


@dataclass(frozen=True, slots=True)
class Workload:
    warm_up: list[Prompt]
    measured: list[Prompt]
    sets: list[int]  # passage set of each measured prompt


# -- prompts -------------------------------------------------------------------------------------


def prompt_of(tokenizer, pool: list[Passage], members: list[int], rng: np.random.Generator) -> Prompt:
    """A prompt of exactly the passages `members` (pool indices) in a random order, with a question
    about one of them (rag_blend.build_prompt on that sub-pool; indices mapped back to the pool)."""
    prompt = build_prompt(tokenizer, [pool[i] for i in members], rng, len(members))
    prompt.passages = [members[i] for i in prompt.passages]
    return prompt


def askable_groups(pool: list[Passage], groups: list[list[int]]) -> bool:
    return all(any(pool[i].names for i in g) for g in groups)


def workload(tokenizer, pool: list[Passage], args: argparse.Namespace) -> Workload:
    """Warm-up prompts that hold every passage once, then `sets` x `orders` measured prompts."""
    rng = np.random.default_rng(args.seed)
    for _ in range(1000):  # every prompt needs a passage to ask about
        perm = rng.permutation(len(pool)).tolist()
        groups = [g.tolist() for g in np.array_split(perm, max(1, round(len(pool) / WARM_UP_PASSAGES)))]
        if askable_groups(pool, groups):
            break
    else:
        raise ValueError("the pool has too few passages that name a function to ask about")
    warm_up = [prompt_of(tokenizer, pool, g, rng) for g in groups]
    measured, sets = [], []
    for s in range(args.sets):
        members = []
        while not askable_groups(pool, [members]):
            count = int(rng.integers(args.passages[0], args.passages[1] + 1))
            members = rng.choice(len(pool), size=min(count, len(pool)), replace=False).tolist()
        for _ in range(args.orders):
            measured.append(prompt_of(tokenizer, pool, members, rng))
            sets.append(s)
    # Interleaved over the sets: a set's orders do not follow each other.
    order = sorted(range(len(measured)), key=lambda i: (i % args.orders, sets[i]))
    return Workload(warm_up, [measured[i] for i in order], [sets[i] for i in order])


# -- engines -------------------------------------------------------------------------------------


def kvtier_config(setup: Setup, separator_ids: list[int], chunk_size: int = CHUNK) -> KvtierConfig | None:
    """CPU tier only; with `blend:` at the setup's ratio and the issue's check layer."""
    if not setup.kvtier:
        return None
    blend = None
    if setup.blend_ratio is not None:
        blend = BlendConfig(separator_ids=tuple(separator_ids), ratio=setup.blend_ratio,
                            check_layer=CHECK_LAYER)
    return KvtierConfig(chunk_size=chunk_size, save_partial_chunks=True, disk=None,
                        cpu=CpuConfig(capacity=2 << 30), blend=blend)


class Runner:
    """One setup's engine; runs one prompt at a time and reads what it cost from its metrics."""

    def __init__(self, setup: Setup, model: str, separator_ids: list[int], chunk_size: int = CHUNK):
        self.setup = setup
        self.llm = LLM(model, kvtier_config=kvtier_config(setup, separator_ids, chunk_size), dtype="float32",
                       max_num_batched_tokens=BATCHED_TOKENS)
        self.params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0)

    def run(self, prompt: Prompt, phase: str, index: int, passage_set: int) -> Query:
        ids = prompt.ids
        out = self.llm.generate(ids, self.params)[0]
        if not self.llm.engine.wait_for_saves(120):  # the next prompt finds every saved passage
            raise RuntimeError(f"{self.setup.name}: kvtier saves did not land in 120 s")
        m = out.metrics
        return Query(self.setup.name, phase, index, passage_set, len(ids), len(prompt.passages), m.ttft_s,
                     m.prefill_tokens_computed, m.tokens_loaded, m.tokens_cached_on_device,
                     m.blend_segments_hit, m.blend_tokens_reused,
                     m.blend_tokens_recomputed, list(out.token_ids))

    def close(self) -> None:
        self.llm.close()


def run_workload(model: str, separator_ids: list[int], work: Workload, console: Console,
                 setups: tuple[Setup, ...] = SETUPS, chunk_size: int = CHUNK) -> list[Query]:
    """Every prompt (warm-up, then measured) on every setup's engine, the setups' order rotated."""
    prompts = [("warm-up", p, -1) for p in work.warm_up] + [("measured", p, s)
                                                            for p, s in zip(work.measured, work.sets)]
    runners, queries = [], []
    try:
        for setup in setups:
            runners.append(Runner(setup, model, separator_ids, chunk_size))
        with progress_bar(console) as bar:
            task = bar.add_task("requests", total=len(prompts) * len(runners))
            for i, (phase, prompt, s) in enumerate(prompts):
                for runner in runners[i % len(runners):] + runners[:i % len(runners)]:
                    queries.append(runner.run(prompt, phase, i, s))
                    bar.update(task, advance=1, refresh=True)
                if i == len(work.warm_up) - 1:
                    logger.info("warm-up done: %d prompts held every passage once", len(work.warm_up))
    finally:
        for r in runners:
            r.close()
    return queries


# -- summary -------------------------------------------------------------------------------------


def summarise(queries: list[Query], setups: tuple[Setup, ...] = SETUPS) -> list[dict]:
    """Per setup over the measured prompts; answers compared with no kvtier's for the same prompt."""
    measured = [q for q in queries if q.phase == "measured"]
    ref = {q.prompt: q.answer for q in measured if q.setup == setups[0].name}
    rows = []
    for s in setups:
        mine = [q for q in measured if q.setup == s.name]
        ttft = np.array([q.ttft_s for q in mine])
        row = {"setup": s.name, "blend_ratio": s.blend_ratio, "prompts": len(mine),
               "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_mean_s": float(ttft.mean()),
               "prompt_tokens": sum(q.tokens for q in mine), "passages": sum(q.passages for q in mine)}
        for key in ("computed", "loaded", "device_cached", "segments_hit", "reused", "recomputed"):
            row[key] = sum(getattr(q, key) for q in mine)
        row["blended_prompts"] = sum(q.segments_hit > 0 for q in mine)
        row["identical_share"] = float(np.mean([q.answer == ref[q.prompt] for q in mine]))
        row["first_token_agreement"] = float(np.mean([q.answer[:1] == ref[q.prompt][:1] for q in mine]))
        rows.append(row)
    base = rows[0]["ttft_p50_s"]
    prefix = next((r["ttft_p50_s"] for r in rows if r["setup"] == "kvtier prefix"), None)
    for r in rows:
        r["speedup_vs_no_kvtier"] = base / r["ttft_p50_s"]
        r["speedup_vs_prefix"] = prefix / r["ttft_p50_s"] if prefix else None
    return rows


def model_level(path: Path) -> dict | None:
    """rag_blend.json's model-level TTFT per setup (its methods' mean of per-prompt medians)."""
    if not path.exists():
        return None
    summary = json.loads(path.read_text())["summary"]
    return {setup: summary[method]["ttft_s"] for setup, method in MODEL_LEVEL.items() if method in summary}


# -- output --------------------------------------------------------------------------------------


def print_results(console: Console, rows: list[dict], level: dict | None, title: str) -> None:
    t = Table(title=title)
    for c in ("setup", "TTFT p50 ms", "TTFT mean ms", "x vs no kvtier", "x vs prefix", "computed", "loaded",
              "on device", "hit / passages", "reused", "recomputed", "identical", "first token",
              "model-level ms"):
        t.add_column(c, justify="left" if c == "setup" else "right")
    for r in rows:
        t.add_row(r["setup"], f"{r['ttft_p50_s'] * 1e3:,.0f}", f"{r['ttft_mean_s'] * 1e3:,.0f}",
                  f"{r['speedup_vs_no_kvtier']:.2f}",
                  f"{r['speedup_vs_prefix']:.2f}" if r["speedup_vs_prefix"] else "",
                  f"{r['computed']:,}", f"{r['loaded']:,}", f"{r['device_cached']:,}",
                  f"{r['segments_hit']}/{r['passages']}", f"{r['reused']:,}", f"{r['recomputed']:,}",
                  f"{r['identical_share']:.0%}", f"{r['first_token_agreement']:.0%}",
                  f"{level[r['setup']] * 1e3:,.0f}" if level and r["setup"] in level else "")
    console.print(t)


def plot(path: Path, rows: list[dict], level: dict | None, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5))
    x = np.arange(len(rows))
    p50 = [r["ttft_p50_s"] * 1e3 for r in rows]
    bars = ax.bar(x - 0.2, p50, 0.4, color="tab:blue", label="engine TTFT p50 (whisker: mean)",
                  yerr=[[0] * len(rows), [max(0, r["ttft_mean_s"] * 1e3 - p) for r, p in zip(rows, p50)]],
                  capsize=3)
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in p50], fontsize=8)
    if level:
        lv = [level.get(r["setup"], 0) * 1e3 for r in rows]
        bars = ax.bar(x + 0.2, lv, 0.4, color="tab:gray", label="model level (rag_blend.json)")
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in lv], fontsize=8)
    ax.set_xticks(x, [f"{r['setup']}\n{r['speedup_vs_no_kvtier']:.2f}x, identical {r['identical_share']:.0%}"
                      for r in rows], fontsize=8)
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 sets x 2 orders of 4 passages, a 12-passage pool")
    p.add_argument("--sets", type=int, default=4, help="passage sets measured (default 4)")
    p.add_argument("--orders", type=int, default=3, help="prompts per set, each a new order (default 3)")
    p.add_argument("--passages", type=int, nargs=2, default=(5, 8), metavar=("MIN", "MAX"))
    p.add_argument("--pool", type=int, default=None, help="passages in the pool (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.sets, args.orders, args.passages, args.pool = 2, 2, (4, 4), args.pool or 12
    return args


def settings(args: argparse.Namespace, pool: list[Passage], work: Workload, separator_ids: list[int],
             chunk_size: int) -> dict:
    tokens = [len(p.ids) for p in work.measured]
    return {"check_layer": CHECK_LAYER, "answer_tokens": ANSWER_TOKENS, "chunk_size": chunk_size,
            "separator": SEPARATOR, "separator_ids": separator_ids, "device_prefix_caching": True,
            "max_num_batched_tokens": BATCHED_TOKENS, "setups": [asdict(s) for s in SETUPS],
            "pool_passages": len(pool), "warm_up_prompts": len(work.warm_up),
            "measured_prompts": len(work.measured), "passage_sets": args.sets, "orders": args.orders,
            "measured_tokens": [min(tokens), max(tokens)]}


def main(argv: list[str] | None = None, model: str = MODEL, tokenizer=None, pool: list[Passage] | None = None,
         chunk_size: int = CHUNK) -> int:
    """The benchmark; a test gives a tiny `model`, its `tokenizer`, a `pool` and a small `chunk_size`."""
    args = parse_args(argv)
    console = console_and_logging(170, logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    tokenizer = tokenizer or load_tokenizer(model)
    pool = (pool or passage_pool(tokenizer))[: args.pool]
    work = workload(tokenizer, pool, args)
    separator_ids = tokenizer.encode(SEPARATOR)
    setup = settings(args, pool, work, separator_ids, chunk_size)
    logger.info("%d passages; %d warm-up prompts, %d measured prompts of %s tokens; %d setups", len(pool),
                len(work.warm_up), len(work.measured), setup["measured_tokens"], len(SETUPS))
    queries = run_workload(model, separator_ids, work, console, chunk_size=chunk_size)
    rows = summarise(queries)
    level = model_level(args.out / "rag_blend.json") if model == MODEL else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lo, hi = setup["measured_tokens"]
    title = (f"CacheBlend through the engine: {model} fp32 on {device}, {len(work.measured)} prompts of "
             f"{lo:,}-{hi:,} tokens\n({args.sets} passage sets x {args.orders} orders, "
             f"device prefix caching on)")
    print_results(console, rows, level, title)
    load_after = os.getloadavg()
    machine = machine_info(args.out.resolve()) | {
        "device": device, "torch_threads": torch.get_num_threads(), "load_avg_before": load_before,
        "load_avg_after": load_after}
    console.print(f"{machine['cpu_model']}, {machine['cores']} cores; load average before "
                  f"{'/'.join(f'{x:.2f}' for x in load_before)}, "
                  f"after {'/'.join(f'{x:.2f}' for x in load_after)}")
    report = {"model": model, "model_dtype": "float32", "device": device, "machine": machine,
              "args": vars(args) | {"out": str(args.out)}, "settings": setup, "summary": rows,
              "model_level_ttft_s": level, "queries": [asdict(q) for q in queries],
              "seconds": time.perf_counter() - t0}
    name = "rag_blend_engine_quick" if args.quick else "rag_blend_engine"
    write_results(args.out, name, report, lambda path: plot(path, rows, level, title))
    console.print(f"wrote {args.out / name}.json/.png in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
