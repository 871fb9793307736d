"""Disaggregated prefill against one colocated instance: the inter-token latency of requests that
are decoding while long prompts arrive, and the long prompts' time to first token.

    .venv/bin/python benchmarks/disagg.py           # 8 shorts decoding, 4 prompts of 4-8K tokens
    .venv/bin/python benchmarks/disagg.py --quick   # smoke run: llama-tiny, 2 shorts, 1 prompt of 300

Setups, each its own real processes (`python -m kvtier_engine serve|proxy`) started for it and
stopped after it, on this machine:
- `colocated`: one `serve --kv-role both` instance (kvtier CPU tier, no P2P) gets every request.
- `disagg`: a `--kv-role prefill` and a `--kv-role decode` instance (P2P over TCP on loopback) behind
  `kvtier_engine proxy`; every request, short or long, goes through the proxy.
- `disagg-pinned`: the same, the prefill instance on one core and the decode on another, one torch
  thread each: the nearest this box comes to two separate accelerators (each gets half the compute).
The workload (disagg_load.py) is the same in each: `--shorts` requests of 32 tokens decode greedily
(`ignore_eos`) from the start to the end; once all have their first token, the long prompts arrive
`--every` seconds apart (max_tokens 8); the shorts are stopped `--tail` seconds after the last long
one finished. All requests stream; every time is taken by the client.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from disagg_load import Workload, run_workload, summarise, timeline
from harness import console_and_logging, machine_info, model_config, progress_bar, scratch_run, write_results
from rich.console import Console
from rich.table import Table
from services import free_port

logger = logging.getLogger("disagg")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"
START_DEADLINE_S = 120.0  # torch import and model build, three processes at once on 2 cores


@dataclass(frozen=True, slots=True)
class Setup:
    name: str
    disaggregated: bool
    pinned: bool  # prefill and decode instances on a core each, one torch thread each


SETUPS = {"colocated": Setup("colocated", disaggregated=False, pinned=False),
          "disagg": Setup("disaggregated", disaggregated=True, pinned=False),
          "disagg-pinned": Setup("disaggregated, 1 core each", disaggregated=True, pinned=True)}


# -- processes -------------------------------------------------------------------------------------


class Instance:
    """`python -m kvtier_engine ARGS --port P` on a free port, its output in `<folder>/<name>.log`;
    `cpu`: pinned to that core with one torch thread."""

    def __init__(self, name: str, args: list[str], folder: Path, cpu: int | None = None):
        self.name, self.port, self.log = name, free_port(), folder / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kvtier_engine", *args, "--port", str(self.port),
               "--log-level", "warning"]
        env = dict(os.environ) if cpu is None else {**os.environ, "OMP_NUM_THREADS": "1"}
        # Affinity is set in the child before exec, so that every thread torch starts inherits it.
        pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready in {START_DEADLINE_S} s:\n{self.log.read_text()}")
            time.sleep(0.2)  # readiness polling, before anything is measured

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains kvtier and ends its leases
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM; killed", self.name)
                self.proc.kill()
                self.proc.wait()


def serve(folder: Path, role: str, model: str, nbytes: int, chunk: int, p2p_port: int | None,
          cpu: int | None = None, *extra: str) -> Instance:
    """A `serve --kv-role ROLE` instance with a kvtier CPU tier of `nbytes` (and P2P over TCP on
    `p2p_port`, 0 for any, unless None) and a paged cache of `nbytes`."""
    config = {"chunk_size": chunk, "save_partial_chunks": True, "disk": None,
              "cpu": {"capacity": nbytes, "pin_memory": "off"}}
    if p2p_port is not None:
        config["p2p"] = {"transport": "tcp", "host": "127.0.0.1", "port": p2p_port, "timeout_s": 30.0}
    path = folder / f"{role}.yaml"
    path.write_text(yaml.safe_dump(config))
    return Instance(role, ["serve", model, "--kv-role", role, "--kvtier-config", str(path),
                           "--kv-cache-bytes", str(nbytes), *extra], folder, cpu)


@contextmanager
def running_setup(setup: Setup, model: str, folder: Path, nbytes: int, chunk: int) -> Iterator[int]:
    """The setup's processes, started together and all ready; yields the port clients send to."""
    folder.mkdir(parents=True, exist_ok=True)
    instances: list[Instance] = []
    try:
        if not setup.disaggregated:
            instances.append(serve(folder, "both", model, nbytes, chunk, None))
        else:
            cpus = sorted(os.sched_getaffinity(0))[:2] if setup.pinned else [None, None]
            if len(cpus) < 2:
                raise RuntimeError(f"{setup.name} needs two cores; this process may use {cpus}")
            p2p = free_port()  # fixed before either starts: the decode names it in --kv-peer
            instances.append(serve(folder, "prefill", model, nbytes, chunk, p2p, cpus[0]))
            instances.append(serve(folder, "decode", model, nbytes, chunk, 0, cpus[1],
                                   "--kv-peer", f"kvtier://127.0.0.1:{p2p}"))
            instances.append(Instance("proxy", ["proxy", "--prefill", instances[0].url, "--decode",
                                                instances[1].url, "--timeout", "300"], folder))
        for instance in instances:
            instance.wait_ready()
        yield instances[-1].port
    finally:
        for instance in instances:
            instance.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="llama-tiny, 2 shorts, 1 long prompt of 300 tokens")
    p.add_argument("--model", default="random:llama-small")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, of {', '.join(SETUPS)}")
    p.add_argument("--shorts", type=int, default=8)
    p.add_argument("--longs", default="4096,6144,8192,5120", help="prompt tokens of the long requests")
    p.add_argument("--every", type=float, default=3.0, help="seconds between long arrivals")
    p.add_argument("--short-max-tokens", type=int, default=2048, help="a bound: shorts stop after the tail")
    p.add_argument("--settle", type=float, default=2.0, help="seconds of decoding before the first long")
    p.add_argument("--tail", type=float, default=2.0, help="seconds of decoding after the last long")
    p.add_argument("--chunk-size", type=int, default=256, help="kvtier chunk tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", type=Path, default=ROOT / ".kvtier-cache" / "bench",
                   help="instances' configs and logs, in a per-run folder deleted afterwards")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.shorts, args.longs, args.short_max_tokens = "random:llama-tiny", 2, "300", 2000
        args.settle, args.tail, args.setups = 0.5, 0.5, "colocated,disagg"
    unknown = [s for s in args.setups.split(",") if s not in SETUPS]
    if unknown:
        p.error(f"unknown setups {unknown}; choose from {list(SETUPS)}")
    if args.shorts < 1:
        p.error("--shorts must be at least 1: the ITL is theirs")
    return args


