"""What real SmolLM2-135M-Instruct KV says about CacheGen's design (issue 13), before the codec exists.

    .venv/bin/python benchmarks/cachegen_study.py          # 4 documents, 2,048-token prefixes, 256 continued
    .venv/bin/python benchmarks/cachegen_study.py --quick  # 1 document, 512-token prefix, 64 continued

Real KV: the model (fp32, CPU) runs each document's prefix through the engine's reference attention
backend (`ContiguousKVCache`), whose `k`/`v` tensors [layers, tokens, kv_heads, head_dim] hold
exactly what a paged cache (and kvtier) stores: K after RoPE, V. The documents are pydoc pages of
stdlib modules (the json page is `demo.document_text()`).

Measured, per (kv, layer):
1. sizes: CacheGen quantisation (scale = max |x| per (kv, layer, token), kept as fp16; symbols
   round(x / scale * M), M = bins // 2 - 1, so 2M + 1 symbols, as LMCache's `torch_quant`), the
   coded size with static frequency tables per (kv, layer, channel) / (kv, layer, head) / (kv, layer)
   over units of U tokens, the frequencies quantised to PROB_BITS (sum 2^PROB_BITS, every seen symbol
   >= 1: the cross-entropy of the counts under the quantised table is what a range/ANS coder spends),
   the tables (2M + 1 entries of PROB_BITS bits each) and the scales;
2. anchor deltas: tokens in groups of 10, the first quantised as above, the rest as the delta from the
   reconstructed anchor with their own per-token scale; symbol entropy at equal mean squared error
   (the delta bins swept, the rate interpolated in log MSE);
3. quality: the prefix KV replaced by its dequantised copy, the model continues teacher-forced over the
   document's next tokens; top-1 agreement, mean KL(reference || test) and perplexity against the
   uncompressed fp32 KV.
"""

from __future__ import annotations

import argparse
import json
import pydoc
import re
import time
from pathlib import Path

import numpy as np
import torch
from harness import machine_info
from rich.console import Console
from rich.table import Table

from kvtier_engine.demo import MODEL, document_text
from kvtier_engine.layers.attention import ContiguousKVCache
from kvtier_engine.models.loader import load_model
from kvtier_engine.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
BINS = (8, 16, 32, 64)
UNITS = (256, 1024, 2048)
PROB_BITS = (8, 10, 12)
SHOW_PB = 8  # the tables and plot show 8-bit frequencies: the smallest records of the three
GROUPINGS = ("channel", "head", "layer")
SCALE_BITS = 16
ANCHOR_GROUP = 10
DELTA_SWEEP = (1, 2, 3, 4, 5, 7, 9, 11, 15, 19, 23, 31, 39, 47, 63, 95, 127)
OTHER_MODULES = ("argparse", "collections", "pathlib", "logging", "subprocess")
# Presets: (K shallow bins, K deep bins, K boundary, V shallow, V deep, V boundary).
PRESETS = {
    "level1": (16, 8, 10, 16, 8, 2),
    "level2": (32, 16, 10, 32, 16, 2),
    "level3": (64, 32, 10, 64, 32, 2),
    "K32/16 V16/8": (32, 16, 10, 16, 8, 2),
    "K32 V16": (32, 32, 10, 16, 16, 2),
    "K32 V32": (32, 32, 10, 32, 32, 2),
    "K64/32 V32/16": (64, 32, 10, 32, 16, 2),
    "K32 V16/8": (32, 32, 10, 16, 8, 2),
    "K64/32 V16/8": (64, 32, 10, 16, 8, 2),
    "K64/32 V16": (64, 32, 10, 16, 16, 2),
}
# Presets also run with each channel divided by its RMS over the prefix before the per-token max-abs
# scale (192 fp16 divisors per (kv, layer) and record): an outlier channel then no longer sets the scale
# of every other channel of its token.
CHANNEL_NORM = ("level1", "level2", "K32/16 V16/8", "K32 V16/8")


def bins_per_layer(preset: tuple, layers: int) -> tuple[list[int], list[int]]:
    ks, kd, kb, vs, vd, vb = preset
    return [ks if i < kb else kd for i in range(layers)], [vs if i < vb else vd for i in range(layers)]


