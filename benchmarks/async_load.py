"""Asynchronous kvtier loads through the bundled engine: the inter-token latency of requests that are
decoding while other requests load long prefixes from the disk tier and from a kvtier_server, with
no loads at all, the long requests' prefixes already resident on the device, synchronous loads,
asynchronous loads and asynchronous loads + prefetch, in one run.

    .venv/bin/python benchmarks/async_load.py          # full run: 4 loads of 4K-16K tokens, 8 x 64 decoded
    .venv/bin/python benchmarks/async_load.py --quick  # smoke run: 1K-2.5K-token loads, 8 x 32 decoded

Each (backend, setup) gets an engine of its own (the `loads:` section differs per setup). Before it
is measured, the long requests' prefixes are stored through its CacheEngine with seeded random KV
(a 4K-token prefill takes 7 s on 2 cores, a 16K one far longer: the benchmark measures the load,
not the KV's values), the writes are flushed to the lower tier and the CPU tier is cleared, so every load
comes from disk (O_DIRECT) or from the kvtier_server process ("no loads" stores them too, so every
engine has the same history; its long requests just never arrive). "resident" is the baseline the
issue's target means by "the same run with no loads": the long requests arrive as in every loading
setup, but their prefixes' KV was written into the engine's paged blocks and published to its device
prefix cache beforehand (its engine's KV cache is sized to keep them there beside everything else),
so each gets a device hit on its whole prefix, kvtier loads nothing and only its question is
computed. The model runs on `--threads`
torch threads (default 1, benchmarks/README.md says why). Then 8 short requests start decoding
and, at fixed decode steps, the 4 long requests arrive (a prefix of 4-16K tokens plus a short
question, 1 token generated). The engine is stepped by hand so the others go on decoding while a
request waits for its KV. Every decoded token is timestamped at the end of the step that produced
it: inter-token latency (ITL) is the gap between two tokens of one decoding request. Each step is
also classed: "quiet" (no long request pending), "pending" (a long request has arrived and has not
produced its token yet: its load, and its prefetch, run beside the model) or "compute" (a long
request's own question ran in the step, attending over its whole prefix). What the decoding
requests lose in pending steps is the copies sharing the 2 cores with the model; a last
measurement, per backend, reads the same prefixes and scatters them into paged blocks with no
model running (wall and CPU seconds).
Setups whose `loads:` keys this kvtier does not know yet are skipped (logged); `asynchronous: off`
is then today's behaviour. benchmarks/README.md ("Asynchronous loads") explains each column.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from harness import console_and_logging, machine_info, model_config, progress_bar, scratch_run, write_results
from rich.console import Console
from rich.table import Table
from services import kvtier_server_process

from kvtier import load_config
from kvtier.config import KvtierConfig
from kvtier.errors import ConfigError
from kvtier_engine import LLM, SamplingParams

logger = logging.getLogger("async_load")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "random:llama-small"
BACKENDS = ("disk", "server")
TARGET_VS_SYNC = 0.5  # p99 ITL, asynchronous <= 0.5x synchronous ...
TARGET_VS_RESIDENT = 1.5  # ... and <= 1.5x the same run with the prefixes already on the device
TARGET_VS_NO_LOADS = 1.5  # shown beside it: the run whose long requests never arrive
TOKEN_ID_BOUND = 32_000  # as long_doc_qa.py
KINDS = ("quiet", "pending", "compute")  # what a step held beside the decoding requests (module doc)


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    loads: bool  # whether the long requests arrive at all
    asynchronous: str = "off"  # the `loads.asynchronous` key
    prefetch: bool = False  # the `loads.prefetch` key
    resident: bool = False  # the long requests' prefixes sit in the device prefix cache before they arrive


SETUPS = [Setup("no loads", False), Setup("resident", True, resident=True), Setup("sync", True, "off"),
          Setup("async", True, "on"), Setup("async + prefetch", True, "on", True)]
BASELINES = ("resident", "no loads")  # the setups the asynchronous ones are held against, in that order


@dataclass(slots=True)
class Workload:
    decoders: list[list[int]]  # short prompts that decode `decode_tokens` each
    loaders: list[list[int]]  # prefix + question
    prefixes: list[int]  # the prefix length of each loader (chunk-aligned)
    arrivals: list[int]  # the decode step at which each loader arrives


@dataclass(slots=True)
class StepRecord:
    step: int  # index in this run's loop
    start: float
    end: float
    kind: str  # "quiet", "pending" or "compute"
    decoding: int  # decoding requests that produced a token in it
    loading: int  # requests waiting for their KV after it (the engine's step log; 0 without one)


@dataclass(slots=True)
class RunResult:
    backend: str
    setup: str
    round: int = 1
    parks_loads: bool = False  # the engine has a waiting-for-KV state (asynchronous loads can happen)
    itl_s: list[float] = field(default_factory=list)  # every decoding request's gaps
    itl_kind: list[str] = field(default_factory=list)  # the class of the step that ended each gap
    ttft_s: list[float] = field(default_factory=list)  # the loaders'
    loaded: list[int] = field(default_factory=list)  # prompt tokens each loader got from kvtier
    on_device: list[int] = field(default_factory=list)  # prompt tokens each loader found on the device
    computed: list[int] = field(default_factory=list)  # prompt tokens each loader ran through the model
    tier_hits: dict = field(default_factory=dict)  # chunk hits per tier during the run
    steps: list[StepRecord] = field(default_factory=list)
    engine_steps: int = 0  # steps the engine ran (its own count when it keeps one)
    wall_s: float = 0.0


# -- workload and configs --------------------------------------------------------------------


def token_ids(rng: np.random.Generator, n: int, model: str) -> list[int]:
    return rng.integers(0, min(TOKEN_ID_BOUND, model_config(model).vocab_size), n).tolist()


def workload(args: argparse.Namespace) -> Workload:
    rng = np.random.default_rng(args.seed)
    decoders = [token_ids(rng, args.prompt_tokens, args.model) for _ in range(args.decoders)]
    prefixes = [p // args.chunk_size * args.chunk_size for p in args.prefix_tokens]
    loaders = [token_ids(rng, p + args.question_tokens, args.model) for p in prefixes]
    return Workload(decoders, loaders, prefixes, list(args.arrivals))


def config_text(backend: str, setup: Setup, args: argparse.Namespace, folder: Path, url: str | None,
                with_loads: bool) -> str:
    lines = [f"chunk_size: {args.chunk_size}", "write_through: true", "promote_on_hit: true",
             f"cpu:\n  capacity: {args.cpu_capacity}"]
    if backend == "disk":
        lines += [f"disk:\n  path: {folder / 'disk'}\n  capacity: 8GiB\n  o_direct: auto"]
    else:
        lines += ["disk: null", f"remote:\n  url: {url}"]
    if with_loads:
        lines += [f'loads:\n  asynchronous: "{setup.asynchronous}"',
                  f"  prefetch: {str(setup.prefetch).lower()}"]
    return "\n".join(lines) + "\n"


def kvtier_config(backend: str, setup: Setup, args: argparse.Namespace, folder: Path,
                  url: str | None) -> KvtierConfig | None:
    """The setup's config, or None when this kvtier does not know its `loads:` keys yet. Without a
    `loads:` section, synchronous loads are today's behaviour, so "off" falls back to that."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kvtier.yaml"
    for with_loads in (True, False):
        path.write_text(config_text(backend, setup, args, folder, url, with_loads))
        try:
            return load_config(path, env={})
        except ConfigError as exc:
            if setup.asynchronous != "off" or not with_loads:
                logger.warning("%s / %s: skipped, this kvtier does not take its config: %s", backend,
                               setup.name, exc)
                return None
    return None


