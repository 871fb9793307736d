"""Tests for kvtier/server/app.py (and __main__): a real `kvtier_server` process over TCP.

A raw protocol client (`Client`) speaks frames directly, so the tests can send what the tier never
would: pipelined bursts, malformed frames, missing tokens, 10,000 fuzzed frames. Servers come from
tests/kvtier_servers.py (the shared one, or one per test with its own config). Tests keep apart on
the shared server by namespace and count its STATS in deltas. Waits poll real state against a
deadline; nothing sleeps for synchronisation.
"""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import threading
import time

import pytest
import torch
from kvtier_servers import DEFAULTS, HELLO, TIMEOUT_S, Client, ServerProcess, raw_frame, record, start_failure
from waiting import wait_until

from kvtier.config import RemoteConfig, ServerConfig
from kvtier.keys import ChunkKey
from kvtier.metrics import Metrics
from kvtier.record import encode_header
from kvtier.server.app import KvtierServer
from kvtier.tiers.base import PutItem
from kvtier.tiers.remote import RemoteTier
from kvtier.wire.decoder import FrameDecoder
from kvtier.wire.frames import (
    MAX_ERROR_CHARS,
    MAX_FIELDS,
    Frame,
    Op,
    PutResult,
    Status,
    check_reply,
    encode,
)

DEADLINE_S = 20.0


@pytest.fixture
def ns() -> bytes:
    return os.urandom(8)


@pytest.fixture
def client(kvtier_server):
    c = Client(kvtier_server.port)
    yield c
    c.close()


def payloads_of(frame: Frame) -> list[bytes | None]:
    return [None if p is None else bytes(p) for p in frame.payloads]


# -- ops -----------------------------------------------------------------------------------------


def test_every_op_against_a_real_server(client, ns):
    recs = [record(ns, i) for i in range(3)]
    missing = record(ns, 99)[0]
    assert client.call(Op.PING).status is Status.OK

    assert client.put(recs) == [PutResult.STORED] * 3
    got = client.call(Op.GET, keys=[recs[0][0], missing, recs[2][0]])
    assert got.heads == [recs[0][1], None, recs[2][1]]
    assert payloads_of(got) == [recs[0][2], None, recs[2][2]]
    assert client.call(Op.EXISTS, keys=[recs[0][0], recs[1][0], missing, recs[2][0]]).count == 2
    assert client.call(Op.HAS, keys=[recs[0][0], missing, recs[2][0]]).flags == [1, 0, 1]
    assert client.call(Op.DELETE, keys=[recs[1][0], missing]).count == 1
    assert client.call(Op.HAS, keys=[r[0] for r in recs]).flags == [1, 0, 1]
    assert client.call(Op.CLEAR, namespaces=[ns]).count == 2
    assert client.call(Op.GET, keys=[r[0] for r in recs]).heads == [None] * 3
    stats = client.stats()
    assert len(stats) <= MAX_FIELDS  # (a client refuses a bigger map)
    assert {"requests_get", "bytes_in", "bytes_out", "hits", "misses", "evictions", "spills", "records",
            "bytes", "capacity", "connections", "errors", "bad_frames"} <= set(stats)


def test_pipelined_requests_are_answered_in_order_on_one_connection(client, ns):
    recs = [record(ns, i, size=1000 + i) for i in range(200)]
    ids = []
    for rec in recs:  # all sent before any reply is read
        ids.append(client.send(Op.PUT, [rec[2]], keys=[rec[0]], heads=[rec[1]]))
        ids.append(client.send(Op.GET, keys=[rec[0]]))
        ids.append(client.send(Op.EXISTS, keys=[rec[0], record(ns, 999)[0]]))

    replies = [client.receive() for _ in ids]

    assert [r.request_id for r in replies] == ids
    for i, rec in enumerate(recs):
        put, get, exists = replies[3 * i:3 * i + 3]
        assert put.flags == [PutResult.STORED]
        assert get.heads == [rec[1]] and payloads_of(get) == [rec[2]]
        assert exists.count == 1


