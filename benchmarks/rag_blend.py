"""CacheBlend on SmolLM2-135M-Instruct (issue 14): quality and time to first token of blending reused
passages' KV against full prefill and prefix caching, measured at the model level.

    .venv/bin/python benchmarks/rag_blend.py           # 4 prompts of 5-8 passages, ~1.2-2K tokens
    .venv/bin/python benchmarks/rag_blend.py --quick   # 2 prompts of 4 passages (a smoke run)

Prompts. A retrieval-augmented chat prompt (SmolLM2's chat format):

    [system prompt + "<|im_start|>user\\n"] [SEP passage] ... [SEP passage] [SEP question + assistant turn]
     head (prefix caching)                   passages (blended)              suffix (prefilled)

SEP is "\\n\\n## " as token ids (a separator given as ids, as the `blend:` config takes it); every
passage and the question start with it, so `kvtier.blend.segments.split_segments` cuts the prompt into
head, passages and suffix. Passages are real text: the pydoc pages of stdlib modules, cut at blank
lines into passages of 150-300 tokens (a longer one is cut at 300 tokens), each tokenised alone behind
a "From the documentation of <module>:" line. Each prompt draws 5-8 passages from the pool in a random
order; the question asks what a function named in one of them does.

Passages' KV (`--source`), stored in a kvtier CacheEngine (CPU tier, float32 KV as the model
computes it, 256-token chunks) under segment keys (`SegmentKeys.spans` + `engine.storage.put`), K
normalised to segment position 0 (`rope_shift.shift_keys(k, -segment.start, inv_freq)`):
- context (the default: what the bundled engine stores): each passage cut from the full prefill of an
  EARLIER prompt that held it ("donor" prompts: every measured passage once, in random groups and
  orders, none behind the same passages as in any measured prompt), as the connector saves passages
  from the first prompt it computes them in;
- alone (CacheBlend's setting, the harder one): each passage prefilled as its own prompt at positions
  0.., without any context.
The head (same system prompt in every prompt) is stored under prefix keys (`engine.store`, partial
chunk kept). Each test prompt then places the passages at new positions.
benchmarks/rag_blend_study.py studies why the two sources differ.

Methods, per prompt (model fp32 on CPU, torch threads = the machine's cores):
- full: prefill of the whole prompt (the reference).
- prefix: prefix caching: the head's KV read from kvtier (`engine.retrieve`), the rest prefilled.
- blend r: the head read by prefix, the passages read by segment keys (`engine.storage.get`), K shifted
  to where each passage now sits (`shift_keys`, one per-token shift), then `blend_prefill` at ratio r
  with check layer 1 (the issue's defaults), selecting by K deviation (`select_rows`), or at random
  (`random_rows`, the baseline) at 0.15. The question suffix is uncached: always recomputed.

TTFT is model-level: from having the prompt's token ids to having the first token's logits (kvtier
reads, shift and every forward included; tokenisation, scheduling and sampling excluded). Each method's
TTFT is the median of REPEATS runs, the methods interleaved within each repeat so that the other
processes on the machine slow them alike; the load average before and after is in the JSON.

Quality against full prefill, per prompt: the reference answer is full prefill's greedy answer (up to
32 tokens, to its end-of-turn token). Teacher-forced over it, the next-token distributions after the
prompt and after each answer token but the last: top-1 agreement and mean KL(full || method). Each
method also decodes greedily (32 tokens): the share of prompts whose answer is identical to full's.
"""

from __future__ import annotations

import argparse
import logging
import os
import pydoc
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cachegen_study import compare, rounded
from harness import console_and_logging, machine_info, progress_bar, write_results
from rich.console import Console
from rich.table import Table

from kvtier.blend import rope_shift, selection
from kvtier.blend.segments import Segment, SegmentKeys, split_segments
from kvtier.config import CpuConfig, KvtierConfig
from kvtier.engine import CacheEngine
from kvtier.layout import KVLayout
from kvtier_engine.blend import BlendInput, blend_prefill
from kvtier_engine.demo import MODEL
from kvtier_engine.layers.attention import ContiguousKVCache
from kvtier_engine.layers.rotary import inverse_frequencies
from kvtier_engine.models.loader import load_model
from kvtier_engine.tokenizer import load_tokenizer

