"""The reader side of the P2P rows of benchmarks/remote_throughput.py: a holder process
(benchmarks/p2p_holder.py) per measurement, the reader's memory pool (whose slabs every store's GETs
land in) with its NIXL endpoint, real `kvtier.tiers.p2p.P2PTier`s over it, and the holder's own
counters, which prove which way the bytes went.

    with HolderProcess(nbytes, count, seed) as process:     # it fills its memory meanwhile
        readers = ReaderPool(nbytes, count)                  # readers.dests(): slabs; readers.why
        holder = process.ready()                             # holder.url, holder.nixl, holder.why
        tier = readers.tier(holder.url, nixl=True)           # a P2PTier naming the holder for every key
        before = holder_stats(holder.url); ...; after = holder_stats(holder.url)
        readers.close()

What is not measured: the controller's round trip (`StaticDirectory` stands in for PeerDirectory and
names the holder for every key), as the directory's answer is cached across a load's has/get.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from p2p_holder import NAMESPACE

from kvtier.config import P2PConfig
from kvtier.fleet.messages import PeerHolding
from kvtier.keys import ChunkKey
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.tiers.p2p import P2PTier
from kvtier.tiers.remote import parse_url
from kvtier.tiers.remote_client import Client, Request
from kvtier.wire.frames import Frame, Op

HOLDER = Path(__file__).resolve().parent / "p2p_holder.py"
TOKEN = "bench-p2p-token-0123456789abcdef"
TIMEOUT_S = 30.0  # a reader's deadline, as the other clients' timeout
QUIET = {"NIXL_LOG_LEVEL": "FATAL", "UCX_LOG_LEVEL": "error"}  # never UCX_TLS: UCX picks cma here


def quiet_nixl() -> None:
    """NIXL's and UCX's logs at fatal / error in this process and its children (unless set)."""
    for name, value in QUIET.items():
        os.environ.setdefault(name, value)


class StaticDirectory:
    """Stands in for kvtier.p2p.directory.PeerDirectory: the holder holds every key, in memory."""

    def __init__(self, url: str):
        self.url = url

    def locate(self, keys: Sequence[ChunkKey]) -> list[PeerHolding]:
        n = len(keys)
        return [PeerHolding(instance_id="holder", p2p_url=self.url, held=[True] * n, in_memory=[True] * n)]

    def close(self) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Holder:
    url: str
    nixl: bool  # it serves NIXL READs (and TCP GETs); else TCP only
    why: str | None  # why not NIXL


class HolderProcess:
    """A p2p_holder.py process holding the `seeded_records(count, nbytes, seed)` records; it
    fills its memory while the caller goes on, until `ready()`. A context manager: stopped after."""

    def __init__(self, nbytes: int, count: int, seed: int, nixl: bool = True):
        self._proc = subprocess.Popen([sys.executable, str(HOLDER), str(nbytes), str(count), str(seed),
                                       "nixl" if nixl else "tcp", TOKEN],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      env={**QUIET, **os.environ})
        self._holder: Holder | None = None

    def ready(self) -> Holder:
        """Where it serves, once it does (its one line of output)."""
        if self._holder is None:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the P2P holder exited with {self._proc.wait()} before serving")
            started = json.loads(line)
            self._holder = Holder(started["url"], started["nixl"], started["why"])
        return self._holder

    def close(self) -> None:
        self._proc.stdin.close()  # the holder stops its server, ends every lease and exits
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> HolderProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def holder_stats(url: str) -> dict[str, int]:
    """The holder's STATS over the wire: p2p_leases, p2p_served_chunks, requests, ..."""
    client = Client(*parse_url(url), TIMEOUT_S, TOKEN, 1)
    try:
        (reply,) = client.call([Request(Frame(Op.STATS, 1))])
    finally:
        client.close()
    return reply.stats


class ReaderPool:
    """The reader's memory pool (`count` slabs of `nbytes`, touched once) and its NIXL endpoint over
    the whole arena, as an engine's (kvtier.p2p.setup); `why` says why there is none."""

    def __init__(self, nbytes: int, count: int):
        self.nbytes = nbytes
        self.pool = MemoryPool(count * nbytes, nbytes, pin=False)
        self.slabs = [self.pool.alloc("bench") for _ in range(count)]
        self.pool.arena.fill_(0)  # page faults here, not in a timed GET
        self.metrics = Metrics(["p2p"])
        self.endpoint, self.why = None, None
        from kvtier.p2p.nixl_transport import NixlEndpoint, TransportError, nixl_status

        self.why = nixl_status()
        if self.why is None:
            try:
                self.endpoint = NixlEndpoint(f"bench-reader-{uuid.uuid4().hex}", self.pool.arena,
                                             self.pool.slab_stride, self.pool.slab_bytes, self.pool.num_slabs)
            except TransportError as exc:
                self.why = str(exc)

    def dests(self) -> list[torch.Tensor]:
        """One slab per record, the record's size: where every store's GETs land."""
        return [self.pool.tensor(slab, self.nbytes) for slab in self.slabs]

    def tier(self, url: str, nixl: bool) -> P2PTier:
        """A P2PTier that reads every key from `url`: over NIXL into our slabs when `nixl` (and the
        holder has an endpoint too), else over TCP (no endpoint: the tier never leases)."""
        config = P2PConfig(token=TOKEN, timeout_s=TIMEOUT_S)
        return P2PTier(config, StaticDirectory(url), NAMESPACE, self.metrics,
                       self.endpoint if nixl else None, own_url=None)

    def close(self) -> None:
        """After every tier over it closed: the arena is deregistered before the pool goes."""
        if self.endpoint is not None:
            self.endpoint.close()


def check_path(name: str, before: dict[str, int], after: dict[str, int], records: int) -> dict[str, int]:
    """What the holder counted over one P2P phase of `records` GETs: every record served, under one
    lease each over NIXL (LEASE, READ, RELEASE) and under none over TCP (GET). Raises otherwise."""
    leases = after.get("p2p_leases", 0) - before.get("p2p_leases", 0)
    served = after.get("p2p_served_chunks", 0) - before.get("p2p_served_chunks", 0)
    want = records if name == "p2p_nixl" else 0
    if served != records or leases != want:
        raise RuntimeError(f"{name}: the holder served {served} of {records} records under {leases} leases "
                           f"(expected {want}): not the path this row is named for")
    return {"leases": leases, "served_chunks": served}
