"""Real `kvtier_server` processes for the tests, started with `python -m kvtier.server`.

A server binds port 0 (any free port) unless told a port, and the test reads the bound port from
the one line it prints on stdout (`kvtier_server listening on HOST:PORT`), so readiness is that line,
never a fixed wait. Its log (stderr) goes to a file the tests can read. `kvtier_server` is one
session-wide server that tests share by keeping to their own namespaces; `start_kvtier_server`
starts servers with their own config (and port), stopped with SIGTERM at the test's end.
`Client` is a raw protocol client (it says HELLO, then sends whatever frames a test wants);
`start_failure` runs a server that is expected to refuse to start; `wait_for` polls STATS for a
condition, `authenticated` opens a raw socket past its HELLO.
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
import torch
import yaml
from waiting import wait_until

from kvtier.keys import ChunkKey
from kvtier.record import encode_header
from kvtier.wire.decoder import FrameDecoder
from kvtier.wire.frames import PROTOCOL_VERSION, Frame, Op, Status, check_reply, encode

START_DEADLINE_S = 60.0  # a start imports torch (kvtier's package import): ~2 s, more on a busy box
STOP_DEADLINE_S = 20.0
PREFIX = "kvtier_server listening on "
# Small limits so that tests reach them quickly, large enough for a few 1 MiB records per frame.
DEFAULTS = {"capacity": "64MiB", "max_frame_bytes": "16MiB", "stats_interval_s": 0.2}
TIMEOUT_S = 10.0  # socket timeout of test clients: a reply that never comes fails the test


def record(namespace: bytes, i: int, size: int = 4096) -> tuple[ChunkKey, bytes, bytes]:
    """A valid record: (key, header, seeded payload of `size` bytes, shaped as fp16 [2, 1, 1, size/4])."""
    key = ChunkKey(namespace, i.to_bytes(16, "little"))
    payload = torch.randint(0, 256, (size,), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(i)).numpy().tobytes()
    return key, encode_header(key, (2, 1, 1, size // 4), torch.float16, payload), payload


class ServerProcess:
    """One kvtier_server process; `restart()` starts it again on the same port."""

    def __init__(self, folder: Path, config: dict, port: int = 0):
        self.folder = folder
        self.config_path = folder / "server.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log = folder / "server.log"
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"kvtier://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> None:
        cmd = [sys.executable, "-m", "kvtier.server", "--config", str(self.config_path), "--port",
               str(self.port), "--host", "127.0.0.1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        line = self._first_line()
        if not line.startswith(PREFIX):
            self.kill()
            pytest.fail(f"kvtier_server did not start ({line!r}):\n{self.log.read_text()}")
        self.port = int(line.rsplit(":", 1)[1])

    def _first_line(self) -> str:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                return self.proc.stdout.readline()  # "" if it exited first
        return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def stop(self) -> int:
        """SIGTERM and wait; the exit status (0 for a graceful shutdown)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"kvtier_server ignored SIGTERM:\n{self.log.read_text()}")
        self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def restart(self) -> None:
        if self.alive():
            self.stop()
        self.start()


@pytest.fixture(scope="session")
def kvtier_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """One shared server (DEFAULTS); tests keep to their own namespaces and count in deltas."""
    server = ServerProcess(tmp_path_factory.mktemp("kvtier_server"), dict(DEFAULTS))
    yield server
    server.stop()


@pytest.fixture
def start_kvtier_server(tmp_path) -> Iterator[Callable[..., ServerProcess]]:
    """`start(port=0, **config)`: a server with DEFAULTS overridden by `config`, for this test only."""
    servers: list[ServerProcess] = []

    def start(port: int = 0, **config) -> ServerProcess:
        folder = tmp_path / f"server{len(servers)}"
        folder.mkdir()
        server = ServerProcess(folder, {**DEFAULTS, **config}, port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.alive():
            server.stop()


def start_failure(folder: Path, config: dict, flags: tuple[str, ...] = ("--port", "0")
                  ) -> subprocess.CompletedProcess:
    """Run `kvtier_server` with `config` (and command-line `flags`) where it should refuse to
    start; its exit and output."""
    path = folder / "bad-server.yaml"
    path.write_text(yaml.safe_dump({**DEFAULTS, **config}))
    cmd = [sys.executable, "-m", "kvtier.server", "--config", str(path), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = proc.stdout.readline()  # "" once it exits; the listening line if it started after all
    if line:
        proc.kill()
    out, err = proc.communicate(timeout=START_DEADLINE_S)
    return subprocess.CompletedProcess(cmd, proc.returncode, line + out, err)


def raw_frame(fields: object, payload: bytes = b"") -> bytes:
    """A frame from a hand-made header (to send what `encode` would never produce)."""
    header = msgpack.packb(fields, use_bin_type=True)
    return struct.pack("<I", len(header)) + header + payload


def wire(frame: Frame, payloads=()) -> bytes:
    return b"".join(bytes(b) for b in encode(frame, payloads))


HELLO = wire(Frame(Op.HELLO, 0, version=PROTOCOL_VERSION))  # what a client without a token sends first


class Client:
    """A blocking protocol client for tests: `call(op, ...)` is one request and its reply. It says
    HELLO (with `token`) first and expects OK, unless `hello=False`."""

    def __init__(self, port: int, token: str | None = None, hello: bool = True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
        self.decoder = FrameDecoder(1 << 30, check=check_reply)
        self.ids = itertools.count(1)
        if hello:
            welcome = self.hello(token)
            assert welcome is not None and welcome.status is Status.OK, welcome

    def hello(self, token: str | None = None) -> Frame | None:
        self.send(Op.HELLO, token=token, version=PROTOCOL_VERSION)
        return self.receive()

    def send(self, op: Op, payloads=(), **fields) -> int:
        rid = next(self.ids)
        for buf in encode(Frame(op, rid, **fields), payloads):
            self.sock.sendall(buf)
        return rid

    def receive(self) -> Frame | None:
        """The next reply; None when the server closed the connection."""
        while (frame := self.decoder.next_frame()) is None:
            buf = self.decoder.get_buffer()
            try:
                n = self.sock.recv_into(buf)
            except ConnectionResetError:
                return None
            if not n:
                return None
            self.decoder.advance(n)
        return frame

    def call(self, op: Op, payloads=(), **fields) -> Frame:
        rid = self.send(op, payloads, **fields)
        frame = self.receive()
        assert frame is not None and frame.request_id == rid, frame
        return frame

    def put(self, records) -> list[int]:
        keys, heads, payloads = zip(*records)
        return self.call(Op.PUT, payloads, keys=list(keys), heads=list(heads)).flags

    def stats(self) -> dict[str, int]:
        return self.call(Op.STATS).stats

    def close(self) -> None:
        self.sock.close()


def wait_for(client: Client, what: Callable[[dict[str, int]], bool], deadline_s: float = 20.0
             ) -> dict[str, int]:
    """Poll STATS until `what(stats)` holds; the stats then."""
    last: dict[str, int] = {}

    def holds() -> dict[str, int] | None:
        last.update(client.stats())
        return dict(last) if what(last) else None

    try:
        return wait_until(holds, "STATS condition", deadline_s)
    except AssertionError:
        raise AssertionError(last) from None


def authenticated(port: int) -> socket.socket:
    """A raw socket past its HELLO (no token), for attacks that send exact bytes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    sock.sendall(HELLO)
    assert sock.recv(4096)  # the HELLO's OK (a few bytes, one segment on loopback)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Read (and drop) until the peer closes; True when it did before the socket's timeout."""
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True
