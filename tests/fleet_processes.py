"""A fleet of real processes for the controller tests: `kvtier_controller`, CacheEngine instances
(tests/controller/fleet_instance.py) and `kvtier_server`s that joined it through a `controller:`
config section.

Readiness is always a line a process prints or state polled from the controller (tests/waiting.py),
never a fixed wait: the controller prints `kvtier_controller listening on HOST:PORT`, an instance
prints one JSON line once its engine is built and then one JSON line per command it reads on stdin
(`store <seed> <n>`, `lookup <seed> <n>`, `tiers <seed> <n>`, `stats`, `flood <n>`, `digest <seed> <n>`,
`check`, `begin <tag> <command>`, `end <tag>`, `exit`). Options given to an instance go into its
config file (e.g. `p2p={...}`: the engine's `p2p:` section).

Prompts are `prompt(seed, n)`: the same tokens in the test and in every instance process, so a test
asks the controller about exactly what an instance stored. `Fleet` starts the processes of one
test; `running_fleet` (what each test module's `fleet` fixture uses) stops every one at its end.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from kvtier_servers import DEFAULTS as SERVER_DEFAULTS
from kvtier_servers import ServerProcess
from waiting import wait_until

from kvtier.fleet.http_client import HttpError, JsonClient

TESTS = Path(__file__).parent
INSTANCE_SCRIPT = TESTS / "controller" / "fleet_instance.py"
START_DEADLINE_S = 60.0  # an instance imports torch: ~2 s alone, much more on a busy 2-core box
REPLY_DEADLINE_S = 30.0  # one instance command (a flood writes a few hundred small files)
STOP_DEADLINE_S = 20.0
PREFIX = "kvtier_controller listening on "
TOKEN = "fleet-test-token-0123456789"
MODEL = "fleet-model"
CHUNK = 16  # tokens per chunk of the instances (the small layout: one 4 KiB slab per chunk)
HEARTBEAT_S = 0.2  # instances' heartbeat interval
HEARTBEAT_TIMEOUT_S = 1.5  # the controller's: silent this long, an instance is down
# Small tiers, so that a flood of a few hundred chunks evicts everything that is not pinned.
CPU_CAPACITY = "64KiB"  # 16 chunks
DISK_CAPACITY = "256KiB"


def prompt(seed: int, num_tokens: int) -> list[int]:
    """Seeded token ids: the same list in every process."""
    return np.random.default_rng(seed).integers(0, 50_000, num_tokens).tolist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_line(proc: subprocess.Popen, deadline_s: float) -> str:
    """The next stdout line of `proc` within `deadline_s` ("" when it exited or said nothing)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            return proc.stdout.readline()
    return ""


class Process:
    """What a controller and an instance share: a Popen with stdout piped and stderr in a log file."""

    proc: subprocess.Popen | None = None
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _popen(self, cmd: list[str], stdin: bool = False) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                         stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill at once (SIGKILL): no goodbye to anyone."""
        if self.alive():
            self.proc.send_signal(sig)
            self.proc.wait(timeout=STOP_DEADLINE_S)
        self._close_pipes()

    def pause(self) -> None:
        """SIGSTOP: it stalls (its sockets stay open, nothing answers) until `resume`."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> int:
        """SIGTERM and wait; its exit status."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(f"{self} ignored SIGTERM:\n{self.log_text()}")
        self._close_pipes()
        return self.proc.returncode

    def _close_pipes(self) -> None:
        if self.proc is not None:
            for pipe in (self.proc.stdin, self.proc.stdout):
                if pipe is not None and not pipe.closed:
                    try:
                        pipe.close()
                    except BrokenPipeError:
                        pass


class OneShotClient:
    """JsonClient's get and post, each on a new connection: a test sits idle for seconds between
    requests (while instances work), past uvicorn's keep-alive timeout, and the reuse of a closed
    connection is tested on its own (test_fleet_processes), not met by chance here."""

    def __init__(self, url: str, token: str | None, timeout_s: float):
        self.url, self.token, self.timeout_s = url, token, timeout_s

    def get(self, path: str) -> Any:
        client = JsonClient(self.url, self.token, self.timeout_s)
        try:
            return client.get(path)
        finally:
            client.close()

    def post(self, path: str, body: Any) -> Any:
        client = JsonClient(self.url, self.token, self.timeout_s)
        try:
            return client.post(path, body)
        finally:
            client.close()

    def close(self) -> None:
        """Nothing to close (each request had its own connection): JsonClient's interface."""