logger = logging.getLogger("rag_blend")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
MODULES = ("json", "heapq", "bisect", "textwrap", "shlex", "fnmatch", "base64", "zlib", "difflib",
           "functools", "string", "copy")
PER_MODULE = 3  # passages taken from each page
DONOR_TRIES = 200  # draws of donor prompts before giving up (donor_prompts)
SOURCES = ("context", "alone")  # where the passages' stored KV comes from (--source)
SEPARATOR = "\n\n## "
SYSTEM = ("<|im_start|>system\nYou are a helpful assistant. Answer the user's question in one or two "
          "sentences using the documentation excerpts the user gives.<|im_end|>\n<|im_start|>user\n"
          "Here are excerpts from the Python documentation.")
QUESTION = ("Question: according to the excerpts above, what does {name} do?<|im_end|>\n"
            "<|im_start|>assistant\n")
PASSAGE_TOKENS = (150, 300)
RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)
RANDOM_RATIO = 0.15
CHECK_LAYER = 1
ANSWER_TOKENS = 32
REPEATS = 3
CHUNK = 256
TARGET_RATIO = 0.15
TARGETS = {"ttft_speedup": 3.0, "kl_vs_ratio0": 0.6, "top1": 0.90}


@dataclass(frozen=True)
class Passage:
    module: str
    ids: list[int]  # starts with the separator
    names: tuple[str, ...]  # functions named in it (what a question may ask about)


@dataclass
class Prompt:
    ids: list[int]
    passages: list[int]  # indices into the pool, in prompt order
    question: str
    segments: list[Segment] = field(default_factory=list)


# -- prompts -------------------------------------------------------------------------------------


