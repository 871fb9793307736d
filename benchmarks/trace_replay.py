"""Replay the Mooncake conversation trace through a CacheEngine: hit rate and bytes moved per tier
for a sweep of CPU capacities, each beside the hit rate of an infinite cache.

    .venv/bin/python benchmarks/trace_replay.py            # full run (first 6,000 requests by default)
    .venv/bin/python benchmarks/trace_replay.py --quick    # smoke run: the first 600 requests

Model-free: block `h` of the trace (512 tokens) becomes 512 token ids drawn from
`numpy.random.default_rng(h)`, so equal hash ids give equal prefixes; a prompt is its blocks' tokens
cut to `input_length`. For each request, in trace order (timestamps are not replayed):
`lookup(tokens)`, `retrieve(tokens)` of the hit, `store(tokens, kv)` of the whole prompt (the
engine skips the chunks it holds), and `flush()` when a disk tier is configured. The KV geometry is
tiny (1 layer, 1 KV head, head dim 8, fp16: 32 bytes a token, 8 KiB a 256-token chunk) so millions of
tokens fit in RAM; bytes moved are also reported scaled to Llama-3.1-8B (128 KiB a token) by token
count. benchmarks/README.md explains each column.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from harness import console_and_logging, machine_info, progress_bar, scratch_run, write_results
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from kvtier.config import CpuConfig, DiskConfig, KvtierConfig
from kvtier.engine import CacheEngine
from kvtier.layout import KVLayout

logger = logging.getLogger("trace_replay")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = ROOT.parent / "shared" / "workloads" / "mooncake_conversation_trace.jsonl"
BLOCK = 512  # tokens per trace hash block
CHUNK = 256  # tokens per kvtier chunk (the config default)
VOCAB = 128_000
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16)  # 32 B/token
REAL_MODEL = "Llama-3.1-8B"
REAL_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads, head dim 128, bf16: 128 KiB
DEFAULT_CAPACITIES = "64K,256K,1M,4M,16M"
SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30}


@dataclass(frozen=True, slots=True)
class Request:
    input_length: int
    hash_ids: tuple[int, ...]


@dataclass(slots=True)
class Result:
    """One replay: the configuration, then what it measured (bytes in the tiny geometry)."""

    config: str  # "cpu" or "cpu+disk"
    cpu_capacity_tokens: int
    infinite: bool
    requests: int = 0
    input_tokens: int = 0
    hit_tokens: int = 0
    hit_rate: float = 0.0
    cpu_hits: int = 0  # chunks served, from retrieve
    disk_hits: int = 0
    cpu_evictions: int = 0
    cpu_rejected: int = 0
    promotions: int = 0
    bytes: dict[str, int] | None = None  # "<tier>_written" / "<tier>_read", tiny geometry
    seconds: float = 0.0

    def real_gib(self, key: str) -> float:
        """Bytes moved, scaled to the real model: tokens moved x its bytes per token, in GiB."""
        return self.bytes[key] / LAYOUT.bytes_per_token * REAL_BYTES_PER_TOKEN / 2**30


def load_trace(path: Path, limit: int | None) -> list[Request]:
    if not path.is_file():
        sys.exit(f"trace not found: {path}\n(get mooncake_conversation_trace.jsonl, see "
                 f"../shared/workloads/README.md, or pass its path as the first argument)")
    requests = []
    with path.open() as f:
        for line in f:
            if limit is not None and len(requests) >= limit:
                break
            row = json.loads(line)
            requests.append(Request(int(row["input_length"]), tuple(row["hash_ids"])))
    return requests


class Prompts:
    """Token ids per request, synthesised per hash block and cached (2 KiB a block)."""

    def __init__(self) -> None:
        self._blocks: dict[int, np.ndarray] = {}

    def block(self, h: int) -> np.ndarray:
        if (arr := self._blocks.get(h)) is None:
            arr = np.random.default_rng(h).integers(0, VOCAB, BLOCK).astype(np.uint32)
            self._blocks[h] = arr
        return arr

    def tokens(self, req: Request) -> np.ndarray:
        return np.concatenate([self.block(h) for h in req.hash_ids])[:req.input_length]


def infinite_hits(requests: list[Request]) -> tuple[int, int]:
    """Straight from the trace: per request, the leading hash blocks seen before, in tokens, capped
    at input_length and cut to whole chunks (kvtier stores no partial chunk). Returns (hit tokens,
    unique chunks an infinite cache ends up holding)."""
    seen: set[int] = set()
    held: dict[int, int] = {}  # hash id -> whole chunks of it ever stored
    hits = 0
    for req in requests:
        lead = next((i for i, h in enumerate(req.hash_ids) if h not in seen), len(req.hash_ids))
        hits += min(lead * BLOCK, req.input_length) // CHUNK * CHUNK
        seen.update(req.hash_ids)
        for i, h in enumerate(req.hash_ids):
            held[h] = max(held.get(h, 0), min(BLOCK, max(req.input_length - i * BLOCK, 0)) // CHUNK)
    return hits, sum(held.values())


def replay(requests: list[Request], prompts: Prompts, result: Result, disk: DiskConfig | None,
           progress: Progress) -> Result:
    capacity = result.cpu_capacity_tokens * LAYOUT.bytes_per_token  # whole 8 KiB slabs
    config = KvtierConfig(cpu=CpuConfig(capacity=capacity, pin_memory="off"), disk=disk)
    longest = max(r.input_length for r in requests)
    kv = torch.zeros(LAYOUT.chunk_shape(longest), dtype=LAYOUT.dtype)  # the KV content is irrelevant here
    out = torch.empty_like(kv)
    label = f"{result.config}, CPU {tokens_text(result.cpu_capacity_tokens)} tokens"
    task = progress.add_task(label, total=len(requests))
    started = time.perf_counter()
    with CacheEngine(config, LAYOUT, model_id="trace-replay") as eng:
        for i, req in enumerate(requests):
            tokens = prompts.tokens(req)
            hit = eng.lookup(tokens)
            if hit and (got := eng.retrieve(tokens, out=out)[1]) != hit:
                raise RuntimeError(f"request {i}: lookup found {hit} tokens, retrieve served {got}")
            eng.store(tokens, kv[:, :, :len(tokens)])
            if disk is not None and not eng.flush(60):
                raise RuntimeError("background writes did not land within 60 s")
            result.input_tokens += len(tokens)
            result.hit_tokens += hit
            if i % 50 == 0:
                progress.update(task, completed=i + 1, refresh=True)
        stats = eng.stats()
    progress.remove_task(task)
    result.seconds = time.perf_counter() - started
    tiers = stats["tiers"]
    result.requests = len(requests)
    result.hit_rate = result.hit_tokens / result.input_tokens
    result.cpu_hits, result.cpu_evictions = tiers["cpu"]["hits"], tiers["cpu"]["evictions"]
    result.cpu_rejected, result.promotions = tiers["cpu"]["rejected"], stats["promotions"]
    result.disk_hits = tiers["disk"]["hits"] if "disk" in tiers else 0
    result.bytes = {f"{t}_{op}": tiers[t][f"bytes_{op}"] for t in tiers for op in ("written", "read")}
    logger.info("%s: hit rate %.4f, %.0f s", label, result.hit_rate, result.seconds)
    return result


def tokens_text(n: int) -> str:
    for suffix, size in reversed(SUFFIX.items()):
        if n >= size and n % size == 0 and (n < 2**20 or size > 2**10):
            return f"{n // size}{suffix}"
    return f"{n / 2**20:.1f}M" if n >= 2**20 else str(n)


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    n = int(text[:-1]) * SUFFIX[text[-1]] if text[-1:] in SUFFIX else int(text)
    if n <= 0 or n % CHUNK:
        raise argparse.ArgumentTypeError(f"a capacity is a positive multiple of {CHUNK} tokens, got {text}")
    return n


def print_table(console: Console, results: list[Result], infinite_rate: float) -> None:
    title = (f"Trace replay: token hit rate and bytes moved per tier (GiB scaled to {REAL_MODEL}, "
             f"{REAL_BYTES_PER_TOKEN // 1024} KiB/token)")
    out = Table(title=title)
    header = ("config|#CPU tokens|#CPU GiB @8B|#hit rate|#infinite|#CPU hits|#disk hits|#CPU evict|"
              "#rejected|#CPU write|#CPU read|#disk write|#disk read|#s")
    for col in header.split("|"):
        out.add_column(col.strip("#"), justify="right" if col.startswith("#") else "left")
    for r in results:
        gib = {k: f"{r.real_gib(k):,.0f}" for k in r.bytes}
        disk = "disk_read" in r.bytes
        out.add_row(r.config, ("inf " if r.infinite else "") + tokens_text(r.cpu_capacity_tokens),
                    f"{r.cpu_capacity_tokens * REAL_BYTES_PER_TOKEN / 2**30:,.0f}", f"{r.hit_rate:.4f}",
                    f"{infinite_rate:.4f}", f"{r.cpu_hits:,}", f"{r.disk_hits:,}" if disk else "",
                    f"{r.cpu_evictions:,}", f"{r.cpu_rejected:,}", gib["cpu_written"], gib["cpu_read"],
                    gib.get("disk_written", ""), gib.get("disk_read", ""), f"{r.seconds:.0f}")
    console.print(out)


def plot(results: list[Result], infinite_rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for config, style in (("cpu", "o-"), ("cpu+disk", "s")):
        shown = [r for r in results if r.config == config]
        ax.plot([r.cpu_capacity_tokens for r in shown], [r.hit_rate for r in shown], style, label=config)
    ax.axhline(infinite_rate, color="gray", linestyle="--", label=f"infinite cache ({infinite_rate:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("CPU tier capacity (tokens)")
    ax.set_ylabel("token hit rate")
    ax.set_ylim(0, max(0.05, infinite_rate * 1.15))
    top = ax.secondary_xaxis("top", functions=(lambda t: t * REAL_BYTES_PER_TOKEN / 2**30,
                                               lambda g: g * 2**30 / REAL_BYTES_PER_TOKEN))
    top.set_xlabel(f"the same capacity for {REAL_MODEL} (GiB)")
    n = results[0].requests
    ax.set_title(f"Mooncake conversation trace, first {n:,} requests: hit rate vs CPU capacity (LRU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE, help="the trace (JSONL)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests "
                   "(default 6000; --quick 600; 0 = all 12,031)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer requests and capacities")
    p.add_argument("--capacities", type=lambda s: [parse_tokens(x) for x in s.split(",")],
                   default=None, help=f"CPU capacities in tokens (default {DEFAULT_CAPACITIES})")
    p.add_argument("--disk-cpu-tokens", type=parse_tokens, default=parse_tokens("256K"),
                   help="CPU capacity of the cpu+disk run (the disk holds everything)")
    p.add_argument("--dir", type=Path, default=ROOT / ".kvtier-cache" / "trace", help="disk tier dir")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results dir")
    args = p.parse_args()
    if args.limit is None:
        args.limit = 600 if args.quick else 6000
    args.capacities = args.capacities or [parse_tokens(x) for x in
                                          ("64K,1M" if args.quick else DEFAULT_CAPACITIES).split(",")]
    return args


def measure(args: argparse.Namespace, requests: list[Request], unique_chunks: int, root: Path,
            progress: Progress) -> list[Result]:
    prompts = Prompts()
    infinite = unique_chunks * CHUNK + CHUNK  # every chunk the replay stores, and a spare slab
    sizes = sorted(c for c in args.capacities if c < infinite)
    results = [replay(requests, prompts, Result("cpu", c, False), None, progress) for c in sizes]
    results.append(replay(requests, prompts, Result("cpu", infinite, True), None, progress))
    # Room on disk for every chunk with its 4 KiB header block, twice over: the disk never evicts.
    record = LAYOUT.chunk_bytes(CHUNK) + 4096
    disk = DiskConfig(path=str(root / "disk"), capacity=2 * unique_chunks * record)
    results.append(replay(requests, prompts, Result("cpu+disk", args.disk_cpu_tokens, False), disk, progress))
    return results


def main() -> None:
    args = parse_args()
    # kvtier errors only: a prompt longer than a small CPU tier logs a warning per store; the
    # "rejected" column counts those chunks instead.
    console = console_and_logging(150, logging.ERROR)
    torch.set_num_threads(1)
    requests = load_trace(args.trace, args.limit or None)
    theory_hits, unique_chunks = infinite_hits(requests)
    input_tokens = sum(r.input_length for r in requests)
    infinite_rate = theory_hits / input_tokens
    logger.info("%d requests, %d input tokens, %d unique chunks; infinite-cache hit rate from the trace %.4f",
                len(requests), input_tokens, unique_chunks, infinite_rate)
    info = machine_info(args.dir.resolve())
    started = time.perf_counter()
    with scratch_run(args.dir) as root, progress_bar(console) as progress:
        results = measure(args, requests, unique_chunks, root, progress)
    measured = next(r for r in results if r.infinite)
    if measured.hit_tokens != theory_hits or measured.cpu_evictions:
        raise RuntimeError(f"infinite-capacity run hit {measured.hit_tokens} tokens with "
                           f"{measured.cpu_evictions} evictions; the trace says {theory_hits} tokens")
    print_table(console, results, infinite_rate)
    elapsed = time.perf_counter() - started
    console.print(f"{len(requests):,} requests, {input_tokens:,} input tokens, {unique_chunks:,} unique "
                  "chunks. "
                  f"Infinite-cache hit rate: {infinite_rate:.4f} from the trace, {measured.hit_rate:.4f} "
                  f"measured (equal). GiB columns: tokens moved x {REAL_BYTES_PER_TOKEN // 1024} KiB "
                  f"({REAL_MODEL}); the replay itself moved 32 B/token. {elapsed:.0f} s")
    report = {"machine": {**info, "load_avg_1m_end": os.getloadavg()[0]},
              "settings": {"trace": str(args.trace), "requests": len(requests), "quick": args.quick,
                           "chunk_tokens": CHUNK, "block_tokens": BLOCK, "layout": LAYOUT.describe(),
                           "bytes_per_token": LAYOUT.bytes_per_token, "real_model": REAL_MODEL,
                           "real_bytes_per_token": REAL_BYTES_PER_TOKEN, "eviction": "LRU (kvtier default)",
                           "disk_cpu_tokens": args.disk_cpu_tokens},
              "trace": {"input_tokens": input_tokens, "unique_chunks": unique_chunks,
                        "infinite_hit_tokens": theory_hits, "infinite_hit_rate": infinite_rate},
              "rows": [{**asdict(r), "real_gib": {k: r.real_gib(k) for k in r.bytes}} for r in results],
              "elapsed_s": round(elapsed, 1)}
    write_results(args.out, "trace_replay", report, lambda path: plot(results, infinite_rate, path))


if __name__ == "__main__":
    main()
