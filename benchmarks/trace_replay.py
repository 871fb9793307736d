"""Replay the Mooncake conversation trace through a CacheEngine, per eviction policy: hit rate and bytes
moved per tier, each replay beside the model-free simulator's hit rate on the same requests and
capacities, and beside the hit rate of an infinite cache.

    .venv/bin/python benchmarks/trace_replay.py            # full run: first 6,000 requests, every policy
    .venv/bin/python benchmarks/trace_replay.py --quick    # smoke run: the first 600 requests

Model-free: block `h` of the trace (512 tokens) becomes 512 token ids drawn from
`numpy.random.default_rng(h)`, so equal hash ids give equal prefixes; a prompt is its blocks' tokens
cut to `input_length`. For each request, in trace order (timestamps are not replayed):
`lookup(tokens)`, `retrieve(tokens)` of the hit, `store(tokens, kv)` of the whole prompt (the
engine skips the chunks it holds), and `flush()` when a disk tier is configured. The KV geometry is
tiny (1 layer, 1 KV head, head dim 8, fp16: 32 bytes a token, 8 KiB a 256-token chunk) so millions of
tokens fit in RAM; bytes moved are also reported scaled to Llama-3.1-8B (128 KiB a token) by token
count. The simulator (`kvtier.sim.tiers.replay_tiers`) replays the same requests in 256-token chunks
through tiers of the same capacities in chunks and the same policies, with no KV and no engine.
benchmarks/README.md explains each column.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
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
from kvtier.policy_registry import POLICIES
from kvtier.record_files import file_bytes
from kvtier.sim.tiers import TierSpec, replay_tiers
from kvtier.sim.trace import TraceRequest, read_trace

logger = logging.getLogger("trace_replay")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = ROOT.parent / "shared" / "workloads" / "mooncake_conversation_trace.jsonl"
BLOCK = 512  # tokens per trace hash block
MODEL_ID = "trace-replay"
CHUNK = 256  # tokens per kvtier chunk (the config default)
VOCAB = 128_000
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16)  # 32 B/token
RECORD_BYTES = file_bytes(LAYOUT.chunk_bytes(CHUNK))  # one chunk's file on disk: 4 KiB header + 8 KiB
REAL_MODEL = "Llama-3.1-8B"
REAL_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads, head dim 128, bf16: 128 KiB
DEFAULT_CAPACITIES, QUICK_CAPACITIES = "1%,5%,20%", "5%"
SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30}


@dataclass(frozen=True, slots=True)
class Capacity:
    """A tier capacity as given: tokens ("64K"), or a share of the replayed requests' distinct
    512-token blocks ("5%": 5 % of them, as twice as many 256-token chunks)."""

    text: str
    tokens: int = 0
    share: float = 0.0

    def resolve(self, distinct_blocks: int) -> int:
        """The capacity in tokens: whole chunks."""
        tokens = self.tokens or int(self.share * distinct_blocks) * (BLOCK // CHUNK) * CHUNK
        if tokens <= 0:
            raise SystemExit(f"capacity {self.text} of {distinct_blocks:,} distinct blocks is not one chunk")
        return tokens


@dataclass(slots=True)
class Result:
    """One replay: the configuration, then what the engine and the simulator measured (bytes in the
    tiny geometry)."""

    config: str  # "cpu" or "cpu+disk"
    policy: str  # of every tier (kvtier.policy_registry)
    cpu_capacity: str  # as given ("5%", "64K"; "inf")
    cpu_capacity_tokens: int
    disk_capacity: str = ""
    disk_capacity_tokens: int = 0  # 0: no disk tier
    infinite: bool = False
    requests: int = 0
    input_tokens: int = 0
    hit_tokens: int = 0
    hit_rate: float = 0.0
    cpu_hits: int = 0  # chunks served, from retrieve
    disk_hits: int = 0
    cpu_evictions: int = 0
    cpu_rejected: int = 0
    promotions: int = 0
    bytes: dict[str, int] = field(default_factory=dict)  # "<tier>_written" / "<tier>_read", tiny geometry
    seconds: float = 0.0
    sim_hit_tokens: int = 0
    sim_hit_rate: float = 0.0
    sim_tiers: dict[str, dict[str, int]] = field(default_factory=dict)  # per tier: hits, writes, evictions
    sim_seconds: float = 0.0

    @property
    def diff_points(self) -> float:
        """Engine minus simulator hit rate, in percentage points."""
        return 100 * (self.hit_rate - self.sim_hit_rate)

    def real_gib(self, key: str) -> float:
        """Bytes moved, scaled to the real model: tokens moved x its bytes per token, in GiB."""
        return self.bytes[key] / LAYOUT.bytes_per_token * REAL_BYTES_PER_TOKEN / 2**30


def load_trace(path: Path, limit: int | None) -> list[TraceRequest]:
    if not path.is_file():
        sys.exit(f"trace not found: {path}\n(get mooncake_conversation_trace.jsonl, see "
                 f"../shared/workloads/README.md, or pass its path as the first argument)")
    return read_trace(path)[0][:limit]


def distinct_blocks(requests: list[TraceRequest]) -> int:
    return len({h for r in requests for h in r.hash_ids})


class Prompts:
    """Token ids per request, synthesised per hash block and cached (2 KiB a block)."""

    def __init__(self) -> None:
        self._blocks: dict[int, np.ndarray] = {}

    def block(self, h: int) -> np.ndarray:
        if (arr := self._blocks.get(h)) is None:
            arr = np.random.default_rng(h).integers(0, VOCAB, BLOCK).astype(np.uint32)
            self._blocks[h] = arr
        return arr

    def tokens(self, req: TraceRequest) -> np.ndarray:
        return np.concatenate([self.block(h) for h in req.hash_ids])[:req.input_length]


def engine_chunks(requests: list[TraceRequest], prompts: Prompts) -> list[TraceRequest]:
    """The requests as the engine's whole 256-token chunks, each named by its key's last 8 bytes (as
    an int): the trace `kvtier.sim.tiers.to_chunks` would give, but with the engine's own key values,
    so that a policy that samples keys by value (adaptive's shadows) samples the same chunks in the
    simulator as in the engine."""
    with CacheEngine(KvtierConfig(cpu=CpuConfig(capacity=LAYOUT.chunk_bytes(CHUNK), pin_memory="off")),
                     LAYOUT, model_id=MODEL_ID) as eng:
        def ids(r: TraceRequest) -> tuple[int, ...]:
            return tuple(int.from_bytes(key[-8:], "little") for key in eng.db.keys(prompts.tokens(r)))

        return [TraceRequest(r.timestamp, r.input_length, r.output_length, ids(r)) for r in requests]


def infinite_hits(requests: list[TraceRequest]) -> tuple[int, int]:
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


def engine_config(result: Result, disk_path: Path) -> KvtierConfig:
    cpu = CpuConfig(capacity=result.cpu_capacity_tokens * LAYOUT.bytes_per_token, pin_memory="off",
                    policy=result.policy)  # whole 8 KiB slabs: capacity // chunk bytes chunks
    disk = None
    if result.disk_capacity_tokens:
        disk = DiskConfig(path=str(disk_path), capacity=result.disk_capacity_tokens // CHUNK * RECORD_BYTES,
                          policy=result.policy)
    return KvtierConfig(cpu=cpu, disk=disk)


def replay(requests: list[TraceRequest], prompts: Prompts, result: Result, disk_path: Path,
           progress: Progress | None = None) -> Result:
    """`requests` through a real CacheEngine configured as `result` says (a disk tier in `disk_path`,
    which must hold nothing yet); fills in what it measured."""
    config = engine_config(result, disk_path)
    longest = max(r.input_length for r in requests)
    kv = torch.zeros(LAYOUT.chunk_shape(longest), dtype=LAYOUT.dtype)  # the KV content is irrelevant here
    out = torch.empty_like(kv)
    label = f"{result.config} {result.policy}, CPU {result.cpu_capacity}"
    task = progress.add_task(label, total=len(requests)) if progress else None
    started = time.perf_counter()
    with CacheEngine(config, LAYOUT, model_id=MODEL_ID) as eng:
        for i, req in enumerate(requests):
            tokens = prompts.tokens(req)
            hit = eng.lookup(tokens)
            if hit and (got := eng.retrieve(tokens, out=out)[1]) != hit:
                raise RuntimeError(f"request {i}: lookup found {hit} tokens, retrieve served {got}")
            eng.store(tokens, kv[:, :, :len(tokens)])
            if config.disk is not None and not eng.flush(60):
                raise RuntimeError("background writes did not land within 60 s")
            result.input_tokens += len(tokens)
            result.hit_tokens += hit
            if progress and i % 50 == 0:
                progress.update(task, completed=i + 1, refresh=True)
        stats = eng.stats()
    if progress:
        progress.remove_task(task)
    result.seconds = time.perf_counter() - started
    tiers = stats["tiers"]
    if {tiers[t]["policy"] for t in tiers} != {result.policy}:
        raise RuntimeError(f"asked for {result.policy}, the engine's tiers use {tiers}")
    result.requests = len(requests)
    result.hit_rate = result.hit_tokens / result.input_tokens
    result.cpu_hits, result.cpu_evictions = tiers["cpu"]["hits"], tiers["cpu"]["evictions"]
    result.cpu_rejected, result.promotions = tiers["cpu"]["rejected"], stats["promotions"]
    result.disk_hits = tiers["disk"]["hits"] if "disk" in tiers else 0
    result.bytes = {f"{t}_{op}": tiers[t][f"bytes_{op}"] for t in tiers for op in ("written", "read")}
    logger.info("%s: hit rate %.4f, %.0f s", label, result.hit_rate, result.seconds)
    return result


def simulate(chunked: list[TraceRequest], result: Result) -> Result:
    """The simulator on the same requests (in the engine's 256-token chunks, `engine_chunks`), tiers
    and policy."""
    tiers = [TierSpec("cpu", result.cpu_capacity_tokens // CHUNK, result.policy)]
    if result.disk_capacity_tokens:
        tiers.append(TierSpec("disk", result.disk_capacity_tokens // CHUNK, result.policy))
    started = time.perf_counter()
    sim = replay_tiers(chunked, tiers, block_tokens=CHUNK)
    result.sim_seconds = time.perf_counter() - started
    result.sim_hit_tokens, result.sim_hit_rate = sim.hit_tokens, sim.hit_rate
    result.sim_tiers = {name: asdict(counts) for name, counts in sim.tiers.items()}
    return result


def run(requests: list[TraceRequest], chunked: list[TraceRequest], prompts: Prompts, result: Result,
        root: Path, progress: Progress | None = None) -> Result:
    """One configuration through the engine (its disk tier in a fresh folder, deleted after) and the
    simulator."""
    disk_path = root / f"disk-{result.policy}"
    try:
        replay(requests, prompts, result, disk_path, progress)
    finally:
        shutil.rmtree(disk_path, ignore_errors=True)
    return simulate(chunked, result)


def tokens_text(n: int) -> str:
    for suffix, size in reversed(SUFFIX.items()):
        if n >= size and n % size == 0 and (n < 2**20 or size > 2**10):
            return f"{n // size}{suffix}"
    return f"{n / 2**20:.1f}M" if n >= 2**20 else f"{n / 2**10:.1f}K" if n >= 2**10 else str(n)


def parse_capacity(text: str) -> Capacity:
    text = text.strip().upper()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 < share:
                raise ValueError
            return Capacity(text, share=share)
        n = int(text[:-1]) * SUFFIX[text[-1]] if text[-1:] in SUFFIX else int(text)
    except ValueError:
        n = 0
    if n <= 0 or n % CHUNK:
        raise argparse.ArgumentTypeError(f"a capacity is a positive multiple of {CHUNK} tokens (64K, 1M, "
                                         f"4096) or a share of the trace's distinct blocks (5%), got {text}")
    return Capacity(text, tokens=n)


def parse_policies(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in POLICIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    return names


def capacity_text(text: str, tokens: int) -> str:
    """"1M", "342.5K (5%)" for a share, "inf 6.5M"."""
    if text == "inf":
        return f"inf {tokens_text(tokens)}"
    return text if text == tokens_text(tokens) else f"{tokens_text(tokens)} ({text})"


def print_table(console: Console, results: list[Result], infinite_rate: float) -> None:
    title = (f"Trace replay: token hit rate, engine beside the simulator, and bytes moved per tier (GiB "
             f"scaled to {REAL_MODEL}, {REAL_BYTES_PER_TOKEN // 1024} KiB/token)")
    out = Table(title=title)
    header = ("config|policy|#CPU tokens|#disk tokens|#CPU GiB @8B|#hit rate|#sim|#diff pts|#infinite|"
              "#CPU hits|#disk hits|#CPU evict|#rejected|#CPU write|#CPU read|#disk write|#disk read|"
              "#s|#sim s")
    for col in header.split("|"):
        out.add_column(col.strip("#"), justify="right" if col.startswith("#") else "left")
    for r in results:
        gib = {k: f"{r.real_gib(k):,.0f}" for k in r.bytes}
        disk = "disk_read" in r.bytes
        out.add_row(r.config, r.policy, capacity_text(r.cpu_capacity, r.cpu_capacity_tokens),
                    capacity_text(r.disk_capacity, r.disk_capacity_tokens) if disk else "",
                    f"{r.cpu_capacity_tokens * REAL_BYTES_PER_TOKEN / 2**30:,.0f}", f"{r.hit_rate:.4f}",
                    f"{r.sim_hit_rate:.4f}", f"{r.diff_points:+.2f}", f"{infinite_rate:.4f}",
                    f"{r.cpu_hits:,}", f"{r.disk_hits:,}" if disk else "", f"{r.cpu_evictions:,}",
                    f"{r.cpu_rejected:,}", gib["cpu_written"], gib["cpu_read"], gib.get("disk_written", ""),
                    gib.get("disk_read", ""), f"{r.seconds:.0f}", f"{r.sim_seconds:.1f}")
    console.print(out)


def plot(results: list[Result], infinite_rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    policies = list(dict.fromkeys(r.policy for r in results if not r.infinite))
    for i, policy in enumerate(policies):
        color = f"C{i}"
        shown = [r for r in results if r.config == "cpu" and r.policy == policy and not r.infinite]
        x = [r.cpu_capacity_tokens for r in shown]
        ax.plot(x, [r.hit_rate for r in shown], "o-", color=color, label=f"cpu, {policy}")
        ax.plot(x, [r.sim_hit_rate for r in shown], "x", color=color, markersize=10)
        for r in results:
            if r.config == "cpu+disk" and r.policy == policy:
                ax.plot([r.cpu_capacity_tokens], [r.hit_rate], "s", color=color,
                        label=f"cpu+disk ({r.disk_capacity} disk), {policy}")
    ax.axhline(infinite_rate, color="gray", linestyle="--", label=f"infinite cache ({infinite_rate:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("CPU tier capacity (tokens); x = the simulator")
    ax.set_ylabel("token hit rate")
    ax.set_ylim(0, max(0.05, infinite_rate * 1.15))
    top = ax.secondary_xaxis("top", functions=(lambda t: t * REAL_BYTES_PER_TOKEN / 2**30,
                                               lambda g: g * 2**30 / REAL_BYTES_PER_TOKEN))
    top.set_xlabel(f"the same capacity for {REAL_MODEL} (GiB)")
    n = results[0].requests
    ax.set_title(f"Mooncake conversation trace, {n:,} requests: hit rate vs CPU capacity per policy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", nargs="?", type=Path, default=DEFAULT_TRACE, help="the trace (JSONL)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests "
                   "(default 6000; --quick 600; 0 = all 12,031)")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer requests and capacities")
    p.add_argument("--policies", type=parse_policies, default=list(POLICIES),
                   help=f"eviction policies of the tiers, a replay each (default all: {','.join(POLICIES)})")
    p.add_argument("--capacities", type=lambda s: [parse_capacity(x) for x in s.split(",")], default=None,
                   help=f"CPU capacities of the cpu runs: tokens (64K) or shares of the distinct blocks "
                        f"(5%%) (default {DEFAULT_CAPACITIES}; --quick {QUICK_CAPACITIES})")
    p.add_argument("--disk-cpu-tokens", type=parse_capacity, default=parse_capacity("1%"),
                   help="CPU capacity of the cpu+disk run (default 1%%)")
    p.add_argument("--disk-tokens", type=parse_capacity, default=parse_capacity("5%"),
                   help="disk capacity of the cpu+disk run (default 5%%)")
    p.add_argument("--no-disk", action="store_true", help="skip the cpu+disk runs")
    p.add_argument("--dir", type=Path, default=ROOT / ".kvtier-cache" / "trace", help="disk tier dir")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results dir")
    args = p.parse_args(argv)
    if args.limit is None:
        args.limit = 600 if args.quick else 6000
    args.capacities = args.capacities or [parse_capacity(x) for x in
                                          (QUICK_CAPACITIES if args.quick else DEFAULT_CAPACITIES).split(",")]
    return args


def measure(args: argparse.Namespace, requests: list[TraceRequest], unique_chunks: int, root: Path,
            progress: Progress) -> list[Result]:
    prompts = Prompts()
    chunked = engine_chunks(requests, prompts)
    distinct = distinct_blocks(requests)
    infinite = unique_chunks * CHUNK + CHUNK  # every chunk the replay stores, and a spare slab
    sizes = sorted({(c.resolve(distinct), c.text) for c in args.capacities})
    rows = [Result("cpu", policy, text, tokens) for tokens, text in sizes if tokens < infinite
            for policy in args.policies]
    rows.append(Result("cpu", args.policies[0], "inf", infinite, infinite=True))  # no eviction: one policy
    if not args.no_disk:
        cpu, disk = args.disk_cpu_tokens, args.disk_tokens
        rows += [Result("cpu+disk", policy, cpu.text, cpu.resolve(distinct), disk.text,
                        disk.resolve(distinct)) for policy in args.policies]
    return [run(requests, chunked, prompts, r, root, progress) for r in rows]


def main() -> None:
    args = parse_args()
    # kvtier errors only: a prompt longer than a small CPU tier logs a warning per store; the
    # "rejected" column counts those chunks instead.
    console = console_and_logging(240, logging.ERROR)
    torch.set_num_threads(1)
    requests = load_trace(args.trace, args.limit or None)
    theory_hits, unique_chunks = infinite_hits(requests)
    input_tokens = sum(r.input_length for r in requests)
    infinite_rate = theory_hits / input_tokens
    distinct = distinct_blocks(requests)
    logger.info("%d requests, %d input tokens, %d distinct blocks, %d unique chunks; infinite-cache hit rate "
                "from the trace %.4f", len(requests), input_tokens, distinct, unique_chunks, infinite_rate)
    info = machine_info(args.dir.resolve())
    started = time.perf_counter()
    with scratch_run(args.dir) as root, progress_bar(console) as progress:
        results = measure(args, requests, unique_chunks, root, progress)
    measured = next(r for r in results if r.infinite)
    if {measured.hit_tokens, measured.sim_hit_tokens} != {theory_hits} or measured.cpu_evictions:
        raise RuntimeError(f"infinite-capacity run hit {measured.hit_tokens} tokens (the simulator "
                           f"{measured.sim_hit_tokens}) with {measured.cpu_evictions} evictions; the trace "
                           f"says {theory_hits} tokens")
    print_table(console, results, infinite_rate)
    elapsed = time.perf_counter() - started
    worst = max(results, key=lambda r: abs(r.diff_points))
    console.print(f"{len(requests):,} requests, {input_tokens:,} input tokens, {distinct:,} distinct blocks, "
                  f"{unique_chunks:,} unique chunks. Infinite-cache hit rate: {infinite_rate:.4f} from the "
                  f"trace, {measured.hit_rate:.4f} measured (equal). Engine vs simulator: at most "
                  f"{abs(worst.diff_points):.2f} points apart ({worst.config} {worst.policy} "
                  f"{worst.cpu_capacity}). GiB columns: tokens moved x {REAL_BYTES_PER_TOKEN // 1024} KiB "
                  f"({REAL_MODEL}); the replay itself moved 32 B/token. {elapsed:.0f} s")
    report = {"machine": {**info, "load_avg_1m_end": os.getloadavg()[0]},
              "settings": {"trace": str(args.trace), "requests": len(requests), "quick": args.quick,
                           "chunk_tokens": CHUNK, "block_tokens": BLOCK, "layout": LAYOUT.describe(),
                           "bytes_per_token": LAYOUT.bytes_per_token, "real_model": REAL_MODEL,
                           "real_bytes_per_token": REAL_BYTES_PER_TOKEN, "policies": args.policies,
                           "capacities": [c.text for c in args.capacities],
                           "disk_cpu_capacity": args.disk_cpu_tokens.text,
                           "disk_capacity": None if args.no_disk else args.disk_tokens.text,
                           "disk_record_bytes": RECORD_BYTES},
              "trace": {"input_tokens": input_tokens, "distinct_blocks": distinct,
                        "unique_chunks": unique_chunks, "infinite_hit_tokens": theory_hits,
                        "infinite_hit_rate": infinite_rate},
              "rows": [{**asdict(r), "diff_points": r.diff_points,
                        "real_gib": {k: r.real_gib(k) for k in r.bytes}} for r in results],
              "elapsed_s": round(elapsed, 1)}
    write_results(args.out, "trace_replay" + ("_quick" if args.quick else ""), report,
                  lambda path: plot(results, infinite_rate, path))


if __name__ == "__main__":
    main()