def kv_bytes_per_token(model: str) -> int:
    config = model_config(model)
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * 4  # fp32 on CPU


def cache_bytes(work: Workload, args: argparse.Namespace, resident: bool = False) -> int:
    """The paged cache: every request at once, with a quarter to spare; for "resident", the prefixes
    once more, so their cached blocks are never the ones recycled for the others' (40K tokens,
    320 MiB, in the full run)."""
    tokens = sum(len(p) + 1 for p in work.loaders) + sum(len(p) + args.decode_tokens for p in work.decoders)
    tokens += sum(work.prefixes) if resident else 0
    requests = len(work.loaders) + len(work.decoders)
    return int(1.25 * (tokens + 16 * requests)) * kv_bytes_per_token(args.model)


# -- one engine, one setup -------------------------------------------------------------------


def prefix_kv(llm: LLM, work: Workload, seed: int):
    """(prefix tokens, their seeded random KV) per loader: the same values on every call."""
    gen, dtype = torch.Generator().manual_seed(seed), llm.engine.cache.kv.dtype
    for tokens, n in zip(work.loaders, work.prefixes):
        yield tokens[:n], torch.randn(*kv_shape(llm, n), generator=gen, dtype=dtype)


def store_prefixes(llm: LLM, work: Workload, seed: int) -> None:
    """The loaders' prefixes into kvtier with seeded random KV, then only in the lower tier."""
    kv_engine = llm.engine.kvtier
    for tokens, kv in prefix_kv(llm, work, seed):
        kv_engine.store(tokens, kv)
    if not kv_engine.flush(timeout=300):
        raise RuntimeError("the prefixes did not reach the lower tier in 300 s")
    kv_engine.clear("cpu")
    for tokens, n in zip(work.loaders, work.prefixes):
        if kv_engine.lookup(tokens[:n]) != n:
            raise RuntimeError(f"a stored prefix of {n} tokens is not found in the lower tier")


