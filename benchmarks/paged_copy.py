"""The CPU platform's paged block copies (`kvtier.platforms.cpu_ops`: C++, every layer in one call,
over torch's intra-op threads) against the torch fallback (`index_select` / `index_copy_`), beside a
plain contiguous copy of the same bytes (the memory-bandwidth limit for this machine), on a
Llama-3.1-8B-shaped block cache (32 layers, 8 KV heads of 128, bf16, blocks of 16 tokens).

    .venv/bin/python benchmarks/paged_copy.py            # 2,048 tokens a request, 5 repeats
    .venv/bin/python benchmarks/paged_copy.py --quick    # 256 tokens, 3 repeats (smoke run)

gather: a request's blocks (scattered over the cache, in shuffled order) into one `[2, L, T, H*D]`
chunk, as a save does; scatter: the inverse, as a load does. GB/s counts the chunk's bytes once.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from harness import console_and_logging, machine_info, write_results
from rich.table import Table

from kvtier.platforms import cpu_ops
from kvtier.platforms.base import torch_gather_blocks, torch_scatter_blocks

ROOT = Path(__file__).resolve().parent.parent
LAYERS, HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def timed(fn, repeats: int) -> float:
    """The median seconds of `repeats` calls, after one warm-up."""
    fn()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(tokens: int, repeats: int) -> list[dict]:
    blocks = tokens // BLOCK
    cache = torch.randn(2, LAYERS, 2 * blocks, BLOCK, HEADS, HEAD_DIM).to(torch.bfloat16)
    ids = torch.randperm(2 * blocks, generator=torch.Generator().manual_seed(0))[:blocks].tolist()
    chunk = torch_gather_blocks(cache, ids, tokens)
    nbytes = chunk.numel() * chunk.element_size()
    flat, target = chunk.clone(), torch.empty_like(chunk)
    rows = [("contiguous copy (limit)", lambda: target.copy_(flat))]
    rows += [("gather, torch", lambda: torch_gather_blocks(cache, ids, tokens)),
             ("scatter, torch", lambda: torch_scatter_blocks(cache, ids, chunk))]
    if cpu_ops.native is not None:
        rows += [("gather, kvtier C++", lambda: cpu_ops.gather_blocks(cache, ids, tokens)),
                 ("gather, kvtier C++, into a buffer",
                  lambda: cpu_ops.gather_blocks(cache, ids, tokens, target)),
                 ("scatter, kvtier C++", lambda: cpu_ops.scatter_blocks(cache, ids, chunk))]
    results = []
    for label, fn in rows:
        seconds = timed(fn, repeats)
        results.append({"copy": label, "seconds": seconds, "gb_per_s": nbytes / seconds / 1e9,
                        "bytes": nbytes})
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="256 tokens, 3 repeats")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    console = console_and_logging(120, logging.WARNING)
    tokens, repeats = (256, 3) if args.quick else (2048, 5)
    results = measure(tokens, repeats)
    limit = results[0]["gb_per_s"]
    table = Table(title=f"Paged block copies, Llama-8B shape, {tokens} tokens "
                        f"({results[0]['bytes'] / 2**20:.0f} MiB), {torch.get_num_threads()} threads")
    for column in ("copy", "ms", "GB/s", "of the limit"):
        table.add_column(column, justify="left" if column == "copy" else "right")
    for r in results:
        share = r["gb_per_s"] / limit
        table.add_row(r["copy"], f"{1e3 * r['seconds']:.2f}", f"{r['gb_per_s']:.2f}", f"{share:.0%}")
    console.print(table)
    report = {"machine": {**machine_info(ROOT), "load_avg_1m_end": os.getloadavg()[0]},
              "settings": {"tokens": tokens, "repeats": repeats, "layers": LAYERS, "kv_heads": HEADS,
                           "head_dim": HEAD_DIM, "block_tokens": BLOCK, "dtype": "bfloat16",
                           "threads": torch.get_num_threads(), "native": cpu_ops.native is not None},
              "results": results}
    write_results(args.out, "paged_copy_quick" if args.quick else "paged_copy", report, None)


if __name__ == "__main__":
    main()
