"""Tests for kvtier/tiers/remote.py: the kvtier_server client tier.

Against the real server process (tests/kvtier_servers.py): bit-exact round trips (also split into
many pipelined frames), has / remove / clear / usage, a buffer too small for its record, tokens, and
two CacheEngines in two processes sharing KV through the server. Against a fake server in a thread
(the real one validates every PUT, so it never serves a bad record): corrupt records are misses.
Against nothing at all: back-off. Recovery after a server restart is in tests/server/test_app.py.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import msgpack
import numpy as np
import pytest
import torch
from conftest import CHUNK, REPO, seeded_kv, seeded_tokens
from kvtier_servers import Client, record
from waiting import wait_until

from kvtier.config import RemoteConfig
from kvtier.errors import ConfigError
from kvtier.metrics import Metrics
from kvtier.tiers import remote
from kvtier.tiers.base import PutItem
from kvtier.tiers.remote import RemoteTier, parse_url
from kvtier.wire.decoder import FrameDecoder
from kvtier.wire.frames import Op, PutResult, check_request, encode, reply

TESTS = REPO / "tests"


def counter(metrics: Metrics, name: str) -> int:
    return int(metrics.value(f"kvtier_tier_{name}_total", {"tier": "remote"}))


def put_item(ns: bytes, i: int, size: int = 4096) -> PutItem:
    key, head, payload = record(ns, i, size)
    return PutItem(key, head, torch.frombuffer(bytearray(payload), dtype=torch.uint8))


def slab(size: int) -> torch.Tensor:
    """A destination like the memory pool's: larger than the payload, garbage-filled."""
    return torch.full((size + 4096,), 0xAB, dtype=torch.uint8)


@pytest.fixture
def ns() -> bytes:
    return os.urandom(8)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(["remote"])


@pytest.fixture
def make_tier(metrics):
    tiers = []

    def make(url: str, ns: bytes, **config) -> RemoteTier:
        tiers.append(RemoteTier(RemoteConfig(url=url, **{"timeout_s": 5.0, **config}), ns, metrics))
        return tiers[-1]

    yield make
    for tier in tiers:
        tier.close()


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 4096, 5000, 3 << 20], ids=lambda s: f"{s}B")
def test_round_trip_is_bit_exact(kvtier_server, make_tier, metrics, ns, size):
    tier = make_tier(kvtier_server.url, ns)
    items = [put_item(ns, i, size) for i in range(3)]
    missing = put_item(ns, 99).key

    assert tier.put(items) == [True] * 3
    dests = [slab(size) for _ in range(4)]
    headers = tier.get([items[0].key, missing, items[1].key, items[2].key], dests)

    assert headers[1] is None
    for item, header, dest in zip(items, [headers[0], headers[2], headers[3]], [dests[0], *dests[2:]]):
        assert header.key == item.key and header.payload_len == size
        assert torch.equal(dest[:size], item.payload)
        assert torch.all(dest[size:] == 0xAB)  # nothing written past the payload
    assert counter(metrics, "bytes_read") == counter(metrics, "bytes_written") == 3 * size
    assert counter(metrics, "errors") == counter(metrics, "corrupt") == 0


def test_numpy_payloads_and_destinations_as_the_tier_contract_allows(kvtier_server, make_tier, metrics, ns):
    """Bug: the Tier contract (kvtier/tiers/base.py) lets payloads and `dests` be numpy arrays, as
    the disk and Redis tiers take them; put() and get() called `.numel()` and raised AttributeError."""
    tier = make_tier(kvtier_server.url, ns)
    items = [put_item(ns, i) for i in range(2)]
    items = [PutItem(item.key, item.header, item.payload.numpy()) for item in items]

    assert tier.put(items) == [True, True]
    dests = [np.full(4096 + 512, 0xEE, dtype=np.uint8) for _ in items]
    headers = tier.get([item.key for item in items], dests)

    assert all(h is not None for h in headers)
    assert all(np.array_equal(d[:4096], item.payload) for d, item in zip(dests, items))
    assert all((d[4096:] == 0xEE).all() for d in dests)
    assert counter(metrics, "bytes_written") == counter(metrics, "bytes_read") == 2 * 4096


def test_batches_split_into_many_pipelined_frames(kvtier_server, make_tier, ns, monkeypatch):
    monkeypatch.setattr(remote, "BATCH_BYTES", 10_000)
    monkeypatch.setattr(remote, "MAX_KEYS", 3)
    tier = make_tier(kvtier_server.url, ns, connections=1)
    items = [put_item(ns, i, 3000 + i) for i in range(25)]

    assert tier.put(items) == [True] * 25
    dests = [slab(4096) for _ in items]
    headers = tier.get([item.key for item in items], dests)

    assert all(h is not None and torch.equal(d[:h.payload_len], item.payload)
               for h, d, item in zip(headers, dests, items))
    assert tier.has([item.key for item in items] + [put_item(ns, 99).key]) == [True] * 25 + [False]


