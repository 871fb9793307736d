"""Everything the GPU path is judged by, in one run (a few minutes on one H100/H200):

    .venv/bin/python benchmarks/gpu.py                          # on a CUDA GPU, full sizes
    .venv/bin/python benchmarks/gpu.py --device cpu --quick     # the same code on the CPU, small (CI smoke)
    --sections LIST   transfers,attention,ttft (default all)    --out PATH   results folder

- transfers: kvtier saves (device -> the CPU tier's pinned slabs) and loads (slabs -> device) of a
  Llama-3.1-8B-shaped chunk set (32 layers, 8 KV heads of 128, bf16, 256-token chunks), beside torch's
  own pinned copies of the same bytes in the same run (the PCIe limit): target >= 0.9x. Both from a
  contiguous chunk and from the bundled engine's paged blocks, and the paged copy alone (blocks <->
  page-locked host memory). On CUDA the paged rows run twice: with torch's index copies (gathered on
  the device, every layer in one call, so a chunk crosses PCIe as one 32 MiB piece) and with kvtier's
  copy kernel (csrc/paged_copy_cuda.cu: every row in one launch, host memory read or written across
  PCIe by the kernel), where it was built. And the record checksum a GPUDirect Storage read is
  verified with, computed on the device (kvtier.device_checksum), beside xxhash on the host.
- attention: the Triton paged-attention kernel against the torch path (SDPA over gathered blocks) on
  one mixed batch of the 8B shape (decodes over 4K contexts and a 512-token prefill chunk): tokens/s
  and the largest difference (target 1e-2 in bf16). Needs CUDA and triton; skipped, saying so, else.
- ttft: time to first token of `random:llama-8b` (quick: llama-small) at 8K and 32K tokens: cold,
  warm from the CPU tier with the layer-wise load on and off (the copy of layer l+1 overlapping
  layer l), and warm from the disk tier (by GPUDirect Storage where kvikio finds it: `disk_gds`). The
  device prefix cache is off, so a warm prompt is kvtier's.
  Target: warm from the CPU tier >= 25x faster than cold at 32K.

Writes gpu.json (gpu_quick.json) and a PNG of the TTFTs; prints a table per section and the targets.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import xxhash
from harness import console_and_logging, machine_info, write_results
from rich.table import Table

from kvtier import device_checksum
from kvtier.config import CpuConfig, DiskConfig, KvtierConfig
from kvtier.engine import CacheEngine
from kvtier.layout import KVLayout
from kvtier.platforms import cpu_ops, cuda_ops
from kvtier_engine import LLM, SamplingParams
from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers.attention import BatchMetadata, PagedAttention
from kvtier_engine.layers.triton_attention import TritonPagedAttention, triton_supports
from kvtier_engine.models.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("transfers", "attention", "ttft")
CHUNK = 256


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    sync(device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def transfers(device: torch.device, quick: bool) -> list[dict]:
    """kvtier's save and load GB/s beside torch's pinned copies of the same bytes."""
    layers, chunks, repeats = (4, 2, 3) if quick else (32, 16, 5)
    layout = KVLayout(num_layers=layers, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    tokens = chunks * CHUNK
    nbytes = layout.chunk_bytes(tokens)
    pinned = device.type == "cuda"
    config = KvtierConfig(chunk_size=CHUNK, disk=None, cpu=CpuConfig(
        capacity=(repeats + 2) * nbytes + (64 << 20), pin_memory="on" if pinned else "off"))
    kv = torch.randn(layout.chunk_shape(tokens), device=device).to(torch.bfloat16)
    out = torch.empty_like(kv)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    flat = kv.view(-1).view(torch.uint8)
    fresh = iter(range(1, 1 << 30))
    # The bundled engine's paged cache of the same shape; the request's blocks shuffled among twice as many.
    paged = PagedKVCache(replace(PRESETS["llama-8b"], num_layers=layers), 2 * tokens // 16, 16,
                         dtype=torch.bfloat16, device=device)
    order = torch.randperm(2 * tokens // 16, generator=torch.Generator().manual_seed(0))
    blocks = order[:tokens // 16].tolist()
    paged.scatter(blocks, kv)

    def row(label: str, fn: Callable[[], object]) -> dict:
        seconds = median_seconds(fn, device, repeats)
        return {"copy": label, "seconds": seconds, "bytes": nbytes, "gb_per_s": nbytes / seconds / 1e9}

    with CacheEngine(config, layout, model_id="gpu-bench") as engine:
        ids = torch.arange(tokens)

        def save() -> None:  # new tokens each time: a store of held chunks is deduplicated
            engine.store(ids + next(fresh) * tokens, kv)
            engine.clear("cpu")

        def load() -> None:
            assert engine.retrieve(ids, out=out)[1] == tokens, "a load fell short"

        def save_paged() -> None:  # the engine's save: its blocks gathered on the device, then stored
            engine.store(ids + next(fresh) * tokens, paged.gather(blocks, tokens))
            engine.clear("cpu")

        def load_paged() -> None:  # the engine's load: retrieved, then scattered into its blocks
            got, n = engine.retrieve(ids, out=out)
            paged.scatter(blocks, got[:, :, :n])

        host_chunk = host.view(torch.bfloat16).view(kv.shape)

        ops = cuda_ops if device.type == "cuda" else cpu_ops

        def gather_to_host() -> None:  # the paged copy alone: blocks -> page-locked host memory
            ops.gather_blocks(paged.kv, blocks, tokens, out=host_chunk)

        def scatter_from_host() -> None:  # and back: page-locked host memory -> blocks
            paged.scatter(blocks, host_chunk)

        saves = [("save, torch pinned copy (D2H)", lambda: host.copy_(flat, non_blocking=True)),
                 ("save, kvtier store (D2H)", save)]
        loads = [("load, torch pinned copy (H2D)", lambda: flat.copy_(host, non_blocking=True)),
                 ("load, kvtier retrieve (H2D)", load)]
        for suffix, mode in copy_modes(device):  # the paged rows once per way of copying blocks
            saves += [(f"save, paged blocks -> kvtier (gather + D2H){suffix}", with_mode(mode, save_paged)),
                      (f"save, paged blocks -> pinned host (one gather){suffix}",
                       with_mode(mode, gather_to_host))]
            loads += [(f"load, kvtier -> paged blocks (H2D + scatter){suffix}", with_mode(mode, load_paged)),
                      (f"load, pinned host -> paged blocks (one scatter){suffix}",
                       with_mode(mode, scatter_from_host))]
        results = [row(label, fn) for label, fn in saves]
        engine.store(ids, kv)  # what the loads read
        results += [row(label, fn) for label, fn in loads]
        assert torch.equal(out, kv), "a load did not give back what was saved"
        assert torch.equal(paged.gather(blocks, tokens), kv), "the paged load did not give back the KV"
        sync(device)
        assert torch.equal(host_chunk.to(device), kv), "the gather into host memory did not give the KV"
    # What a GPUDirect read adds: the record's checksum computed where the bytes are
    # (kvtier.device_checksum), beside xxhash over the same bytes on the host.
    fields = bytes(60)
    want = xxhash.xxh3_64_intdigest(fields + host.numpy().tobytes())
    assert device_checksum.xxh3_64(fields, flat) == want, "the device checksum differs from xxhash"
    results += [row("verify, record checksum on the device (GDS reads)",
                    lambda: device_checksum.xxh3_64(fields, flat)),
                row("verify, record checksum on the host (xxhash)",
                    lambda: xxhash.xxh3_64_intdigest(host.numpy()))]
    return results


def copy_modes(device: torch.device) -> list[tuple[str, str | None]]:
    """On CUDA, the paged rows run with torch's index copies and with kvtier's copy kernel (where it
    was built and passed its check): `KVTIER_CUDA_PAGED_COPY`, kvtier.platforms.cuda_ops."""
    if device.type != "cuda":
        return [("", None)]
    modes = [(" [torch index copies]", "torch")]
    return modes + [(" [copy kernel]", "auto")] if cuda_ops.kernel_ready(device) else modes


def with_mode(mode: str | None, fn: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        before = os.environ.get(cuda_ops.MODE_ENV)
        if mode is not None:
            os.environ[cuda_ops.MODE_ENV] = mode
        try:
            fn()
        finally:
            if before is None:
                os.environ.pop(cuda_ops.MODE_ENV, None)
            else:
                os.environ[cuda_ops.MODE_ENV] = before
    return run


def attention(device: torch.device, quick: bool) -> list[dict]:
    """Triton against the torch path on the same batch and cache copies; empty when it cannot run."""
    config = PRESETS["llama-8b"]
    if device.type != "cuda" or not triton_supports(config):
        return []
    decodes, context, prefill = (4, 512, 64) if quick else (31, 4096, 512)
    computed, new = [context] * decodes + [0], [1] * decodes + [prefill]
    counts = [-(-(c + n) // 16) for c, n in zip(computed, new)]
    order = torch.randperm(sum(counts), device="cpu").tolist()
    tables = [order[sum(counts[:i]):sum(counts[:i + 1])] for i in range(len(counts))]
    cache = PagedKVCache(config, sum(counts), 16, dtype=torch.bfloat16, device=device)
    cache.kv.normal_()
    meta = BatchMetadata.build(tables, computed, new, 16, device=device)
    rows = sum(new)
    q = torch.randn(rows, config.num_heads, config.head_dim, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(rows, config.num_kv_heads, config.head_dim, device=device, dtype=torch.bfloat16)
            for _ in range(2))
    results, outputs = [], {}
    for label, backend in (("torch (SDPA over gathered blocks)", PagedAttention),
                           ("triton paged attention", TritonPagedAttention)):
        attend = backend(cache, meta, config)
        outputs[label] = attend.attend(0, q, k, v).float()
        seconds = median_seconds(lambda attend=attend: attend.attend(0, q, k, v), device, 20)
        results.append({"backend": label, "seconds": seconds, "tokens_per_s": rows / seconds})
    error = (outputs["triton paged attention"] - outputs["torch (SDPA over gathered blocks)"]).abs().max()
    for r in results:
        r["max_abs_error"] = float(error)
    return results


def ttft(device: torch.device, quick: bool, scratch: Path) -> list[dict]:
    """Cold and warm TTFT per prompt length (see the module docstring)."""
    model, lengths = ("random:llama-small", [512, 1024]) if quick else ("random:llama-8b", [8192, 32768])
    config = PRESETS[model.split(":")[1]]
    dtype_bytes = 2 if device.type == "cuda" else 4
    kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes
    longest = max(lengths) + 64
    cpu = CpuConfig(capacity=2 * longest * kv_per_token + (256 << 20))
    disk = DiskConfig(path=str(scratch / "disk"), capacity=4 * longest * kv_per_token)
    kv_config = KvtierConfig(chunk_size=CHUNK, cpu=cpu, disk=disk)
    llm = LLM(model, kvtier_config=kv_config, device=device.type, enable_prefix_caching=False,
              kv_cache_bytes=2 * longest * kv_per_token, max_model_len=longest + 8)
    rng, params = np.random.default_rng(0), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    one = lambda tokens: llm.generate(tokens, params)[0].metrics  # noqa: E731
    one(rng.integers(0, config.vocab_size, 200).tolist())  # one-off costs: not a cold query
    results = []
    try:
        for length in lengths:
            tokens = rng.integers(0, config.vocab_size, length).tolist()
            row = {"tokens": length, "cold_s": one(tokens).ttft_s}
            llm.engine.kvtier.flush()
            for layerwise in (True, False):
                llm.engine.connector.layerwise = layerwise
                m = one(tokens)
                row[f"warm_cpu_layerwise_{'on' if layerwise else 'off'}_s"] = m.ttft_s
                row["tokens_loaded"] = m.tokens_loaded
            llm.engine.connector.layerwise = device.type == "cuda"
            llm.engine.kvtier.clear("cpu")  # what is left is on disk
            row["warm_disk_s"] = one(tokens).ttft_s
            row["disk_gds"] = llm.engine.kvtier.stats()["tiers"]["disk"]["gds"]["enabled"]  # read by GDS?
            warm = min(row["warm_cpu_layerwise_on_s"], row["warm_cpu_layerwise_off_s"])
            row["speedup_cpu"] = row["cold_s"] / warm
            results.append(row)
    finally:
        llm.close()
    return results


def report(console, device: torch.device, results: dict) -> dict[str, bool | None]:
    """The tables, and each target met (None: not measured here)."""
    for name, rows in results.items():
        if not rows:
            console.print(f"{name}: skipped (needs a CUDA GPU and triton)")
            continue
        table = Table(title=f"{name} on {device.type}")
        for column in rows[0]:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
        console.print(table)
    rate = {r["copy"]: r["gb_per_s"] for r in results.get("transfers", [])}
    limits = {op: rate.get(f"{op}, torch pinned copy ({way})")
              for op, way in (("save", "D2H"), ("load", "H2D"))}
    targets: dict[str, bool | None] = {}
    for label, gb_per_s in rate.items():
        op = label.split(",")[0]
        if "torch pinned copy" not in label and limits.get(op):
            targets[f"{label} >= 0.9x pinned copy"] = gb_per_s >= 0.9 * limits[op]
    if rows := results.get("attention"):
        targets["triton within 1e-2 of SDPA"] = rows[0]["max_abs_error"] <= 1e-2
    if rows := results.get("ttft"):
        targets["warm TTFT at the longest prompt >= 25x faster"] = rows[-1]["speedup_cpu"] >= 25
    for name, met in targets.items():
        console.print(f"target {name}: {'met' if met else 'MISSED'}")
    return targets


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in rows[0] if k.endswith("_s")]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax.bar([j + i * width for j in range(len(rows))], [r[kind] for r in rows], width, label=kind[:-2])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [f"{r['tokens']:,} tokens" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of the same code)")
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run on a GPU machine, or pass --device cpu for a smoke run")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := sorted(set(sections) - set(SECTIONS)):
        p.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    console = console_and_logging(140, logging.WARNING)
    started = time.perf_counter()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-gpu-bench-") as scratch:
        for name in sections:
            console.print(f"[bold]{name}[/bold] ...")
            run = {"transfers": lambda: transfers(device, args.quick),
                   "attention": lambda: attention(device, args.quick),
                   "ttft": lambda: ttft(device, args.quick, Path(scratch))}[name]
            results[name] = run()
    targets = report(console, device, results)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    out = {"machine": {**machine_info(ROOT), "gpu": gpu, "load_avg_1m_end": os.getloadavg()[0]},
           "settings": {"device": str(device), "quick": args.quick, "sections": sections},
           "results": results, "targets": targets, "elapsed_s": round(time.perf_counter() - started, 1)}
    name = "gpu_quick" if args.quick else "gpu"
    draw = (lambda path: plot(results["ttft"], path)) if results.get("ttft") else None
    write_results(args.out, name, out, draw)
    return out


if __name__ == "__main__":
    main()
