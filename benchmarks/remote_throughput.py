"""GET and PUT GB/s of whole chunk records through the remote tiers: kvtier_server against Redis,
and GET from a peer (the P2P tier) over NIXL and over TCP.

    .venv/bin/python benchmarks/remote_throughput.py            # full run, a few minutes
    .venv/bin/python benchmarks/remote_throughput.py --quick    # smoke run

Both servers run on this machine as real processes on loopback ports (`redis-server` with no
persistence; `kvtier_server` with room for everything), and both are driven through kvtier's own
tier clients, `RedisTier` and `RemoteTier`, so the numbers are what a kvtier user gets: records
verified on every GET (xxh3 over the payload), read into buffers allocated (and touched) up front
as the memory pool's slabs are (they are slabs of a real MemoryPool: the reader's).
P2P: a holder process (benchmarks/p2p_holder.py: a StorageManager holding the same records in its
CPU tier, a real PeerServer, a NixlEndpoint over its pool's arena) and real `P2PTier`s in this
process whose dests are the slabs of our pool, which has its own NixlEndpoint; the controller is
left out (a static directory names the holder for every key). P2P is read-only: GET rows only. The
holder's own counters prove the path of every P2P phase (NIXL: one lease per record; TCP: none).
Records of 4 MiB and 32 MiB; 1 and 8 concurrent clients (threads, each with its own tier
client), each moving its share of the same records. GB/s = payload bytes (1e9) over the wall time
of a whole phase, median of `--reps` runs. Beside them, a raw socket reference: Python `sendall`
into `recv_into` over loopback (receiver in a process of its own), same sizes, same client counts,
measured in every rep, best rep shown. It is a reference, not a ceiling: on this VM loopback varies
2x from run to run, and the server's non-blocking `sendmsg` path can beat a blocking `sendall` loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from harness import console_and_logging, machine_info, progress_bar, scratch_run, write_results
from p2p_holder import NAMESPACE, seeded_records
from p2p_peers import Holder, HolderProcess, ReaderPool, check_path, holder_stats, quiet_nixl
from rich.table import Table
from services import kvtier_server_process, redis_process

from kvtier.config import RedisConfig, RemoteConfig
from kvtier.metrics import Metrics
from kvtier.record import encode_header
from kvtier.tiers.base import PutItem, Tier
from kvtier.tiers.redis import RedisTier
from kvtier.tiers.remote import RemoteTier

logger = logging.getLogger("remote_throughput")

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
TARGET = 1.5  # kvtier_server / Redis on GET of 32 MiB records
P2P_TARGET_GBPS = 2.0  # P2P over NIXL on GET of 32 MiB records: at least this, and at least kvtier_server
P2P = ("p2p_nixl", "p2p_tcp")


@dataclass(frozen=True, slots=True)
class Row:
    op: str
    record_mib: int
    clients: int
    redis_gbps: float
    server_gbps: float
    loopback_gbps: float
    redis_runs_s: list[float]
    server_runs_s: list[float]
    p2p_nixl_gbps: float | None = None  # GET rows (None: PUT, or NIXL unusable here)
    p2p_tcp_gbps: float | None = None
    p2p_nixl_runs_s: list[float] | None = None
    p2p_tcp_runs_s: list[float] | None = None
    p2p_path: dict | None = None  # per P2P column, what the holder counted over all its phases

    @property
    def ratio(self) -> float:
        return self.server_gbps / self.redis_gbps

    @property
    def nixl_ratio(self) -> float | None:
        return None if self.p2p_nixl_gbps is None else self.p2p_nixl_gbps / self.server_gbps

    @property
    def tcp_ratio(self) -> float | None:
        return None if self.p2p_tcp_gbps is None else self.p2p_tcp_gbps / self.server_gbps

    @property
    def nixl_pass(self) -> bool | None:
        """The P2P target, on GET of 32 MiB records (None elsewhere)."""
        if self.op != "get" or self.record_mib != 32 or self.p2p_nixl_gbps is None:
            return None
        return self.p2p_nixl_gbps >= max(self.server_gbps, P2P_TARGET_GBPS)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small totals, 2 reps")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 5; quick 2)")
    p.add_argument("--total-mib", type=int, default=None,
                   help="payload per measurement (default 1024; quick 256)")
    p.add_argument("--dir", type=Path, default=ROOT / ".kvtier-cache" / "bench")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    args.reps = args.reps or (2 if args.quick else 5)
    args.total_mib = args.total_mib or (256 if args.quick else 1024)
    return args


def make_records(count: int, nbytes: int, seed: int) -> list[PutItem]:
    """The records every store gets (the P2P holder makes the same ones: p2p_holder.seeded_records)."""
    shape = (1, 1, nbytes // 2, 1)  # fp16 elements: the record only checks that the bytes add up
    return [PutItem(key, encode_header(key, shape, torch.float16, payload.numpy()), payload)
            for key, payload in seeded_records(count, nbytes, seed)]


def timed_phase(clients: Sequence[Tier], shares: Sequence[list[PutItem]], op: str,
                dests: Sequence[list[torch.Tensor]]) -> float:
    """Seconds for every client to PUT (or GET into `dests`) its share, all at once; checks results."""

    def work(i: int) -> None:
        tier, share = clients[i], shares[i]
        for j, item in enumerate(share):  # one record per call: the size of a transfer is the point
            if op == "put":
                ok = tier.put([item])[0]
            else:
                ok = tier.get([item.key], [dests[i][j]])[0] is not None
            if not ok:
                raise RuntimeError(f"{tier.name}: {op} of a {item.payload.numel() >> 20} MiB record failed")

    with ThreadPoolExecutor(len(clients)) as pool:
        start = time.perf_counter()
        list(pool.map(work, range(len(clients))))
        elapsed = time.perf_counter() - start
    if op == "get":
        for share, got in zip(shares, dests):
            for item, dest in zip(share, got):
                if not torch.equal(item.payload, dest):
                    raise RuntimeError("a GET returned other bytes than were PUT")
    return elapsed


# The receiving end of the loopback measurement, in a process of its own like the servers (two
# busy threads in one process would hand the GIL back and forth and measure that instead).
_RECEIVER = """
import socket, sys, threading
nbytes, count, streams = map(int, sys.argv[1:])
listener = socket.create_server(("127.0.0.1", 0))
listener.listen(streams)
print(listener.getsockname()[1], flush=True)
def receive(conn):
    buf = memoryview(bytearray(nbytes))
    with conn:
        for _ in range(count):
            got = 0
            while got < nbytes:
                got += conn.recv_into(buf[got:])
