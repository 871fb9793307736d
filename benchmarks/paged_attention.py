"""The bundled engine's CPU attention over paged KV: the gathering path beside the in-place path
(kvtier_engine/layers/cpu_attention.py), side by side in one process.

    .venv/bin/python benchmarks/paged_attention.py           # 1K, 4K and 16K-token contexts
    .venv/bin/python benchmarks/paged_attention.py --quick   # 1K and 4K, fewer repeats
    --model SPEC   model shape (default random:llama-small)   --repeats N   steps timed per case (default 7)
    --threads N    torch threads (default 1, as in async_load.py)   --out PATH   results folder

One sequence, one step, every layer of the model: `PagedAttention` is built (its per-step plans
included) and attends in each layer, as the model runner does. Steps: a decode step (1 new token) and
a 16-token question after the context, over a block table that is one run of consecutive blocks
(a fresh pool hands blocks out in order) or a random permutation of twice as many blocks (a pool
recycled in no order at all). The cache is fp32 and full of noise. Columns: ms per layer (CPU time
of the one thread, as codec_speed.py: what a shared machine disturbs least; median of the repeats,
the two paths alternating; the whole step divided by the layers; the JSON has wall time too) for
the gathering path ("gather": index_select of the blocks, then SDPA with enable_gqa, masked row
blocks for the question) and the in-place path, the speed-up, and the largest difference between
the two outputs. Writes paged_attention.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path

import torch
from harness import console_and_logging, machine_info, model_config, write_results
from rich.table import Table

from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers import cpu_attention
from kvtier_engine.layers.attention import BatchMetadata, PagedAttention
from kvtier_engine.model_config import ModelConfig

logger = logging.getLogger("paged_attention")

BLOCK_SIZE = 16
STEPS = {"decode": 1, "question": 16}


def case(config: ModelConfig, context: int, new: int, table_kind: str, repeats: int) -> dict:
    """Time one step of `new` tokens ending at `context` tokens with each path; ms per layer."""
    gen = torch.Generator().manual_seed(context + new)
    blocks = -(-context // BLOCK_SIZE)
    if table_kind == "contiguous":
        table, num_blocks = list(range(blocks)), blocks
    else:
        table, num_blocks = torch.randperm(2 * blocks, generator=gen)[:blocks].tolist(), 2 * blocks
    cache = PagedKVCache(config, num_blocks, block_size=BLOCK_SIZE)
    cache.kv.normal_(generator=gen)
    meta = BatchMetadata.build([table], [context - new], [new], BLOCK_SIZE)
    q = torch.randn(new, config.num_heads, config.head_dim, generator=gen)
    k, v = (torch.randn(new, config.num_kv_heads, config.head_dim, generator=gen) for _ in range(2))

    def step(in_place: bool) -> list[torch.Tensor]:
        backend = PagedAttention(cache, meta, config, read_in_place=in_place)
        return [backend.attend(layer, q, k, v) for layer in range(config.num_layers)]

    row = {"context": context, "step": "decode" if new == 1 else f"{new}-token question", "new_tokens": new,
           "table": table_kind}
    paths = {"gather": False, "in_place": True}
    outputs = {name: step(in_place) for name, in_place in paths.items()}  # warm-up; compared below
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    wall: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):  # the paths alternate, so that both meet the same neighbours
        for name, in_place in paths.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            step(in_place)
            cpu[name].append((time.thread_time() - c0) * 1e3 / config.num_layers)
            wall[name].append((time.perf_counter() - w0) * 1e3 / config.num_layers)
    for name in paths:
        row[name] = {"ms_per_layer": round(statistics.median(cpu[name]), 3),
                     "min": round(min(cpu[name]), 3), "max": round(max(cpu[name]), 3),
                     "wall_ms_per_layer": round(statistics.median(wall[name]), 3)}
    row["speedup"] = round(row["gather"]["ms_per_layer"] / row["in_place"]["ms_per_layer"], 2)
    row["max_abs_diff"] = max((a - b).abs().max().item()
                              for a, b in zip(outputs["gather"], outputs["in_place"]))
    return row


def print_table(console, rows: list[dict], args: argparse.Namespace, config: ModelConfig) -> None:
    t = Table(title=f"Paged attention on CPU, {args.model} ({config.num_heads} query heads on "
                    f"{config.num_kv_heads} KV heads, dim {config.head_dim}, fp32), "
                    f"{args.threads} thread(s): CPU ms per layer, median")
    for col in ("#context", "step", "table", "#gather", "#in place", "#speed-up", "#max abs diff"):
        t.add_column(col.strip("#"), justify="right" if col.startswith("#") else "left")
    for i, r in enumerate(rows):
        t.add_row(f"{r['context']:,}", r["step"], r["table"], f"{r['gather']['ms_per_layer']:.2f}",
                  f"{r['in_place']['ms_per_layer']:.2f}", f"{r['speedup']:.1f}x", f"{r['max_abs_diff']:.1e}",
                  end_section=(i + 1) % (2 * len(STEPS)) == 0)
    console.print(t)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:llama-small", help="model shape (default random:llama-small)")
    p.add_argument("--quick", action="store_true", help="1K and 4K contexts, 3 repeats")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per case (default 7)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    console = console_and_logging(130, logging.WARNING)
    if cpu_attention.FLASH is None:
        raise SystemExit("this torch has no CPU flash-attention op: the in-place path is off")
    torch.set_num_threads(args.threads)
    config = model_config(args.model)
    contexts = (1024, 4096) if args.quick else (1024, 4096, 16384)
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    info = machine_info(Path(__file__).parent.resolve())
    rows = [case(config, context, new, kind, repeats)
            for context in contexts for kind in ("contiguous", "fragmented") for new in STEPS.values()]
    print_table(console, rows, args, config)
    load_end = os.getloadavg()
    console.print(f"load average {info['load_avg_1m']:.2f} at the start, {load_end[0]:.2f} at the end")
    report = {"machine": {**info, "load_avg_end": list(load_end)},
              "settings": {"model": args.model, "threads": args.threads, "repeats": repeats,
                           "block_size": BLOCK_SIZE, "dtype": "float32", "layers": config.num_layers},
              "rows": rows}
    write_results(args.out, "paged_attention_quick" if args.quick else "paged_attention", report, None)


if __name__ == "__main__":
    main()