def page_paragraphs(module: str) -> list[str]:
    """The pydoc page of `module` cut at blank lines, without the boilerplate reference note."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", pydoc.render_doc(module, renderer=pydoc.plaintext))
    text = re.sub(r"MODULE REFERENCE.*?consult the module reference at the\s+location listed above\.",
                  "", text, flags=re.S)
    return [p.rstrip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def cut_passages(paragraphs: list[str], encode, lo: int, hi: int) -> list[list[int]]:
    """Consecutive paragraphs joined until at least `lo` tokens; a passage over `hi` is cut at `hi`."""
    out, current = [], []
    for para in paragraphs:
        current.append(para)
        ids = encode("\n\n".join(current))
        if len(ids) >= lo:
            out.append(ids[:hi])
            current = []
    return out


def passage_pool(tokenizer, modules=MODULES, per_module=PER_MODULE,
                 size: tuple[int, int] = PASSAGE_TOKENS) -> list[Passage]:
    sep = tokenizer.encode(SEPARATOR)
    pool = []
    for module in modules:
        header = tokenizer.encode(f"From the documentation of {module}:\n")
        bodies = cut_passages(page_paragraphs(module), tokenizer.encode, size[0] - len(header) - len(sep),
                              size[1] - len(header) - len(sep))
        for body in bodies[:per_module]:
            names = tuple(dict.fromkeys(re.findall(r"^\s*(\w{3,})\(", tokenizer.decode(body), flags=re.M)))
            pool.append(Passage(module, sep + header + body, names))
    return pool


def build_prompt(tokenizer, pool: list[Passage], rng: np.random.Generator, count: int) -> Prompt:
    """A head, `count` passages of the pool in a random order, and a question about one of them."""
    askable = [i for i, p in enumerate(pool) if p.names]
    target = int(rng.choice(askable))
    others = [i for i in rng.permutation(len(pool)).tolist() if i != target][: count - 1]
    order = [int(i) for i in rng.permutation([target, *others])]
    name = pool[target].names[int(rng.integers(len(pool[target].names)))]
    return assemble_prompt(tokenizer, pool, order, QUESTION.format(name=name))


def assemble_prompt(tokenizer, pool: list[Passage], order: list[int], question: str) -> Prompt:
    """The head, the passages `order` names (indices into the pool) in that order, and `question`."""
    sep = tokenizer.encode(SEPARATOR)
    passages = [t for i in order for t in pool[i].ids]
    ids = tokenizer.encode(SYSTEM) + passages + sep + tokenizer.encode(question)
    prompt = Prompt(ids, list(order), question)
    prompt.segments = split_segments(ids, sep)
    kinds = [s.kind for s in prompt.segments]
    if kinds != ["head", *["passage"] * len(order), "suffix"]:  # the separator occurred inside some text
        raise ValueError(f"the prompt split into {kinds}, not head + {len(order)} passages + suffix")
    return prompt


# -- kvtier: storing passages and loading them at new positions -----------------------------------


class PassageStore:
    """A kvtier CacheEngine (CPU tier only) holding the head under prefix keys and each passage's KV
    under its segment keys, K at segment position 0."""

    def __init__(self, model, capacity: int):
        cfg = model.config
        self.model, self.config = model, cfg
        self.layout = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.float32)
        kv_config = KvtierConfig(chunk_size=CHUNK, save_partial_chunks=True, disk=None,
                                 cpu=CpuConfig(capacity=capacity, pin_memory="off"))
        self.engine = CacheEngine(kv_config, self.layout, model_id=f"rag-blend-{MODEL}")
        self.keys = SegmentKeys(self.engine.db.namespace_digest, CHUNK)
        self.inv_freq = inverse_frequencies(cfg)
        self.stored: set[tuple[int, ...]] = set()

    def close(self) -> None:
        self.engine.close()

    def _kv(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[L, T, H, D] K and V -> kvtier's chunk layout [2, L, T, H*D]."""
        return torch.stack((k, v)).flatten(3).contiguous()

    def store_head(self, ids: list[int]) -> None:
        cache = prefill(self.model, ids)
        self.engine.store(ids, self._kv(cache.k, cache.v))

    def store_passage(self, ids: list[int]) -> None:
        """Prefill the passage alone (its own prompt, positions 0..) and store it by segment keys."""
        if tuple(ids) in self.stored:
            return
        cache = prefill(self.model, ids)
        self.put_passage(ids, cache.k, cache.v, 0)  # the passage as it sat when computed: alone

    def put_passage(self, ids: list[int], k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store a passage's K/V [L, len(ids), H, D], computed with the passage at position `start`,
        by segment keys with K normalised to position 0."""
        k = rope_shift.shift_keys(k, -start, self.inv_freq)  # normalise to position 0
        spans = self.keys.spans(ids, Segment(0, len(ids), "passage"))
        stored = self.engine.storage.put(spans, self._kv(k, v))
        if stored != len(spans):
            raise RuntimeError(f"kvtier stored {stored} of the passage's chunks: the CPU tier is too small")
        self.stored.add(tuple(ids))

    def load(self, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loaded_k, loaded_v [L, T, H, D] at true positions, cached bool [T]): the head by prefix
        keys, each passage by its segment keys, K shifted from segment position 0 to its start."""
        t, cfg = len(prompt.ids), self.config
        out = torch.zeros(self.layout.chunk_shape(t), dtype=self.layout.dtype)
        cached = torch.zeros(t, dtype=torch.bool)
        head = prompt.segments[0]
        _, n = self.engine.retrieve(prompt.ids[: head.end], out=out)
        cached[:n] = True
        delta = torch.zeros(t, dtype=torch.long)
        for seg in prompt.segments:
            if seg.kind != "passage":
                continue
            spans = self.keys.spans(prompt.ids, seg)
            if self.engine.storage.get(spans, out) == len(spans):
                cached[seg.start:seg.end] = True
                delta[seg.start:seg.end] = seg.start
        kv = out.view(2, cfg.num_layers, t, cfg.num_kv_heads, cfg.head_dim)
        return rope_shift.shift_keys(kv[0], delta, self.inv_freq), kv[1], cached


def donor_prompts(tokenizer, pool: list[Passage], prompts: list[Prompt],
                  rng: np.random.Generator, sizes: tuple[int, int]) -> list[Prompt]:
    """Prompts holding every passage of `prompts` once, none behind the same passages (or none) as in
    a test prompt: the earlier prompts an engine would have saved the passages from."""
    need = list(dict.fromkeys(i for p in prompts for i in p.passages))
    before = {(i, tuple(p.passages[:j])) for p in prompts for j, i in enumerate(p.passages)}
    for _ in range(DONOR_TRIES):
        order, groups = [int(i) for i in rng.permutation(need)], []
        while order:
            n = int(rng.integers(sizes[0], sizes[1] + 1))
            groups.append(order[:n])
            order = order[n:]
        if not any((i, tuple(g[:j])) in before for g in groups for j, i in enumerate(g)):
            break
    else:
        raise RuntimeError(f"no donor order in {DONOR_TRIES} tries keeps every passage's context new")
    named = [next((pool[i].names[0] for i in g if pool[i].names), "it") for g in groups]
    return [assemble_prompt(tokenizer, pool, g, QUESTION.format(name=n)) for g, n in zip(groups, named)]


def store_cut(store: PassageStore, prompt: Prompt, cache: ContiguousKVCache) -> None:
    """Each passage of `prompt` not yet in `store`, cut from `cache` (the prompt's full prefill)."""
    for seg in prompt.segments:
        ids = prompt.ids[seg.start:seg.end]
        if seg.kind == "passage" and tuple(ids) not in store.stored:
            store.put_passage(ids, cache.k[:, seg.start:seg.end], cache.v[:, seg.start:seg.end], seg.start)


# -- the model -----------------------------------------------------------------------------------


def prefill(model, ids: list[int], extra: int = 0) -> ContiguousKVCache:
    """A full prefill of `ids` into a fresh cache with room for `extra` more tokens."""
    cache = ContiguousKVCache(model.config, len(ids) + extra)
    with torch.inference_mode():
        cache.last_logits = model(torch.tensor(ids), torch.arange(len(ids)), cache)[-1]  # advances it
    return cache


def prefix_prefill(store: PassageStore, prompt: Prompt, extra: int = 0) -> ContiguousKVCache:
    """Prefix caching: the head's KV read from kvtier, the rest of the prompt prefilled."""
    model, t = store.model, len(prompt.ids)
    cache = ContiguousKVCache(model.config, t + extra)
    kv, n = store.engine.retrieve(prompt.ids[: prompt.segments[0].end])
    cfg = model.config
    kv = kv.view(2, cfg.num_layers, n, cfg.num_kv_heads, cfg.head_dim)
    cache.k[:, :n], cache.v[:, :n] = kv[0], kv[1]
    cache.advance(n)
    with torch.inference_mode():
        cache.last_logits = model(torch.tensor(prompt.ids[n:]), torch.arange(n, t), cache)[-1]
    return cache


def blend(store: PassageStore, prompt: Prompt, ratio: float, select, extra: int = 0):
    """Blended prefill: (cache holding the merged KV with room for `extra` tokens, rows recomputed)."""
    k, v, cached = store.load(prompt)
    out = blend_prefill(store.model, BlendInput(torch.tensor(prompt.ids), k, v, cached, ratio, CHECK_LAYER,
                                                select))
    t = len(prompt.ids)
    cache = ContiguousKVCache(store.model.config, t + extra)
    cache.k[:, :t], cache.v[:, :t] = out.k, out.v
    cache.advance(t)
    cache.last_logits = out.last_logits
    return cache, out.recomputed


def answer_logits(model, cache: ContiguousKVCache, answer: list[int]) -> torch.Tensor:
    """Next-token logits [len(answer), vocab] after the prompt and after each answer token but the
    last, teacher-forced over `answer` from the prompt's KV in `cache` (which keeps its length)."""
    t = cache.num_tokens
    with torch.inference_mode():
        rest = model(torch.tensor(answer[:-1]), torch.arange(t, t + len(answer) - 1), cache)
    cache.num_tokens = t
    return torch.cat((cache.last_logits[None], rest))


def greedy(model, cache: ContiguousKVCache, n: int, eos: int | None) -> list[int]:
    """Greedy tokens after the prompt in `cache` (up to `n`, ending at `eos`); `cache` grows."""
    out, logits = [], cache.last_logits
    with torch.inference_mode():
        while n > 0:
            out.append(int(logits.argmax()))
            if out[-1] == eos or len(out) == n:
                break
            logits = model(torch.tensor(out[-1:]), torch.tensor([cache.num_tokens]), cache)[-1]  # advances
    return out


# -- measuring -----------------------------------------------------------------------------------


def methods() -> dict[str, tuple[float, object]]:
    """Blend methods by name: (ratio, selector)."""
    out = {f"blend {r:g}": (r, selection.select_rows) for r in RATIOS}
    gen = torch.Generator().manual_seed(0)
    out[f"random {RANDOM_RATIO:g}"] = (RANDOM_RATIO,
                                       lambda k_new, k_loaded, cached, ratio: selection.random_rows(
                                           cached, ratio, gen))
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_prompt(store: PassageStore, pool: list[Passage], prompt: Prompt, eos: int | None,
                   repeats: int) -> dict:
    model = store.model
    for i in prompt.passages:
        store.store_passage(pool[i].ids)
    runs = {"full": lambda: prefill(model, prompt.ids), "prefix": lambda: prefix_prefill(store, prompt),
            "kvtier load": lambda: store.load(prompt)}  # the part of every blend's TTFT that reads + shifts
    runs |= {name: (lambda r=r, s=s: blend(store, prompt, r, s)) for name, (r, s) in methods().items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved: the machine's other load slows every method alike
        for name, fn in runs.items():
            times[name].append(timed(fn))
    ref_cache = prefill(model, prompt.ids, ANSWER_TOKENS)
    answer = greedy(model, ref_cache, ANSWER_TOKENS, eos)
    ref_cache.num_tokens = len(prompt.ids)  # back to the prompt's KV (greedy wrote after it)
    ref = answer_logits(model, ref_cache, answer)
    row = {"tokens": len(prompt.ids), "passages": len(prompt.passages), "question": prompt.question,
           "answer_ids": answer, "answer_tokens": len(answer),
           "ttft_s": {n: statistics.median(ts) for n, ts in times.items()},
           "ttft_runs_s": times, "methods": {}}
    targets = torch.tensor(answer)
    for name, (ratio, select) in methods().items():
        cache, recomputed = blend(store, prompt, ratio, select, ANSWER_TOKENS)
        q = compare(ref, answer_logits(model, cache, answer), targets)  # cache keeps its length
        q["identical"] = greedy(model, cache, ANSWER_TOKENS, eos) == answer
        q["recomputed_share"] = recomputed / len(prompt.ids)
        row["methods"][name] = q
    return row


def summarise(rows: list[dict]) -> dict:
    """Per method over prompts: mean TTFT (of per-prompt medians), speedups as ratios of the means,
    mean top-1 and KL (per prompt: the mean over its answer positions), share of identical answers."""
    full = float(np.mean([r["ttft_s"]["full"] for r in rows]))
    prefix = float(np.mean([r["ttft_s"]["prefix"] for r in rows]))
    out = {"full": {"ttft_s": full, "speedup_vs_full": 1.0},
           "prefix": {"ttft_s": prefix, "speedup_vs_full": full / prefix}}
    for name in rows[0]["methods"]:
        ttft = float(np.mean([r["ttft_s"][name] for r in rows]))
        out[name] = {"ttft_s": ttft, "speedup_vs_full": full / ttft, "speedup_vs_prefix": prefix / ttft,
                     "kvtier_load_s": float(np.mean([r["ttft_s"]["kvtier load"] for r in rows]))}
        for key in ("top1", "kl", "kl_max", "recomputed_share"):
            out[name][key] = float(np.mean([r["methods"][name][key] for r in rows]))
        out[name]["identical_share"] = float(np.mean([r["methods"][name]["identical"] for r in rows]))
    return out


def targets(summary: dict) -> dict:
    """The issue's targets at ratio 0.15, each with its value, bound and verdict."""
    m, zero, rand = (summary[f"blend {TARGET_RATIO:g}"], summary["blend 0"],
                     summary[f"random {RANDOM_RATIO:g}"])
    checks = {
        "TTFT >= 3x faster than full prefill": (m["speedup_vs_full"], TARGETS["ttft_speedup"],
                                                m["speedup_vs_full"] >= TARGETS["ttft_speedup"]),
        "KL <= 0.6x that of ratio 0": (m["kl"], TARGETS["kl_vs_ratio0"] * zero["kl"],
                                       m["kl"] <= TARGETS["kl_vs_ratio0"] * zero["kl"]),
        "KL below random selection at 0.15": (m["kl"], rand["kl"], m["kl"] < rand["kl"]),
        "top-1 agreement >= 0.90": (m["top1"], TARGETS["top1"], m["top1"] >= TARGETS["top1"]),
    }
    return {name: {"value": v, "bound": b, "pass": bool(ok)} for name, (v, b, ok) in checks.items()}


# -- output --------------------------------------------------------------------------------------


def print_results(console: Console, summary: dict, verdicts: dict, rows: list[dict],
                  source: str = SOURCES[0]) -> None:
    tokens = [r["tokens"] for r in rows]
    t = Table(title=f"CacheBlend on {MODEL} (fp32, CPU): {len(rows)} prompts of {min(tokens)}-{max(tokens)} "
                    f"tokens, passages' KV {source}, check layer {CHECK_LAYER}; quality vs full prefill")
    for c in ("method", "recomputed", "TTFT ms", "x vs full", "x vs prefix", "top-1", "KL", "KL max",
              "identical"):
        t.add_column(c, justify="right")
    for name, s in summary.items():
        q = name not in ("full", "prefix")
        t.add_row(name, f"{s['recomputed_share']:.1%}" if q else "100%" if name == "full" else "suffix",
                  f"{s['ttft_s'] * 1e3:.0f}", f"{s['speedup_vs_full']:.2f}",
                  f"{s['speedup_vs_prefix']:.2f}" if q else "", f"{s['top1']:.3f}" if q else "",
                  f"{s['kl']:.4f}" if q else "", f"{s['kl_max']:.3f}" if q else "",
                  f"{s['identical_share']:.0%}" if q else "")
    console.print(t)
    console.print(f"every blend's TTFT includes the kvtier load (head + passages read, K shifted): "
                  f"{summary[f'blend {TARGET_RATIO:g}']['kvtier_load_s'] * 1e3:.0f} ms on average")
    for name, v in verdicts.items():
        console.print(f"{'PASS' if v['pass'] else 'FAIL'}  {name}: {v['value']:.4g} (bound {v['bound']:.4g})")


def plot(path: Path, summary: dict, source: str = SOURCES[0]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "kl", "mean KL(full || method)"), (axes[1], "top1", "top-1 agreement")):
        for name, s in summary.items():
            if name in ("full", "prefix"):
                ax.axvline(s["ttft_s"] * 1e3, ls="--", c="gray" if name == "full" else "tab:green")
                ax.annotate(f"{name} prefill" if name == "full" else "prefix caching",
                            (s["ttft_s"] * 1e3, 0.5), xycoords=("data", "axes fraction"), rotation=90,
                            fontsize=8)
                continue
            rand = name.startswith("random")
            ax.scatter(s["ttft_s"] * 1e3, s[key], marker="x" if rand else "o", s=60,
                       c="tab:red" if rand else "tab:blue")
            ax.annotate(name, (s["ttft_s"] * 1e3, s[key]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel("TTFT, ms (model level, mean of per-prompt medians)")
        ax.set_ylabel(label)
        if key == "kl":
            ax.set_yscale("symlog", linthresh=1e-4)
        else:
            ax.axhline(TARGETS["top1"], ls=":", c="gray")
    fig.suptitle(f"CacheBlend on {MODEL}, passages' KV {source}: quality vs TTFT per ratio "
                 f"(x: random selection)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def prompt_args(description: str) -> argparse.ArgumentParser:
    """The workload's arguments, shared with rag_blend_study.py (`parse_prompt_args` applies --quick)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="2 prompts of 4 passages, 1 repeat")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--passages", type=int, nargs=2, default=(5, 8), metavar=("MIN", "MAX"))
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    return p


def parse_prompt_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.passages, args.repeats = 2, (4, 4), 1
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = prompt_args(__doc__.split("\n")[0])
    p.add_argument("--source", choices=SOURCES, default=SOURCES[0],
                   help="where the passages' KV comes from (see the module docstring)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: cores)")
    return parse_prompt_args(p, argv)


def run_prompts(model, tokenizer, args: argparse.Namespace,
                console: Console) -> tuple[list[Passage], list[dict]]:
    """Build the passage pool and the prompts, store the head, and measure every prompt."""
    store = PassageStore(model, capacity=2 << 30)
    try:
        pool = passage_pool(tokenizer)
        rng = np.random.default_rng(args.seed)
        counts = rng.integers(args.passages[0], args.passages[1] + 1, size=args.prompts)
        prompts = [build_prompt(tokenizer, pool, rng, int(c)) for c in counts]
        store.store_head(prompts[0].ids[: prompts[0].segments[0].end])  # the same head in every prompt
        if args.source == "context":  # else measure_prompt stores each passage alone on first use
            donors = donor_prompts(tokenizer, pool, prompts, np.random.default_rng(args.seed + 1),
                                   tuple(args.passages))
            for donor in donors:
                store_cut(store, donor, prefill(model, donor.ids))
        rows = []
        with progress_bar(console) as bar:
            task = bar.add_task("prompts", total=len(prompts))
            for prompt in prompts:
                rows.append(measure_prompt(store, pool, prompt, tokenizer.eos_token_id, args.repeats))
                rows[-1]["answer"] = tokenizer.decode(rows[-1].pop("answer_ids"))
                bar.advance(task)
                bar.refresh()
    finally:
        store.close()
    return pool, rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = console_and_logging(160, logging.WARNING)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model = load_model(MODEL, torch.float32)
    pool, rows = run_prompts(model, load_tokenizer(MODEL), args, console)
    summary = summarise(rows)
    verdicts = targets(summary)
    print_results(console, summary, verdicts, rows, args.source)
    load_after = os.getloadavg()
    machine = machine_info(args.out.resolve()) | {"torch_threads": torch.get_num_threads(),
                                                  "load_avg_before": load_before,
                                                  "load_avg_after": load_after}
    console.print(f"{machine['cpu_model']}, {machine['cores']} cores, torch threads "
                  f"{machine['torch_threads']}; load average (1/5/15 min) before "
                  f"{'/'.join(f'{x:.2f}' for x in load_before)}, after "
                  f"{'/'.join(f'{x:.2f}' for x in load_after)}")
    report = {"model": MODEL, "model_dtype": "float32", "kv_dtype": "float32", "machine": machine,
              "args": vars(args) | {"out": str(args.out)}, "check_layer": CHECK_LAYER, "ratios": RATIOS,
              "random_ratio": RANDOM_RATIO, "answer_tokens": ANSWER_TOKENS, "chunk_size": CHUNK,
              "passage_pool": [{"module": p.module, "tokens": len(p.ids)} for p in pool],
              "source": args.source,
              "passages_prefilled": {"context": "in context (cut from the full prefill of an earlier donor "
                                                "prompt, as the engine saves them)",
                                     "alone": "alone (each its own prompt at positions 0..)"}[args.source],
              "summary": summary, "targets": verdicts, "per_prompt": rows,
              "seconds": time.perf_counter() - t0}
    name = "rag_blend" + ("" if args.source == SOURCES[0] else f"_{args.source}") + ("_quick" * args.quick)
    write_results(args.out, name, rounded(report), lambda path: plot(path, summary, args.source))
    console.print(f"wrote {args.out / name}.json/.png in {report['seconds']:.0f} s")
    return 0 if all(v["pass"] for v in verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
