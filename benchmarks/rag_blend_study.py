"""What limits CacheBlend's top-1 agreement on SmolLM2-135M-Instruct (issue 14): a study over where the
passages' KV comes from, the check layer, the deviation score, and attention-sink rows.

    .venv/bin/python benchmarks/rag_blend_study.py           # rag_blend.py's 4 prompts of 5-8 passages
    .venv/bin/python benchmarks/rag_blend_study.py --quick   # 2 prompts of 4 passages, 1 repeat

The prompts, pool and seed are rag_blend.py's. Every variant blends the same prompt from loaded K/V
(`blend_prefill`) and is scored against full prefill as rag_blend.py scores it: teacher-forced over
full prefill's greedy answer, top-1 agreement and mean KL(full || variant); "identical" is the share of
prompts where every teacher-forced top-1 matches, which is when greedy decoding would give full
prefill's answer (up to float ties: the decode itself is not run, to keep the study short).

Passage KV sources (each through a kvtier CacheEngine by segment keys, K normalised to position 0 and
shifted to where the passage now sits, as rag_blend.PassageStore does):
- alone:   each passage prefilled as its own prompt at positions 0.. (rag_blend.py, CacheBlend's setting);
- context: each passage cut from the full prefill of an EARLIER, different "donor" prompt that held it
           (the head, other passages before it, another order): what the engine's connector saves
           (kvtier/connector/blend_io.py). Donors: the test prompts' passages in a seeded random order, cut
           into prompts of 5-8, redrawn until no passage sits behind the same passages as in a test prompt;
- oracle:  cut from the full prefill of the SAME prompt: at ratio 0 this must give KL ~0 (shifting and
           merging are exact), so any gap elsewhere is the KV, not the mechanics.
Selection variants: check layer 1/2/4; score K (the default), V, or K+V (`selection.joint_kv`: each
divided by its mean squared row norm); "+sinkN": each passage's first N rows always recomputed on top of
the ratio (a passage prefilled alone begins at position 0, where a model puts its attention sink);
"oracle-select": the rows whose loaded K/V truly deviate most from full prefill's, summed over the
layers from the check layer on (needs full prefill: a bound on what any selection at that ratio
reaches, not a method, so it has no TTFT).

TTFT is model-level as in rag_blend.py (the kvtier load and shift + the blend), the median of repeats,
the variants interleaved within each repeat; it does not depend on the source, so it is timed once per
(ratio, check layer, score, sink rows) on the "alone" store (V and K+V once, as K+V: the same compute,
`keys_values` at the check layer, and K+V's few extra element-wise operations).

Diagnostics (per layer, over the passages' rows): the relative deviation of the loaded K and V from
full prefill's, split into each passage's first row, rows 1-3 and the rest, per source; what is left
after the default blend at 0.15; where its selected rows sit, and how many of the rows that truly
deviate most (oracle-select's) it finds.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import rag_blend as rb
import torch
from cachegen_study import compare, rounded
from harness import console_and_logging, machine_info, progress_bar, write_results
from rich.console import Console
from rich.table import Table

from kvtier.blend import selection
from kvtier_engine.blend import BlendInput, BlendOutput, blend_prefill
from kvtier_engine.demo import MODEL
from kvtier_engine.layers.attention import ContiguousKVCache
from kvtier_engine.models.loader import load_model
from kvtier_engine.tokenizer import load_tokenizer

logger = logging.getLogger("rag_blend_study")

SOURCES = ("alone", "context", "oracle")
RATIOS = (0.15, 0.3)
SINK_ROWS = 4
OFFSETS = {"first row": (0, 1), "rows 1-3": (1, 4), "rows 4+": (4, 1 << 30)}  # within each passage


@dataclass(frozen=True)
class Variant:
    source: str = "alone"
    ratio: float = 0.15
    check_layer: int = 1
    deviation: str = "k"  # BlendInput.deviation
    sink_rows: int = 0  # each passage's first rows, recomputed on top of the ratio
    oracle_select: bool = False  # rows by their true deviation from full prefill (a bound, not a method)

    @property
    def name(self) -> str:
        extra = f" +sink{self.sink_rows}" if self.sink_rows else ""
        extra += " oracle-select" if self.oracle_select else ""
        return f"{self.source} {self.ratio:g} c{self.check_layer} {self.deviation.upper()}{extra}"

    @property
    def timing(self) -> str | None:
        """The name of the timed run with this variant's compute (None: an oracle, not timed)."""
        if self.oracle_select:
            return None
        deviation = "kv" if self.deviation == "v" else self.deviation  # the same compute: keys_values
        return Variant("alone", self.ratio, self.check_layer, deviation, self.sink_rows).name