def test_has_remove_clear_and_usage(kvtier_server, make_tier, ns):
    tier = make_tier(kvtier_server.url, ns)
    other = make_tier(kvtier_server.url, os.urandom(8))
    items = [put_item(ns, i) for i in range(4)]
    tier.put(items)
    kept = put_item(other.namespace, 1)
    other.put([kept])
    keys = [item.key for item in items]

    assert tier.has(keys) == [True] * 4
    assert tier.remove(keys[:2] + [put_item(ns, 50).key]) == 2
    assert tier.has(keys) == [False, False, True, True]
    usage = tier.usage()
    assert usage.chunks >= 3 and usage.bytes >= 3 * 4096 and usage.capacity_bytes == 64 << 20

    tier.clear()  # this namespace only
    assert tier.has(keys) == [False] * 4
    assert other.has([kept.key]) == [True]
    assert tier.has([]) == [] and tier.get([], []) == [] and tier.put([]) == [] and tier.remove([]) == 0


def test_record_larger_than_its_buffer_is_corrupt_and_removed(kvtier_server, make_tier, metrics, ns):
    tier = make_tier(kvtier_server.url, ns)
    item = put_item(ns, 1, size=10_000)
    tier.put([item])
    small = torch.zeros(4096, dtype=torch.uint8)

    assert tier.get([item.key], [small]) == [None]

    assert counter(metrics, "corrupt") == 1 and not small.any()
    assert tier.has([item.key]) == [False]


def test_token_is_sent_and_a_wrong_one_fails_like_a_dead_server(start_kvtier_server, make_tier, metrics, ns):
    server = start_kvtier_server(token="s3cret")
    good = make_tier(server.url, ns, token="s3cret")
    bad = make_tier(server.url, ns, token="guess", retry_after_s=60.0)
    item = put_item(ns, 1)

    assert good.put([item]) == [True] and good.has([item.key]) == [True]
    assert bad.has([item.key]) == [False] and bad.put([item]) == [False]
    assert counter(metrics, "errors") == 1  # the second call was answered by the back-off


