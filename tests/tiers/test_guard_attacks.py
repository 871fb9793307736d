"""Review attacks on the network tiers' shared failure guard (kvtier/tiers/backoff.py) through the
remote and Redis tiers, each test named after the bug it pinned. Real kvtier_server and redis-server
processes (tests/kvtier_servers.py, tests/redis_servers.py); FakeClock where time matters."""

from __future__ import annotations

import logging
import socket
import threading
import time

import test_remote
import torch
from kvtier_servers import Client, record
from test_redis import counters, keys_of, records
from test_remote import counter, put_item
from waiting import wait_until

from kvtier.config import RedisConfig
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.tiers import remote
from kvtier.tiers.backoff import Backoff, Failure, FailureGuard
from kvtier.tiers.redis import RedisTier
from kvtier.wire.decoder import FrameDecoder
from kvtier.wire.frames import Op, Status, check_request, encode, reply

# The fixtures of test_remote.py, used here by name.
ns, metrics, make_remote = test_remote.ns, test_remote.metrics, test_remote.make_tier


def logged(caplog, name: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno == level]


# -- kvtier_server -------------------------------------------------------------------------------


def test_one_oversized_batch_refused_does_not_switch_the_tier_off(start_kvtier_server, make_remote,
                                                                  metrics, ns, caplog):
    # Bug: a BAD_REQUEST to one request (here a PUT frame over the server's max_frame_bytes) was
    # classified as the client being misconfigured, so the tier held back for retry_max_s: every
    # lookup, get and small put of a healthy server was a miss for a minute because of one record.
    # A refusal of one request shape costs that request; the tier stays up for the others.
    caplog.set_level(logging.INFO, "kvtier.tiers.remote")
    server = start_kvtier_server(max_frame_bytes="1MiB")
    tier = make_remote(server.url, ns, retry_after_s=0.0, retry_max_s=60.0)
    big, small = put_item(ns, 1, size=48 << 20), put_item(ns, 2)

    assert [tier.put([big]) for _ in range(3)] == [[False]] * 3
    assert tier.put([small]) == [True] and tier.has([small.key, big.key]) == [True, False]

    probe = Client(server.port)
    assert probe.stats()["bad_frames"] == 3  # each big PUT reached the server; nothing held back
    probe.close()
    assert counter(metrics, "errors") == 3  # one chunk per refused PUT
    (warning,) = logged(caplog, "kvtier.tiers.remote", logging.WARNING)  # at most a line a minute
    assert "BAD_REQUEST" in warning and "frame limit" in warning
    assert logged(caplog, "kvtier.tiers.remote", logging.ERROR) == []
    assert not any("is back" in line for line in logged(caplog, "kvtier.tiers.remote", logging.INFO))


def test_a_refusal_after_an_accepted_frame_of_the_same_call_is_not_an_outage(start_kvtier_server, make_remote,
                                                                            metrics, ns, monkeypatch):
    # Bug: when a PUT's send failed because the server refused a frame and closed, the client read
    # only the first reply it had been sent: here the OK to the call's first, small frame. So the
    # refusal of the second (over max_frame_bytes) was taken for a reset connection, an outage:
    # the tier backed off (60 s here) and dropped its idle connections.
    monkeypatch.setattr(remote, "BATCH_BYTES", 1 << 20)  # the small and the big record: two frames
    server = start_kvtier_server(max_frame_bytes="1MiB")
    tier = make_remote(server.url, ns, retry_after_s=60.0, retry_max_s=60.0)
    small, big = put_item(ns, 1), put_item(ns, 2, size=48 << 20)

    assert tier.put([small, big]) == [False, False]
    assert tier.has([small.key, big.key]) == [True, False]  # the server stored the first frame's
    assert counter(metrics, "errors") == 2


def test_the_remote_tiers_log_lines_name_its_url_not_a_type(make_remote, metrics, ns, caplog):
    # Bug: the guard's label was built with redact_url, which formats a value for a ConfigError
    # ("str 'kvtier://...'"), so every outage line read "remote tier str 'kvtier://h:p' unavailable".
    caplog.set_level(logging.INFO, "kvtier.tiers.remote")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    tier = make_remote(f"kvtier://127.0.0.1:{port}", ns, timeout_s=1.0)

    assert tier.has([put_item(ns, 1).key]) == [False]

    (warning,) = logged(caplog, "kvtier.tiers.remote", logging.WARNING)
    assert warning.startswith(f"remote tier kvtier://127.0.0.1:{port} unavailable (")


# -- the guard under concurrency -----------------------------------------------------------------