def test_replies_beyond_the_high_water_mark_wait_for_the_client_and_stay_in_order(client, ns):
    big = record(ns, 1, size=8 << 20)
    client.put([big])
    ids = [client.send(Op.GET, keys=[big[0]]) for _ in range(24)]  # 192 MiB of replies, unread

    for rid in ids:  # the server paused past HIGH_WATER (64 MiB) and resumed as these drained
        got = client.receive()
        assert got.request_id == rid and got.heads == [big[1]] and bytes(got.payloads[0]) == big[2]


def test_invalid_record_is_refused_in_the_reply_and_not_stored(client, ns):
    key, head, payload = record(ns, 1)
    bad = bytearray(payload)
    bad[100] ^= 1
    before = client.stats()

    assert client.put([(key, head, bytes(bad))]) == [PutResult.INVALID]

    assert client.call(Op.HAS, keys=[key]).flags == [0]
    assert client.stats()["invalid"] == before["invalid"] + 1


def test_stats_count_requests_bytes_hits_and_misses(client, ns):
    rec = record(ns, 1, size=50_000)
    before = client.stats()
    client.put([rec])
    client.call(Op.GET, keys=[rec[0], record(ns, 2)[0]])
    after = client.stats()

    assert after["requests_put"] == before["requests_put"] + 1
    assert after["requests_get"] == before["requests_get"] + 1
    assert after["requests_stats"] == before["requests_stats"] + 1
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 1)
    assert after["bytes_in"] - before["bytes_in"] > 50_000
    assert after["bytes_out"] - before["bytes_out"] > 50_000
    assert after["connections"] >= 1 and after["capacity"] == 64 << 20


def test_traffic_is_logged_once_per_interval(kvtier_server, client):
    client.call(Op.PING)
    wait_until(lambda: "requests," in kvtier_server.log.read_text(), "a traffic log line", DEADLINE_S)


# -- bad input -----------------------------------------------------------------------------------


def test_malformed_frame_gets_an_error_reply_and_the_connection_goes_on(client):
    client.sock.sendall(raw_frame({"op": 42, "id": 77, "lens": [5]}, b"12345"))
    bad = client.receive()
    assert (bad.status, bad.request_id) == (Status.BAD_REQUEST, 77) and "op" in bad.error

    assert client.call(Op.PING).status is Status.OK


def test_unsyncable_stream_gets_an_error_reply_then_a_close(kvtier_server, client):
    client.sock.sendall(b"\xff\xff\xff\x7fnot a frame at all")

    assert client.receive().status is Status.BAD_REQUEST
    assert client.receive() is None  # closed
    other = Client(kvtier_server.port)
    assert other.call(Op.PING).status is Status.OK and kvtier_server.alive()
    other.close()


# -- token and connection limit ------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("guarded"),
                           {**DEFAULTS, "token": "s3cret", "max_connections": 3})
    yield server
    server.stop()


@pytest.mark.parametrize("token", [None, "wrong", "s3cret-but-longer", ""])
def test_a_missing_or_wrong_token_gets_unauthorized_and_a_close(guarded_server, token):
    c = Client(guarded_server.port, hello=False)
    reply = c.hello(token)

    assert reply.status is Status.UNAUTHORIZED and "token" in reply.error
    assert c.receive() is None
    c.close()


def test_the_right_token_is_served(guarded_server, ns):
    c = Client(guarded_server.port, token="s3cret")
    assert c.put([record(ns, 1)]) == [PutResult.STORED]
    assert c.call(Op.HAS, keys=[record(ns, 1)[0]]).flags == [1]
    c.close()


def test_connections_beyond_the_limit_get_busy_and_a_close(guarded_server):
    held = [Client(guarded_server.port, token="s3cret") for _ in range(3)]
    for c in held:
        assert c.call(Op.PING).status is Status.OK  # accepted and counted

    extra = Client(guarded_server.port, hello=False)
    busy = extra.hello("s3cret")
    assert busy.status is Status.BUSY and extra.receive() is None
    extra.close()

    held.pop().close()  # a slot frees once the server sees the close
    deadline = time.monotonic() + DEADLINE_S
    while True:
        c = Client(guarded_server.port, hello=False)
        reply = c.hello("s3cret")
        c.close()
        if reply is not None and reply.status is Status.OK:
            break
        assert time.monotonic() < deadline, "the freed slot was never reused"
    for c in held:
        c.close()


# -- capacity, fuzz, restart -----------------------------------------------------------------------