threads = [threading.Thread(target=receive, args=(listener.accept()[0],)) for _ in range(streams)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("done", flush=True)
"""


def loopback_limit(nbytes: int, streams: int, per_stream: int) -> float:
    """GB/s of raw TCP over loopback: `streams` connections, each sending `per_stream` buffers to a
    receiver process that reads them with `recv_into`."""
    receiver = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(nbytes), str(per_stream), str(streams)],
                                stdout=subprocess.PIPE, text=True)
    port = int(receiver.stdout.readline())
    payload = memoryview(bytearray(os.urandom(1 << 16)) * (nbytes >> 16))
    senders = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]

    def send(s: socket.socket) -> None:
        for _ in range(per_stream):
            s.sendall(payload)

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        list(pool.map(send, senders))
    if receiver.stdout.readline().strip() != "done":
        raise RuntimeError("the loopback receiver failed")
    elapsed = time.perf_counter() - start
    for s in senders:
        s.close()
    receiver.wait()
    return streams * per_stream * nbytes / elapsed / 1e9


def p2p_tiers(readers: ReaderPool, holder: Holder, clients: int, path: dict) -> dict[str, list[Tier]]:
    """One P2PTier per client thread, as the other stores' clients: over NIXL (when both sides have
    an endpoint: else path["nixl_missing"] says why) and over TCP."""
    names = list(P2P)
    if readers.endpoint is None or not holder.nixl:
        path["nixl_missing"] = readers.why or holder.why
        names.remove("p2p_nixl")
    return {name: [readers.tier(holder.url, nixl=name == "p2p_nixl") for _ in range(clients)]
            for name in names}


def p2p_phase(name: str, group: Sequence[Tier], shares, dests, readers: ReaderPool, url: str,
              path: dict) -> float:
    """One timed P2P GET phase; the holder's counters before and after say which path it took."""
    before = holder_stats(url)
    try:
        elapsed = timed_phase(group, shares, "get", dests)
    except RuntimeError as exc:  # a miss: say what the P2P tiers counted (their log says more)
        counts = {what: int(readers.metrics.value(f"kvtier_tier_{what}_total", {"tier": "p2p"}))
                  for what in ("errors", "corrupt")}
        raise RuntimeError(f"{name}: {exc} (P2P tiers' counters: {counts})") from exc
    counted = check_path(name, before, holder_stats(url), sum(len(share) for share in shares))
    for what, n in counted.items():
        path.setdefault(name, {}).setdefault(what, 0)
        path[name][what] += n
    return elapsed


