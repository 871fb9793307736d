"""kvtier_engine serve: the real server in a subprocess, spoken to over HTTP; and its parts in-process.

Server processes are few and module-scoped (each costs a torch import and a model load): one plain,
one with kvtier on a disk tier under tmp_path (saving partial chunks), and that one restarted on the
same disk. Tests about the process's own life (signals, exit status, start-up errors) start one of
their own. Readiness is /health polled against a deadline. The in-process parts are the body ->
SamplingParams mapping and EngineLoop's failure handling, driven by a fake engine that fails on
demand, or by the real engine with a fault injected into its forward pass.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from waiting import wait_until

from kvtier.tiers.disk import SUFFIX
from kvtier_engine import LLM, SamplingParams
from kvtier_engine.llm_engine import EngineOptions, LLMEngine, RequestOutput
from kvtier_engine.request import RequestMetrics
from kvtier_engine.serving.cli import build_parser
from kvtier_engine.serving.engine_loop import MAX_FAILED_STEPS, EngineLoop, EngineUnavailable, RequestFailed
from kvtier_engine.serving.openai_protocol import InvalidRequest, parse_completion_request, sampling_params
from kvtier_engine.serving.server import ServedModel, build_app
from kvtier_engine.tokenizer import ByteTokenizer

MODEL = "random:llama-tiny"
SERVED_NAME = "tiny"  # the plain server's --served-model-name
START_DEADLINE_S = 60.0
READ_TIMEOUT_S = 3  # the plain server's --read-timeout
KVTIER_YAML = """\
chunk_size: 32
save_partial_chunks: true
write_through: true
cpu:
  capacity: 64MiB
disk:
  path: {path}
  capacity: 256MiB
  io_threads: 1
"""


# -- the server process --------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            return err.code, err.read(), err.headers.get("Content-Type", "")

    def post(self, body: dict | bytes, path: str = "/v1/completions") -> tuple[int, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, data, _ = self.request("POST", path, raw)
        return status, json.loads(data)

    def complete(self, **body) -> dict:
        status, data = self.post(body)
        assert status == 200, data
        return data

    def get(self, path: str) -> tuple[int, bytes, str]:
        return self.request("GET", path)

    def stream(self, **body) -> list[str]:
        """The `data:` payloads of a streamed completion, in order ("[DONE]" included)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        events = [e for e in resp.read().decode().split("\n\n") if e]
        conn.close()
        assert all(e.startswith("data: ") for e in events), events
        return [e.removeprefix("data: ") for e in events]

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                return self.get("/health")[0] == 200
            except OSError:  # not listening yet
                return False

        if not wait_until(ready, "server ready", START_DEADLINE_S, required=False):
            pytest.fail(f"server not ready in {START_DEADLINE_S} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: uvicorn shuts down, then the engine closes
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"server ignored SIGTERM:\n{self.log.read_text()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(log: Path, *args: str, command: list[str] | None = None) -> Server:
    """`kvtier_engine serve MODEL *args` on a free port, or `command + [port]`."""
    port = free_port()
    cmd = [*command, str(port)] if command is not None else [
        sys.executable, "-m", "kvtier_engine", "serve", MODEL, "--port", str(port),
        "--kv-cache-bytes", "64MiB", "--log-level", "warning", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two servers share 2 cores with the tests
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server(proc, port, log)


@pytest.fixture(scope="module")
def kvtier_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kvtier")
    path = folder / "kvtier.yaml"
    path.write_text(KVTIER_YAML.format(path=folder / "disk"))
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory, kvtier_config):
    """(plain server, kvtier server), started side by side."""
    logs = tmp_path_factory.mktemp("logs")
    started = [launch(logs / "plain.log", "--served-model-name", SERVED_NAME, "--read-timeout",
                      str(READ_TIMEOUT_S)),
               launch(logs / "kvtier.log", "--kvtier-config", str(kvtier_config))]
    try:
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def offline() -> LLM:
    """The same model in-process: what the server's greedy output must equal."""
    llm = LLM(MODEL, kv_cache_bytes=64 << 20)
    yield llm
    llm.close()


def greedy(max_tokens: int, **extra) -> dict:
    return {"model": SERVED_NAME, "max_tokens": max_tokens, "temperature": 0, **extra}


# -- completions ---------------------------------------------------------------------------------


def test_completion_from_text_equals_offline_generate(server, offline):
    prompt = "The quick brown fox jumps over the lazy dog"
    body = server.complete(prompt=prompt, **greedy(24))
    want = offline.generate(prompt, SamplingParams(max_tokens=24, temperature=0))[0]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == SERVED_NAME and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": want.text, "finish_reason": want.finish_reason,
                                "logprobs": None}]
    n_prompt, n_out = len(want.prompt_token_ids), len(want.token_ids)
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                             "total_tokens": n_prompt + n_out}
    kv = body["kvtier"]
    assert set(kv) == {"ttft_s", "prefill_tokens_computed", "tokens_loaded", "tokens_cached_on_device"}
    assert kv["ttft_s"] > 0 and kv["tokens_loaded"] == 0


