"""Tests for the P2P rows of benchmarks/remote_throughput.py (holder: benchmarks/p2p_holder.py, reader
side: benchmarks/p2p_peers.py): one small case against real processes (redis-server, kvtier_server,
a P2P holder) gives every column, with each record verified in its slab and the holder's counters
proving the path (NIXL: one lease per record; TCP: none); a phase on the wrong path is refused.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import remote_throughput  # noqa: E402
from harness import progress_bar  # noqa: E402
from p2p_holder import seeded_records  # noqa: E402
from p2p_peers import HolderProcess, ReaderPool, check_path, holder_stats, quiet_nixl  # noqa: E402
from rich.console import Console  # noqa: E402
from services import kvtier_server_process, redis_process  # noqa: E402

from kvtier.p2p.nixl_transport import nixl_status  # noqa: E402

MiB = 1 << 20


def test_the_holder_serves_the_benchmarks_records_over_both_paths():
    """Bytes equal to the other stores' records, in the reader pool's slabs; the counters tell the paths."""
    quiet_nixl()
    count, clients = 6, 2
    with HolderProcess(MiB, count, seed=5) as process:
        items = remote_throughput.make_records(count, MiB, seed=5)
        assert [k for k, _ in seeded_records(count, MiB, 5)] == [item.key for item in items]
        readers = ReaderPool(MiB, count)
        holder = process.ready()
        slabs = readers.dests()
        shares = [items[i::clients] for i in range(clients)]
        dests = [slabs[i::clients] for i in range(clients)]
        path: dict = {}
        tiers = remote_throughput.p2p_tiers(readers, holder, clients, path)
        try:
            if nixl_status() is None:
                assert holder.nixl and set(tiers) == {"p2p_nixl", "p2p_tcp"}
            else:
                assert set(tiers) == {"p2p_tcp"} and path["nixl_missing"] == nixl_status()
            for name, group in tiers.items():
                for slab in slabs:
                    slab.fill_(0)
                # (the phase itself checks every slab against its record's payload)
                assert remote_throughput.p2p_phase(name, group, shares, dests, readers, holder.url, path) > 0
        finally:
            for group in tiers.values():
                for tier in group:
                    tier.close()
            readers.close()
        stats = holder_stats(holder.url)
    assert path["p2p_tcp"] == {"leases": 0, "served_chunks": count}
    if "p2p_nixl" in tiers:
        assert path["p2p_nixl"] == {"leases": count, "served_chunks": count}
        assert stats["leases_active"] == 0 and stats["released_chunks"] == count


def test_without_nixl_the_nixl_column_says_why(monkeypatch):
    import kvtier.p2p.nixl_transport as nixl_transport

    monkeypatch.setattr(nixl_transport, "nixl_status", lambda: "stand-in: NIXL cannot load")
    with HolderProcess(MiB, 2, seed=6, nixl=False) as process:
        readers = ReaderPool(MiB, 2)
        holder = process.ready()
        path: dict = {}
        tiers = remote_throughput.p2p_tiers(readers, holder, 1, path)
        for tier in tiers["p2p_tcp"]:
            tier.close()
        readers.close()
    assert not holder.nixl and holder.why == "the holder was started for TCP"
    assert readers.endpoint is None and set(tiers) == {"p2p_tcp"}
    assert path == {"nixl_missing": "stand-in: NIXL cannot load"}


def test_a_phase_on_the_wrong_path_is_refused():
    tcp_like = {"p2p_leases": 0, "p2p_served_chunks": 4}
    with pytest.raises(RuntimeError, match="not the path"):
        check_path("p2p_nixl", {}, tcp_like, 4)  # served, but never leased: TCP
    with pytest.raises(RuntimeError, match="not the path"):
        check_path("p2p_tcp", {}, {"p2p_leases": 4, "p2p_served_chunks": 4}, 4)
    with pytest.raises(RuntimeError, match="2 of 4 records"):
        check_path("p2p_tcp", {}, {"p2p_served_chunks": 2}, 4)
    assert check_path("p2p_tcp", {"p2p_served_chunks": 1}, {"p2p_served_chunks": 5}, 4) == {
        "leases": 0, "served_chunks": 4}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_one_case_fills_every_column(tmp_path):
    """As --quick runs each case, smaller: PUT rows have no P2P columns, GET rows have them all."""
    quiet_nixl()
    args = argparse.Namespace(total_mib=8, reps=1)
    with redis_process(tmp_path) as redis_url, kvtier_server_process(tmp_path, 64 * MiB) as server_url, \
            progress_bar(Console(file=io.StringIO())) as progress:
        task = progress.add_task("test", total=4)
        stores = remote_throughput.store_clients(redis_url, server_url)
        put, get = remote_throughput.measure_case(args, stores, 4, 2, progress, task)
    assert (put.op, get.op) == ("put", "get")
    assert put.p2p_nixl_gbps is put.p2p_tcp_gbps is put.p2p_path is None
    assert min(put.redis_gbps, put.server_gbps, get.redis_gbps, get.server_gbps, get.p2p_tcp_gbps) > 0
    assert get.tcp_ratio == get.p2p_tcp_gbps / get.server_gbps
    assert get.p2p_path["p2p_tcp"] == {"leases": 0, "served_chunks": 2}
    if nixl_status() is None:
        assert get.p2p_nixl_gbps > 0 and get.p2p_path["p2p_nixl"] == {"leases": 2, "served_chunks": 2}
    else:
        assert get.p2p_nixl_gbps is None and get.p2p_path["nixl_missing"]
    assert get.nixl_pass is None  # the target is on 32 MiB records