def test_calls_in_flight_when_the_medium_fails_do_not_lengthen_the_back_off(clock, caplog):
    # Bug: each failure lengthened the delay, including those of calls that were already in flight
    # when the medium went down. 8 I/O threads on a Redis that restarts took the delay from 1 s to
    # its 8 s cap at once (30 s by default: the tier stayed off for 30 s after a 1 s blip). Only a
    # failed probe, a call let through while backing off, says the outage goes on.
    errors: list[int] = []
    guard = FailureGuard("test tier", Backoff(1.0, 8.0, clock=clock), errors.append,
                         LogLimiter(logging.getLogger("test_guard"), clock=clock), _outage_only)
    inside = threading.Barrier(8)

    def in_flight():
        inside.wait(timeout=10)  # all 8 calls are in their round trip when the medium goes
        raise ConnectionError("reset by peer")

    threads = [threading.Thread(target=guard.call, args=(2, in_flight)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert errors == [2] * 8  # every in-flight call counted, per chunk
    clock.now += 1.0  # the first delay: one probe, which fails
    assert guard.call(1, _raise(ConnectionError("still down"))) is None
    clock.now += 1.9
    assert guard.call(1, lambda: "up") is None  # the failed probe doubled the delay to 2 s
    clock.now += 0.1
    assert guard.call(1, lambda: "up") == "up"
    warnings = [r for r in caplog.records if r.name == "test_guard" and r.levelno == logging.WARNING]
    assert len(warnings) == 1


def _outage_only(exc: Exception) -> Failure | None:
    return Failure.OUTAGE if isinstance(exc, ConnectionError) else None


def _raise(exc: Exception):
    def round_trip():
        raise exc
    return round_trip


# -- a server that refuses some HELLOs -----------------------------------------------------------


class FlakyAuthServer:
    """Answers HELLO #n with `status` (and a close) when `refuse(n)`, else OK; a HAS with all
    flags set, after `gate` opens (`asked` is set when one is waiting)."""

    def __init__(self, refuse, status: Status = Status.UNAUTHORIZED):
        self.refuse, self.status, self.hellos = refuse, status, 0
        self.gate, self.asked = threading.Event(), threading.Event()
        self.gate.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"kvtier://127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = FrameDecoder(1 << 20, check=check_request)
        with conn:
            try:
                while data := conn.recv(1 << 16):
                    decoder.feed(data)
                    while (frame := decoder.next_frame()) is not None:
                        if not self._answer(conn, frame):
                            return
            except OSError:
                return

    def _answer(self, conn: socket.socket, frame) -> bool:
        if frame.op is Op.HELLO:
            self.hellos += 1
            refused = self.refuse(self.hellos)
            answer = reply(frame, self.status, error="no") if refused else reply(frame)
            conn.sendall(b"".join(bytes(b) for b in encode(answer)))
            return not refused
        self.asked.set()
        self.gate.wait(timeout=10)
        conn.sendall(b"".join(bytes(b) for b in encode(reply(frame, flags=[1] * len(frame.keys)))))
        return True

    def close(self) -> None:
        self.gate.set()
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_a_server_that_refuses_only_some_hellos_logs_one_error_not_one_per_flap(make_remote, metrics, ns,
                                                                                caplog):
    # Bug: each refused HELLO began a new hold, and a call that was in flight on an authenticated
    # connection ended it when it succeeded ("is back"), so a server refusing some HELLOs (a token
    # rotated on one replica behind a balancer) logged an ERROR per flap, at call rate. And the
    # refusal discarded the pool's idle, authenticated connections, making the next calls open new
    # ones: more HELLOs, more refusals. Now: one ERROR a minute, and the idle connections stay.
    caplog.set_level(logging.INFO, "kvtier.tiers.remote")
    server = FlakyAuthServer(refuse=lambda n: n > 1)  # the first HELLO passes, the later ones not
    tier = make_remote(server.url, ns, connections=2, retry_after_s=0.0, retry_max_s=60.0)
    key = put_item(ns, 1).key
    assert tier.has([key]) == [True]  # one authenticated connection, idle in the pool

    for _ in range(3):
        server.gate.clear()
        server.asked.clear()
        slow = threading.Thread(target=tier.has, args=([key],))
        slow.start()  # takes the authenticated connection; its answer waits for the gate
        assert server.asked.wait(timeout=10)
        assert tier.has([key]) == [False]  # a new connection: refused
        server.gate.set()
        slow.join(timeout=10)  # its success ends the hold

    assert counter(metrics, "errors") == 3
    errors = logged(caplog, "kvtier.tiers.remote", logging.ERROR)
    assert len(errors) == 1 and "UNAUTHORIZED" in errors[0]
    assert server.hellos == 4  # the authenticated connection was reused, never discarded
    server.close()


# -- Redis ---------------------------------------------------------------------------------------


def test_a_wrong_redis_cluster_password_is_a_configuration_error_not_an_outage(redis_cluster, ns, caplog):
    # Bug: a cluster client with a wrong password fails while reading the slot map, and redis-py
    # raises that as a RedisClusterException whose cause is the AuthenticationError; the guard saw
    # an outage ("unavailable", retried every retry_after_s: here 0, every call) where a standalone
    # Redis with the same password was a configuration error said once.
    caplog.set_level(logging.INFO, "kvtier.tiers.redis")
    port = redis_cluster.url.rpartition(":")[2]
    url = f"redis://nobody:wrong@127.0.0.1:{port}"
    tier = RedisTier(RedisConfig(url=url, cluster=True, retry_after_s=0.0, retry_max_s=60.0), ns,
                     Metrics(["redis"]))
    items = records(ns, 3)
    try:
        for _ in range(5):
            assert tier.has(keys_of(items)) == [False] * 3 and tier.put(items) == [False] * 3

        assert counters(tier)["errors"] == 3  # the first call's three chunks; then no attempt
        lines = [r for r in caplog.records if r.name == "kvtier.tiers.redis" and r.levelno > logging.INFO]
        assert [r.levelno for r in lines] == [logging.ERROR]
        assert "refuses this client as configured" in lines[0].getMessage()
    finally:
        tier.close()


def test_a_wrong_token_then_a_server_restarted_with_it_comes_back_within_max_delay(start_kvtier_server,
                                                                                   make_remote, metrics,
                                                                                   ns, clock, caplog):
    # Held: a wrong token is one ERROR and one HELLO per retry_max_s; once the server is restarted
    # to accept the token, the next probe (within retry_max_s) brings the tier back, said once.
    caplog.set_level(logging.INFO, "kvtier.tiers.remote")
    server = start_kvtier_server(token="old")
    tier = make_remote(server.url, ns, token="new", retry_after_s=1.0, retry_max_s=8.0)
    tier._guard.backoff = Backoff(1.0, 8.0, clock=clock)
    item = put_item(ns, 1)

    assert tier.put([item]) == [False]
    clock.now += 8.0
    assert tier.has([item.key]) == [False]  # the probe: refused again, no second ERROR
    port = server.port
    server.stop()
    server = start_kvtier_server(port=port, token="new")
    clock.now += 7.9
    assert tier.has([item.key]) == [False]  # held: not asked
    clock.now += 0.1
    assert tier.put([item]) == [True] and tier.has([item.key]) == [True]

    assert counter(metrics, "errors") == 2
    assert len(logged(caplog, "kvtier.tiers.remote", logging.ERROR)) == 1
    assert logged(caplog, "kvtier.tiers.remote", logging.INFO) == [f"remote tier {server.url} is back"]
    assert logged(caplog, "kvtier.tiers.remote", logging.WARNING) == []


def test_busy_at_hello_is_an_outage_that_ends_when_a_slot_frees(start_kvtier_server, make_remote, metrics,
                                                                 ns, clock):
    # Held: a server at max_connections answers BUSY to a new HELLO: an outage (a retry can fix it),
    # backed off, and the first probe after a connection is freed gets through.
    server = start_kvtier_server(max_connections=1)
    first = make_remote(server.url, ns)
    second = make_remote(server.url, ns)
    second._guard.backoff = Backoff(1.0, 8.0, clock=clock)
    item = put_item(ns, 1)
    assert first.put([item]) == [True]  # holds the one slot, pooled

    assert second.has([item.key]) == [False] and counter(metrics, "errors") == 1
    first.close()

    def probe() -> bool:  # each try a probe: the server frees the slot when it sees the close
        clock.now += 8.0
        return second.has([item.key]) == [True]

    wait_until(probe, "the freed slot")


def test_calls_queued_for_a_connection_when_the_server_stops_answering_do_not_each_wait_a_timeout(
        make_remote, metrics, ns):
    # Bug: calls let through while the server was up, then queued for one of the pool's
    # connections, each went on to the network after the first had timed out and started the
    # back-off: with a server that accepts but never answers (a hung process, a partition), the
    # fourth of 4 threads on 1 connection waited 4 timeouts (on the lookup path: the scheduler).
    # A call whose turn comes after the medium went down is answered like the back-off answers.
    silent = socket.create_server(("127.0.0.1", 0))  # connects (the backlog), never answers
    tier = make_remote(f"kvtier://127.0.0.1:{silent.getsockname()[1]}", ns, timeout_s=0.5, connections=1)
    key = put_item(ns, 1).key
    took: list[float] = []

    def lookup() -> None:
        started = time.monotonic()
        assert tier.has([key]) == [False]
        took.append(time.monotonic() - started)

    threads = [threading.Thread(target=lookup) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert len(took) == 4 and max(took) < 1.2  # one timeout (0.5 s), not four (2 s)
    assert counter(metrics, "errors") == 1  # one call reached the medium
    silent.close()


def test_many_threads_on_a_stopped_redis_make_one_probe_per_period_then_it_is_back_once(redis_server, ns,
                                                                                       clock, caplog):
    # Held: 8 threads asking at once while Redis is down cost one connection attempt per delay
    # (one chunk counted), and the first probe after Redis is back ends the outage, said once.
    caplog.set_level(logging.INFO, "kvtier.tiers.redis")
    tier = RedisTier(RedisConfig(url=redis_server.url, timeout_s=2.0), ns, Metrics(["redis"]))
    tier.backoff = Backoff(1.0, 8.0, clock=clock)
    items = records(ns, 1)

    def wave() -> list[list[bool]]:
        answers: list[list[bool]] = []
        threads = [threading.Thread(target=lambda: answers.append(tier.has(keys_of(items))))
                   for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        return answers

    try:
        assert tier.put(items) == [True]
        redis_server.stop()
        assert tier.has(keys_of(items)) == [False] and counters(tier)["errors"] == 1
        clock.now += 1.0
        assert wave() == [[False]] * 8 and counters(tier)["errors"] == 2  # one probe of 8 callers
        redis_server.start()
        assert tier.put(items) == [False]  # backing off: 2 s after the failed probe
        clock.now += 2.0
        assert tier.put(items) == [True] and wave() == [[True]] * 8
        assert counters(tier)["errors"] == 2
        lines = [r.getMessage() for r in caplog.records if r.name == "kvtier.tiers.redis"]
        assert [line.rpartition(" (")[0] or line for line in lines] == [
            f"redis tier: {tier.where} unavailable", f"redis tier: {tier.where} is back"]
    finally:
        tier.backoff = Backoff(0, 0)
        tier.clear()
        tier.close()


class HalfReplyServer(FlakyAuthServer):
    """Accepts every HELLO; answers a request with the first half of its reply and a close while
    `halve` is set, in full after."""

    def __init__(self, ns: bytes):
        super().__init__(refuse=lambda n: False)
        self.ns, self.halve = ns, True

    def _answer(self, conn: socket.socket, frame) -> bool:
        if frame.op is Op.HELLO:
            return super()._answer(conn, frame)
        _, head, payload = record(self.ns, 1)
        data = b"".join(bytes(b) for b in encode(reply(frame, heads=[head] * len(frame.keys)),
                                                 [payload] * len(frame.keys)))
        conn.sendall(data[:len(data) // 2] if self.halve else data)
        return not self.halve


def test_a_server_that_closes_mid_reply_is_a_counted_miss_and_the_next_call_reads_whole_records(
        make_remote, metrics, ns):
    # Held: a GET reply cut by a close fails the call (both chunks counted, nothing reported from
    # the half-filled slabs); the connection is not reused, and the next call reads whole records.
    server = HalfReplyServer(ns)
    tier = make_remote(server.url, ns, retry_after_s=0.0)
    key, _, payload = record(ns, 1)
    dests = [torch.zeros(8192, dtype=torch.uint8) for _ in range(2)]

    assert tier.get([key, key], dests) == [None, None]
    assert counter(metrics, "errors") == 2
    server.halve = False
    headers = tier.get([key, key], dests)
    assert all(h is not None for h in headers)
    assert all(bytes(d[:4096].numpy()) == payload for d in dests)
    server.close()


def test_a_hello_refused_as_a_bad_request_is_still_a_configuration_error(make_remote, metrics, ns, caplog):
    # What the split of BAD_REQUEST must keep: at HELLO it refuses this client (another protocol
    # version), so the tier holds back for retry_max_s with one ERROR, as for a wrong token.
    caplog.set_level(logging.INFO, "kvtier.tiers.remote")
    server = FlakyAuthServer(refuse=lambda n: True, status=Status.BAD_REQUEST)
    tier = make_remote(server.url, ns, retry_after_s=0.0, retry_max_s=60.0)
    key = put_item(ns, 1).key

    assert [tier.has([key]) for _ in range(5)] == [[False]] * 5
    assert server.hellos == 1 and counter(metrics, "errors") == 1
    (error,) = logged(caplog, "kvtier.tiers.remote", logging.ERROR)
    assert "refuses this client as configured" in error and "BAD_REQUEST" in error
    server.close()
