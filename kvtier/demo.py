"""`make demo`: store a long synthetic prompt's KV, then look it up and retrieve it from each tier.

    python -m kvtier.demo --config configs/cpu_disk.yaml [--tokens 8192]

Runs on the embedded default (CPU + disk tiers, no services). The KV is seeded random data with a
Llama-3.2-1B-like geometry; every retrieve is checked bit for bit against what was stored. Run it
twice: the second process finds the prompt in the disk tier the first one filled.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from rich.console import Console
from rich.table import Table

from kvtier import CacheEngine, KVLayout, load_config

# Llama-3.2-1B per-rank KV geometry: 16 layers, 8 KV heads of 128 dims, bf16 (64 KiB per token).
DEMO_LAYOUT = KVLayout(num_layers=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)


def synthetic_prompt(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Seeded by the length too: the tokens of a shorter prompt are a prefix of a longer one's (same
    # chunk keys), but its KV comes from elsewhere in the random stream, so a run with another
    # --tokens found the first run's KV on disk under its keys and reported "not bit-exact".
    gen = torch.Generator().manual_seed(seed << 32 | num_tokens)
    tokens = torch.randint(0, 128_000, (num_tokens,), generator=gen, dtype=torch.int64)
    kv = torch.randn(DEMO_LAYOUT.chunk_shape(num_tokens), generator=gen, dtype=torch.float32)
    return tokens, kv.to(DEMO_LAYOUT.dtype)


def _served_by(before: dict, after: dict) -> str:
    gained = [t for t in after["tiers"] if after["tiers"][t]["hits"] > before["tiers"][t]["hits"]]
    return "+".join(gained) or "-"


def _timed_retrieve(eng: CacheEngine, tokens: torch.Tensor, kv: torch.Tensor, out: torch.Tensor,
                    step: str) -> list[str]:
    before = eng.stats()
    start = time.perf_counter()
    got, n = eng.retrieve(tokens, out=out)
    seconds = time.perf_counter() - start
    exact = torch.equal(got, kv[:, :, :n])
    nbytes = DEMO_LAYOUT.chunk_bytes(n)
    return [step, _served_by(before, eng.stats()), f"{n:,}", f"{nbytes / 2**20:,.0f}",
            f"{seconds * 1e3:,.1f}", f"{nbytes / seconds / 1e9:,.2f}" if n else "-",
            "[green]yes[/]" if exact and n else "[red]NO[/]"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: KVTIER_CONFIG or built-in)")
    parser.add_argument("--tokens", type=int, default=8192, help="prompt length in tokens")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _run_steps(eng: CacheEngine, console: Console, tokens: torch.Tensor, kv: torch.Tensor) -> list[list[str]]:
    """Store the prompt, look it up, retrieve it hot and (with a disk tier) from disk: one row per
    retrieve."""
    found = eng.lookup(tokens)
    if found:
        console.print(f"found {found:,} tokens already cached (a previous run filled the disk tier)")
    # One output buffer, touched once and reused, as an engine's KV buffer is: a fresh tensor
    # per retrieve would time the kernel's page faults, not kvtier.
    out = torch.zeros_like(kv)
    rows = []
    if found:
        rows.append(_timed_retrieve(eng, tokens, kv, out, "retrieve, from a previous run"))
    start = time.perf_counter()
    eng.store(tokens, kv)
    eng.flush()  # let the write-through to disk land, so the next steps see it
    stored_s = time.perf_counter() - start
    console.print(f"stored in {stored_s * 1e3:,.0f} ms (CPU copy + background disk write)")
    start = time.perf_counter()
    hit = eng.lookup(tokens)
    console.print(f"lookup: {hit:,} of {len(tokens):,} tokens cached "
                  f"({(time.perf_counter() - start) * 1e3:.2f} ms, no payload I/O)")
    rows.append(_timed_retrieve(eng, tokens, kv, out, "retrieve, hot"))
    if "disk" in eng.metrics.tiers:
        eng.clear("cpu")
        rows.append(_timed_retrieve(eng, tokens, kv, out, "retrieve after clear('cpu')"))
        rows.append(_timed_retrieve(eng, tokens, kv, out, "retrieve again (promoted)"))
    return rows


def _print_report(eng: CacheEngine, console: Console, rows: list[list[str]]) -> None:
    table = Table(title="kvtier demo")
    for col in ("step", "served by", "tokens", "MiB", "ms", "GB/s", "bit-exact"):
        table.add_column(col, justify="left" if col in ("step", "served by") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for name, tier in eng.stats()["tiers"].items():
        console.print(f"  {name}: {tier['chunks']} chunks, {tier['bytes'] / 2**20:,.0f} MiB, "
                      f"hits {tier['hits']}, misses {tier['misses']}, evictions {tier['evictions']}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    config = load_config(args.config)
    tokens, kv = synthetic_prompt(args.tokens, args.seed)
    with CacheEngine(config, DEMO_LAYOUT, model_id="kvtier-demo") as eng:
        console.print(f"[bold]kvtier demo[/]: config {config.source}, tiers {eng.metrics.tiers}, "
                      f"{args.tokens:,} tokens x {DEMO_LAYOUT.bytes_per_token // 1024} KiB/token "
                      f"({DEMO_LAYOUT.chunk_bytes(args.tokens) / 2**20:,.0f} MiB of KV)")
        rows = _run_steps(eng, console, tokens, kv)
        _print_report(eng, console, rows)
    ok = all("yes" in row[-1] for row in rows)
    if not ok:
        console.print("[red]a retrieve was not bit-exact[/]")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