def workload(args: argparse.Namespace) -> Workload:
    return Workload(shorts=args.shorts, short_prompt=32, short_max_tokens=args.short_max_tokens,
                    longs=tuple(int(n) for n in args.longs.split(",")), long_every_s=args.every,
                    long_max_tokens=8, settle_s=args.settle, tail_s=args.tail,
                    vocab=model_config(args.model).vocab_size, seed=args.seed)


def kv_bytes_per_token(model: str) -> int:
    """K and V, every layer, fp32 (the engine's CPU dtype)."""
    c = model_config(model)
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4


def run_setup(setup: Setup, args: argparse.Namespace, work: Workload, nbytes: int, folder: Path,
              console: Console) -> dict:
    """Start the setup's processes, run the workload once through its front door, stop them."""
    started = time.perf_counter()
    with running_setup(setup, args.model, folder, nbytes, args.chunk_size) as port:
        ready_s = time.perf_counter() - started
        with progress_bar(console) as bar:
            task = bar.add_task(setup.name, total=len(work.longs))

            def tick(longs_done: int, short_tokens: int) -> None:
                bar.update(task, completed=longs_done,
                           description=f"{setup.name}: {short_tokens:,} short tokens decoded")
                bar.refresh()

            t0 = time.perf_counter()
            shorts, longs, steady = run_workload(port, work, tick)
            wall = time.perf_counter() - t0
    summary = summarise(shorts, longs, steady, setup.disaggregated)
    for error in summary["errors"]:
        logger.warning("%s: %s", setup.name, error)
    if summary["shorts_finished_early"]:  # the window's end had fewer decoding requests
        logger.warning("%s: %d short requests reached --short-max-tokens before the end", setup.name,
                       summary["shorts_finished_early"])
    return {"setup": asdict(setup), "startup_s": ready_s, "workload_s": wall, **summary,
            "timeline": timeline(shorts, longs, steady)}


# -- report ----------------------------------------------------------------------------------------


def _ms(spread: dict, keys: tuple[str, ...] = ("p50_ms", "p99_ms", "max_ms"), scale: float = 1.0,
        digits: int = 0) -> str:
    return " / ".join(f"{spread[k] * scale:,.{digits}f}" for k in keys) if spread["n"] else "-"