class ControllerProcess(Process):
    """`python -m kvtier.controller` with a config file and a token file; `restart()` binds the same
    port, so that instances find it again."""

    def __init__(self, folder: Path, config: dict | None = None, token: str | None = TOKEN, port: int = 0):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.token, self.port = folder, token, port
        self.config_path = folder / "controller.yaml"
        self.config_path.write_text(yaml.safe_dump({"heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                                                    "command_timeout_s": 10.0, **(config or {})}))
        self.log = folder / "controller.log"
        self.start()

    def __str__(self) -> str:
        return f"kvtier_controller on port {self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "kvtier.controller", "--host", "127.0.0.1", "--port", str(self.port),
               "--config", str(self.config_path)]
        if self.token is not None:
            token_file = self.folder / "token"
            token_file.write_text(self.token + "\n")
            cmd += ["--token-file", str(token_file)]
        self._popen(cmd)
        line = _read_line(self.proc, START_DEADLINE_S)
        if not line.startswith(PREFIX):
            self.kill()
            pytest.fail(f"kvtier_controller did not start ({line!r}):\n{self.log_text()}")
        self.port = int(line.rsplit(":", 1)[1])

    def restart(self) -> None:
        if self.alive():
            self.stop()
        self.start()

    def client(self, token: str | None = "default", timeout_s: float = 10.0) -> OneShotClient:
        """A client with this controller's token (or `token` when given; None: no token)."""
        return OneShotClient(self.url, self.token if token == "default" else token, timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any, http.client.HTTPResponse]:
        """One raw request (any bytes, any headers): (status, decoded JSON or text, response)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw), resp
        except ValueError:
            return resp.status, raw.decode(errors="replace"), resp


class InstanceProcess(Process):
    """A CacheEngine in its own process (tests/controller/fleet_instance.py) that joined the fleet.
    The same `instance_id` and `folder` on restart: the same disk tier, the same identity."""

    def __init__(self, folder: Path, controller_url: str, instance_id: str, token: str | None = TOKEN,
                 **options: Any):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.instance_id = folder, instance_id
        self.log = folder / "instance.log"
        self.config = {"controller_url": controller_url, "instance_id": instance_id, "token": token,
                       "disk": str(folder / "disk"), "model_id": MODEL, "chunk_size": CHUNK,
                       "heartbeat_s": HEARTBEAT_S, "cpu_capacity": CPU_CAPACITY,
                       "disk_capacity": DISK_CAPACITY, **options}
        self.info: dict = {}
        self.launch()

    def __str__(self) -> str:
        return f"instance {self.instance_id}"

    def launch(self) -> None:
        """Start the process; `ready()` waits for its first line."""
        config = self.folder / "instance.json"
        config.write_text(json.dumps(self.config))
        self._popen([sys.executable, str(INSTANCE_SCRIPT), str(config)], stdin=True)

    def ready(self) -> dict:
        self.info = self._reply(START_DEADLINE_S, "start")
        return self.info

    def restart(self) -> None:
        if self.alive():
            self.exit()
        self.launch()
        self.ready()

    def call(self, line: str, deadline_s: float = REPLY_DEADLINE_S) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._reply(deadline_s, line)

    def _reply(self, deadline_s: float, what: str) -> dict:
        line = _read_line(self.proc, deadline_s)
        if not line:
            self.kill()
            pytest.fail(f"{self}: no reply to {what!r}:\n{self.log_text()}")
        reply = json.loads(line)
        if "error" in reply:
            pytest.fail(f"{self}: {what!r} failed: {reply['error']}")
        return reply

    def store(self, seed: int, num_tokens: int) -> int:
        """Store prompt(seed, n) and wait for its background writes; chunks newly stored."""
        return self.call(f"store {seed} {num_tokens}")["stored"]

    def lookup(self, seed: int, num_tokens: int) -> int:
        return self.call(f"lookup {seed} {num_tokens}")["hit"]

    def tiers(self, seed: int, num_tokens: int) -> dict[str, list[bool]]:
        """Per tier, whether it holds each chunk of the prompt."""
        return self.call(f"tiers {seed} {num_tokens}")["tiers"]

    def stats(self) -> dict:
        return self.call("stats")["stats"]

    def digest(self, seed: int, num_tokens: int) -> dict:
        """Retrieve prompt(seed, n) into zeros: {"hit": tokens, "digest": its hash, "seconds": ...}."""
        return self.call(f"digest {seed} {num_tokens}")

    def check(self) -> None:
        """Fail the test if the engine's storage accounting is broken (check_invariants)."""
        self.call("check")

    def begin(self, tag: str, line: str) -> None:
        """Start command `line` on a thread of the instance; `end(tag)` waits for its reply."""
        self.call(f"begin {tag} {line}")

    def end(self, tag: str, deadline_s: float = REPLY_DEADLINE_S) -> dict:
        return self.call(f"end {tag}", deadline_s)

    def flood(self, count: int) -> int:
        """Store `count` new 4-chunk prompts (and wait for the disk): evicts whatever is not pinned."""
        return self.call(f"flood {count}", 60.0)["stored"]

    def exit(self) -> None:
        """Close the engine and exit (a graceful stop)."""
        self.call("exit")
        self.proc.wait(timeout=STOP_DEADLINE_S)
        self._close_pipes()


class Fleet:
    """The processes of one test; `close()` stops every one still running."""

    def __init__(self, root: Path):
        self.root = root
        self.processes: list[Process] = []
        self.controller: ControllerProcess | None = None

    def start_controller(self, config: dict | None = None, token: str | None = TOKEN,
                         name: str = "controller") -> ControllerProcess:
        controller = ControllerProcess(self.root / name, config, token)
        self.processes.append(controller)
        self.controller = self.controller or controller
        return controller

    def start_instances(self, ids: list[str], controller: ControllerProcess | None = None,
                        **options: Any) -> list[InstanceProcess]:
        """Instances started side by side (each imports torch: in parallel, the wait is one start)."""
        controller = controller or self.controller
        started = [InstanceProcess(self.root / i, controller.url, i, controller.token, **options)
                   for i in ids]
        self.processes.extend(started)
        for instance in started:
            instance.ready()
        return started

    def start_server(self, instance_id: str, controller: ControllerProcess | None = None,
                     **config: Any) -> ServerProcess:
        """A kvtier_server whose config has a `controller:` section (heartbeats as fast as instances')."""
        controller = controller or self.controller
        folder = self.root / instance_id
        folder.mkdir()
        section = {"url": controller.url, "instance_id": instance_id, "heartbeat_s": HEARTBEAT_S}
        if controller.token is not None:
            section["token"] = controller.token
        server = ServerProcess(folder, {**SERVER_DEFAULTS, "controller": section, **config})
        self.processes.append(server)
        return server

    def close(self) -> None:
        for process in reversed(self.processes):
            if isinstance(process, InstanceProcess) and process.alive():
                process.kill()
            elif process.alive():
                process.stop()


@contextmanager
def running_fleet(root: Path) -> Iterator[Fleet]:
    """A Fleet whose processes are all stopped on the way out (a test module's `fleet` fixture)."""
    fleet = Fleet(root)
    try:
        yield fleet
    finally:
        fleet.close()


# -- questions to a controller -------------------------------------------------------------------

def instances(client: OneShotClient) -> dict[str, dict]:
    """GET /v1/instances by id."""
    return {i["instance_id"]: i for i in client.get("/v1/instances")["instances"]}


def wait_up(client: OneShotClient, ids: list[str], timeout_s: float = 20.0) -> dict[str, dict]:
    """Wait until every instance in `ids` is registered and up."""
    last: dict[str, dict] = {}

    def up() -> dict[str, dict] | None:
        try:
            known = instances(client)
        except HttpError:  # e.g. 503 while the index is unavailable
            return None
        last.clear()
        last.update(known)
        return known if all(i in known and known[i]["up"] for i in ids) else None

    if not wait_until(up, f"instances {ids} up", timeout_s, required=False):
        seen = {i: ("up" if v["up"] else "down") for i, v in last.items()}
        raise AssertionError(f"instances {ids} not all up within {timeout_s} s; /v1/instances: {seen}")
    return dict(last)


def lookup(client: OneShotClient, tokens: list[int], model_id: str = MODEL) -> dict:
    return client.post("/v1/lookup", {"model_id": model_id, "tokens": tokens})


def hits(client: OneShotClient, tokens: list[int], model_id: str = MODEL) -> dict[str, int]:
    """instance id -> hit tokens, from /v1/lookup."""
    return {i["instance_id"]: i["hit_tokens"] for i in lookup(client, tokens, model_id)["instances"]}


def route(client: OneShotClient, tokens: list[int], model_id: str = MODEL) -> list[dict]:
    return client.post("/v1/route", {"model_id": model_id, "tokens": tokens})["instances"]


def wait_hits(client: OneShotClient, tokens: list[int], expected: dict[str, int], what: str,
              timeout_s: float = 20.0) -> dict[str, int]:
    """Wait until /v1/lookup gives `expected` hits for these instances (others may be anything)."""
    last: dict[str, int] = {}

    def holds() -> bool:
        last.clear()
        last.update(hits(client, tokens))
        return all(last.get(i, 0) == n for i, n in expected.items())

    if not wait_until(holds, what, timeout_s, required=False):
        raise AssertionError(f"{what}: /v1/lookup says {last}, expected {expected}")
    return dict(last)
