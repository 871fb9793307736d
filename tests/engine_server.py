"""`kvtier_engine serve` as a real process for tests: on a free port, with a kvtier config of its
own written to its folder, its output in `engine.log` (shown when it fails), stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from fleet_processes import free_port
from waiting import wait_until

START_DEADLINE_S = 60.0  # it imports torch and builds a model: seconds, more on a busy 2-core box


class EngineServer:
    def __init__(self, folder: Path, kvtier_config: dict, model: str = "random:llama-tiny", *extra: str):
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "kvtier.yaml"
        config.write_text(yaml.safe_dump(kvtier_config))
        self.port, self.log = free_port(), folder / "engine.log"
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "kvtier_engine", "serve", model, "--port", str(self.port),
               "--kv-cache-bytes", "64MiB", "--log-level", "warning", "--kvtier-config", str(config), *extra]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, "OMP_NUM_THREADS": "1"})

    def request(self, path: str, body: dict | None = None) -> tuple[int, dict]:
        """One request; (status, decoded JSON), for an error status too."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def metric(self, name: str) -> float:
        """A sample without labels from /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as resp:
            lines = resp.read().decode().splitlines()
        values = [float(line.split()[-1]) for line in lines if line.startswith(name + " ")]
        assert values, f"no {name} in /metrics"
        return values[0]

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"kvtier_engine exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                return self.request("/health")[0] == 200
            except OSError:  # not listening yet
                return False

        if not wait_until(ready, "kvtier_engine ready", START_DEADLINE_S, required=False):
            pytest.fail(f"kvtier_engine not ready in {START_DEADLINE_S} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        """SIGTERM (after SIGCONT: a test may have stopped it); a process that ignores it is killed and
        the test fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"kvtier_engine ignored SIGTERM:\n{self.log.read_text()}")