def documents(tokenizer, need: int, count: int) -> list[tuple[str, list[int]]]:
    """(name, ids) of the first `count` pydoc pages with at least `need` tokens."""
    docs = [("json", tokenizer.encode(document_text()))]
    for name in OTHER_MODULES:
        text = re.sub(r" at 0x[0-9a-fA-F]+", "", pydoc.render_doc(name, renderer=pydoc.plaintext))
        docs.append((name, tokenizer.encode(text)))
    return [d for d in docs if len(d[1]) >= need][:count]


def quantise(x: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """x [T, C] -> (symbols in [0, 2M], fp16-rounded scale [T, 1])."""
    m = bins // 2 - 1
    scale = np.abs(x).max(axis=1, keepdims=True).astype(np.float16).astype(np.float32)
    scale = np.maximum(scale, 1e-8)
    return (np.rint(x / scale * m).clip(-m, m) + m).astype(np.int64), scale


def dequantise(sym: np.ndarray, scale: np.ndarray, bins: int) -> np.ndarray:
    m = bins // 2 - 1
    return (sym - m).astype(np.float32) * (scale / m)


def table_bits(counts: np.ndarray, prob_bits: int) -> float:
    """Bits a static-table coder spends on `counts` [tables, symbols] with frequencies quantised to
    sum 2^prob_bits (each seen symbol >= 1, the rounding error put on the commonest symbol)."""
    total = 1 << prob_bits
    n = counts.sum(axis=1, keepdims=True)
    live = n[:, 0] > 0
    counts, n = counts[live], n[live]
    q = np.where(counts > 0, np.maximum(1, np.rint(counts * total / n)), 0)
    top = q.argmax(axis=1)
    q[np.arange(len(q)), top] += total - q.sum(axis=1)
    q = np.maximum(q, np.where(counts > 0, 1, 0))  # a pathological fix-up never drops a seen symbol
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(counts > 0, counts * (np.log2(q.sum(axis=1, keepdims=True)) - np.log2(q)), 0.0)
    return float(cost.sum())


def entropy_bits(counts: np.ndarray) -> float:
    n = counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.where(counts > 0, -counts * np.log2(counts / np.maximum(n, 1)), 0.0).sum())


def group_ids(grouping: str, channels: int, head_dim: int) -> tuple[np.ndarray, int]:
    c = np.arange(channels)
    if grouping == "channel":
        return c, channels
    if grouping == "head":
        return c // head_dim, channels // head_dim
    return np.zeros(channels, dtype=np.int64), 1


