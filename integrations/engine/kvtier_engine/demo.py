"""`make demo`: the engine on random:llama-small without and with kvtier, through a multi-round chat
and a long-document Q&A; per round, the time to first token of each and what kvtier served.

    python -m kvtier_engine.demo --config configs/cpu_disk.yaml

Two engines with the same seeded weights, one without kvtier and one with the given config, run
every prompt in turn. Both have the device prefix cache off, so the engine without kvtier recomputes
every prompt, as on a GPU whose paged cache other users' requests have filled (benchmarks/ measures
the prefix cache on and a small paged cache). Prompts are seeded token ids and the assistant turns
are scripted, so both engines, and every run, see the same tokens under the same weights: run it
twice and the second process loads round 1 from the disk tier the first one filled.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvtier import load_config
from kvtier_engine.llm import LLM
from kvtier_engine.sampling import SamplingParams

MODEL = "random:llama-small"
VOCAB = 32_000
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def sessions(seed: int, doc_tokens: int, rounds: int) -> dict[str, list[list[int]]]:
    """Each session's prompts, round by round: a chat (system prompt, then question / scripted answer
    turns; a round's prompt is the whole conversation) and questions about one long document."""
    rng = np.random.default_rng(seed)

    def ids(n: int) -> list[int]:
        return rng.integers(0, VOCAB, n).tolist()

    chat, conversation = [], ids(1024)
    for _ in range(rounds):
        conversation += ids(64)  # the user's question
        chat.append(list(conversation))
        conversation += ids(192)  # the assistant's answer (scripted: the same in every run)
    document = ids(doc_tokens)
    return {"multi-round chat": chat, "long-document Q&A": [document + ids(48) for _ in range(rounds)]}


def served_by(before: dict, after: dict) -> tuple[str, int]:
    """Tiers that served hits between two `stats()`, and the disk tier's chunk hits."""
    tiers = [t for t in after["tiers"] if after["tiers"][t]["hits"] > before["tiers"][t]["hits"]]
    disk = after["tiers"].get("disk", {}).get("hits", 0) - before["tiers"].get("disk", {}).get("hits", 0)
    return "+".join(tiers) or "-", disk


def run_session(console: Console, name: str, prompts: list[list[int]], without: LLM, with_kv: LLM) -> int:
    """Prints the session's table; returns the disk-tier chunk hits of its first round."""
    kv = with_kv.engine.kvtier
    table = Table(title=f"{name}: time to first token without / with kvtier")
    for col in ("round", "prompt tokens", "TTFT without", "TTFT with", "speedup", "tokens loaded",
                "hit rate"):
        table.add_column(col, justify="left" if col == "round" else "right")
    table.add_column("served by", min_width=8)  # "cpu+disk" whole
    first_disk = 0
    # Redrawn between requests only: an auto-refresh thread would take the GIL inside timed requests.
    with Progress(console=console, transient=True, auto_refresh=False) as progress:
        task = progress.add_task(name, total=2 * len(prompts))
        for i, prompt in enumerate(prompts):
            progress.refresh()
            base = without.generate(prompt, PARAMS)[0].metrics
            progress.update(task, advance=1, refresh=True)
            before = kv.stats()
            got = with_kv.generate(prompt, PARAMS)[0].metrics
            progress.update(task, advance=1, refresh=True)
            kv.flush()  # the write-through to disk lands now: a later process finds it
            tiers, disk = served_by(before, kv.stats())
            first_disk = disk if i == 0 else first_disk
            table.add_row(str(i + 1), f"{len(prompt):,}", f"{base.ttft_s:.2f} s", f"{got.ttft_s:.2f} s",
                          f"{base.ttft_s / got.ttft_s:.1f}x", f"{got.tokens_loaded:,}",
                          f"{got.tokens_loaded / len(prompt):.0%}", tiers)
    console.print(table)
    return first_disk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="kvtier YAML config (default: KVTIER_CONFIG or built-in)")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--seed", type=int, default=0, help="weights and token ids")
    parser.add_argument("--doc-tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console() if sys.stdout.isatty() else Console(width=100)  # wide enough for a table

    config = load_config(args.config)
    options = {"seed": args.seed, "enable_prefix_caching": False, "kv_cache_bytes": 64 << 20}
    started = time.perf_counter()
    with LLM(args.model, **options) as without, LLM(args.model, kvtier_config=config, **options) as with_kv:
        kv = with_kv.engine.kvtier
        disk = f", disk tier at {config.disk.path}" if config.disk is not None else ""
        console.print(f"[bold]kvtier engine demo[/]: {args.model} (seed {args.seed}) on "
                      f"{with_kv.engine.cache.kv.device}, kvtier config {config.source}{disk}")
        console.print("Each prompt runs on two engines with the same weights, without and with kvtier. "
                      "Both have the device prefix cache off, as when other users' requests have "
                      "filled the GPU's KV cache: without kvtier every prompt is computed again.")
        # An engine's first forward passes pay one-off costs; over 512 tokens, attention's long-query path
        # is warm too. The engine with kvtier stores its two whole chunks (and finds them on a rerun).
        warm_up = np.random.default_rng(args.seed + 1).integers(0, VOCAB, 600).tolist()
        for llm in (without, with_kv):
            llm.generate(warm_up, PARAMS)
        first_disk = {name: run_session(console, name, prompts, without, with_kv)
                      for name, prompts in sessions(args.seed, args.doc_tokens, args.rounds).items()}
        stats = kv.stats()
    for name, chunks in first_disk.items():
        if chunks:
            console.print(f"{name}, round 1: served from the disk tier ({chunks} chunks read from disk): "
                          "a previous run stored them there.")
    if not any(first_disk.values()) and config.disk is not None:
        console.print("Round 1 of each session was computed: nothing of it was on disk yet. Run "
                      "`make demo` again: the second process loads it from the disk tier this run filled.")
    for name, tier in stats["tiers"].items():
        console.print(f"  {name} tier: {tier['chunks']} chunks, {tier['bytes'] / 2**20:,.0f} MiB, "
                      f"hits {tier['hits']}, misses {tier['misses']}")
    console.print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
