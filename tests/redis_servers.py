"""Real Redis servers for the tests: a standalone server and a 3-master Redis Cluster on loopback.

Both are started once per session on free ports in a temporary directory (no persistence), and are
stopped at the end. A test may kill and restart them (`stop()`, `start()`): the function-scoped
fixtures bring a stopped server back before the next test, so a fault test cannot break another.
Tests keep apart by namespace (a unique model id per test), never by flushing a shared server.

Readiness is polled from the real state (PING, `CLUSTER INFO` saying cluster_state:ok) against a
deadline; nothing waits a fixed time. Tests are skipped when `redis-server` / `redis-cli` are not
installed (CI installs them).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import redis
from waiting import wait_until

START_DEADLINE_S = 20.0
CLUSTER_BUS_OFFSET = 10000


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


def _require_binaries() -> None:
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install redis-server): "
                    "the Redis tier tests need a real server")


class RedisServer:
    """One `redis-server` process on 127.0.0.1:`port`, restartable on the same port."""

    def __init__(self, root: Path, extra: Sequence[str] = (), cluster: bool = False):
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
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
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

    def __init__(self, root: Path):
        flags = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "5000"]
        self.nodes = [RedisServer(root, flags, cluster=True) for _ in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        cmd = ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
               "--cluster-replicas", "0", "--cluster-yes"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_DEADLINE_S)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        self.wait_ok()

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
    _require_binaries()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def _redis_cluster_session(tmp_path_factory) -> Iterator[RedisClusterServers]:
    _require_binaries()
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
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
