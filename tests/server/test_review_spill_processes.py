"""Attacks on real `kvtier_server` processes' spills found reviewing issue 9 (`kvtier.server.spill`):
one client writing records of many namespaces, two servers spilling into one directory, then a
restart on it. Guards as much as regressions: each asserts what a broken spill would violate."""

from __future__ import annotations

import os

from kvtier_servers import Client, record

from kvtier.wire.frames import Op, PutResult


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_client_writing_many_namespaces_cannot_take_the_servers_file_descriptors(start_kvtier_server,
                                                                                  tmp_path):
    spill = {"path": str(tmp_path / "spill"), "capacity": "64MiB"}
    server = start_kvtier_server(capacity="64KiB", spill=spill)
    client = Client(server.port)
    before = open_fds(server.pid)
    recs = [record(os.urandom(8), 0, size=8 << 10) for _ in range(400)]  # a namespace each
    for i in range(0, len(recs), 8):
        assert client.put(recs[i:i + 8]) == [PutResult.STORED] * 8

    stats = client.stats()
    assert stats["spills"] >= 350 and stats["spill_errors"] == 0
    assert open_fds(server.pid) - before <= 70
    got = client.call(Op.GET, keys=[r[0] for r in recs[:8]])
    assert [bytes(p) for p in got.payloads] == [r[2] for r in recs[:8]]
    client.close()


def test_two_servers_spilling_into_one_directory_then_a_restart_serves_only_valid_records(
        start_kvtier_server, tmp_path):
    spill = {"path": str(tmp_path / "spill"), "capacity": "4MiB"}
    first, second = (start_kvtier_server(capacity="256KiB", spill=spill) for _ in range(2))
    ns = os.urandom(8)
    recs = [record(ns, i, size=64 << 10) for i in range(80)]
    clients = [Client(first.port), Client(second.port)]
    for i in range(0, len(recs), 4):  # both store every record: the same files, written twice
        for client in clients:
            assert client.put(recs[i:i + 4]) == [PutResult.STORED] * 4
    for client in clients:  # each serves what it has (a file the other evicted is a miss)
        got = client.call(Op.GET, keys=[r[0] for r in recs])
        assert all(p is None or bytes(p) == r[2] for p, r in zip(got.payloads, recs))
        assert client.stats()["spill_errors"] == 0
        client.close()
    first.proc.kill()
    first.proc.wait()
    first.proc.stdout.close()
    second.stop()

    first.start()
    client = Client(first.port)
    stats = client.stats()
    files = len(list((tmp_path / "spill").rglob("*.kvr")))
    got = client.call(Op.GET, keys=[r[0] for r in recs])

    assert stats["spill_records"] == files and stats["spill_bytes"] <= stats["spill_capacity"]
    assert all(p is None or bytes(p) == r[2] for p, r in zip(got.payloads, recs))
    assert client.stats()["spill_errors"] == 0 and not list((tmp_path / "spill").rglob("*.tmp.*"))
    client.close()
