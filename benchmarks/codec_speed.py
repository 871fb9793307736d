"""Cachegen codec speed, the C++ coder beside the numpy reference, in one run (issue 13's target:
decode >= 0.3 GB/s of decoded fp16 per core).

    .venv/bin/python benchmarks/codec_speed.py            # 256 and 1,024 tokens, levels 1-3 + lossless
    .venv/bin/python benchmarks/codec_speed.py --quick    # 256 tokens only, fewer repeats
    --repeats N   native repeats (best counts; default 7)   --ref-repeats N   reference (default 1)
    --out PATH    results folder (default benchmarks/results)

Chunks are SmolLM2-135M-shaped, [2, 30 layers, tokens, 192 channels] fp16, of KV-like synthetic
values (the real-KV numbers are benchmarks/cachegen.py's): per (kv, layer, channel) a Laplacian of
its own width (uniform in [0.1, 3.1]) and offset, which codes to about the sizes the study measured
on SmolLM2's KV (level 2 ~6.5x smaller than fp16; harder to code than real KV's outlier channels).
One thread (torch.set_num_threads(1)); each call is timed in CPU seconds of the calling thread
(time.thread_time: what "per core" means on a shared machine) and in wall seconds; GB/s = fp16 bytes
of the chunk / seconds, best of the repeats. Also checks that both backends give the same record and
the same decoded bits. Writes codec_speed.json (every number, the machine, its load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from kvtier.codecs import native
from kvtier.codecs.cachegen import CachegenCodec

LEVELS = (1, 2, 3, "lossless")
SHAPE = (30, 192)  # SmolLM2-135M: layers, channels (3 KV heads x 64)


def kv_like(tokens: int, seed: int = 0) -> torch.Tensor:
    layers, channels = SHAPE
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(2, layers, 1, channels, generator=g) * 3 + 0.1
    offset = torch.randn(2, layers, 1, channels, generator=g) * 0.2 * spread
    u = torch.rand(2, layers, tokens, channels, generator=g).clamp(1e-6, 1 - 1e-6) - 0.5
    return (offset - spread * u.sign() * torch.log1p(-2 * u.abs())).to(torch.float16)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best CPU seconds of this thread, best wall seconds) of `repeats` calls."""
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return min(cpu), min(wall)


def measure(x: torch.Tensor, level, backend: str, repeats: int) -> dict:
    os.environ[native.ENV] = backend
    codec = CachegenCodec(level)
    record = codec.encode(x)
    out = torch.empty_like(x)
    enc_cpu, enc_wall = timed(lambda: codec.encode(x), repeats)
    dec_cpu, dec_wall = timed(lambda: codec.decode(record, out), repeats)
    gb = x.numel() * 2 / 1e9
    return {"record": record, "decoded": out.view(torch.int16).clone(), "ratio": x.numel() * 2 / len(record),
            "encode_gbps": gb / enc_cpu, "decode_gbps": gb / dec_cpu,
            "encode_gbps_wall": gb / enc_wall, "decode_gbps_wall": gb / dec_wall,
            "encode_ms": enc_cpu * 1e3, "decode_ms": dec_cpu * 1e3}


def run(tokens_list, repeats: int, ref_repeats: int) -> list[dict]:
    rows = []
    for tokens in tokens_list:
        x = kv_like(tokens)
        for level in LEVELS:
            nat = measure(x, level, "native", repeats)
            ref = measure(x, level, "reference", ref_repeats)
            same = nat["record"] == ref["record"] and torch.equal(nat["decoded"], ref["decoded"])
            row = {"tokens": tokens, "level": str(level), "ratio_vs_fp16": round(nat["ratio"], 3),
                   "identical": same}
            for name, res in (("native", nat), ("reference", ref)):
                row[name] = {k: round(v, 4) for k, v in res.items() if k.endswith(("gbps", "wall", "ms"))}
            rows.append(row)
            print(f"{tokens:>6} {str(level):>9} {row['ratio_vs_fp16']:>6.2f}x "
                  f"{row['native']['decode_gbps']:>8.3f} {row['native']['encode_gbps']:>8.3f} "
                  f"{row['reference']['decode_gbps']:>8.4f} {row['reference']['encode_gbps']:>8.4f}  {same}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ref-repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not native.AVAILABLE:
        raise SystemExit(f"the C++ coder is not built: {native.WHY_NOT}")
    torch.set_num_threads(1)
    tokens_list = (256,) if args.quick else (256, 1024)
    repeats = min(args.repeats, 3) if args.quick else args.repeats
    print("GB/s of fp16 per core (CPU time of one thread, best of the repeats)")
    heads = ("nat dec", "nat enc", "ref dec", "ref enc")
    print(f"{'tokens':>6} {'level':>9} {'ratio':>7} " + " ".join(f"{h:>8}" for h in heads) + "  identical")
    load_before = os.getloadavg()
    rows = run(tokens_list, repeats, args.ref_repeats)
    result = {"shape": [2, SHAPE[0], "tokens", SHAPE[1]], "dtype": "float16", "threads": 1,
              "repeats": {"native": repeats, "reference": args.ref_repeats},
              "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "load_avg_before": load_before,
                          "load_avg_after": os.getloadavg()},
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("codec_speed_quick.json" if args.quick else "codec_speed.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}; load average before {load_before}, after {os.getloadavg()}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