def test_server_at_capacity_evicts_instead_of_failing_puts(start_kvtier_server, ns):
    server = start_kvtier_server(capacity="1MiB")
    c = Client(server.port)
    recs = [record(ns, i, size=64 << 10) for i in range(40)]  # 2.5 MiB in all

    flags = [c.put(recs[i:i + 4]) for i in range(0, 40, 4)]

    assert flags == [[PutResult.STORED] * 4] * 10
    stats = c.stats()
    assert stats["bytes"] <= 1 << 20 and stats["evictions"] >= 24
    present = c.call(Op.HAS, keys=[r[0] for r in recs]).flags
    assert present[-1] == 1 and present[0] == 0  # the oldest went first
    assert present == sorted(present)
    c.close()


FUZZ_FRAMES = 10_000
FUZZ_CONNECTIONS = 4


def fuzz_frames(rng: random.Random, n: int, ns: bytes):
    """(frame bytes, hang up after it) pairs in a seeded mix: random bytes, valid frames with a
    corrupted field, truncated frames, huge lengths, bad records and well-formed requests. A client
    hangs up after what leaves the stream unsyncable or mid-frame, so the next one starts clean."""
    key, head, payload = record(ns, 0, size=2000)
    for _ in range(n):
        kind = rng.randrange(6)
        if kind == 0:
            yield rng.randbytes(rng.randrange(1, 300)), True
        elif kind == 1:
            fields = {"op": int(Op.PUT), "id": rng.randrange(2**32), "keys": [bytes(key)], "heads": [head],
                      "lens": [len(payload)]}
            name = rng.choice(sorted(fields))
            fields[name] = rng.choice([None, -1, 99, "x", b"y" * 25, [1.5], {"a": 1}, [b"z" * 24, None]])
            yield raw_frame(fields, payload), name == "lens"
        elif kind == 2:
            data = b"".join(bytes(b) for b in encode(Frame(Op.PUT, 1, keys=[key], heads=[head]), [payload]))
            yield data[:rng.randrange(1, len(data))], True
        elif kind == 3:
            yield rng.choice([struct.pack("<I", 0xFFFFFFF0),
                              raw_frame({"op": int(Op.GET), "id": 1, "lens": [2**63]}),
                              raw_frame({"op": int(Op.PUT), "id": 1, "keys": [bytes(key)], "heads": [head],
                                         "lens": [3 << 20]}, b"partial")]), True
        elif kind == 4:
            bad = bytearray(payload)
            bad[rng.randrange(len(bad))] ^= 0xFF
            yield b"".join(bytes(b) for b in encode(Frame(Op.PUT, 2, keys=[key], heads=[head]), [bad])), False
        else:
            op = rng.choice([Op.GET, Op.HAS, Op.EXISTS, Op.PING, Op.STATS, Op.DELETE])
            keys = [] if op in (Op.PING, Op.STATS) else [os.urandom(24) for _ in range(rng.randrange(5))]
            yield b"".join(bytes(b) for b in encode(Frame(op, 3, keys=keys))), False