def remote_log(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvtier.tiers.remote" and r.levelno == level]


def test_a_wrong_token_is_a_configuration_error_logged_once_and_not_retried_per_call(start_kvtier_server,
                                                                                    make_tier, metrics, ns,
                                                                                    caplog):
    # Before: a wrong token was an outage, retried after retry_after_s (here 0: every call), each
    # retry a new connection and HELLO, a warning per outage. Now the tier stays a miss without
    # contacting the server and asks again once per retry_max_s.
    caplog.set_level(logging.INFO, "kvtier.tiers.remote")
    server = start_kvtier_server(token="s3cret")
    good = make_tier(server.url, ns, token="s3cret")
    bad = make_tier(server.url, ns, token="guess", retry_after_s=0.0, retry_max_s=60.0)
    item = put_item(ns, 1)
    assert good.put([item]) == [True]

    for _ in range(20):
        assert bad.has([item.key]) == [False] and bad.put([item]) == [False]
        assert bad.get([item.key], [slab(4096)]) == [None]

    assert good.stats()["unauthorized"] == 1  # one HELLO reached the server, not 60
    assert counter(metrics, "errors") == 1
    (error,) = remote_log(caplog, logging.ERROR)
    assert "UNAUTHORIZED" in error and "wrong token" in error and "every 60 s" in error
    assert not any("unavailable" in line for line in remote_log(caplog, logging.WARNING))


def test_a_pooled_connection_the_server_closed_when_idle_is_replaced_not_an_error(start_kvtier_server,
                                                                                make_tier, metrics, ns):
    server = start_kvtier_server(idle_timeout_s=0.3)
    tier = make_tier(server.url, ns)
    item = put_item(ns, 1)
    assert tier.put([item]) == [True]  # its connection goes back to the pool, idle
    def closed_by_server() -> int:
        probe = Client(server.port)
        closed = probe.stats()["idle_timeouts"]
        probe.close()
        return closed

    wait_until(closed_by_server, "the server closed the idle pooled connection")

    assert tier.has([item.key]) == [True] and tier.put([item]) == [True]
    assert counter(metrics, "errors") == 0


# -- corrupt records from a misbehaving server ---------------------------------------------------


class FakeServer:
    """Serves whatever `served` maps a key to (header, payload), unchecked; records requests."""

    def __init__(self, served: dict[bytes, tuple[bytes, bytes]]):
        self.served = served
        self.ops: list[Op] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"kvtier://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                decoder = FrameDecoder(1 << 30, check=check_request)
                while data := conn.recv(1 << 20):
                    decoder.feed(data)
                    while (frame := decoder.next_frame()) is not None:
                        self.ops.append(frame.op)
                        for buf in self._answer(frame):
                            conn.sendall(buf)

    def _answer(self, frame) -> list:
        if frame.op is Op.GET:
            found = [self.served.get(bytes(k)) for k in frame.keys]
            return encode(reply(frame, heads=[f[0] if f else None for f in found]),
                          [f[1] if f else None for f in found])
        if frame.op in (Op.PUT, Op.HAS):
            return encode(reply(frame, flags=[PutResult.STORED] * len(frame.keys)))
        return encode(reply(frame, count=len(frame.keys)))

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def _flipped(payload: bytes) -> bytes:
    out = bytearray(payload)
    out[123] ^= 0x10
    return bytes(out)


CORRUPT = {
    "flipped payload bit": lambda ns: (record(ns, 1)[1], _flipped(record(ns, 1)[2])),
    "another key's record": lambda ns: record(ns, 2)[1:],
    "short payload": lambda ns: (record(ns, 1)[1], record(ns, 1)[2][:-8]),
    "garbage header": lambda ns: (b"KVTR" + bytes(64), record(ns, 1)[2]),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_record_is_a_miss_counted_and_deleted(make_tier, metrics, ns, name):
    key = record(ns, 1)[0]
    fake = FakeServer({bytes(key): CORRUPT[name](ns)})
    tier = make_tier(fake.url, ns)
    dest = slab(4096)

    assert tier.get([key], [dest]) == [None]

    assert counter(metrics, "corrupt") == 1 and counter(metrics, "errors") == 0
    assert fake.ops == [Op.HELLO, Op.GET, Op.DELETE]
    fake.close()


# -- failures ------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_unreachable_server_is_misses_then_back_off_without_connecting(make_tier, metrics, ns):
    tier = make_tier(f"kvtier://127.0.0.1:{_closed_port()}", ns, retry_after_s=60.0)
    item = put_item(ns, 1)

    assert tier.get([item.key], [slab(4096)]) == [None]
    assert counter(metrics, "errors") == 1
    for _ in range(50):  # backing off: answered at once, no connection attempted (no new errors)
        assert tier.get([item.key], [slab(4096)]) == [None]
        assert tier.has([item.key]) == [False] and tier.put([item]) == [False]
        assert tier.remove([item.key]) == 0
    assert counter(metrics, "errors") == 1
    assert tier.usage().chunks == 0


@pytest.mark.parametrize("url", ["redis://127.0.0.1:7000", "kvtier://127.0.0.1", "kvtier://:7000",
                                 "kvtier://host:port", "kvtier://host:7000/db"])
def test_bad_url_is_a_config_error(url):
    with pytest.raises(ConfigError, match="kvtier://host:port"):
        parse_url(url)


# -- two engines, two processes ------------------------------------------------------------------

WRITER = """
import sys
sys.path.insert(0, {tests!r})
from conftest import CHUNK, REPO, seeded_kv, seeded_tokens, small_layout
from kvtier import CacheEngine, load_config

env = {{"KVTIER_REMOTE__URL": {url!r}, "KVTIER_DISK": "null", "KVTIER_CHUNK_SIZE": str(CHUNK),
       "KVTIER_CPU__CAPACITY": "1MiB", "KVTIER_CPU__PIN_MEMORY": "off"}}
layout = small_layout()
with CacheEngine(load_config(REPO / "configs" / "remote.yaml", env=env), layout, {model!r}) as engine:
    print(engine.store(seeded_tokens(6 * CHUNK, 11), seeded_kv(layout, 6 * CHUNK, 11)))
    print(engine.flush(timeout=30))
"""


def test_a_second_engine_process_loads_what_the_first_stored_through_the_server(
        kvtier_server, make_engine, layout):
    model = f"shared-{uuid.uuid4().hex}"
    script = WRITER.format(tests=str(TESTS), url=kvtier_server.url, model=model)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "True"]

    engine = make_engine("remote", model_id=model, disk="null", remote__url=kvtier_server.url)
    tokens, expected = seeded_tokens(6 * CHUNK, 11), seeded_kv(layout, 6 * CHUNK, 11)
    assert engine.lookup(tokens) == 6 * CHUNK
    got, n = engine.retrieve(tokens)

    assert n == 6 * CHUNK and torch.equal(got, expected)
    remote_stats = engine.stats()["tiers"]["remote"]
    assert remote_stats["hits"] == 6 and remote_stats["corrupt"] == remote_stats["errors"] == 0
    assert engine.stats()["tiers"]["cpu"]["misses"] == 6


def test_a_bad_url_error_never_shows_its_credentials():
    # Regression: the error quoted the whole URL, password included, into logs.
    with pytest.raises(ConfigError) as err:
        parse_url("kvtier://admin:s3cret@cache/0")

    assert "s3cret" not in str(err.value) and "admin" not in str(err.value)


# -- a server that stalls, trickles or lies about lengths ----------------------------------------


class ScriptedServer:
    """Answers HELLO with OK, then hands every other request to `answer(conn, frame)`: a thread
    per connection, each ending when the client goes or the server is closed."""

    def __init__(self, answer):
        self.answer = answer
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"kvtier://127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = FrameDecoder(1 << 30, check=check_request)
        with conn:
            try:
                while not self.closed.is_set() and (data := conn.recv(1 << 20)):
                    decoder.feed(data)
                    while (frame := decoder.next_frame()) is not None:
                        if frame.op is Op.HELLO:
                            conn.sendall(b"".join(bytes(b) for b in encode(reply(frame, version=1))))
                        else:
                            self.answer(conn, frame, self.closed)
            except OSError:  # the client gave up on us: what the tests want
                return

    def close(self) -> None:
        self.closed.set()
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:  # (their threads wait in recv for a client that may keep them pooled)
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:  # closed already: its client went
                pass
        for thread in self.threads:
            thread.join(timeout=10.0)


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


def test_a_server_that_trickles_its_reply_cannot_hold_a_call_past_its_deadline(make_tier, metrics, ns):
    # A byte every 50 ms never trips a 0.5 s socket timeout; before the fix the call waited for
    # the whole reply (~2,100 bytes: ~100 s). The call's deadline is timeout_s + its bytes at 1 MiB/s.
    key, head, payload = record(ns, 1)

    def trickle(conn, frame, closed):
        data = b"".join(bytes(b) for b in encode(reply(frame, heads=[head]), [payload]))
        for i in range(len(data)):
            if closed.wait(0.05):  # the trickle's pace (and its way out)
                return
            conn.sendall(data[i:i + 1])

    server = ScriptedServer(trickle)
    tier = make_tier(server.url, ns, timeout_s=0.5)
    started = time.monotonic()

    assert tier.get([key], [slab(4096)]) == [None]

    assert time.monotonic() - started < 3.0
    assert counter(metrics, "errors") == 1
    server.close()


def test_a_reply_announcing_a_huge_payload_allocates_nothing(make_tier, metrics, ns):
    # A GET reply header saying "a 2 GiB record follows", then nothing: before the fix the client
    # allocated (and zeroed) 2 GiB for it at once. Now a payload larger than its slab gets bounded,
    # lazily mapped scratch, and one past SCRATCH_BYTES fails the call; payloads in replies other
    # than GET's are refused outright.
    key, head, _ = record(ns, 1)

    def liar(conn, frame, closed):
        fields = {"op": int(frame.op), "id": frame.request_id, "status": 0, "lens": [2 << 30]}
        if frame.op is Op.GET:
            fields["heads"] = [head]
        else:
            fields["flags"], fields["heads"] = [1] * len(frame.keys), [head]
        header = msgpack.packb(fields, use_bin_type=True)
        conn.sendall(len(header).to_bytes(4, "little") + header)
        closed.wait(10.0)  # then stall: the client must not wait for the 2 GiB

    server = ScriptedServer(liar)
    tier = make_tier(server.url, ns, timeout_s=2.0, retry_after_s=0.0)
    before = _rss()
    started = time.monotonic()

    assert tier.get([key], [slab(4096)]) == [None]
    assert tier.has([key]) == [False]

    assert _rss() - before < 256 << 20
    assert time.monotonic() - started < 2.0  # refused on the header, not timed out
    assert counter(metrics, "errors") == 2
    server.close()


def test_a_call_that_waited_for_a_pooled_connection_still_has_its_whole_deadline(make_tier, metrics, ns):
    # One connection, two threads, a server that takes 0.6 s per answer and a 1 s timeout: the
    # second call waits ~0.6 s for the connection, then needs 0.6 s of its own. Its deadline runs
    # from when it gets the connection (the wait is the other call's, not the server's failing).
    key, head, payload = record(ns, 1)

    def slow(conn, frame, closed):
        closed.wait(0.6)  # the server's pace
        conn.sendall(b"".join(bytes(b) for b in encode(reply(frame, heads=[head]), [payload])))

    server = ScriptedServer(slow)
    tier = make_tier(server.url, ns, timeout_s=1.0, connections=1)
    results = [None, None]

    def get(i: int) -> None:
        results[i] = tier.get([key], [slab(4096)])[0]

    threads = [threading.Thread(target=get, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(r is not None and r.key == key for r in results)
    assert counter(metrics, "errors") == 0
    server.close()