def variants(ratios=RATIOS, check_layers=(2, 4)) -> list[Variant]:
    out = [Variant(src, r) for src in ("alone", "context") for r in (0.0, *ratios)]
    out += [Variant("oracle", 0.0)]  # the exactness check: ratio 0 must reproduce full prefill
    out += [Variant(check_layer=c, ratio=r) for c in check_layers for r in ratios]
    out += [Variant("context", ratios[0], check_layers[0])]
    out += [Variant(deviation=d, ratio=r) for d in ("v", "kv") for r in ratios]
    out += [Variant(sink_rows=SINK_ROWS, ratio=r) for r in (0.0, ratios[0])]
    out += [Variant(oracle_select=True, ratio=r) for r in ratios]
    return out


# -- passage KV sources ----------------------------------------------------------------------------


def passage_rows(prompt: rb.Prompt, lo: int, hi: int) -> torch.Tensor:
    """Rows at offsets lo..hi-1 within each passage of `prompt`."""
    rows = [r for s in prompt.segments if s.kind == "passage"
            for r in range(s.start + lo, min(s.start + hi, s.end))]
    return torch.tensor(rows, dtype=torch.long)


# -- one variant ------------------------------------------------------------------------------------


def relative_deviation(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per layer [L]: mean over `rows` of |a - b|^2, over the mean |b|^2 (a, b: [L, T, H, D])."""
    a, b = a[:, rows].flatten(2), b[:, rows].flatten(2)
    return (a - b).square().sum(-1).mean(-1) / b.square().sum(-1).mean(-1)


def true_score(k: torch.Tensor, v: torch.Tensor, full_k: torch.Tensor, full_v: torch.Tensor,
               first_layer: int) -> torch.Tensor:
    """Per row [T]: the loaded K/V's squared deviation from full prefill's, each layer's divided by its
    mean squared row norm, summed over layers first_layer.. (what oracle-select ranks by)."""
    score = torch.zeros(k.shape[1])
    for got, want in ((k, full_k), (v, full_v)):
        dev = (got[first_layer:] - want[first_layer:]).flatten(2).square().sum(-1)  # [L', T]
        score += (dev / want[first_layer:].flatten(2).square().sum(-1).mean(-1, keepdim=True)).sum(0)
    return score


def selector(variant: Variant, prompt: rb.Prompt, score: torch.Tensor | None):
    """The blend's selector for `variant` (`score`: the true deviation, for oracle-select)."""
    if variant.oracle_select:
        return lambda new, loaded, cached, ratio: selection.select_by_score(score, cached, ratio)
    if not variant.sink_rows:
        return selection.select_rows
    sinks = passage_rows(prompt, 0, variant.sink_rows)
    return lambda new, loaded, cached, ratio: torch.unique(torch.cat(
        (selection.select_rows(new, loaded, cached, ratio), sinks)))


def run_blend(model, prompt: rb.Prompt, loaded, variant: Variant, select) -> BlendOutput:
    k, v, cached = loaded
    return blend_prefill(model, BlendInput(torch.tensor(prompt.ids), k, v, cached, variant.ratio,
                                           variant.check_layer, select, variant.deviation))


def cache_of(model, out: BlendOutput, extra: int) -> ContiguousKVCache:
    t = out.k.shape[1]
    cache = ContiguousKVCache(model.config, t + extra)
    cache.k[:, :t], cache.v[:, :t] = out.k, out.v
    cache.advance(t)
    cache.last_logits = out.last_logits
    return cache


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class Reference:
    """Full prefill of one prompt: its greedy answer, the teacher-forced logits over it, its K/V."""

    answer: list[int]
    logits: torch.Tensor
    k: torch.Tensor  # [L, T, H, D]
    v: torch.Tensor


def reference(model, prompt: rb.Prompt, eos: int | None) -> tuple[Reference, ContiguousKVCache]:
    t = len(prompt.ids)
    cache = rb.prefill(model, prompt.ids, rb.ANSWER_TOKENS)
    answer = rb.greedy(model, cache, rb.ANSWER_TOKENS, eos)
    cache.num_tokens = t  # back to the prompt's KV (greedy wrote after it)
    logits = rb.answer_logits(model, cache, answer)
    return Reference(answer, logits, cache.k[:, :t].clone(), cache.v[:, :t].clone()), cache


def quality(model, prompt: rb.Prompt, ref: Reference, loaded, variant: Variant) -> tuple[dict, BlendOutput]:
    score = (true_score(loaded[0], loaded[1], ref.k, ref.v, variant.check_layer)
             if variant.oracle_select else None)
    out = run_blend(model, prompt, loaded, variant, selector(variant, prompt, score))
    logits = rb.answer_logits(model, cache_of(model, out, rb.ANSWER_TOKENS), ref.answer)
    targets = torch.tensor(ref.answer)
    q = compare(ref.logits, logits, targets)
    q["identical"] = bool((logits.argmax(-1) == targets).all())  # greedy would decode full's answer
    q["recomputed_share"] = out.recomputed / len(prompt.ids)
    return q, out


def diagnostics(prompt: rb.Prompt, ref: Reference, loads: dict, default: BlendOutput) -> dict:
    """Per source, per layer: the loaded K's and V's relative deviation from full prefill by row offset
    in the passages; what is left after the default blend at 0.15; where its selected rows sit."""
    out: dict = {}
    for src in ("alone", "context"):
        k, v, _ = loads[src]
        for offset, (lo, hi) in OFFSETS.items():
            rows = passage_rows(prompt, lo, hi)
            out[f"{src} K {offset}"] = relative_deviation(k, ref.k, rows).tolist()
            out[f"{src} V {offset}"] = relative_deviation(v, ref.v, rows).tolist()
    rows = passage_rows(prompt, 0, 1 << 30)
    out["alone K after blend 0.15"] = relative_deviation(default.k, ref.k, rows).tolist()
    k, v, cached = loads["alone"]
    chosen = set(default.selected.tolist())
    top = set(selection.select_by_score(true_score(k, v, ref.k, ref.v, 1), cached, 0.15).tolist())
    uncached = set(torch.nonzero(~cached).flatten().tolist())
    out["selected share by offset"] = {
        name: float(np.mean([r in chosen for r in passage_rows(prompt, lo, hi).tolist()]))
        for name, (lo, hi) in OFFSETS.items()}
    out["recall of the true top 0.15"] = len((chosen - uncached) & top) / max(1, len(top - uncached))
    norms = [x[1, rows].flatten(1).square().sum(-1).mean().item() for x in (ref.k, ref.v)]
    out["check layer 1 |K|^2 / |V|^2"] = norms[0] / norms[1]  # why joint_kv divides each by its scale
    return out


def measure_prompt(model, stores: dict, prompt: rb.Prompt, eos: int | None, repeats: int,
                   vs: list[Variant]) -> dict:
    ref, cache = reference(model, prompt, eos)
    oracle = rb.PassageStore(model, capacity=256 << 20)  # this prompt's own passages
    try:
        oracle.store_head(prompt.ids[: prompt.segments[0].end])
        rb.store_cut(oracle, prompt, cache)
        loads = {src: store.load(prompt) for src, store in (stores | {"oracle": oracle}).items()}
    finally:
        oracle.close()
    row = {"tokens": len(prompt.ids), "passages": len(prompt.passages), "question": prompt.question,
           "answer_ids": ref.answer, "variants": {}}
    outputs = {}
    for variant in vs:
        q, outputs[variant.name] = quality(model, prompt, ref, loads[variant.source], variant)
        row["variants"][variant.name] = q
    row["diagnostics"] = diagnostics(prompt, ref, loads, outputs[Variant().name])
    row["ttft_s"], row["ttft_runs_s"] = ttft(model, stores["alone"], prompt, vs, repeats)
    return row


def ttft(model, store: rb.PassageStore, prompt: rb.Prompt, vs: list[Variant],
         repeats: int) -> tuple[dict, dict]:
    """Median TTFT per timed compute (full prefill, and each variant's `timing`), interleaved."""
    runs = {"full": lambda: rb.prefill(model, prompt.ids)}
    for variant in vs:
        if variant.timing and variant.timing not in runs:
            v = Variant("alone", variant.ratio, variant.check_layer, variant.deviation, variant.sink_rows)
            runs[v.name] = lambda v=v: run_blend(model, prompt, store.load(prompt), v,
                                                 selector(v, prompt, None))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved: the machine's other load slows every run alike
        for name, fn in runs.items():
            times[name].append(timed(fn))
    return {n: statistics.median(ts) for n, ts in times.items()}, times


def summarise(rows: list[dict], vs: list[Variant]) -> dict:
    """Per variant over prompts: mean top-1, KL, KL max, recomputed share; share identical; mean TTFT
    (of per-prompt medians) of its compute and the speedup over full prefill's."""
    full = float(np.mean([r["ttft_s"]["full"] for r in rows]))
    out = {"full": {"ttft_s": full, "speedup_vs_full": 1.0}}
    for variant in vs:
        name = variant.name
        s = {key: float(np.mean([r["variants"][name][key] for r in rows]))
             for key in ("top1", "kl", "kl_max", "recomputed_share", "identical")}
        s["identical_share"] = s.pop("identical")
        s["ttft_s"] = (float(np.mean([r["ttft_s"][variant.timing] for r in rows])) if variant.timing
                       else None)
        s["speedup_vs_full"] = full / s["ttft_s"] if s["ttft_s"] else None
        out[name] = asdict(variant) | s
    return out


def mean_diagnostics(rows: list[dict]) -> dict:
    out = {}
    for key, value in rows[0]["diagnostics"].items():
        if isinstance(value, list):
            out[key] = np.mean([r["diagnostics"][key] for r in rows], axis=0).tolist()
        elif isinstance(value, dict):
            out[key] = {k: float(np.mean([r["diagnostics"][key][k] for r in rows])) for k in value}
        else:
            out[key] = float(np.mean([r["diagnostics"][key] for r in rows]))
    return out


# -- output ------------------------------------------------------------------------------------------


def print_results(console: Console, summary: dict, diag: dict, rows: list[dict]) -> None:
    tokens = [r["tokens"] for r in rows]
    t = Table(title=f"What limits CacheBlend on {MODEL} (fp32, CPU): {len(rows)} prompts of "
                    f"{min(tokens)}-{max(tokens)} tokens; quality vs full prefill")
    for c in ("variant", "recomputed", "TTFT ms", "x vs full", "top-1", "KL", "KL max", "identical"):
        t.add_column(c, justify="right")
    for name, s in summary.items():
        if name == "full":
            t.add_row("full prefill", "100%", f"{s['ttft_s'] * 1e3:.0f}", "1.00", "", "", "", "")
            continue
        timed_ = s["ttft_s"] is not None
        t.add_row(name, f"{s['recomputed_share']:.1%}", f"{s['ttft_s'] * 1e3:.0f}" if timed_ else "-",
                  f"{s['speedup_vs_full']:.2f}" if timed_ else "-", f"{s['top1']:.3f}", f"{s['kl']:.4f}",
                  f"{s['kl_max']:.3f}", f"{s['identical_share']:.0%}")
    console.print(t)
    for src in ("alone", "context"):
        parts = ", ".join(f"{o} {np.mean(diag[f'{src} K {o}'][1:]):.3f}" for o in OFFSETS)
        console.print(f"loaded K vs full prefill ({src}), relative deviation, mean of layers 1..: {parts}")
    console.print(f"left after alone 0.15 c1 K: {np.mean(diag['alone K after blend 0.15'][1:]):.3f}; "
                  f"selected share by offset: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in diag["selected share by offset"].items())
                  + f"; recall of the true top 0.15: {diag['recall of the true top 0.15']:.0%}")


def plot(path, summary: dict, diag: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(18, 5))
    colours = {"alone": "tab:blue", "context": "tab:green", "oracle": "tab:gray"}
    for ax, key, label in ((axes[0], "top1", "top-1 agreement"), (axes[1], "kl", "mean KL(full || variant)")):
        ax.axvline(summary["full"]["ttft_s"] * 1e3, ls="--", c="gray")
        for name, s in summary.items():
            if name == "full":
                continue
            x = summary[Variant(ratio=s["ratio"]).name]["ttft_s"] if s["ttft_s"] is None else s["ttft_s"]
            marker = "*" if s["oracle_select"] else "s" if s["sink_rows"] else (
                "^" if s["check_layer"] > 1 else "D" if s["deviation"] != "k" else "o")
            ax.scatter(x * 1e3, s[key], marker=marker, c=colours[s["source"]], s=50)
            ax.annotate(name, (x * 1e3, s[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("TTFT, ms (model level; full prefill dashed)")
        ax.set_ylabel(label)
    axes[0].axhline(rb.TARGETS["top1"], ls=":", c="gray")
    axes[1].set_yscale("symlog", linthresh=1e-4)
    ax = axes[2]
    for src, style in (("alone", "-"), ("context", "--")):
        for offset, c in zip(OFFSETS, ("tab:red", "tab:orange", "tab:blue")):
            ax.plot(diag[f"{src} K {offset}"], style, c=c, label=f"{src}: {offset}")
    ax.plot(diag["alone K after blend 0.15"], ":", c="k", label="alone after blend 0.15 (all rows)")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("loaded K vs full prefill: |dK|^2 / |K|^2")
    ax.legend(fontsize=7)
    fig.suptitle(f"CacheBlend on {MODEL}: passage KV source, check layer, score, sink rows "
                 "(o K c1, ^ check layer, D score, s sink rows, * oracle selection)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return rb.parse_prompt_args(rb.prompt_args(__doc__.split("\n")[0]), argv)


def build_stores(model, tokenizer, pool: list[rb.Passage], prompts: list[rb.Prompt],
                 args: argparse.Namespace) -> tuple[dict, list[rb.Prompt]]:
    """The "alone" and "context" stores holding every passage of `prompts`, and the donor prompts."""
    head = prompts[0].ids[: prompts[0].segments[0].end]  # the same head in every prompt
    stores = {src: rb.PassageStore(model, capacity=2 << 30) for src in ("alone", "context")}
    for store in stores.values():
        store.store_head(head)
    for i in dict.fromkeys(i for p in prompts for i in p.passages):
        stores["alone"].store_passage(pool[i].ids)
    rng = np.random.default_rng(args.seed + 1)
    donors = rb.donor_prompts(tokenizer, pool, prompts, rng, tuple(args.passages))
    for donor in donors:
        rb.store_cut(stores["context"], donor, rb.prefill(model, donor.ids))
    return stores, donors


def run_prompts(model, tokenizer, args: argparse.Namespace, console: Console,
                vs: list[Variant]) -> tuple[list[rb.Prompt], list[dict]]:
    pool = rb.passage_pool(tokenizer)
    rng = np.random.default_rng(args.seed)  # rag_blend.py's draws: the same prompts
    counts = rng.integers(args.passages[0], args.passages[1] + 1, size=args.prompts)
    prompts = [rb.build_prompt(tokenizer, pool, rng, int(c)) for c in counts]
    stores, donors = build_stores(model, tokenizer, pool, prompts, args)
    rows = []
    try:
        with progress_bar(console) as bar:
            task = bar.add_task("prompts", total=len(prompts))
            for prompt in prompts:
                rows.append(measure_prompt(model, stores, prompt, tokenizer.eos_token_id, args.repeats, vs))
                rows[-1]["answer"] = tokenizer.decode(rows[-1].pop("answer_ids"))
                logger.info("prompt %d of %d measured", len(rows), len(prompts))
                bar.advance(task)
                bar.refresh()
    finally:
        for store in stores.values():
            store.close()
    return donors, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = console_and_logging(160, logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    model, tokenizer = load_model(MODEL, torch.float32), load_tokenizer(MODEL)
    vs = variants()
    donors, rows = run_prompts(model, tokenizer, args, console, vs)
    summary, diag = summarise(rows, vs), mean_diagnostics(rows)
    print_results(console, summary, diag, rows)
    machine = machine_info(args.out.resolve()) | {"torch_threads": torch.get_num_threads(),
                                                  "load_avg_before": load_before,
                                                  "load_avg_after": os.getloadavg()}
    console.print(f"{machine['cpu_model']}, {machine['cores']} cores; load average (1/5/15 min) before "
                  f"{'/'.join(f'{x:.2f}' for x in load_before)}, after "
                  f"{'/'.join(f'{x:.2f}' for x in machine['load_avg_after'])}")
    report = {"model": MODEL, "model_dtype": "float32", "kv_dtype": "float32", "machine": machine,
              "args": vars(args) | {"out": str(args.out)}, "answer_tokens": rb.ANSWER_TOKENS,
              "sink_rows": SINK_ROWS, "donors": [d.passages for d in donors],
              "summary": summary, "diagnostics": diag, "per_prompt": rows,
              "seconds": time.perf_counter() - t0}
    name = "rag_blend_study_quick" if args.quick else "rag_blend_study"
    write_results(args.out, name, rounded(report), lambda path: plot(path, summary, diag))
    console.print(f"wrote {args.out / name}.json/.png in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