def rows(result: dict) -> dict[str, str]:
    """The table's cells of one setup, by row label."""
    longs, rate = result["longs"], result["short_tokens_per_s"]
    cells = {"ITL while long prompts in flight, ms p50 / p99 / max": _ms(result["itl"]["during_long"]),
             "ITL otherwise, ms p50 / p99 / max": _ms(result["itl"]["outside_long"]),
             "ITL overall, ms p50 / p99 / max": _ms(result["itl"]["overall"]),
             "short tokens/s (all shorts) during / otherwise":
                 f"{rate['during_long'] or 0:,.0f} / {rate['outside_long']:,.0f}",
             "long TTFT, s mean / p50 / max": _ms(result["long_ttft"], ("mean_ms", "p50_ms", "max_ms"),
                                                  1e-3, 2)}
    for row in longs:
        cells[f"TTFT {row['prompt_tokens']:,}-token prompt, s (instance's own)"] = (
            f"{row['ttft_s']:.2f} ({row['server_ttft_s']:.2f})" if row["ttft_s"] is not None else "-")
    cells["long prompts: tokens loaded (= prompt - 1 / 0 colocated)"] = (
        f"{' '.join(str(r['tokens_loaded']) for r in longs)} "
        f"{'ok' if all(r['loaded_ok'] for r in longs) else 'NOT as expected'}")
    cells["routed (x-kvtier-disagg)"] = ", ".join(sorted({r["routed"] or "direct" for r in longs}))
    cells["chunks carrying >1 token; errors"] = f"{result['merged_chunks']}; {len(result['errors'])}"
    cells["window (s): decoding / long prompts in flight"] = (
        f"{result['window_s']:.1f} / {result['long_busy_s']:.1f}")
    cells["processes ready (s)"] = f"{result['startup_s']:.1f}"
    return cells


def print_results(console: Console, results: list[dict], title: str) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for result in results:
        table.add_column(result["setup"]["name"], justify="right")
    columns = [rows(r) for r in results]
    for label in columns[0]:
        table.add_row(label, *(c.get(label, "") for c in columns))
    console.print(table)


def plot(path: Path, results: list[dict], title: str) -> None:
    """ITL of every short chunk over time, one panel per setup; long prompts shaded from their
    arrival to their first token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 2.6 * len(results) + 0.6), sharex=True,
                             sharey=True, squeeze=False)
    for ax, result in zip(axes[:, 0], results):
        points = result["timeline"]["itl"]
        ax.scatter([t for t, _ in points], [ms for _, ms in points], s=3, alpha=0.5)
        # One bar per long prompt, stacked at the top (the prompts overlap in time).
        at = ax.get_xaxis_transform()
        for i, (tokens, sent, first, _) in enumerate(result["timeline"]["longs"]):
            y = 0.95 - 0.08 * i
            ax.axvline(sent, color="tab:orange", lw=0.6, ls=":")
            ax.hlines(y, sent, first if first is not None else sent, color="tab:orange", lw=3, transform=at)
            ax.text(sent, y - 0.02, f"{tokens:,} ", transform=at, fontsize=7, ha="right", va="center",
                    color="tab:orange")
        ax.set_yscale("log")
        ax.set_ylabel("ITL (ms)")
        ax.set_title(f"{result['setup']['name']} (orange: each long prompt, arrival to first token)",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since every short request was decoding")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    console = console_and_logging(150, logging.WARNING)
    work = workload(args)
    nbytes = work.cache_bytes(kv_bytes_per_token(args.model))
    load_before, t0 = os.getloadavg(), time.perf_counter()
    logger.info("%s; %d shorts of %d tokens; long prompts %s every %.1f s; setups %s", args.model,
                work.shorts, work.short_prompt, list(work.longs), work.long_every_s, args.setups)
    results = []
    with scratch_run(args.work_dir) as folder:
        for key in args.setups.split(","):
            results.append(run_setup(SETUPS[key], args, work, nbytes, folder / key, console))
    sizes = ", ".join(f"{n:,}" for n in work.longs)
    title = (f"{args.model} fp32 on {os.cpu_count()} CPU cores: {work.shorts} requests decoding while "
             f"prompts of {sizes} tokens arrive every {work.long_every_s:g} s")
    print_results(console, results, title)
    machine = machine_info(args.out.resolve()) | {"load_avg_before": load_before,
                                                   "load_avg_after": os.getloadavg()}
    report = {"model": args.model, "machine": machine,
              "args": vars(args) | {"out": str(args.out), "work_dir": str(args.work_dir)},
              "workload": asdict(work), "cache_bytes": nbytes,
              "kv_bytes_per_token": kv_bytes_per_token(args.model), "results": results,
              "seconds": time.perf_counter() - t0}
    name = "disagg_quick" if args.quick else "disagg"
    write_results(args.out, name, report, lambda path: plot(path, results, title))
    console.print(f"wrote {args.out / name}.json/.png in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    main()