def fuzz_connection(port: int, seed: int, ns: bytes, sent: list[int]) -> None:
    """Send fuzz frames, draining replies without ever waiting for one; reconnect after a hang-up
    or when the server closed the connection."""
    sock = None
    for data, hang_up in fuzz_frames(random.Random(seed), FUZZ_FRAMES // FUZZ_CONNECTIONS, ns):
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
            data = HELLO + data
        try:
            sock.sendall(data)
            while select.select([sock], [], [], 0)[0]:
                if not sock.recv(1 << 20):
                    raise ConnectionResetError("closed by the server")
        except OSError:  # the server closed it after a fatal frame
            hang_up = True
        if hang_up:
            sock.close()
            sock = None
        sent[0] += 1
    if sock is not None:
        sock.close()


def test_fuzzed_frames_never_stop_the_server_or_its_good_clients(start_kvtier_server, ns):
    server = start_kvtier_server(capacity="32MiB", max_frame_bytes="4MiB")
    good = Client(server.port)
    good.put([record(ns, 1)])  # warm up before measuring memory
    rss_before = server.rss_bytes()
    sent = [0]
    threads = [threading.Thread(target=fuzz_connection, args=(server.port, seed, ns, sent))
               for seed in range(FUZZ_CONNECTIONS)]
    for t in threads:
        t.start()

    checked = 0
    while any(t.is_alive() for t in threads) or checked < 20:
        rec = record(ns, 100 + checked % 50, size=8192 + checked)
        assert good.put([rec]) == [PutResult.STORED]
        got = good.call(Op.GET, keys=[rec[0]])
        assert got.heads == [rec[1]] and payloads_of(got) == [rec[2]]
        checked += 1
    for t in threads:
        t.join()

    assert sent[0] == FUZZ_FRAMES and server.alive()
    stats = good.stats()
    assert stats["bad_frames"] > FUZZ_FRAMES // 6 and stats["errors"] == 0
    assert stats["bytes"] <= 32 << 20
    assert server.rss_bytes() < rss_before + (32 << 20) + (200 << 20)
    assert good.call(Op.PING).status is Status.OK
    good.close()


def test_tier_degrades_to_misses_and_recovers_when_the_server_restarts(start_kvtier_server, ns):
    server = start_kvtier_server()
    metrics = Metrics(["remote"])
    tier = RemoteTier(RemoteConfig(url=server.url, timeout_s=2.0, retry_after_s=0.05, retry_max_s=0.2),
                      ns, metrics)
    key, head, payload = record(ns, 1)
    item = PutItem(key, head, torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dest = torch.empty(len(payload), dtype=torch.uint8)
    assert tier.put([item]) == [True] and tier.get([key], [dest])[0] is not None

    server.kill()
    assert tier.get([key], [dest]) == [None] and tier.has([key]) == [False]
    assert tier.put([item]) == [False] and tier.remove([key]) == 0
    assert metrics.value("kvtier_tier_errors_total", {"tier": "remote"}) >= 1

    server.start()  # same port, empty store
    # The back-off lets a probe through every 50-200 ms.
    wait_until(lambda: tier.put([item]) == [True], "the tier never came back", DEADLINE_S)
    header = tier.get([key], [dest])[0]
    assert header is not None and bytes(dest.numpy()) == payload

    tier.close()
    assert server.stop() == 0  # SIGTERM: a graceful exit
    assert "shutting down" in server.log.read_text()


def test_server_spills_what_it_evicts_and_serves_it_back(start_kvtier_server, tmp_path, ns):
    spill = {"path": str(tmp_path / "spill"), "capacity": "4MiB"}
    server = start_kvtier_server(capacity="256KiB", spill=spill)
    c = Client(server.port)
    recs = [record(ns, i, size=60_000) for i in range(12)]  # 720 kB: most of it spills

    assert c.put(recs) == [PutResult.STORED] * 12
    got = c.call(Op.GET, keys=[r[0] for r in recs])

    assert payloads_of(got) == [r[2] for r in recs]
    stats = c.stats()
    assert stats["spills"] >= 8 and stats["spill_hits"] >= 8 and stats["bytes"] <= 256 << 10
    assert stats["spill_records"] > 0 and list((tmp_path / "spill" / ns.hex()).rglob("*.kvr"))
    c.close()


def test_server_moves_and_spills_records_without_loading_torch(start_kvtier_server, tmp_path, ns):
    # Regression: kvtier_server imported torch through kvtier/__init__ and the spill's tensor
    # wrappers, 270 MiB of RSS for a process that only moves bytes.
    spill = {"path": str(tmp_path / "spill"), "capacity": "4MiB"}
    server = start_kvtier_server(capacity="256KiB", spill=spill)
    c = Client(server.port)
    recs = [record(ns, i, size=60_000) for i in range(12)]  # most of it spills and is read back

    assert c.put(recs) == [PutResult.STORED] * 12
    assert payloads_of(c.call(Op.GET, keys=[r[0] for r in recs])) == [r[2] for r in recs]
    assert c.stats()["spill_hits"] >= 8
    c.close()

    maps = open(f"/proc/{server.pid}/maps").read()
    assert "libtorch" not in maps and "/torch/" not in maps
    assert server.rss_bytes() < 150 << 20


@pytest.mark.parametrize("flags, message", [
    (("--host", "", "--port", "0"), "host: must not be empty"),
    (("--host", "127.0.0.1", "--port", "70000"), "port: must be <= 65535"),
], ids=["empty_host", "port_out_of_range"])
def test_command_line_flags_are_checked_like_the_config_file(tmp_path, flags, message):
    # Regression: --host "" bypassed validation and bound every interface (0.0.0.0).
    done = start_failure(tmp_path, {}, flags)

    assert done.returncode == 2 and "listening" not in done.stdout
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "cache.example"])
def test_a_server_reachable_from_other_machines_refuses_to_start_without_a_token(tmp_path, host):
    # Fail closed: binding beyond loopback with auth off served anyone who could connect.
    done = start_failure(tmp_path, {"host": host, "token": None})

    assert done.returncode == 2 and "listening" not in done.stdout
    assert "no token is set" in done.stderr


