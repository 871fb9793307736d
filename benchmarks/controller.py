"""kvtier_controller lookup latency against a large index: 2,000 `POST /v1/lookup` of 32K-token
prompts against 1M chunks held by 8 instances, over HTTP, beside the same lookups in-process and the
hashing alone, and the index's memory per chunk.

    .venv/bin/python benchmarks/controller.py          # full run: 1M chunks, 2,000 lookups (~2 minutes)
    .venv/bin/python benchmarks/controller.py --quick  # smoke run: 100K chunks, 200 lookups

A real controller process (`python -m kvtier.controller`, in-memory index, a token) is started on a
free port. 8 instances register over HTTP (no engines behind them: the benchmark speaks the agent
protocol itself) and send `stored` events for the chunk keys of seeded 32K-token prompts (256-token
chunks, keyed with kvtier.keys.TokenDatabase as an engine keys them: 128 chunks a prompt), prompt i
held by instance i % 8, half of them in its cpu tier and half in its disk tier. Then one client
(one keep-alive connection) times lookups of three kinds, interleaved: a stored prompt (hit, 32K
tokens), a stored prompt's first 16K tokens then new ones (partial, 16K), a new prompt (miss).
Every answer's hit length is checked. benchmarks/README.md explains the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import console_and_logging, machine_info, progress_bar
from rich.console import Console
from rich.table import Table

from kvtier.controller import fleet_lookup
from kvtier.controller.memory_state import MemoryState
from kvtier.controller.prompt_body import parse_prompt
from kvtier.fleet.http_client import JsonClient
from kvtier.fleet.messages import MAX_EVENT_KEYS, EventBatch, KeyEvent, Registration, TierUsage
from kvtier.keys import Namespace, TokenDatabase

logger = logging.getLogger("controller_bench")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-model"
LAYOUT = "L32xH8xD128:bfloat16"  # text only: it names the namespace, nothing is allocated
CHUNK = 256
PROMPT_TOKENS = 32_768
INSTANCES = 8
TOKEN = "controller-bench-token-0123456789"
TARGET_P50_MS = 5.0
TIERS = ("cpu", "disk")


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


def prompt(seed: int, num_tokens: int = PROMPT_TOKENS) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 32_000, num_tokens, dtype=np.uint32)


class Controller:
    """A kvtier_controller process with the in-memory index, on a free port."""

    def __init__(self, folder: Path):
        (folder / "controller.yaml").write_text("heartbeat_timeout_s: 3600\n")  # no heartbeats sent here
        (folder / "token").write_text(TOKEN)
        self.log = folder / "controller.log"
        cmd = [sys.executable, "-m", "kvtier.controller", "--port", "0", "--log-level", "warning",
               "--config", str(folder / "controller.yaml"), "--token-file", str(folder / "token")]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60.0)
        line = self.proc.stdout.readline() if ready else ""
        if "listening on" not in line:
            self.proc.kill()
            raise RuntimeError(f"kvtier_controller did not start ({line!r}):\n{self.log.read_text()}")
        self.url = "http://" + line.rsplit(" ", 1)[1].strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def registration(index: int, namespace: str) -> Registration:
    tiers = [TierUsage(name=n, chunks=0, bytes_used=0, capacity_bytes=(64 << 30) * (i + 1))
             for i, n in enumerate(TIERS)]
    return Registration(instance_id=f"bench-{index}", kind="engine", command_url="http://127.0.0.1:9",
                        command_token="x" * 32, model_id=MODEL, namespace=namespace, chunk_size=CHUNK,
                        layout=LAYOUT, tiers=tiers)


def build_keys(db: TokenDatabase, num_prompts: int, progress) -> list[dict[str, list[str]]]:
    """Per instance, tier -> the hex keys it holds (prompt i: instance i % 8, tier by i // 8 parity)."""
    held = [{t: [] for t in TIERS} for _ in range(INSTANCES)]
    task = progress.add_task("hashing the stored prompts", total=num_prompts)
    for i in range(num_prompts):
        held[i % INSTANCES][TIERS[(i // INSTANCES) % 2]].extend(k.hex() for k in db.keys(prompt(i)))
        progress.advance(task)
        if i % 256 == 0:
            progress.refresh()
    return held


def batches(held: dict[str, list[str]]):
    """EventBatch bodies (plain JSON data) of at most MAX_EVENT_KEYS keys."""
    for tier, keys in held.items():
        for start in range(0, len(keys), MAX_EVENT_KEYS):
            yield [{"op": "stored", "tier": tier, "keys": keys[start:start + MAX_EVENT_KEYS]}]


def fill(controller: Controller, namespace: str, held: list[dict[str, list[str]]], progress) -> float:
    client = JsonClient(controller.url, TOKEN, timeout_s=120.0)
    task = progress.add_task("registering and sending events", total=sum(
        len(k) for h in held for k in h.values()))
    started = time.perf_counter()
    for i, keys in enumerate(held):
        session = client.post("/v1/instances/register", registration(i, namespace))["session"]
        for seq, events in enumerate(batches(keys), 1):
            reply = client.post(f"/v1/instances/bench-{i}/events", {"session": session, "seq": seq,
                                                                      "events": events})
            assert reply["known"] and not reply["resync"], reply
            progress.advance(task, len(events[0]["keys"]))
            progress.refresh()
    client.close()
    return time.perf_counter() - started


def queries(num_prompts: int, count: int) -> list[tuple[int, int, int]]:
    """(seed of the first half, seed of the second half, expected hit tokens), interleaved kinds."""
    rng = np.random.default_rng(12345)
    out = []
    for q in range(count):
        kind, stored = q % 4, int(rng.integers(0, num_prompts))
        if kind in (0, 1):  # hit: a stored prompt
            out.append((stored, stored, PROMPT_TOKENS))
        elif kind == 2:  # partial: its first half, then new tokens
            out.append((stored, 10_000_000 + q, PROMPT_TOKENS // 2))
        else:  # miss
            out.append((10_000_000 + q, 10_000_000 + q, 0))
    return out


def query_tokens(first: int, second: int) -> np.ndarray:
    if first == second:
        return prompt(first)
    half = PROMPT_TOKENS // 2
    return np.concatenate([prompt(first)[:half], prompt(second)[half:]])


def server_seconds(client: JsonClient) -> tuple[float, int]:
    """(sum of seconds, count) of the controller's own /v1/lookup latency histogram (its ASGI
    middleware: from the request head parsed to the reply sent; no TCP, no HTTP parsing of the head)."""
    status, raw = client.raw_request("GET", "/metrics")
    total, count = 0.0, 0
    for line in raw.decode().splitlines():
        if line.startswith("kvtier_controller_request_seconds_") and '"/v1/lookup"' in line:
            name, value = line.rsplit(" ", 1)
            if name.startswith("kvtier_controller_request_seconds_sum"):
                total = float(value)
            elif name.startswith("kvtier_controller_request_seconds_count"):
                count = int(float(value))
    return total, count


def time_http(controller: Controller, plan, progress) -> tuple[list[float], list[float], int, float]:
    """(round trips, client body encodings, wrong answers, the controller's own mean seconds) of
    POST /v1/lookup over one connection."""
    client = JsonClient(controller.url, TOKEN, timeout_s=30.0)
    trips, encodes, wrong = [], [], 0
    task = progress.add_task("HTTP lookups", total=len(plan))
    for n, (first, second, expected) in enumerate(plan):
        tokens = query_tokens(first, second).tolist()
        t0 = time.perf_counter()
        body = json.dumps({"model_id": MODEL, "tokens": tokens}, separators=(",", ":")).encode()
        t1 = time.perf_counter()
        status, raw = client.raw_request("POST", "/v1/lookup", body)
        reply = json.loads(raw)
        t2 = time.perf_counter()
        if status != 200 or reply["hit_tokens"] != expected:
            wrong += 1
        if n >= WARMUP:
            encodes.append(t1 - t0)
            trips.append(t2 - t1)
        elif n == WARMUP - 1:
            before = server_seconds(client)
        progress.advance(task)
        progress.refresh()
    after = server_seconds(client)
    client.close()
    return trips, encodes, wrong, (after[0] - before[0]) / max(after[1] - before[1], 1)


WARMUP = 20  # first lookups of each loop, not timed (connection, caches)


def in_process_state(namespace: str, held: list[dict[str, list[str]]]) -> MemoryState:
    state = MemoryState(3600.0)
    for i, keys in enumerate(held):
        state.register(registration(i, namespace), 0.0)
        for seq, events in enumerate(batches(keys), 1):
            batch = EventBatch(session=state.session, seq=seq, events=[KeyEvent(**e) for e in events])
            state.apply(f"bench-{i}", state.session, seq, list(batch.events), 0.0)
    return state


def time_in_process(state: MemoryState, db: TokenDatabase, plan, progress) -> tuple[dict[str, list], int]:
    """What the controller's app does for one lookup, step by step in this process (per step, the
    seconds of each lookup), and the wrong answers: parse the body (`parse_prompt`: JSON to a uint32
    array), `fleet_lookup.lookup` on the array (hashing + the index), the reply's JSON; and the
    hashing alone (TokenDatabase.keys, the floor of any lookup)."""
    steps: dict[str, list[float]] = {"parse": [], "lookup": [], "reply": [], "hash": []}
    wrong = 0
    task = progress.add_task("in-process lookups", total=len(plan))
    for n, (first, second, expected) in enumerate(plan):
        body = json.dumps({"model_id": MODEL, "tokens": query_tokens(first, second).tolist()},
                          separators=(",", ":")).encode()
        t0 = time.perf_counter()
        model_id, tokens = parse_prompt(body)
        t1 = time.perf_counter()
        reply = fleet_lookup.lookup(state, model_id, tokens, 1.0)
        t2 = time.perf_counter()
        reply.model_dump_json()
        t3 = time.perf_counter()
        db.keys(tokens)
        t4 = time.perf_counter()
        wrong += reply.hit_tokens != expected
        if n >= WARMUP:
            for step, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                steps[step].append(seconds)
        progress.advance(task)
        progress.refresh()
    return steps, wrong


def table(report: dict) -> Table:
    t = Table(title=f"kvtier_controller: {report['lookups']:,} lookups of {PROMPT_TOKENS // 1024}K-token "
                    f"prompts, {report['index']['entries']:,} chunks over {INSTANCES} instances")
    for col in ("measurement", "p50 ms", "p90 ms", "p99 ms", "mean ms", "target"):
        t.add_column(col, justify="left" if col in ("measurement", "target") else "right")
    for name, row in report["latency"].items():
        target = ""
        if name == "HTTP POST /v1/lookup":
            target = f"p50 < {TARGET_P50_MS} ms " + ("PASS" if row["p50_ms"] < TARGET_P50_MS else "FAIL")
        t.add_row(name, *(f"{row[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")), target)
        if name == "HTTP POST /v1/lookup":
            mean = f"{report['server_side_mean_ms']:.3f}"
            t.add_row("  of which in the controller's app", "", "", "", mean, "")
    return t


def index_table(index: dict) -> Table:
    t = Table(title="the controller's index")
    t.add_column("measurement")
    t.add_column("value", justify="right")
    t.add_row("entries (key, instance)", f"{index['entries']:,}")
    t.add_row("index_bytes (GET /v1/stats)", f"{index['index_bytes'] / 2**20:,.1f} MiB")
    t.add_row("bytes per chunk, /v1/stats", f"{index['stats_bytes_per_chunk']:.1f}")
    t.add_row("process RSS before / after filling", f"{index['rss_before'] / 2**20:,.0f} / "
                                                    f"{index['rss_after'] / 2**20:,.0f} MiB")
    t.add_row("bytes per chunk, RSS delta", f"{index['rss_bytes_per_chunk']:.1f}")
    t.add_row("fill: register + events over HTTP", f"{index['fill_s']:.1f} s")
    return t


def plot(report: dict, samples: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in samples.items():
        ms = np.sort(np.array(values) * 1e3)
        ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=name)
    # The axis ends past the slowest p99.5: a single GC pause would squeeze every curve to the left.
    ax.set_xlim(0, 1.2 * max(float(np.percentile(np.array(v) * 1e3, 99.5)) for v in samples.values()))
    ax.axvline(TARGET_P50_MS, color="grey", linestyle="--", label=f"target p50 {TARGET_P50_MS} ms")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of lookups")
    ax.set_title(f"{report['lookups']:,} lookups of 32K-token prompts, {report['index']['entries']:,} chunks")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, console: Console) -> tuple[dict, dict[str, list[float]]]:
    load_at_start = os.getloadavg()[0]  # other work on the machine skews every number here
    db = TokenDatabase(Namespace(MODEL, LAYOUT), CHUNK)
    namespace = db.namespace_digest.hex()
    num_prompts = -(-args.chunks // (PROMPT_TOKENS // CHUNK))
    plan = queries(num_prompts, args.lookups + WARMUP)
    with tempfile.TemporaryDirectory(prefix="kvtier-controller-bench-") as folder, \
            progress_bar(console) as progress:
        controller = Controller(Path(folder))
        try:
            JsonClient(controller.url, TOKEN).get("/v1/stats")  # the app has answered once
            rss_before = rss_bytes(controller.proc.pid)
            held = build_keys(db, num_prompts, progress)
            fill_s = fill(controller, namespace, held, progress)
            stats = JsonClient(controller.url, TOKEN).get("/v1/stats")
            rss_after = rss_bytes(controller.proc.pid)
            trips, encodes, wrong_http, server_mean = time_http(controller, plan, progress)
        finally:
            controller.stop()
        state = in_process_state(namespace, held)
        steps, wrong_local = time_in_process(state, db, plan, progress)
    entries = stats["index_chunks"]
    samples = {"HTTP POST /v1/lookup": trips,
               "in-process: parse_prompt (JSON body to array)": steps["parse"],
               "in-process: fleet_lookup.lookup (hash + index)": steps["lookup"],
               "in-process: reply model_dump_json": steps["reply"],
               "hashing floor: TokenDatabase.keys": steps["hash"],
               "client: json.dumps of the body (not timed above)": encodes}
    return {"lookups": args.lookups, "prompt_tokens": PROMPT_TOKENS, "chunk_size": CHUNK,
            "instances": INSTANCES, "wrong_answers": {"http": wrong_http, "in_process": int(wrong_local)},
            "latency": {name: percentiles(values) for name, values in samples.items()},
            "server_side_mean_ms": server_mean * 1e3,
            "index": {"entries": entries, "index_bytes": stats["index_bytes"],
                      "stats_bytes_per_chunk": stats["index_bytes"] / max(entries, 1),
                      "rss_before": rss_before, "rss_after": rss_after,
                      "rss_bytes_per_chunk": (rss_after - rss_before) / max(entries, 1), "fill_s": fill_s},
            "machine": {**machine_info(ROOT), "load_avg_1m_start": load_at_start}}, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100K chunks, 200 lookups")
    parser.add_argument("--chunks", type=int, default=None, help="chunks in the index (default 1,000,000)")
    parser.add_argument("--lookups", type=int, default=None, help="timed lookups (default 2,000)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.chunks = args.chunks or (100_000 if args.quick else 1_000_000)
    args.lookups = args.lookups or (200 if args.quick else 2_000)
    console = console_and_logging(120, logging.WARNING)
    report, samples = run(args, console)
    console.print(table(report))
    console.print(index_table(report["index"]))
    wrong = report["wrong_answers"]
    if any(wrong.values()):
        console.print(f"[red]wrong hit lengths: {wrong}[/red]")
    name = "controller_quick" if args.quick else "controller"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, samples, args.out / f"{name}.png")
    console.print(f"wrote {args.out / f'{name}.json'} and {args.out / f'{name}.png'}")
    p50 = report["latency"]["HTTP POST /v1/lookup"]["p50_ms"]
    return 0 if p50 < TARGET_P50_MS and not any(wrong.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
