"""`kvtier_controller` as a real process (kvtier/controller/__main__.py): the console script starts,
prints its one line with the real port, answers /health, checks the token from --token-file, stops
on SIGTERM with exit 0; a bad config, an empty token file or a public host without a token exit 2
with one line on stderr."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from waiting import wait_until

from kvtier.fleet.http_client import HttpError, JsonClient
from kvtier.fleet.messages import EventBatch, KeyEvent, Registration, TierUsage

SCRIPT = Path(sys.executable).parent / "kvtier_controller"
PREFIX = "kvtier_controller listening on "
START_DEADLINE_S = 30.0  # the import of kvtier (torch) takes seconds on a busy machine


def command(*args: str) -> list[str]:
    return [str(SCRIPT), *args] if SCRIPT.exists() else [sys.executable, "-m", "kvtier.controller", *args]


def env() -> dict[str, str]:
    # No KVTIER_CONTROLLER_* from the caller's environment: each test says what it wants.
    return {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_CONTROLLER")}


def read_line(process: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    assert ready, f"no line on stdout within {timeout_s} s"
    return process.stdout.readline()


@contextmanager
def controller(*args: str, stop: signal.Signals = signal.SIGTERM,
               environ: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """A running controller on a free port and its base URL; `stop` at the end must exit 0."""
    process = subprocess.Popen(command("--port", "0", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**env(), **(environ or {})})
    try:
        line = read_line(process, START_DEADLINE_S)
        assert line.startswith(PREFIX), line + process.stderr.read() if process.poll() is not None else line
        host, port = line[len(PREFIX):].strip().rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        yield process, f"http://{host}:{port}"
        process.send_signal(stop)
        assert process.wait(20) == 0, process.stderr.read()
        assert process.stdout.read() == ""  # exactly one line on stdout
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def refused(*args: str, environ: dict[str, str] | None = None) -> str:
    """Run a controller expected to refuse its config: exit 2 and one line on stderr."""
    result = subprocess.run(command(*args), capture_output=True, text=True, timeout=60,
                            env={**env(), **(environ or {})})
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtier_controller: "), result.stderr
    return lines[0]


def test_it_starts_prints_its_port_answers_health_and_stops_on_sigterm():
    with controller() as (_, url):
        client = JsonClient(url)
        assert client.get("/health") == {"status": "ok"}
        assert client.get("/v1/instances") == {"instances": []}  # no token configured: open on loopback
        client.close()


def test_sigint_stops_it_cleanly_too():
    with controller(stop=signal.SIGINT) as (_, url):
        assert JsonClient(url).get("/health") == {"status": "ok"}


def test_the_token_file_guards_every_endpoint_but_health(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("  file-token-0123456789\n")  # surrounding whitespace is not part of it
    with controller("--token-file", str(token_file)) as (_, url):
        assert JsonClient(url).get("/health") == {"status": "ok"}
        with pytest.raises(HttpError) as refusal:
            JsonClient(url).get("/v1/instances")
        assert refusal.value.status == 401
        with pytest.raises(HttpError):
            JsonClient(url, token="wrong").get("/v1/stats")
        assert JsonClient(url, token="file-token-0123456789").get("/v1/instances") == {"instances": []}


def test_two_controllers_on_one_redis_answer_the_same_and_503_while_it_is_down(redis_server):
    # Database 7: away from the keys of other tests on this session-wide server.
    environ = {"KVTIER_CONTROLLER_INDEX": redis_server.url.rsplit("/", 1)[0] + "/7",
               "KVTIER_CONTROLLER_INDEX_TIMEOUT_S": "0.5"}
    with controller(environ=environ) as (_, first), controller(environ=environ) as (_, second):
        one, two = JsonClient(first), JsonClient(second)
        one.post("/v1/instances/register", registration("shared-a"))
        assert [v["instance_id"] for v in two.get("/v1/instances")["instances"]] == ["shared-a"]
        redis_server.stop()
        try:
            with pytest.raises(HttpError) as unavailable:
                two.get("/v1/instances")
            assert unavailable.value.status == 503 and "unavailable" in unavailable.value.detail
            with pytest.raises(HttpError) as health:
                one.get("/health")
            assert health.value.status == 503
        finally:
            redis_server.start()
        wait_until(lambda: two.raw_request("GET", "/health")[0] == 200, "the controller sees Redis again")


def registration(instance_id: str) -> Registration:
    tiers = [TierUsage(name="cpu", chunks=0, bytes_used=0, capacity_bytes=1 << 20)]
    return Registration(instance_id=instance_id, kind="engine", command_url="http://127.0.0.1:9",
                        command_token="c" * 32, model_id="m", namespace="00" * 8, chunk_size=16, tiers=tiers)


def test_the_sweeper_drops_a_silent_instances_keys(tmp_path):
    config = tmp_path / "controller.yaml"
    config.write_text("heartbeat_timeout_s: 0.5\n")  # from the file: a 10 s default would outlast the test
    with controller("--config", str(config)) as (_, url):
        client = JsonClient(url)
        session = client.post("/v1/instances/register", registration("a"))["session"]
        event = KeyEvent(op="stored", tier="cpu", keys=["ab" * 24, "cd" * 24])
        reply = client.post("/v1/instances/a/events", EventBatch(session=session, seq=0, events=[event]))
        assert reply["known"] and client.get("/v1/stats")["index_chunks"] in (0, 2)  # 0: already swept
        wait_until(lambda: client.get("/v1/stats")["index_chunks"] == 0, "the sweeper drops the keys")
        assert client.get("/v1/stats")["instances_down"] == 1


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_gets_its_413_not_a_reset(tmp_path, chunked):
    # The server reads on and drops the rest of a refused body: a client writes its whole body before
    # it reads, and a socket closed with unread bytes would reset it before the answer.
    config = tmp_path / "controller.yaml"
    config.write_text("max_body_bytes: 262144\n")
    body = json.dumps({"model_id": "m", "tokens": [7] * 300_000}).encode()  # ~900 KB: more than
    # loopback's socket buffers take at once, within the 4x the server drains
    with controller("--config", str(config)) as (_, url):
        conn = http.client.HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
        headers = {"Content-Type": "application/json"}
        if chunked:
            conn.request("POST", "/v1/lookup", body=(body[i:i + 65536] for i in range(0, len(body), 65536)),
                         headers=headers, encode_chunked=True)
        else:
            conn.request("POST", "/v1/lookup", body=body, headers=headers)
        reply = conn.getresponse()
        assert reply.status == 413 and "262144 bytes" in json.loads(reply.read())["detail"]
        conn.close()


def test_an_empty_token_file_is_refused(tmp_path):
    empty = tmp_path / "token"
    empty.write_text(" \n")
    assert "empty" in refused("--token-file", str(empty))
    assert "cannot read" in refused("--token-file", str(tmp_path / "missing"))


def test_a_public_host_without_a_token_is_refused():
    line = refused("--host", "0.0.0.0", "--port", "0")
    assert "0.0.0.0" in line and "token" in line


def test_a_bad_config_is_refused_naming_the_key(tmp_path):
    config = tmp_path / "controller.yaml"
    config.write_text("heartbeat_timout_s: 5\n")
    assert "heartbeat_timout_s" in refused("--config", str(config))
    assert "port" in refused("--port", "70000")
    assert "KVTIER_CONTROLLER_INDEX" in refused(environ={"KVTIER_CONTROLLER_INDEX": "http://not-redis"})