def make_resident(llm: LLM, work: Workload, seed: int) -> None:
    """The loaders' prefixes (the KV `store_prefixes` stored) into the engine's device prefix cache,
    as a finished request leaves its prompt: blocks allocated, the KV scattered into them, published
    as computed, then freed, so they stay cached until the pool recycles them (cache_bytes sizes the
    cache so it never needs to). Checked: a prompt of the prefix plus a question finds all of it."""
    pool, cache = llm.engine.scheduler.pool, llm.engine.cache
    for i, (tokens, kv) in enumerate(prefix_kv(llm, work, seed)):
        seq_id = f"resident-{i}"
        pool.allocate(seq_id, tokens)
        cache.scatter(pool.block_table(seq_id), kv)
        pool.publish(seq_id, tokens, len(tokens))
        pool.free(seq_id)
    for prompt, n in zip(work.loaders, work.prefixes):  # a probe: what the long request will find
        found = pool.allocate("resident-probe", prompt)
        pool.free("resident-probe")
        if found != n:
            raise RuntimeError(f"{found} of a resident prefix of {n} tokens found in the device prefix cache")


def kv_shape(llm: LLM, tokens: int) -> tuple[int, ...]:
    """What CacheEngine.store takes and retrieve gives: [2, layers, tokens, kv heads * head dim]."""
    c = llm.engine.cache.config
    return 2, c.num_layers, tokens, c.num_kv_heads * c.head_dim


def tier_hits(llm: LLM) -> dict[str, int]:
    return {name: t.get("hits", 0) for name, t in llm.engine.kvtier.stats()["tiers"].items()}


def title_loads(args: argparse.Namespace) -> str:
    return (f"{len(args.prefix_tokens)} load {min(args.prefix_tokens):,}-{max(args.prefix_tokens):,}"
            f"-token prefixes")


def step_kind(pending: set[str], computed: set[str]) -> str:
    return "compute" if computed else ("pending" if pending else "quiet")


class Driver:
    """Steps one engine through the workload: decoders first, loaders at their decode steps."""

    def __init__(self, llm: LLM, work: Workload, setup: Setup, args: argparse.Namespace):
        self.engine, self.work, self.setup, self.args = llm.engine, work, setup, args
        self.last_token: dict[str, float] = {}
        self.decoders: set[str] = set()
        self.pending: dict[str, str] = {}  # loader request id -> still waiting for its first token
        self.loader_out: dict[str, object] = {}

    def add_decoders(self) -> None:
        params = SamplingParams(max_tokens=self.args.decode_tokens, temperature=0, ignore_eos=True)
        for tokens in self.work.decoders:
            self.decoders.add(self.engine.add_request(tokens, params))

    def arrive(self, decode_step: int) -> None:
        if not self.setup.loads:
            return
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for tokens, at in zip(self.work.loaders, self.work.arrivals):
            if at == decode_step:
                request_id = self.engine.add_request(tokens, params)
                self.pending[request_id] = request_id

    def run(self, result: RunResult) -> None:
        self.add_decoders()
        decode_step, loop = -1, 0
        started = time.perf_counter()
        while self.engine.has_unfinished():
            if decode_step >= 0:
                self.arrive(decode_step)
            start = time.perf_counter()
            outputs = self.engine.step()
            end = time.perf_counter()
            self._record(outputs, start, end, loop, result)
            if decode_step >= 0 or len(self.last_token) == len(self.decoders):
                decode_step += 1  # counted from the step after every decoder had its first token
            loop += 1
        self.engine.wait_for_saves()
        result.wall_s = time.perf_counter() - started
        result.engine_steps = self.engine.scheduler.step

    def _record(self, outputs: list, start: float, end: float, loop: int, result: RunResult) -> None:
        computed = {o.request_id for o in outputs if o.request_id in self.pending}
        kind = step_kind(set(self.pending), computed)
        decoding = 0
        for out in outputs:
            if out.request_id in self.decoders:
                decoding += 1
                if out.request_id in self.last_token:
                    result.itl_s.append(end - self.last_token[out.request_id])
                    result.itl_kind.append(kind)
                self.last_token[out.request_id] = end
            elif out.request_id in computed:
                self.pending.pop(out.request_id)
                m = out.metrics
                result.ttft_s.append(m.ttft_s)
                result.loaded.append(m.tokens_loaded)
                result.on_device.append(m.tokens_cached_on_device)
                result.computed.append(m.prefill_tokens_computed)
        log = getattr(self.engine, "step_log", None)  # issue 15's engine keeps one
        loading = log[-1].num_loading if log else 0
        result.steps.append(StepRecord(loop, start, end, kind, decoding, loading))