def test_completion_from_token_ids_equals_offline_generate(server, offline):
    ids = [5, 17, 99, 200, 301, 42, 7, 250]
    want = offline.generate(ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    for prompt in (ids, [ids]):  # a list of ids, or a batch of one such list
        body = server.complete(prompt=prompt, **greedy(16, ignore_eos=True))
        assert body["choices"][0]["text"] == want.text
        assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 16


def test_streamed_chunks_concatenate_to_the_completion(server):
    request = dict(prompt="Once upon a time", **greedy(40, ignore_eos=True))
    whole = server.complete(**request)
    events = server.stream(**request, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *content, usage = chunks
    assert len(content) > 1
    assert all(c["object"] == "text_completion" and c["id"] == content[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (len(content) - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in content) == whole["choices"][0]["text"]
    assert content[-1]["kvtier"]["prefill_tokens_computed"] >= 0
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    # A first output that is also the last: one chunk, then [DONE].
    single = server.stream(prompt="Once upon a time", **greedy(1, ignore_eos=True))
    assert len(single) == 2 and single[1] == "[DONE]"
    assert json.loads(single[0])["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_text_before_it(server):
    request = dict(prompt="kvtier serves KV", **greedy(40, ignore_eos=True))
    text = server.complete(**request)["choices"][0]["text"]
    # An ASCII character: never part of a multi-byte character the random model may emit.
    stop = next(ch for ch in text[1:] if ch.isascii() and ch.isprintable())
    want = text[:text.index(stop)]
    for form in (stop, [stop, "never emitted"]):
        choice = server.complete(**request, stop=form)["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (want, "stop")
    streamed = [json.loads(e) for e in server.stream(**request, stop=stop)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in streamed) == want


def metric(server: Server, name: str) -> float:
    text = server.get("/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name)


def test_concurrent_requests_all_complete_in_shared_steps(server):
    n, tokens = 8, 64

    def one(i: int) -> dict:
        return server.complete(prompt=f"request number {i} says hello", **greedy(tokens, ignore_eos=True))

    steps_before = metric(server, "kvtier_engine_steps_total")
    with ThreadPoolExecutor(n) as pool:
        bodies = list(pool.map(one, range(n)))
    assert [b["usage"]["completion_tokens"] for b in bodies] == [tokens] * n
    assert len({b["id"] for b in bodies}) == n
    # One token per request per step: served one after another they would take n * tokens steps.
    assert metric(server, "kvtier_engine_steps_total") - steps_before < n * tokens / 2


def test_client_disconnecting_mid_stream_aborts_its_request(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions",
                 json.dumps({"prompt": "a long one", "max_tokens": 5000, "ignore_eos": True, "stream": True}))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    aborted = 'kvtier_engine_requests_total{finish_reason="abort"}'
    wait_until(lambda: aborted in server.get("/metrics")[1].decode(),
               "the disconnected stream was never aborted")
    assert server.complete(prompt="still serving", **greedy(4))["usage"]["completion_tokens"] >= 1


# -- the other endpoints and errors --------------------------------------------------------------


def test_models_lists_the_served_name(server):
    status, data, _ = server.get("/v1/models")
    body = json.loads(data)
    assert status == 200 and body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [(SERVED_NAME, "model")]


def test_health_is_ok_while_the_engine_runs(server):
    status, data, _ = server.get("/health")
    assert (status, json.loads(data)) == (200, {"status": "ok"})


def test_metrics_are_prometheus_text(servers):
    plain, with_kvtier = servers
    plain.complete(prompt="count me", **greedy(2))
    status, data, content_type = plain.get("/metrics")
    text = data.decode()
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert "kvtier_engine_requests_total" in text and "kvtier_engine_steps_total" in text
    assert "kvtier_tier_chunks" not in text  # kvtier is off
    assert "kvtier_tier_chunks" in with_kvtier.get("/metrics")[1].decode()


@pytest.mark.parametrize("body, status, param", [
    ({}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "temperature": 1e-39}, 400, "temperature"),
    (b'{"prompt": "hi", "temperature": 1e999}', 400, "temperature"),  # JSON's way to say inf
    ({"prompt": "hi", "stop": ["s"] * 17}, 400, "stop"),
    ({"prompt": "hi", "stop": "s" * 257}, 400, "stop"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": ["one", ""]}, 400, "prompt"),  # a batch is refused whole for one bad prompt
    ({"prompt": ["one"] * 65}, 400, "prompt"),  # batches and n are bounded (MAX_CHOICES)
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": ["one", "two"], "n": 33}, 400, "n"),
    ({"prompt": "hi", "max_token": 5}, 400, "max_token"),
    ({"prompt": [1, 2, 100000]}, 400, None),  # past the vocabulary: the engine refuses it
    ({"prompt": [1, 2, 100000], "stream": True}, 400, None),  # still a status, not a broken stream
    ({"prompt": "hi", "model": MODEL}, 404, "model"),  # the plain server serves it as SERVED_NAME
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"prompt": "hi", "temperature": NaN}', 400, None),
    (b"[" * 100_000, 400, None),  # RecursionError in the decoder: it was a 500
])
def test_bad_request_gets_an_openai_error_and_the_server_carries_on(server, body, status, param):
    got, data = server.post(body)
    assert got == status
    error = data["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert server.complete(prompt="ok", **greedy(1))["choices"][0]["finish_reason"] in ("length", "stop")


def test_unknown_path_is_a_404_in_the_error_shape(server):
    status, data, _ = server.get("/v1/nothing")
    assert status == 404 and "message" in json.loads(data)["error"]


# -- hardening: parameters, body size, metrics ---------------------------------------------------


@pytest.mark.parametrize("which", [0, 1], ids=["plain", "kvtier-saving-partial-chunks"])
def test_a_tiny_temperature_gets_a_400_and_never_stops_the_server(servers, which):
    # temperature 1e-39 overflowed the sampler: 500 for the whole step, and after 3 such steps the
    # loop stopped for good; with save_partial_chunks a repeated prompt stopped it at once.
    server = servers[which]
    body = {"prompt": "the same prompt, again and again", "max_tokens": 4}
    for _ in range(MAX_FAILED_STEPS + 1):
        status, data = server.post({**body, "temperature": 1e-39})
        assert (status, data["error"]["param"]) == (400, "temperature"), data
    assert server.get("/health")[0] == 200
    assert server.complete(**body, temperature=0)["usage"]["completion_tokens"] >= 1


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    headers = {}
    while (line := reader.readline().strip()):
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, reader.read(int(headers.get(b"content-length", 0)))


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) << 10


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"


def test_a_body_over_the_limit_gets_413_before_it_is_sent(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % (256 << 20))  # and none of the body
        status, body = read_response(sock)
    assert status == 413 and "limit" in json.loads(body)["error"]["message"]


def test_a_chunked_body_over_the_limit_gets_413_and_memory_stays_bounded(server):
    # A 256 MiB body grew the server by 512 MiB before its 400.
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # restart the peak-RSS count
    before = peak_rss(server.proc.pid)
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock, \
            ThreadPoolExecutor(1) as reader:
        sock.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        reply = reader.submit(read_response, sock)  # read while sending: the answer comes mid-body
        try:
            for _ in range(64):
                if reply.done():
                    break
                sock.sendall(chunk)
        except OSError:  # the server closed the connection after answering
            pass
        status, body = reply.result(timeout=30)
    assert status == 413, body
    assert peak_rss(server.proc.pid) - before < 24 << 20
    assert server.complete(prompt="still serving", **greedy(2))["usage"]["completion_tokens"] >= 1


def closed_by_server(sock: socket.socket, trickle: bytes = b"") -> bool:
    """Whether the server closes `sock` within READ_TIMEOUT_S + 10 s, while we send `trickle` a byte
    every 0.2 s (nothing arrives for the client: it sent no complete request)."""
    deadline = time.monotonic() + READ_TIMEOUT_S + 10
    sock.settimeout(0.2)
    for i in itertools.count():
        if time.monotonic() > deadline:
            return False
        try:
            if trickle:
                sock.send(trickle[i % len(trickle):i % len(trickle) + 1])
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:  # reset, or a send after the close
            return True
    return False


def test_a_connection_that_sends_no_complete_request_head_is_closed(server):
    # uvicorn arms its idle timer only after a response and cancels it on any byte: a socket that
    # sent nothing, half a head, or a header line now and then was held for good (slowloris: the
    # server ran out of file descriptors and refused everyone).
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    try:
        silent, partial, trickling = sockets
        partial.sendall(HEAD)
        # After a whole request on the same connection, the next head gets the same deadline.
        get = b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n"
        trickling.sendall(get)
        assert read_response(trickling)[0] == 200
        with ThreadPoolExecutor(3) as pool:
            closed = list(pool.map(closed_by_server, sockets, [b"", b"", b"X-Slow: 1\r\n"]))
    finally:
        for sock in sockets:
            sock.close()
    assert closed == [True, True, True]
    assert server.get("/health")[0] == 200


def test_a_pipelined_request_running_past_the_head_deadline_is_not_cut(server):
    body = json.dumps({"prompt": "pipelined", "max_tokens": 16000, "ignore_eos": True, "stream": True})
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n" + HEAD
                     + b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode()))
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"HTTP/1.1 200")
        end = time.monotonic() + READ_TIMEOUT_S + 2  # the stream outlives a head deadline
        while time.monotonic() < end:
            assert reader.readline(), "the server closed the connection of a running request"


def test_a_body_that_does_not_arrive_in_time_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=READ_TIMEOUT_S + 20) as sock:
        sock.sendall(HEAD + b"Content-Length: 100\r\n\r\n{")  # and the other 99 bytes never
        status, body = read_response(sock)
    assert status == 408 and "did not arrive" in json.loads(body)["error"]["message"]
    assert server.complete(prompt="still serving", **greedy(2))["usage"]["completion_tokens"] >= 1


def test_metrics_carry_kvtier_lease_pin_and_pool_gauges(servers):
    text = servers[1].get("/metrics")[1].decode()
    for name in ("kvtier_leased_chunks", "kvtier_pinned_chunks", "kvtier_pool_slabs_used",
                 "kvtier_pool_slabs_total", "kvtier_pool_bytes_used", "kvtier_engine_free_kv_blocks"):
        assert any(line.startswith(name) for line in text.splitlines()), name


# -- kvtier across a restart (last: it stops the kvtier server) ------------------------------------


def test_restarted_server_loads_a_repeated_prompt_from_the_kvtier_disk_tier(servers, kvtier_config,
                                                                              tmp_path):
    prompt = "A long shared document that a later request repeats word for word. " * 5  # ~340 tokens
    first = servers[1].complete(prompt=prompt, max_tokens=8, temperature=0)
    assert first["kvtier"]["tokens_loaded"] == 0
    servers[1].stop()  # drains kvtier's background writes to disk
    restarted = launch(tmp_path / "restarted.log", "--kvtier-config", str(kvtier_config))
    try:
        restarted.wait_ready()
        again = restarted.complete(prompt=prompt, max_tokens=8, temperature=0)
    finally:
        restarted.stop()
    assert again["kvtier"]["tokens_loaded"] >= 32 * 8
    assert again["kvtier"]["prefill_tokens_computed"] < first["kvtier"]["prefill_tokens_computed"]
    assert again["choices"] == first["choices"]


# -- the process's own life: signals, exit status, start-up errors --------------------------------


def test_sigterm_drains_kvtier_to_disk_and_exits_0(tmp_path):
    # uvicorn re-raised SIGTERM before the engine was closed: exit -15, and queued disk writes were
    # lost (a .tmp was left behind).
    disk = tmp_path / "disk"
    config = tmp_path / "kvtier.yaml"
    config.write_text(KVTIER_YAML.format(path=disk))
    server = launch(tmp_path / "server.log", "--kvtier-config", str(config))
    try:
        server.wait_ready()
        with ThreadPoolExecutor(4) as pool:
            bodies = list(pool.map(lambda i: server.complete(
                prompt=f"{i}: a document that must survive a restart. " * 20, max_tokens=4, temperature=0),
                range(4)))
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(timeout=40)
    finally:
        server.stop()
    assert code == 0, server.log.read_text()
    files = [f for f in disk.rglob("*") if f.is_file()]
    assert [f.name for f in files if ".tmp" in f.name] == []
    # Every whole chunk of every prompt (prompts differ from their first token, so chunks are distinct).
    assert len([f for f in files if f.name.endswith(SUFFIX)]) >= sum(
        b["usage"]["prompt_tokens"] // 32 for b in bodies)


def test_requests_still_running_when_the_grace_period_ends_get_a_503_not_a_cut(tmp_path):
    # uvicorn cancelled the handlers still running after the grace period: a stream stopped mid-way
    # without an error event or [DONE], and a plain request got a plain-text 500 (not retryable).
    server = launch(tmp_path / "server.log")
    long = {"prompt": "a request longer than the grace period", "max_tokens": 16000, "ignore_eos": True}
    try:
        server.wait_ready()
        streaming = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        streaming.request("POST", "/v1/completions", json.dumps({**long, "stream": True}))
        stream = streaming.getresponse()
        assert stream.status == 200 and stream.readline().startswith(b"data: ")  # it is running
        with ThreadPoolExecutor(1) as pool:
            plain = pool.submit(server.post, long)
            wait_until(lambda: metric(server, "kvtier_engine_running_requests") >= 2,
                       "the second request never started")
            server.proc.send_signal(signal.SIGTERM)
            events = [e for e in stream.read().decode().split("\n\n") if e]
            status, body = plain.result(timeout=60)
        code = server.proc.wait(timeout=40)
    finally:
        server.stop()
    assert events[-1] == "data: [DONE]" and '"error"' in events[-2], events[-2:]
    assert status == 503 and body["error"]["type"] == "server_error"
    assert code == 0, server.log.read_text()


def test_an_engine_that_cannot_run_fails_health_and_exits_non_zero(tmp_path):
    # The loop stopped for good, /health said 503, and the process stayed up: no supervisor restarted it.
    server = launch(tmp_path / "broken.log",
                    command=[sys.executable, str(Path(__file__).with_name("broken_engine_server.py"))])
    try:
        server.wait_ready()
        statuses = [server.post({"prompt": f"try {i}", "max_tokens": 2})[0] for i in range(MAX_FAILED_STEPS)]
        try:
            health = server.get("/health")[0]
        except OSError:  # already shut down
            health = None
        code = server.proc.wait(timeout=30)
    finally:
        server.stop()
    assert statuses == [500] * MAX_FAILED_STEPS
    assert health in (503, None)
    assert code == 1, server.log.read_text()


def test_a_config_typo_is_one_line_naming_key_and_file_and_a_non_zero_exit(tmp_path):
    # It was a 25-line traceback, after the model had loaded.
    config = tmp_path / "kvtier.yaml"
    config.write_text("chunk_sise: 32\n")
    done = subprocess.run([sys.executable, "-m", "kvtier_engine", "serve", MODEL, "--kvtier-config",
                           str(config), "--port", str(free_port()), "--log-level", "warning"],
                          capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, lines
    assert "chunk_sise" in lines[0] and str(config) in lines[0]


# -- in-process: the body mapping, the CLI and EngineLoop ----------------------------------------


def test_sampling_params_from_a_completions_body():
    assert sampling_params({}) == SamplingParams(temperature=1.0, max_tokens=16)
    body = {"temperature": 0, "top_p": 0.5, "top_k": 4, "max_tokens": 9, "seed": 3, "stop": "\n",
            "ignore_eos": True}
    assert sampling_params(body) == SamplingParams(temperature=0.0, top_k=4, top_p=0.5, max_tokens=9,
                                                   seed=3, stop=("\n",), ignore_eos=True)
    assert sampling_params({"stop": ["a", "b"], "top_k": None, "seed": None}).stop == ("a", "b")
    for bad, param in [({"top_k": 0}, "top_k"), ({"max_tokens": 1.5}, "max_tokens"),
                       ({"temperature": "hot"}, "temperature"), ({"stop": [""]}, "stop"),
                       ({"seed": 1 << 64}, "seed"), ({"ignore_eos": 1}, "ignore_eos")]:
        with pytest.raises(InvalidRequest) as err:
            sampling_params(bad)
        assert err.value.param == param


def test_parse_completion_request_prompt_forms_and_neutral_openai_fields():
    assert parse_completion_request({"prompt": "hi"}).prompt == "hi"
    assert parse_completion_request({"prompt": [[1, 2]]}).prompt == (1, 2)
    parsed = parse_completion_request({"prompt": ["hi"], "n": 1, "echo": False, "logprobs": None,
                                       "stream": True, "stream_options": {"include_usage": True}})
    assert (parsed.prompt, parsed.stream, parsed.include_usage, parsed.model) == ("hi", True, True, None)
    for bad in ({"prompt": []}, {"prompt": [True]}, {"prompt": [-1]}, {"prompt": 5}):
        with pytest.raises(InvalidRequest):
            parse_completion_request(bad)


def test_cli_parses_serve_options():
    args = build_parser().parse_args(["serve", MODEL, "--kv-cache-bytes", "64MiB", "--max-num-seqs", "4"])
    assert (args.model, args.host, args.port) == (MODEL, "127.0.0.1", 8000)
    assert (args.kv_cache_bytes, args.max_num_seqs) == (64 << 20, 4)
    assert args.max_body_bytes == 8 << 20
    assert build_parser().parse_args(["serve", MODEL, "--max-body-bytes", "1MiB"]).max_body_bytes == 1 << 20
    assert args.max_requests == 512
    assert build_parser().parse_args(["serve", MODEL, "--max-requests", "8"]).max_requests == 8
    assert args.read_timeout == 30.0
    assert build_parser().parse_args(["serve", MODEL, "--read-timeout", "2.5"]).read_timeout == 2.5
    for bad in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", MODEL, "--read-timeout", bad])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", MODEL, "--kv-cache-bytes", "lots"])
    with pytest.raises(SystemExit):  # uvicorn would bind every interface: fail closed
        build_parser().parse_args(["serve", MODEL, "--host", " "])
    assert (args.kv_role, args.kv_peer) == ("both", [])
    roles = build_parser().parse_args(["serve", MODEL, "--kv-role", "decode", "--kv-peer", "kvtier://h:1"])
    assert (roles.kv_role, roles.kv_peer) == ("decode", ["kvtier://h:1"])


class FakeEngine:
    """Finishes each request in the step after it is added; the first `fail_steps` steps raise."""

    def __init__(self, fail_steps: int = 0):
        self.fail_steps = fail_steps
        self.pending: dict[str, list[int]] = {}
        self.closed = False

    def add_request(self, prompt, params, request_id, kv_transfer_params=None):
        if not prompt:
            raise ValueError("empty prompt")
        self.pending[request_id] = list(prompt)

    def has_unfinished(self) -> bool:
        return bool(self.pending)

    def has_requests(self) -> bool:
        return bool(self.pending)

    def abort(self, request_id):
        self.pending.pop(request_id, None)

    def step(self):
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("device fell over")
        outputs = [RequestOutput(rid, None, ids, "x", [1], True, "length", RequestMetrics(0.0), "x", (1,))
                   for rid, ids in self.pending.items()]
        self.pending.clear()
        return outputs

    def close(self):
        self.closed = True


async def _collect(loop: EngineLoop, prompt, request_id: str) -> RequestOutput | RequestFailed:
    stream = loop.submit(prompt, SamplingParams(), request_id)
    try:
        while not (out := await stream.next()).finished:
            pass
        return out
    except RequestFailed as exc:
        return exc


def test_engine_loop_fails_requests_of_a_failed_step_with_500_and_carries_on():
    async def story():
        loop = EngineLoop(FakeEngine(fail_steps=1))
        loop.start()
        try:
            failed = await _collect(loop, [1, 2], "a")
            rejected = await _collect(loop, [], "b")
            served = await _collect(loop, [3], "c")
            return failed, rejected, served, loop.alive
        finally:
            loop.close()

    failed, rejected, served, alive = asyncio.run(story())
    assert isinstance(failed, RequestFailed) and failed.status == 500
    assert isinstance(rejected, RequestFailed) and rejected.status == 400
    assert isinstance(served, RequestOutput) and served.finished and alive


def test_engine_loop_stops_when_steps_keep_failing_and_answers_503_after():
    async def story():
        engine = FakeEngine(fail_steps=100)
        loop = EngineLoop(engine)
        loop.start()
        results = [await _collect(loop, [1], f"r{i}") for i in range(MAX_FAILED_STEPS)]
        try:  # refused at once, or failed by the stopping thread's final drain: 503 either way
            late = await _collect(loop, [1], "late")
        except EngineUnavailable as exc:
            late = exc
        alive = loop.alive
        loop.close()
        return results, late, alive, engine.closed

    results, late, alive, closed = asyncio.run(story())
    assert [r.status for r in results] == [500] * MAX_FAILED_STEPS
    assert isinstance(late, EngineUnavailable) and late.status == 503
    assert not alive and closed


def test_a_failed_step_with_save_partial_chunks_does_not_stop_the_engine_loop(tmp_path):
    # The aborted request's final (partial-chunk) save held its blocks, so the engine was not idle
    # after the failure and the loop gave up for good on the first failed step.
    config = tmp_path / "kvtier.yaml"
    config.write_text("chunk_size: 32\nsave_partial_chunks: true\ncpu:\n  capacity: 16MiB\ndisk: null\n")
    engine = LLMEngine(EngineOptions(MODEL, kvtier_config=str(config), device="cpu", kv_cache_bytes=1 << 20))
    forward, fail_next = engine.model.hidden_states, threading.Event()

    def flaky(*args):
        if fail_next.is_set():
            fail_next.clear()
            raise RuntimeError("injected: the forward pass failed")
        return forward(*args)

    engine.model.hidden_states = flaky
    prompt = list(range(1, 61))  # 48 tokens in the device prefix cache the second time

    async def story():
        loop = EngineLoop(engine)
        loop.start()
        try:
            first = await _collect(loop, prompt, "a")
            fail_next.set()
            failed = await _collect(loop, prompt, "b")
            served = await _collect(loop, prompt, "c")
            return first, failed, served, loop.alive
        finally:
            loop.close()

    first, failed, served, alive = asyncio.run(story())
    assert isinstance(first, RequestOutput) and first.finished
    assert isinstance(failed, RequestFailed) and failed.status == 500
    assert isinstance(served, RequestOutput) and served.finished and alive




class CountingEngine(FakeEngine):
    """Every step gives each request one more token, as LLMEngine's outputs do: the whole text and
    token list so far, and the new ones; a request for prompt [n] finishes at n tokens."""

    def __init__(self):
        super().__init__()
        self.lengths: dict[str, int] = {}

    def add_request(self, prompt, params, request_id, kv_transfer_params=None):
        self.pending[request_id], self.lengths[request_id] = [], prompt[0]

    def step(self):
        outputs = []
        for rid, tokens in list(self.pending.items()):
            tokens.append(7)
            done = len(tokens) >= self.lengths[rid]
            if done:
                del self.pending[rid]
            outputs.append(RequestOutput(rid, None, [1], "x" * len(tokens), list(tokens), done,
                                         "length" if done else None, RequestMetrics(0.0), "x", (7,)))
        return outputs


def test_a_stream_nobody_reads_holds_one_output_not_every_step_of_them():
    # Each output carries the whole text and token list so far; those of a client that stopped
    # reading (its socket full) stayed queued, one per step: memory quadratic in the stream's length
    # (a 16K-token stream held ~1 GiB). Outputs not yet taken are merged into the latest.
    length = 2000  # queued, they held ~20 MB

    async def story():
        loop = EngineLoop(CountingEngine())
        loop.start()
        try:
            stream = loop.submit([length], SamplingParams(), "slow")
            first = await stream.next()
            tracemalloc.start()  # the client stops reading until the engine is done
            try:
                deadline = time.monotonic() + 30
                while loop.engine.has_unfinished():
                    assert time.monotonic() < deadline, "the engine did not finish"
                    await asyncio.sleep(0.01)
                # Delivered after the last of the slow stream's outputs: once it is here, they are.
                await loop.submit([1], SamplingParams(), "probe").next()
                held = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            rest = await stream.next()
            return first, rest, held
        finally:
            loop.close()

    first, rest, held = asyncio.run(story())
    assert held < 2 << 20, f"{held} bytes held for one unread stream"
    assert rest.finished and len(rest.token_ids) == length
    assert first.new_token_ids + rest.new_token_ids == (7,) * length  # no delta lost in the merge
    assert first.new_text + rest.new_text == "x" * length


class RecordingEngine(FakeEngine):
    tokenizer = ByteTokenizer()

    def __init__(self):
        super().__init__()
        self.added: list = []

    def add_request(self, prompt, params, request_id, kv_transfer_params=None):
        self.added.append(prompt)
        super().add_request(prompt, params, request_id)


async def asgi_post(app, body: dict | bytes, length: int | None = None,
                    path: str = "/v1/completions") -> tuple[int, dict | None]:
    """POST `path` to an ASGI app, in-process; a `length` over the body's is a client that
    disconnects after sending what it has."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(length or len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    messages = [{"type": "http.request", "body": raw, "more_body": length is not None}]
    if length is not None:
        messages.append({"type": "http.disconnect"})
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # no disconnect: the client waits for its answer

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(body) if body else None


def test_a_prompt_longer_than_the_context_is_refused_before_the_engine_thread():
    # An 8 MiB prompt was tokenized and scanned on the engine's thread before its 400: every running
    # stream stalled ~0.6 s per such request. Its length is checked first, off the engine thread.
    engine = RecordingEngine()

    async def story():
        loop = EngineLoop(engine)
        loop.start()
        try:
            app = build_app(loop, ServedModel("m", max_model_len=64, created=0))
            refused = [await asgi_post(app, {"prompt": prompt}) for prompt in ("x" * 64, [1] * 64)]
            served = await asgi_post(app, {"prompt": "x" * 63, "max_tokens": 1})
            return refused, served
        finally:
            loop.close()

    refused, served = asyncio.run(story())
    assert [(status, body["error"]["param"]) for status, body in refused] == [(400, "prompt")] * 2
    assert "64 tokens" in refused[0][1]["error"]["message"]
    assert served[0] == 200 and engine.added == [[ord("x")] * 63]


def test_a_client_gone_mid_body_is_not_an_unhandled_error(caplog):
    # Starlette's ClientDisconnect reached the catch-all handler: "unhandled error" and uvicorn's
    # "Exception in ASGI application", two tracebacks at ERROR for every 50-byte connection.
    async def story():
        loop = EngineLoop(RecordingEngine())
        loop.start()
        try:
            app = build_app(loop, ServedModel("m", max_model_len=64, created=0))
            return await asgi_post(app, b'{"prompt": "half a bo', length=100)
        finally:
            loop.close()

    with caplog.at_level(logging.ERROR):
        status, _ = asyncio.run(story())
    assert status == 499 and not [r for r in caplog.records if r.levelno >= logging.ERROR]


class StalledEngine(RecordingEngine):
    """Holds every request unfinished until `release` is set (then finishes them, as FakeEngine)."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()

    def step(self):
        # Waits on the event rather than spinning: the loop steps while requests are unfinished.
        return super().step() if self.release.wait(0.01) else []


def test_requests_beyond_max_requests_get_503_instead_of_queueing_without_end():
    # A flood of requests queued without bound, each holding its prompt and output in memory.
    engine = StalledEngine()

    async def story():
        loop = EngineLoop(engine, max_requests=2)
        loop.start()
        try:
            app = build_app(loop, ServedModel("m", max_model_len=64, created=0))
            held = [loop.submit([1], SamplingParams(), f"r{i}") for i in range(2)]
            refused = await asgi_post(app, {"prompt": [1], "max_tokens": 1})
            held[0].abort()  # a client that left frees its place at once
            third = loop.submit([1], SamplingParams(), "r3")
            engine.release.set()
            outs = [await _until_done(stream) for stream in (held[1], third)]
            return refused, outs, loop.open_requests
        finally:
            loop.close()

    (status, body), outs, open_after = asyncio.run(story())
    assert status == 503 and "busy" in body["error"]["message"]
    assert all(out.finished for out in outs) and open_after == 0


async def _until_done(stream) -> RequestOutput:
    while not (out := await stream.next()).finished:
        pass
    return out