def size_study(sym: np.ndarray, bins: int, units: tuple[int, ...], head_dim: int) -> dict:
    """For one (kv, layer, bins): ideal entropy, coded bits and table bits per grouping, unit and
    PROB_BITS (bit totals over the T x C symbols)."""
    t, c = sym.shape
    nsym = 2 * (bins // 2 - 1) + 1
    out = {}
    for grouping in GROUPINGS:
        gid, groups = group_ids(grouping, c, head_dim)
        for unit in units:
            nunits = -(-t // unit)
            idx = ((np.arange(t)[:, None] // unit) * groups + gid[None, :]) * nsym + sym
            counts = np.bincount(idx.ravel(), minlength=nunits * groups * nsym).reshape(-1, nsym)
            row = {"entropy": entropy_bits(counts)}
            for pb in PROB_BITS:
                row[f"coded_p{pb}"] = table_bits(counts, pb)
                row[f"tables_p{pb}"] = float(nunits * groups * nsym * pb)
            out[f"{grouping}/{unit}"] = row
    return out


def channel_entropy(sym: np.ndarray, nsym: int) -> float:
    """Bits of `sym` [T, C] under one ideal table per channel over all T tokens."""
    c = sym.shape[1]
    counts = np.bincount((np.arange(c)[None, :] * nsym + sym).ravel(), minlength=c * nsym)
    return entropy_bits(counts.reshape(c, nsym))


def delta_curve(x: np.ndarray, anchor_bins: int) -> tuple[list[float], list[float]]:
    """Anchor-delta coding of x [T, C]: (MSE, bits per value) for each delta bin count in the sweep."""
    anchors = np.arange(x.shape[0]) % ANCHOR_GROUP == 0
    asym, ascale = quantise(x[anchors], anchor_bins)
    arec = dequantise(asym, ascale, anchor_bins)
    a_err = float(((arec - x[anchors]) ** 2).sum())
    a_bits = channel_entropy(asym, 2 * (anchor_bins // 2 - 1) + 1)
    ref = np.repeat(arec, ANCHOR_GROUP, axis=0)[: x.shape[0]][~anchors]
    delta = x[~anchors] - ref
    mses, rates = [], []
    for m in DELTA_SWEEP:
        dsym, dscale = quantise(delta, 2 * m + 2)
        err = float(((dequantise(dsym, dscale, 2 * m + 2) - delta) ** 2).sum())
        mses.append((a_err + err) / x.size)
        rates.append((a_bits + channel_entropy(dsym, 2 * m + 1)) / x.size)
    return mses, rates


def delta_study(x: np.ndarray, bins: int) -> dict:
    """Direct quantisation at `bins` vs anchor deltas at the same MSE (anchors at `bins` too)."""
    sym, scale = quantise(x, bins)
    mse = float(((dequantise(sym, scale, bins) - x) ** 2).mean())
    rate = channel_entropy(sym, 2 * (bins // 2 - 1) + 1) / x.size
    mses, rates = delta_curve(x, bins)
    order = np.argsort(np.log(mses))
    lm = np.log(np.array(mses))[order]
    reachable = lm[0] <= np.log(mse) <= lm[-1]
    delta_rate = float(np.interp(np.log(mse), lm, np.array(rates)[order])) if reachable else None
    return {"mse": mse, "direct_bits": rate, "delta_bits_at_equal_mse": delta_rate,
            "delta_min_mse": float(min(mses))}


def prefix_kv(model, ids: list[int], prefix: int, cont: int) -> tuple[ContiguousKVCache, torch.Tensor]:
    """Run the prefix; return the cache (prefix KV) and the reference continuation logits."""
    cache = ContiguousKVCache(model.config, prefix + cont)
    with torch.inference_mode():
        model(torch.tensor(ids[:prefix]), torch.arange(prefix), cache)
        k, v = cache.k[:, :prefix].clone(), cache.v[:, :prefix].clone()
        ref = continue_from(model, cache, k, v, ids, prefix, cont)
    return cache, ref


def continue_from(model, cache: ContiguousKVCache, k: torch.Tensor, v: torch.Tensor, ids: list[int],
                  prefix: int, cont: int) -> torch.Tensor:
    """Logits [cont, vocab] of tokens prefix..prefix+cont-1 teacher-forced over prefix KV (k, v)."""
    cache.k[:, :prefix] = k
    cache.v[:, :prefix] = v
    cache.num_tokens = prefix
    with torch.inference_mode():
        return model(torch.tensor(ids[prefix:prefix + cont]), torch.arange(prefix, prefix + cont), cache)


def compare(ref: torch.Tensor, test: torch.Tensor, targets: torch.Tensor) -> dict:
    lr, lt = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    kl = (lr.exp() * (lr - lt)).sum(-1)
    nll_r = -lr.gather(1, targets[:, None]).mean()
    nll_t = -lt.gather(1, targets[:, None]).mean()
    return {"top1": float((ref.argmax(-1) == test.argmax(-1)).float().mean()), "kl": float(kl.mean()),
            "kl_max": float(kl.max()), "ppl_ref": float(nll_r.exp()), "ppl": float(nll_t.exp())}


def fake_quant(kv: torch.Tensor, bins: list[int], norm: bool = False,
               sizes: dict | None = None, tag: str = "") -> torch.Tensor:
    """kv [L, T, H, D] through quantise/dequantise with bins[layer] per layer (`norm`: channels
    divided by their fp16 RMS first); the size study of the symbols goes into sizes[tag/layer]."""
    out = torch.empty_like(kv)
    for layer, b in enumerate(bins):
        x = kv[layer].reshape(kv.shape[1], -1).numpy()
        div = np.ones((1, x.shape[1]), dtype=np.float32)
        if norm:
            div = np.maximum(np.sqrt((x ** 2).mean(axis=0, keepdims=True)), 1e-6)
            div = div.astype(np.float16).astype(np.float32)
        sym, scale = quantise(x / div, b)
        if sizes is not None:
            sizes[f"{tag}/{layer}"] = size_study(sym, b, (x.shape[0],), 64)
        out[layer] = torch.from_numpy(dequantise(sym, scale, b) * div).view_as(out[layer])
    return out


def quality(model, cache, k, v, ids, prefix, cont, ref, norm_sizes: dict) -> dict:
    layers = model.config.num_layers
    targets = torch.tensor(ids[prefix + 1:prefix + cont + 1])
    ref = ref[: len(targets)]
    variants = {"fp16": (k.half().float(), v.half().float()),
                "int8": (fake_quant(k, [256] * layers), fake_quant(v, [256] * layers))}
    for name, preset in PRESETS.items():
        kb, vb = bins_per_layer(preset, layers)
        variants[name] = (fake_quant(k, kb), fake_quant(v, vb))
    for name in CHANNEL_NORM:
        kb, vb = bins_per_layer(PRESETS[name], layers)
        variants[name + " +chnorm"] = (fake_quant(k, kb, True, norm_sizes, f"{name}/K"),
                                       fake_quant(v, vb, True, norm_sizes, f"{name}/V"))
    out = {}
    for name, (kq, vq) in variants.items():
        logits = continue_from(model, cache, kq, vq, ids, prefix, cont)[: len(targets)]
        out[name] = compare(ref, logits, targets)
    return out


def study_document(model, ids: list[int], prefix: int, cont: int, units: tuple[int, ...]) -> dict:
    cfg = model.config
    t0 = time.perf_counter()
    cache, ref = prefix_kv(model, ids, prefix, cont)
    k, v = cache.k[:, :prefix].clone(), cache.v[:, :prefix].clone()
    sizes, deltas = {}, {}
    for name, kv in (("K", k), ("V", v)):
        for layer in range(cfg.num_layers):
            x = kv[layer].reshape(prefix, -1).numpy()
            for b in BINS:
                sym, _ = quantise(x, b)
                sizes[f"{name}/{layer}/{b}"] = size_study(sym, b, units, cfg.head_dim)
            for b in (16, 32):
                deltas[f"{name}/{layer}/{b}"] = delta_study(x, b)
    norm_sizes: dict = {}
    q = quality(model, cache, k, v, ids, prefix, cont, ref, norm_sizes)
    return {"sizes": sizes, "norm_sizes": norm_sizes, "deltas": deltas, "quality": q,
            "seconds": time.perf_counter() - t0}


def total_bits(docs: list[dict], layers: int, choose, key: str, pb: int, with_tables: bool = True) -> float:
    """Bits per value summed over documents for bins choose(kv, layer), at grouping/unit `key`."""
    bits, values = 0.0, 0
    for d in docs:
        for kv in ("K", "V"):
            for layer in range(layers):
                row = d["sizes"][f"{kv}/{layer}/{choose(kv, layer)}"][key]
                bits += row[f"coded_p{pb}"] + (row[f"tables_p{pb}"] if with_tables else 0.0)
                values += d["values_per_layer"]
    return bits / values + SCALE_BITS / d["channels"]


def summarise(docs: list[dict], layers: int, units: tuple[int, ...]) -> dict:
    uniform = {}
    for b in BINS:
        for grouping in GROUPINGS:
            for unit in units:
                for pb in PROB_BITS:
                    key = f"{grouping}/{unit}"
                    uniform[f"{b}/{key}/p{pb}"] = total_bits(docs, layers, lambda kv, la, b=b: b, key, pb)
    ideal = {}
    for b in BINS:
        for grouping in GROUPINGS:
            bits = sum(d["sizes"][f"{kv}/{la}/{b}"][f"{grouping}/{units[-1]}"]["entropy"]
                       for d in docs for kv in "KV" for la in range(layers))
            values = sum(d["values_per_layer"] * 2 * layers for d in docs)
            ideal[f"{b}/{grouping}/{units[-1]}"] = bits / values
    presets = {}
    for name, preset in PRESETS.items():
        kb, vb = bins_per_layer(preset, layers)
        choose = lambda kv, la, kb=kb, vb=vb: kb[la] if kv == "K" else vb[la]  # noqa: E731
        presets[name] = {f"{g}/{u}/p{pb}": total_bits(docs, layers, choose, f"{g}/{u}", pb)
                         for g in GROUPINGS for u in units for pb in PROB_BITS}
    chnorm = {}
    for name in CHANNEL_NORM:
        for pb in PROB_BITS:
            bits = sum(d["norm_sizes"][f"{name}/{kv}/{la}"][f"channel/{units[-1]}"][part]
                       for d in docs for kv in "KV" for la in range(layers)
                       for part in (f"coded_p{pb}", f"tables_p{pb}"))
            values = sum(d["values_per_layer"] * 2 * layers for d in docs)
            # + per-token fp16 scales + 192 fp16 channel divisors per (kv, layer, record)
            chnorm[f"{name} +chnorm/p{pb}"] = bits / values + SCALE_BITS / 192 + SCALE_BITS / units[-1]
    return {"uniform_bits_per_value": uniform, "ideal_entropy_bits_per_value": ideal,
            "preset_bits_per_value": presets, "chnorm_bits_per_value": chnorm}


def bits_of(name: str, summary: dict, units, unit: int | None = None) -> float:
    """Bits per value of a quality row at per-channel tables over units of `unit` (default: the
    largest, the whole prefix) tokens, PROB_BITS 8 (+chnorm rows: the whole prefix only)."""
    if name == "fp16":
        return 16.0
    if name == "int8":
        return 8 + SCALE_BITS / 192
    if name.endswith("+chnorm"):
        return summary["chnorm_bits_per_value"][f"{name}/p{SHOW_PB}"]
    return summary["preset_bits_per_value"][name][f"channel/{unit or units[-1]}/p{SHOW_PB}"]


def delta_summary(docs: list[dict], layers: int) -> dict:
    out = {}
    for kv in "KV":
        for b in (16, 32):
            rows = [d["deltas"][f"{kv}/{la}/{b}"] for d in docs for la in range(layers)]
            direct = sum(r["direct_bits"] for r in rows)
            reached = [r for r in rows if r["delta_bits_at_equal_mse"] is not None]
            out[f"{kv}/{b}"] = {
                "direct_bits": direct / len(rows),
                "delta_bits": sum(r["delta_bits_at_equal_mse"] for r in reached) / max(len(reached), 1),
                "direct_bits_same_layers": sum(r["direct_bits"] for r in reached) / max(len(reached), 1),
                "layers_reached": len(reached), "layers": len(rows),
                "layers_delta_wins": sum(r["delta_bits_at_equal_mse"] < r["direct_bits"] for r in reached)}
    return out


def mean_quality(docs: list[dict]) -> dict:
    names = docs[0]["quality"].keys()
    return {n: {m: float(np.mean([d["quality"][n][m] for d in docs])) for m in docs[0]["quality"][n]}
            for n in names}


def print_tables(console: Console, summary: dict, quality_: dict, deltas: dict, units) -> None:
    best = f"channel/{units[-1]}"
    t = Table(title="bits per value (coded + tables + fp16 scales), uniform bins, PROB_BITS 8")
    t.add_column("bins")
    for g in GROUPINGS:
        for u in units:
            t.add_column(f"{g}/{u}", justify="right")
    for b in BINS:
        t.add_row(str(b), *[f"{summary['uniform_bits_per_value'][f'{b}/{g}/{u}/p{SHOW_PB}']:.3f}"
                            for g in GROUPINGS for u in units])
    console.print(t)
    q = Table(title=f"quality vs uncompressed fp32 KV; size at per-channel tables, {best} tokens, "
                    "PROB_BITS 8")
    small = units[-2] if len(units) > 1 else units[-1]
    for c in ("KV", "bits/value", "x vs fp16", f"x fp16, {small}-tok tables", "x vs int8", "top-1", "KL",
              "KL max", "ppl", "ppl ref"):
        q.add_column(c, justify="right")
    int8_bits = 8 + SCALE_BITS / 192
    for name, r in quality_.items():
        bits = bits_of(name, summary, units)
        bits_small = bits if name.endswith("+chnorm") else bits_of(name, summary, units, small)
        q.add_row(name, f"{bits:.3f}", f"{16 / bits:.2f}", f"{16 / bits_small:.2f}",
                  f"{int8_bits / bits:.2f}", f"{r['top1']:.3f}", f"{r['kl']:.4f}",
                  f"{r['kl_max']:.3f}", f"{r['ppl']:.3f}", f"{r['ppl_ref']:.3f}")
    console.print(q)
    d = Table(title="anchor deltas (groups of 10) vs direct: symbol entropy, bits/value at equal MSE")
    for c in ("kv/bins", "direct", "delta", "layers reached", "layers delta wins"):
        d.add_column(c, justify="right")
    for key, r in deltas.items():
        d.add_row(key, f"{r['direct_bits_same_layers']:.3f}", f"{r['delta_bits']:.3f}",
                  f"{r['layers_reached']}/{r['layers']}", str(r["layers_delta_wins"]))
    console.print(d)


def plot(path: Path, summary: dict, quality_: dict, units) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for g in GROUPINGS:
        for u in units:
            a.plot(BINS, [16 / summary["uniform_bits_per_value"][f"{bi}/{g}/{u}/p{SHOW_PB}"] for bi in BINS],
                   marker="o", label=f"{g} tables / {u} tok")
    a.set_xscale("log", base=2)
    a.set_xlabel("bins (all layers)")
    a.set_ylabel("size ratio vs fp16")
    a.legend(fontsize=7)
    a.set_title("size vs table grouping and unit (PROB_BITS 8)")
    for name, r in quality_.items():
        bits = bits_of(name, summary, units)
        b.scatter(16 / bits, r["top1"])
        b.annotate(name, (16 / bits, r["top1"]), fontsize=7)
    b.axhline(0.90, ls="--", c="gray")
    b.axvline(5.0, ls="--", c="gray")
    b.set_xlabel("size ratio vs fp16")
    b.set_ylabel("top-1 agreement")
    b.set_title("size vs quality (SmolLM2-135M-Instruct)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def rounded(x):
    """Floats to 6 significant digits (the JSON holds ~100K numbers)."""
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [rounded(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--cont", type=int, default=256)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.docs, args.prefix, args.cont = 1, 512, 64
    units = tuple(sorted({u for u in UNITS if u <= args.prefix} | {args.prefix}))
    torch.manual_seed(0)
    console = Console(width=160)
    t0 = time.perf_counter()
    model = load_model(MODEL, torch.float32)
    tokenizer = load_tokenizer(MODEL)
    docs = documents(tokenizer, args.prefix + args.cont + 1, args.docs)
    results = []
    for name, ids in docs:
        console.print(f"{name}: {len(ids)} tokens, prefix {args.prefix}, continuation {args.cont}")
        r = study_document(model, ids, args.prefix, args.cont, units)
        r.update(name=name, tokens=len(ids), values_per_layer=args.prefix * 192, channels=192)
        results.append(r)
    layers = model.config.num_layers
    summary = summarise(results, layers, units)
    quality_ = mean_quality(results)
    deltas = delta_summary(results, layers)
    print_tables(console, summary, quality_, deltas, units)
    name = "cachegen_study_quick" if args.quick else "cachegen_study"
    report = {"model": MODEL, "model_dtype": "float32", "machine": machine_info(args.out.resolve()),
              "args": vars(args) | {"out": str(args.out)}, "units": units, "bins": BINS,
              "prob_bits": PROB_BITS, "presets": PRESETS, "scale_bits": SCALE_BITS,
              "anchor_group": ANCHOR_GROUP,
              "documents": [{"name": r["name"], "tokens": r["tokens"], "seconds": r["seconds"]}
                            for r in results],
              "summary": summary, "quality_mean": quality_, "anchor_delta": deltas,
              "per_document": [{k: r[k] for k in ("name", "quality", "sizes", "norm_sizes", "deltas")}
                               for r in results],
              "seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(rounded(report)) + "\n")
    plot(args.out / f"{name}.png", summary, quality_, units)
    console.print(f"wrote {args.out / name}.json/.png in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