def measure_case(args: argparse.Namespace, make: dict[str, Callable[[], Tier]], mib: int, clients: int,
                 progress, task) -> list[Row]:
    """The PUT and GET rows of `clients` clients moving `args.total_mib` of `mib` MiB records."""
    count = max(clients, args.total_mib // mib)
    count -= count % clients
    seed = mib * 100 + clients
    with HolderProcess(mib * MiB, count, seed) as process:  # it fills its memory while we fill ours
        items = make_records(count, mib * MiB, seed)
        shares = [items[i::clients] for i in range(clients)]
        # GET buffers: the slabs of a memory pool, touched once (page faults on fresh memory would
        # otherwise be timed too, about 0.3 s a GiB here); every store's GETs land in the same ones.
        readers = ReaderPool(mib * MiB, count)
        slabs = readers.dests()
        dests = [slabs[i::clients] for i in range(clients)]
        holder = process.ready()
        path: dict = {}
        tiers = {name: [factory() for _ in range(clients)] for name, factory in make.items()}
        tiers.update(p2p_tiers(readers, holder, clients, path))
        seconds: dict[tuple[str, str], list[float]] = {}
        limits = []
        try:
            for _ in range(args.reps):
                # Alternate the stores inside each rep, so all see the same machine of the moment.
                for name, group in tiers.items():
                    if name not in P2P:
                        group[0].remove([item.key for item in items])
                        seconds.setdefault(("put", name), []).append(timed_phase(group, shares, "put", dests))
                    for got in dests:
                        for dest in got:
                            dest.fill_(0)  # a GET that wrote nothing must not pass the check
                    if name in P2P:
                        elapsed = p2p_phase(name, group, shares, dests, readers, holder.url, path)
                    else:
                        elapsed = timed_phase(group, shares, "get", dests)
                    seconds.setdefault(("get", name), []).append(elapsed)
                    progress.advance(task)
                limits.append(loopback_limit(mib * MiB, clients, max(1, count // clients)))
                progress.refresh()
        finally:
            for name, group in tiers.items():
                if name not in P2P:
                    group[0].remove([item.key for item in items])
                for tier in group:
                    tier.close()
            readers.close()
    return case_rows(mib, clients, count * mib * MiB, seconds, max(limits), path)


def case_rows(mib: int, clients: int, payload: int, seconds: dict, limit: float, path: dict) -> list[Row]:
    """The PUT and GET rows of one case (loopback: the best rep; it varies 2x from run to run here)."""
    def gbps(op: str, name: str) -> float | None:
        runs = seconds.get((op, name))
        return None if runs is None else payload / statistics.median(runs) / 1e9

    def runs(op: str, name: str) -> list[float] | None:
        return None if (op, name) not in seconds else [round(s, 4) for s in seconds[(op, name)]]

    rows = []
    for op in ("put", "get"):
        rows.append(Row(op, mib, clients, gbps(op, "redis"), gbps(op, "server"), limit,
                        runs(op, "redis"), runs(op, "server"), gbps(op, "p2p_nixl"), gbps(op, "p2p_tcp"),
                        runs(op, "p2p_nixl"), runs(op, "p2p_tcp"), path if op == "get" else None))
    return rows


def store_clients(redis_url: str, server_url: str) -> dict[str, Callable[[], Tier]]:
    """A new tier client of each store (one per client thread)."""
    metrics = Metrics(["redis", "remote"])
    return {"redis": lambda: RedisTier(RedisConfig(url=redis_url, timeout_s=30.0), NAMESPACE, metrics),
            "server": lambda: RemoteTier(RemoteConfig(url=server_url, timeout_s=30.0, connections=1),
                                         NAMESPACE, metrics)}


def measure(args: argparse.Namespace, redis_url: str, server_url: str, progress) -> list[Row]:
    make = store_clients(redis_url, server_url)
    cases = [(mib, clients) for mib in (4, 32) for clients in (1, 8)]
    task = progress.add_task("measuring", total=len(cases) * 4 * args.reps)
    rows = []
    for mib, clients in cases:
        rows += measure_case(args, make, mib, clients, progress, task)
    return rows


def _gbps(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(value: float | None, verdict: bool | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" + ("" if verdict is None else " PASS" if verdict else " FAIL")


def _nixl_missing(r: Row) -> str | None:
    """Why a GET row has no P2P NIXL column (NIXL unusable here), else None."""
    return (r.p2p_path or {}).get("nixl_missing")


def print_table(console, rows: list[Row]) -> None:
    table = Table(title="Remote tiers and P2P: GB/s of chunk records over loopback (median of runs)")
    for col in ("op", "record", "clients", "Redis", "kvtier_server", "server / Redis", "P2P NIXL",
                "NIXL / server", "P2P TCP", "TCP / server", "raw socket loop", "server / raw"):
        table.add_column(col, justify="right")
    for r in rows:
        verdict = None
        if r.op == "get" and r.record_mib == 32:
            verdict = r.ratio >= TARGET
        table.add_row(r.op.upper(), f"{r.record_mib} MiB", str(r.clients), f"{r.redis_gbps:.2f}",
                      f"{r.server_gbps:.2f}", _ratio(r.ratio, verdict),
                      "n/a" if _nixl_missing(r) else _gbps(r.p2p_nixl_gbps),
                      _ratio(r.nixl_ratio, r.nixl_pass), _gbps(r.p2p_tcp_gbps), _ratio(r.tcp_ratio),
                      f"{r.loopback_gbps:.2f}", f"{r.server_gbps / r.loopback_gbps:.2f}x")
    console.print(table)
    console.print(f"Targets on GET of 32 MiB records: kvtier_server >= {TARGET}x Redis; P2P over NIXL >= "
                  f"kvtier_server and >= {P2P_TARGET_GBPS} GB/s.")
    for why in sorted({_nixl_missing(r) for r in rows if _nixl_missing(r)}):
        console.print(f"P2P NIXL: n/a: {why}")
    for r in rows:
        if r.p2p_path:
            what = "; ".join(f"{name}: {c['served_chunks']} records served under {c['leases']} leases"
                             for name, c in r.p2p_path.items() if name in P2P)
            console.print(f"P2P path, GET {r.record_mib} MiB x {r.clients} (the holder's counters): {what}")


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=True, gridspec_kw={"width_ratios": [5, 3]})
    bars = [("Redis (redis-py + hiredis)", "redis_gbps", None),
            ("kvtier_server (RemoteTier)", "server_gbps", None),
            ("P2P over NIXL (P2PTier)", "p2p_nixl_gbps", None),
            ("P2P over TCP (P2PTier)", "p2p_tcp_gbps", None),
            ("raw socket loop (reference)", "loopback_gbps", "lightgray")]
    for ax, op in zip(axes, ("get", "put")):
        picked = [r for r in rows if r.op == op]
        shown = [b for b in bars if any(getattr(r, b[1]) is not None for r in picked)]
        width = 0.8 / len(shown)
        labels = [f"{r.record_mib} MiB\n{r.clients} client{'s' if r.clients > 1 else ''}" for r in picked]
        x = range(len(picked))
        for k, (label, field, color) in enumerate(shown):
            offset = (k - (len(shown) - 1) / 2) * width
            values = [getattr(r, field) or 0.0 for r in picked]
            ax.bar([i + offset for i in x], values, width, label=label, color=color)
            if field == "p2p_nixl_gbps":
                for i, r in zip(x, picked):
                    if r.nixl_ratio is not None:
                        ax.annotate(f"{r.nixl_ratio:.1f}x", (i + offset, values[i]), ha="center", va="bottom",
                                    fontsize=7)
        ax.set_xticks(list(x), labels)
        ax.set_title(f"{op.upper()}" + (" (P2P: ratio to kvtier_server over its bar)" if op == "get" else ""))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("GB/s (payload)")
    fig.suptitle("Chunk records through kvtier's remote tiers and from a peer, same records, same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    quiet_nixl()
    console = console_and_logging(170, logging.WARNING)
    info = machine_info(args.dir.resolve())
    started = time.perf_counter()
    # Room for every case's records: at least one per client, 8 x 32 MiB, whatever --total-mib says.
    with scratch_run(args.dir) as root, redis_process(root) as redis_url, \
            kvtier_server_process(root, capacity_bytes=4 * max(args.total_mib, 8 * 32) * MiB) as server_url, \
            progress_bar(console) as progress:
        rows = measure(args, redis_url, server_url, progress)
    print_table(console, rows)
    elapsed = time.perf_counter() - started
    report = {"machine": {**info, "load_avg_1m_end": os.getloadavg()[0]},
              "settings": {"quick": args.quick, "reps": args.reps, "total_mib": args.total_mib,
                           "clients": "threads, one tier client each", "target_get_32mib": TARGET,
                           "p2p_target_get_32mib_gbps": P2P_TARGET_GBPS,
                           "p2p": "holder: a benchmarks/p2p_holder.py process; reader: a P2PTier per "
                                  "client thread, dests: the reader pool's slabs; a static directory "
                                  "(no controller)"},
              "rows": [{**asdict(r), "ratio": r.ratio, "p2p_nixl_ratio": r.nixl_ratio,
                        "p2p_tcp_ratio": r.tcp_ratio, "p2p_nixl_pass": r.nixl_pass} for r in rows],
              "elapsed_s": round(elapsed, 1)}
    write_results(args.out, "remote_throughput" + ("_quick" if args.quick else ""), report,
                  lambda path: plot(rows, path))
    console.print(f"{elapsed:.0f} s")


if __name__ == "__main__":
    main()