# -- limits: a reply over the header limit, tiny records, a bad spill path ------------------------


def test_a_reply_over_the_header_limit_is_answered_bad_request_not_raised(ns):
    server = KvtierServer(ServerConfig(capacity=1 << 20))
    key, head, payload = record(ns, 1)
    server.store.put(bytes(key), head, memoryview(payload))
    # (The decoder refuses this many keys: built here, it reaches the reply path as a bug would.)
    get = Frame(Op.GET, 7, keys=[bytes(key)] * 300_000)

    buffers, close = server.handle(get)

    answer = FrameDecoder(1 << 30, check=check_reply)
    answer.feed(b"".join(bytes(b) for b in buffers))
    frame = answer.next_frame()
    assert (frame.status, frame.request_id, close) == (Status.BAD_REQUEST, 7, False)
    assert "header" in frame.error and len(frame.error) <= MAX_ERROR_CHARS


def tiny_records(ns: bytes, start: int, n: int):
    """n valid records of 0-16 payload bytes (fp16 shapes [2, 1, 1, 0..4])."""
    for i in range(start, start + n):
        key = ChunkKey(ns, i.to_bytes(16, "little"))
        payload = bytes(4 * (i % 5))
        yield key, encode_header(key, (2, 1, 1, i % 5), torch.float16, payload), payload


def test_tiny_records_stay_within_the_capacity_in_real_memory(start_kvtier_server, ns):
    capacity = 8 << 20
    server = start_kvtier_server(capacity=capacity)
    c = Client(server.port)
    c.put(list(tiny_records(ns, 0, 1000)))  # warm up before measuring memory
    rss_before = server.rss_bytes()

    for start in range(1000, 201_000, 1000):  # 200,000 records: ~15 MB of heads and payloads
        assert set(c.put(list(tiny_records(ns, start, 1000)))) == {PutResult.STORED}

    stats = c.stats()
    grown = server.rss_bytes() - rss_before
    assert stats["bytes"] <= capacity and stats["evictions"] > 0
    assert grown < 2 * capacity, f"{stats['records']} records grew RSS by {grown >> 20} MiB"
    c.close()


def test_a_spill_path_that_is_a_file_stops_the_server_at_start_with_one_clear_error(tmp_path):
    spill = tmp_path / "spill"
    spill.write_text("not a directory")

    done = start_failure(tmp_path, {"spill": {"path": str(spill), "capacity": "1MiB"}})

    assert done.returncode == 2 and done.stdout == ""
    assert "spill.path" in done.stderr and "not a directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_directory_in_place_of_a_spill_file_is_one_miss_in_a_batched_get(start_kvtier_server, tmp_path,
                                                                          ns):
    spill = tmp_path / "spill"
    server = start_kvtier_server(capacity="256KiB", spill={"path": str(spill), "capacity": "4MiB"})
    c = Client(server.port)
    recs = [record(ns, i, size=60_000) for i in range(8)]  # the first ones spill
    assert c.put(recs) == [PutResult.STORED] * 8
    victim = next(iter(sorted((spill / ns.hex()).rglob("*.kvr"))))
    victim.unlink()
    victim.mkdir()

    got = c.call(Op.GET, keys=[r[0] for r in recs])

    assert got.status is Status.OK
    served = [i for i, p in enumerate(payloads_of(got)) if p is not None]
    assert len(served) == 7 and all(payloads_of(got)[i] == recs[i][2] for i in served)
    assert c.call(Op.PING).status is Status.OK and server.alive()
    c.close()