def warm_up(llm: LLM, args: argparse.Namespace) -> None:
    """One-off costs of a process's first passes (allocator, kernels, the decode batch's shapes):
    as many requests as decode, as long, decoding 16 tokens; under one chunk, so kvtier stores none."""
    rng = np.random.default_rng(args.seed + 1_000_003)
    n = min(args.prompt_tokens, args.chunk_size // 2)
    prompts = [token_ids(rng, n, args.model) for _ in range(args.decoders)]
    llm.generate(prompts, SamplingParams(max_tokens=min(16, args.chunk_size // 2), temperature=0,
                                         ignore_eos=True))


def run_setup(backend: str, setup: Setup, work: Workload, args: argparse.Namespace, folder: Path,
              url: str | None) -> RunResult | None:
    config = kvtier_config(backend, setup, args, folder, url)
    if config is None:
        return None
    result = RunResult(backend, setup.name)
    with LLM(args.model, kvtier_config=config, seed=args.seed,
             kv_cache_bytes=cache_bytes(work, args, setup.resident)) as llm:
        # Every setup stores the prefixes, "no loads" too (the long requests just never arrive), so
        # each engine has the same history: the big stores move glibc's mmap threshold, which on this
        # VM changed a decode step 2-3x. The warm-up after them absorbs the first slow steps.
        store_prefixes(llm, work, args.seed)
        if setup.resident:
            make_resident(llm, work, args.seed)
        warm_up(llm, args)
        before = tier_hits(llm)
        result.parks_loads = hasattr(llm.engine.scheduler, "loading")
        if setup.asynchronous != "off" and not result.parks_loads:
            logger.warning("%s / %s: this engine has no waiting-for-KV state: its loads run in the step",
                           backend, setup.name)
        Driver(llm, work, setup, args).run(result)
        after = tier_hits(llm)
    result.tier_hits = {name: after[name] - before.get(name, 0) for name in after}
    check_loads(result, work, backend)
    return result


def check_loads(result: RunResult, work: Workload, backend: str) -> None:
    """Every loader must have run, and its prefix must have come from kvtier's lower tier (or from
    the CPU tier, where a prefetch brought it up); a load that fell short is logged, not hidden."""
    if result.setup == "no loads":
        return
    if len(result.ttft_s) != len(work.loaders):
        raise RuntimeError(f"{backend} / {result.setup}: {len(result.ttft_s)} of {len(work.loaders)} "
                           f"long requests produced a token")
    if result.setup == "resident":
        check_resident(result, work, backend)
        return
    lower = "disk" if backend == "disk" else "remote"
    if result.tier_hits.get(lower, 0) == 0:
        raise RuntimeError(f"{backend} / {result.setup}: no load was served by the {lower} tier: "
                           f"{result.tier_hits}")
    short = [(n, got) for n, got in zip(sorted(work.prefixes), sorted(result.loaded)) if got < n]
    if short:
        logger.warning("%s / %s: loads fell short (prefix, loaded): %s", backend, result.setup, short)


def check_resident(result: RunResult, work: Workload, backend: str) -> None:
    """Each long request of "resident" found its whole prefix on the device and loaded nothing."""
    if sorted(result.on_device) != sorted(work.prefixes) or any(result.loaded):
        raise RuntimeError(f"{backend} / resident: the long requests found {result.on_device} tokens on the "
                           f"device (their prefixes: {work.prefixes}) and loaded {result.loaded}")


# -- copies with no model --------------------------------------------------------------------


def copies_alone(backend: str, work: Workload, args: argparse.Namespace, folder: Path,
                 url: str | None) -> dict:
    """The loads' work with no model running: the same prefixes read from the lower tier
    (`retrieve` into a buffer, as the loader's staging), then scattered into free paged blocks (as
    the loader does), timed in wall and in this process's CPU seconds (every thread)."""
    config = kvtier_config(backend, next(s for s in SETUPS if s.name == "sync"), args, folder, url)
    with LLM(args.model, kvtier_config=config, seed=args.seed, kv_cache_bytes=cache_bytes(work, args)) as llm:
        store_prefixes(llm, work, args.seed)
        kv_engine, cache = llm.engine.kvtier, llm.engine.cache
        outs = [torch.empty(*kv_shape(llm, n), dtype=cache.kv.dtype) for n in work.prefixes]
        wall, cpu = time.perf_counter(), time.process_time()
        got = [kv_engine.retrieve(tokens[:n], out=out)[1]
               for tokens, n, out in zip(work.loaders, work.prefixes, outs)]
        read_wall, read_cpu = time.perf_counter() - wall, time.process_time() - cpu
        for out in outs:  # the blocks are free: no request runs in this engine
            cache.scatter(list(range(-(-out.shape[2] // cache.block_size))), out)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if got != work.prefixes:
        raise RuntimeError(f"{backend}: the reads with no model got {got} of {work.prefixes} tokens")
    nbytes = sum(work.prefixes) * kv_bytes_per_token(args.model)
    return {"backend": backend, "bytes": nbytes, "read_wall_s": read_wall, "read_cpu_s": read_cpu,
            "wall_s": wall, "cpu_s": cpu, "read_gb_per_s": nbytes / read_wall / 1e9}


# -- measuring every setup -------------------------------------------------------------------


@contextmanager
def backend_url(backend: str, folder: Path, work: Workload, args: argparse.Namespace):
    if backend == "disk":
        yield None
        return
    nbytes = sum(work.prefixes) * kv_bytes_per_token(args.model)
    folder.mkdir(parents=True, exist_ok=True)
    with kvtier_server_process(folder, 2 * nbytes + (64 << 20)) as url:
        yield url


def measure(args: argparse.Namespace, console: Console) -> tuple[list[RunResult], list[dict]]:
    """Every backend: `--rounds` rounds of every setup (the order rotating per round, so no setup
    always runs first or last on a machine whose load drifts), then the copies with no model."""
    work = workload(args)
    results, alone = [], []
    with scratch_run(args.dir) as scratch, progress_bar(console) as progress:
        task = progress.add_task("runs", total=len(args.backends) * (args.rounds * len(SETUPS) + 1))
        for backend in args.backends:
            with backend_url(backend, scratch / backend, work, args) as url:
                for rnd in range(args.rounds):
                    for setup in SETUPS[rnd % len(SETUPS):] + SETUPS[:rnd % len(SETUPS)]:
                        logger.info("%s / %s, round %d", backend, setup.name, rnd + 1)
                        folder = scratch / backend / f"run-{rnd}-{SETUPS.index(setup)}"
                        result = run_setup(backend, setup, work, args, folder, url)
                        shutil.rmtree(folder, ignore_errors=True)  # its disk tier: GBs over a run
                        if result is not None:
                            result.round = rnd + 1
                            results.append(result)
                        progress.update(task, advance=1, refresh=True)
                alone.append(copies_alone(backend, work, args, scratch / backend / "alone", url))
                progress.update(task, advance=1, refresh=True)
    return results, alone


# -- summaries -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def excess_shares(result: RunResult) -> dict[str, float]:
    """The decode time the decoding requests lost in "pending" steps (the copies sharing the cores
    with the model) and in "compute" steps (the long requests' own questions in the batch), each gap
    against the median gap of the same run's quiet steps (the same machine at the same time: other
    runs' floors move with the machine's load)."""
    itl, kinds = np.asarray(result.itl_s), np.asarray(result.itl_kind)
    quiet = itl[kinds == "quiet"]
    floor = float(np.median(quiet)) if quiet.size else 0.0
    lost = {k: float(np.clip(itl[kinds == k] - floor, 0, None).sum()) for k in ("pending", "compute")}
    total = sum(lost.values())
    durations = [(s.end - s.start, s.kind) for s in result.steps]
    quiet_step = float(np.median([d for d, k in durations if k == "quiet"] or [0.0]))
    return {"step_loss_pending_s": sum(max(0.0, d - quiet_step) for d, k in durations if k == "pending"),
            "quiet_p50_ms": 1e3 * floor, **{f"lost_{k}_s": v for k, v in lost.items()},
            **{f"lost_{k}_share": (v / total if total > 0 else 0.0) for k, v in lost.items()}}


def pooled(runs: list[RunResult]) -> RunResult:
    """The rounds of one (backend, setup) as one sample: every gap, TTFT, step and tier hit."""
    out = RunResult(runs[0].backend, runs[0].setup, parks_loads=all(r.parks_loads for r in runs))
    for r in runs:
        for name in ("itl_s", "itl_kind", "ttft_s", "loaded", "on_device", "computed", "steps"):
            getattr(out, name).extend(getattr(r, name))
        for tier, hits in r.tier_hits.items():
            out.tier_hits[tier] = out.tier_hits.get(tier, 0) + hits
        out.engine_steps += r.engine_steps
        out.wall_s += r.wall_s
    return out


def summarise(results: list[RunResult]) -> list[dict]:
    """One row per (backend, setup), its rounds pooled, in the order of SETUPS."""
    groups = {(b, s.name): [r for r in results if (r.backend, r.setup) == (b, s.name)]
              for b in dict.fromkeys(r.backend for r in results) for s in SETUPS}
    pools = {key: pooled(runs) for key, runs in groups.items() if runs}
    rows = []
    for (backend, name), r in pools.items():
        kinds, itl = np.asarray(r.itl_kind), np.asarray(r.itl_s)
        row = {"backend": backend, "setup": name, "rounds": len(groups[(backend, name)]),
               "parks_loads": r.parks_loads, "itl_n": len(r.itl_s),
               "itl_p50_ms": 1e3 * percentile(r.itl_s, 50), "itl_p99_ms": 1e3 * percentile(r.itl_s, 99),
               "itl_max_ms": 1e3 * max(r.itl_s, default=float("nan")),
               **{f"itl_p99_{k}_ms": 1e3 * percentile(itl[kinds == k].tolist(), 99) for k in KINDS},
               # What the loads themselves cost the others: every gap but those of the long requests'
               # own question steps (model compute over their whole prefix, loaded or not).
               "itl_p99_no_compute_ms": 1e3 * percentile(itl[kinds != "compute"].tolist(), 99),
               **{f"steps_{k}": sum(s.kind == k for s in r.steps) for k in KINDS},
               "steps_loading": sum(s.loading > 0 for s in r.steps),
               "ttft_p50_s": percentile(r.ttft_s, 50), "ttft_max_s": max(r.ttft_s, default=float("nan")),
               "loaded": sum(r.loaded), "on_device": sum(r.on_device), "computed": sum(r.computed),
               "tier_hits": r.tier_hits,
               "engine_steps": r.engine_steps, "wall_s": r.wall_s}
        if name != "no loads":
            row |= excess_shares(r)
            row["step_loss_pending_s_per_round"] = row.pop("step_loss_pending_s") / row["rounds"]
        rows.append(row)
    for row in rows:  # each row's p99 against its backend's baselines (nan where one was not measured)
        for name in BASELINES:
            base = baseline(rows, row["backend"], name)
            row[f"p99_vs_{key(name)}"] = row["itl_p99_ms"] / base["itl_p99_ms"] if base else float("nan")
    return rows


def baseline(rows: list[dict], backend: str, setup: str) -> dict | None:
    return next((x for x in rows if x["backend"] == backend and x["setup"] == setup), None)


def key(setup: str) -> str:
    """A setup's name in a JSON key: "no loads" -> "no_loads"."""
    return setup.replace(" ", "_")


def targets(rows: list[dict]) -> dict:
    """Per backend and asynchronous setup: p99 ITL against synchronous and against each baseline
    measured. The verdict holds it against "resident" (the same long requests, their prefixes on the
    device: their own question steps are in both) and against "no loads" only where resident was
    not measured; both ratios are kept."""
    verdicts = {}
    for r in rows:
        if not r["setup"].startswith("async"):
            continue
        sync = baseline(rows, r["backend"], "sync")
        floors = {name: base for name in BASELINES if (base := baseline(rows, r["backend"], name))}
        if sync is None or not floors:
            continue
        judged = next(iter(floors))
        verdict = {"vs_sync": r["itl_p99_ms"] / sync["itl_p99_ms"], "baseline": judged,
                   "no_compute_vs_sync": r["itl_p99_no_compute_ms"] / sync["itl_p99_ms"]}
        for name, base in floors.items():
            verdict[f"vs_{key(name)}"] = r["itl_p99_ms"] / base["itl_p99_ms"]
            verdict[f"no_compute_vs_{key(name)}"] = r["itl_p99_no_compute_ms"] / base["itl_p99_ms"]
        limit = TARGET_VS_RESIDENT if judged == "resident" else TARGET_VS_NO_LOADS
        verdict["vs_baseline"], verdict["target_vs_baseline"] = verdict[f"vs_{key(judged)}"], limit
        verdict["pass"] = bool(verdict["vs_sync"] <= TARGET_VS_SYNC and verdict["vs_baseline"] <= limit)
        verdicts[f"{r['backend']} / {r['setup']}"] = verdict
    return verdicts


def print_tables(console: Console, rows: list[dict], alone: list[dict], verdicts: dict,
                 args: argparse.Namespace) -> None:
    t = Table(title=f"Asynchronous loads: {args.decoders} requests decoding {args.decode_tokens} tokens "
                    f"while {title_loads(args)}, {args.model}")
    for col in ("backend|setup|#ITL p50 ms|#ITL p99 ms|#p99 vs resident / no loads|#p99 w/o compute|"
                "#p99 quiet|#p99 pending|#p99 compute|#steps q/p/c|#TTFT p50 s|#TTFT max s|#loaded|"
                "#on device|#lost in pending|#lost in compute").split("|"):
        t.add_column(col.strip("#"), justify="right" if col.startswith("#") else "left",
                     no_wrap=col == "setup")
    for r in rows:
        shares = [f"{r[f'lost_{k}_s']:.2f} s ({r[f'lost_{k}_share']:.0%})" if f"lost_{k}_s" in r else ""
                  for k in ("pending", "compute")]
        t.add_row(r["backend"], r["setup"], f"{r['itl_p50_ms']:.1f}", f"{r['itl_p99_ms']:.1f}",
                  " / ".join(f"{r[f'p99_vs_{key(b)}']:.2f}x" for b in BASELINES),
                  f"{r['itl_p99_no_compute_ms']:.1f}",
                  *(f"{r[f'itl_p99_{k}_ms']:.1f}" for k in KINDS),
                  f"{r['steps_quiet']}/{r['steps_pending']}/{r['steps_compute']}", f"{r['ttft_p50_s']:.2f}",
                  f"{r['ttft_max_s']:.2f}", f"{r['loaded']:,}", f"{r['on_device']:,}", *shares)
    console.print(t)
    for a in alone:
        console.print(f"{a['backend']}: the loads with no model: {a['bytes'] / 2**20:,.0f} MiB read in "
                      f"{a['read_wall_s']:.2f} s ({a['read_gb_per_s']:.2f} GB/s, {a['read_cpu_s']:.2f} CPU s "
                      f"here), with the scatter into blocks {a['wall_s']:.2f} s, {a['cpu_s']:.2f} CPU s")
    cpu = {a["backend"]: a["cpu_s"] for a in alone}
    for r in rows:
        if "step_loss_pending_s_per_round" in r and r["backend"] in cpu and r["setup"] != "resident":
            console.print(f"{r['backend']} / {r['setup']}: the steps while loads were pending took "
                          f"{r['step_loss_pending_s_per_round']:.2f} s longer per round than quiet steps; "
                          f"the loads' reads and scatters alone: {cpu[r['backend']]:.2f} CPU s")
    for name, v in verdicts.items():
        console.print(f"{name}: p99 ITL {v['vs_sync']:.2f}x sync (target <= {TARGET_VS_SYNC}), "
                      f"{v['vs_baseline']:.2f}x {v['baseline']} (target <= {v['target_vs_baseline']}): "
                      + ("[green]PASS[/]" if v["pass"] else "[red]FAIL[/]") + versus(v))


def versus(verdict: dict) -> str:
    """The verdict's other ratios: the other baseline, and every ratio without the compute steps."""
    measured = [b for b in BASELINES if f"vs_{key(b)}" in verdict]
    text = "".join(f"; {verdict[f'vs_{key(b)}']:.2f}x {b}" for b in measured if b != verdict["baseline"])
    text += f"; without the long requests' own steps: {verdict['no_compute_vs_sync']:.2f}x sync"
    return text + "".join(f", {verdict[f'no_compute_vs_{key(b)}']:.2f}x {b}" for b in measured)


def plot(rows: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = [b for b in args.backends if any(r["backend"] == b for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / max(1, len(SETUPS))
    colors = ("tab:gray", "tab:olive", "tab:red", "tab:blue", "tab:green")
    for i, (setup, color) in enumerate(zip(SETUPS, colors)):
        mine = {r["backend"]: r for r in rows if r["setup"] == setup.name}
        x = np.arange(len(backends)) + (i - (len(SETUPS) - 1) / 2) * width
        p99 = [mine[b]["itl_p99_ms"] if b in mine else 0 for b in backends]
        p50 = [mine[b]["itl_p50_ms"] if b in mine else 0 for b in backends]
        axes[0].bar(x, p99, width, color=color, alpha=0.45)
        axes[0].bar(x, p50, width, color=color, label=setup.name)
        ttft = [mine[b]["ttft_p50_s"] if b in mine and setup.loads else 0 for b in backends]
        axes[1].bar(x, ttft, width, color=color, label=setup.name)
    for ax, label in ((axes[0], "inter-token latency (ms): p50 solid, p99 light"),
                      (axes[1], "TTFT of the loading requests, p50 (s)")):
        ax.set_xticks(np.arange(len(backends)), backends)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    for j, backend in enumerate(backends):  # the target: async p99 within 1.5x of resident
        floor = next((base for name in BASELINES if (base := baseline(rows, backend, name))), None)
        if floor is not None:
            label = f"{TARGET_VS_RESIDENT}x {floor['setup']} p99" if j == 0 else None
            axes[0].hlines(TARGET_VS_RESIDENT * floor["itl_p99_ms"], j - 0.4, j + 0.4, colors="black",
                           linestyles="dashed", label=label)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{args.decoders} requests decoding while {title_loads(args)}, {args.model}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: shorter prefixes, fewer tokens")
    p.add_argument("--model", default=MODEL, help=f"engine model (default {MODEL})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--decoders", type=int, default=8, help="requests decoding (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="their prompts (default 64)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="tokens each decodes (default 64; --quick 32)")
    p.add_argument("--prefix-tokens", type=int, nargs="+", default=None,
                   help="the long requests' prefixes (default 4096 8192 12288 16384; "
                        "--quick 1024 1536 2048 2560)")
    p.add_argument("--question-tokens", type=int, default=16, help="after each prefix (default 16)")
    p.add_argument("--arrivals", type=int, nargs="+", default=None,
                   help="decode step at which each long request arrives "
                        "(default 4 12 20 28; --quick 2 6 10 14)")
    p.add_argument("--rounds", type=int, default=None,
                   help="runs of every setup, pooled, the order rotating (default 2; --quick 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the model (default 1: see benchmarks/README.md)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--cpu-capacity", default="2GiB", help="the CPU tier (cleared before each run)")
    p.add_argument("--dir", type=Path, default=ROOT / ".kvtier-cache" / "async_load", help="disk tier dir")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results dir")
    args = p.parse_args(argv)
    args.decode_tokens = args.decode_tokens or (32 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.prefix_tokens = args.prefix_tokens or ([1024, 1536, 2048, 2560] if args.quick
                                                else [4096, 8192, 12288, 16384])
    args.arrivals = args.arrivals or ([2, 6, 10, 14] if args.quick else [4, 12, 20, 28])
    if len(args.arrivals) != len(args.prefix_tokens):
        p.error("--arrivals needs one step per --prefix-tokens")
    if min(args.prefix_tokens) < args.chunk_size:
        p.error("every prefix needs at least one chunk")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous)  # a test calling main keeps its process's setting


def run(args: argparse.Namespace) -> int:
    console = console_and_logging(160, logging.WARNING)
    info = machine_info(args.dir.resolve())
    logger.info("%d decoding x %d tokens; loads of %s tokens at decode steps %s; %s; load %.2f",
                args.decoders, args.decode_tokens, args.prefix_tokens, args.arrivals, args.model,
                info["load_avg_1m"])
    started = time.perf_counter()
    results, alone = measure(args, console)
    elapsed = time.perf_counter() - started
    rows = summarise(results)
    verdicts = targets(rows)
    print_tables(console, rows, alone, verdicts, args)
    load_end = os.getloadavg()
    console.print(f"{elapsed:.0f} s; load average {info['load_avg_1m']:.2f} at the start, "
                  f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f} (1/5/15 min) at the end")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {"machine": {**info, "load_avg_end": list(load_end)},
              "settings": {**settings, "kv_bytes_per_token": kv_bytes_per_token(args.model),
                           "setups": [asdict(s) for s in SETUPS],
                           "measured": [s.name for s in SETUPS if any(r.setup == s.name for r in results)]},
              "summary": rows, "copies_alone": alone,
              "targets": {"vs_sync": TARGET_VS_SYNC, "vs_resident": TARGET_VS_RESIDENT,
                          "vs_no_loads": TARGET_VS_NO_LOADS, "pass": verdicts},
              "runs": [{**{k: v for k, v in asdict(r).items() if k != "steps"},
                        "steps": [asdict(s) for s in r.steps]} for r in results],
              "elapsed_s": round(elapsed, 1)}
    name = "async_load_quick" if args.quick else "async_load"
    write_results(args.out, name, report, lambda path: plot(rows, args, path))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
