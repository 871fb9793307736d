"""The `kvtier` CLI (kvtier/cli/) as a user runs it: `python -m kvtier.cli` in a subprocess, its
stdout, its one-line errors on stderr and its exit statuses.

Without a controller: usage errors (exit 2) and an unreachable controller (exit 3). Against a real
`kvtier_controller` process: instances registered over the agents' REST channel by the test itself
(a registration and one event batch, no engine: fast and exact), for tables, --json, tokens (exit
4), unknown (5), down (6) and unreachable (1: the controller's 502) instances. Then one real
CacheEngine instance process (tests/controller/fleet_instance.py) that joined the fleet by its
config: lookup shows what it stored, pin/unpin/move/clear change what it holds.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fleet_processes import (
    CHUNK,
    MODEL,
    TOKEN,
    free_port,
    instances,
    prompt,
    running_fleet,
    wait_hits,
    wait_up,
)
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from waiting import wait_until

from kvtier.cli.exits import MEANINGS
from kvtier.fleet.messages import EventBatch, KeyEvent, Registration, TierUsage
from kvtier.keys import Namespace, TokenDatabase

RUN_DEADLINE_S = 30.0
GEOMETRY = "L2xH2xD16 float16"


Run = subprocess.CompletedProcess


def kvtier(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Run:
    """One `kvtier` run; the environment has no KVTIER_CONTROLLER_* but what `env` gives."""
    # No COLUMNS either: tables written to a pipe take the CLI's own width.
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVTIER_CONTROLLER") and k != "COLUMNS"}
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=RUN_DEADLINE_S, env={**base, **(env or {})})


def failed(run: subprocess.CompletedProcess, status: int, *words: str) -> str:
    """Assert `run` exited `status` with nothing on stdout and one `kvtier: ...` line holding `words`."""
    assert run.returncode == status, (run.returncode, run.stdout, run.stderr)
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtier: "), run.stderr
    assert "Traceback" not in run.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# -- without a controller ------------------------------------------------------------------------

PROMPT = ["lookup", "--model", MODEL, "--tokens-file", "-"]


@pytest.mark.parametrize("args, stdin, words", [
    ([], None, ["COMMAND"]),
    (["evict"], None, ["invalid choice: 'evict'"]),
    (["lookup", "--tokens-file", "-"], "1 2", ["--model"]),
    (["lookup", "--model", MODEL], None, ["--tokens-file F or --text"]),
    (["lookup", "--model", MODEL, "--text", "hello"], None, ["--text needs --tokenizer"]),
    (["lookup", "--model", MODEL, "--tokens-file", "/nonexistent/tokens"], None, ["/nonexistent/tokens",
                                                                                   "cannot read"]),
    (PROMPT, "1 2 x 4", ["token 2 is 'x', not an integer"]),
    (PROMPT, "[1, true]", ["token 1 is true, not an integer"]),
    (PROMPT, "[1, -5]", ["token 1 is -5, outside [0, 4294967295]"]),
    (PROMPT, "7 4294967296", ["token 1 is 4294967296, outside"]),
    (PROMPT, '{"tokens": [1]}', ["expected a JSON list of integers"]),
    (PROMPT, "[1, 2", ["not valid JSON"]),
    (PROMPT, " \n", ["no tokens"]),
    (["lookup", "--model", "", "--tokens-file", "-"], "1", ["--model"]),
    (["pin", "--model", MODEL, "--tokens-file", "-", "--instance", "../etc"], "1", ["--instance"]),
    (["move", "--model", MODEL, "--tokens-file", "-", "--instance", "a"], "1", ["--to"]),
    (["move", "--model", MODEL, "--tokens-file", "-", "--instance", "a", "--to", "Disk"], "1", ["--to"]),
    (["clear", "--tier", "no such"], None, ["--tier"]),
    (["--timeout", "0", "instances"], None, ["--timeout"]),
    (["instances", "--timeout", "nan"], None, ["--timeout"]),
    (["--controller", "ftp://host", "instances"], None, ["--controller", "http://"]),
    (["--controller", "http://host:port", "instances"], None, ["--controller"]),
])
def test_usage_errors_exit_2_with_one_line(args, stdin, words):
    failed(kvtier(*args, stdin=stdin), 2, *words)


def test_a_token_is_never_an_argument_nor_echoed():
    for args in (["--token", "s3cret-value", "instances"], ["instances", "--token=s3cret-value"]):
        line = failed(kvtier(*args), 2, "--token-file", "KVTIER_CONTROLLER_TOKEN")
        assert "s3cret-value" not in line
    # Not an abbreviation of --token-file either (the secret would come back as a file name).
    line = failed(kvtier("--token-f", "s3cret-value", "instances"), 2)
    assert "cannot read" not in line


def test_token_files_are_checked(tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    failed(kvtier("--token-file", str(empty), "instances"), 2, "empty")
    two_lines = tmp_path / "two"
    two_lines.write_text("abc\ndef\n")
    line = failed(kvtier("--token-file", str(two_lines), "instances"), 2, "printable ASCII")
    assert "abc" not in line
    failed(kvtier("--token-file", str(tmp_path / "missing"), "instances"), 2, "cannot read")


def test_a_tokenizer_folder_needs_tokenizer_json(tmp_path):
    failed(kvtier("lookup", "--model", MODEL, "--text", "hi", "--tokenizer", str(tmp_path)), 2,
           "no tokenizer.json")
    failed(kvtier("lookup", "--model", MODEL, "--text", "hi", "--tokenizer", "not-a-model-anywhere"), 2,
           "not a folder with tokenizer.json")


def test_help_lists_every_exit_status():
    run = kvtier("--help")
    assert run.returncode == 0 and run.stderr == ""
    for status, meaning in MEANINGS.items():
        assert f"{status}  {meaning}" in run.stdout


def test_an_unreachable_controller_exits_3():
    port = free_port()  # nothing listens there any more: refused
    failed(kvtier("--controller", f"http://127.0.0.1:{port}", "instances"), 3,
           f"cannot reach the controller at http://127.0.0.1:{port}")
    # One that accepts and never answers: --timeout bounds the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        run = kvtier("--timeout", "0.5", "instances", env={"KVTIER_CONTROLLER_URL": url})
        failed(run, 3, url, "timed out")


class _Canned(BaseHTTPRequestHandler):
    """A stand-in for a controller of another version, or a broken one: path -> (status, body)."""

    replies = {
        "/v1/instances": (200, b'{"instances": 5}'),
        "/v1/stats": (200, b"<html>not json</html>"),
        "/v1/lookup": (503, b'{"detail": "the index is unavailable:\\nRedis is down"}'),
    }

    def _answer(self):
        status, body = self.replies[self.path]
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


def test_odd_replies_are_one_line_each():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        failed(kvtier("--controller", url, "instances"), 1, "not what this kvtier expects", "instances")
        failed(kvtier("--controller", url, "stats"), 3, "not JSON")
        # The detail's newline is a space: still one line.
        failed(kvtier("--controller", url, *PROMPT, stdin="1 2"), 1, "503", "unavailable: Redis is down")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- against a kvtier_controller -----------------------------------------------------------------

STEADY = {"heartbeat_timeout_s": 300.0}  # the test's own registrations stay up without heartbeats


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    with running_fleet(tmp_path_factory.mktemp("cli-fleet")) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def steady(fleet):
    """A controller whose instances stay up for minutes."""
    return fleet.start_controller(STEADY, name="steady")


@pytest.fixture(scope="module")
def quick(fleet):
    """A controller that marks an instance down after 1.5 s without a heartbeat (real instances
    send one every 0.2 s)."""
    return fleet.start_controller(name="quick")


def at(controller, *args: str, token_file: Path | str | None = "default", **options) -> Run:
    """`kvtier --controller <its URL> --token-file <its token file> ARGS`."""
    token = controller.folder / "token" if token_file == "default" else token_file
    return kvtier("--controller", controller.url, *([] if token is None else ["--token-file", str(token)]),
                  *args, **options)


def register(controller, instance_id: str, tokens: list[int], tiers: dict[str, int]) -> None:
    """Join `instance_id` as an engine of MODEL holding the leading chunks of `tokens`: `tiers` maps
    a tier to how many of them it holds, in order (cpu first). Commands to it find nobody (502)."""
    namespace = Namespace(MODEL, GEOMETRY)
    usage = [TierUsage(name=name, chunks=n, bytes_used=n * 4096, capacity_bytes=1 << 20)
             for name, n in tiers.items()]
    client = controller.client()
    session = client.post("/v1/instances/register", Registration(
        instance_id=instance_id, kind="engine", command_url=f"http://127.0.0.1:{free_port()}",
        command_token="t" * 32, model_id=MODEL, namespace=namespace.digest().hex(), chunk_size=CHUNK,
        layout=GEOMETRY, tiers=usage))["session"]
    keys = [key.hex() for key in TokenDatabase(namespace, CHUNK).keys(tokens)]
    events, start = [], 0
    for name, n in tiers.items():
        events.append(KeyEvent(op="stored", tier=name, keys=keys[start:start + n]))
        start += n
    client.post(f"/v1/instances/{instance_id}/events", EventBatch(session=session, seq=1, events=events))
    client.close()


def test_a_wrong_or_missing_token_exits_4(steady, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    failed(at(steady, "instances", token_file=wrong), 4, "401", "--token-file")
    failed(at(steady, "instances", token_file=None), 4, "401")
    # The token from the environment works like the file.
    run = kvtier("--controller", steady.url, "instances", env={"KVTIER_CONTROLLER_TOKEN": TOKEN})
    assert run.returncode == 0, run.stderr


def test_instances_table_and_json(steady):
    register(steady, "cli-table", prompt(1, 4 * CHUNK), {"cpu": 2, "disk": 1})
    run = at(steady, "instances")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    row = next(line for line in run.stdout.splitlines() if "cli-table" in line)
    for word in ("engine", MODEL, " up ", " 3 ", "cpu 8.0 KiB/1.0 MiB (2 chunks)",
                 "disk 4.0 KiB/1.0 MiB (1 chunk)"):
        assert word in row, (word, row)
    run = at(steady, "instances", "--json")  # after the command as well as before it
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    assert run.stdout.count("\n") == 1 and run.stdout.startswith('{"instances":[')
    expected = steady.client().get("/v1/instances")
    for reply in (printed, expected):
        for instance in reply["instances"]:
            instance.pop("last_heartbeat_s")
    assert printed == expected
    assert "t" * 32 not in run.stdout  # the command token never leaves the controller


def test_lookup_with_a_tokens_file(steady, tmp_path):
    tokens = prompt(2, 5 * CHUNK + 3)
    register(steady, "cli-lookup", tokens, {"cpu": 2, "disk": 1})
    as_json = tmp_path / "tokens.json"
    as_json.write_text(json.dumps(tokens))
    run = at(steady, "lookup", "--model", MODEL, "--tokens-file", str(as_json))
    assert run.returncode == 0, run.stderr
    assert f"{len(tokens)} tokens; longest cached prefix: {3 * CHUNK} tokens" in run.stdout
    row = next(line for line in run.stdout.splitlines() if "cli-lookup" in line)
    assert str(3 * CHUNK) in row and "cpu x2, disk x1" in row
    # Whitespace-separated on stdin; --json is the controller's reply; --instance narrows it.
    run = at(steady, "--json", "lookup", "--model", MODEL, "--tokens-file", "-", "--instance", "cli-lookup",
             stdin=" ".join(map(str, tokens)) + "\n")
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert reply["num_tokens"] == len(tokens) and reply["hit_tokens"] == 3 * CHUNK
    assert reply["instances"] == [{"instance_id": "cli-lookup", "hit_tokens": 3 * CHUNK, "chunk_size": CHUNK,
                                   "tiers": ["cpu", "cpu", "disk"]}]


def test_lookup_with_text_and_a_tokenizer(steady, tmp_path):
    # A model folder's tokenizer.json (one word, one id), read with `tokenizers`.
    words = [f"w{i}" for i in range(3 * CHUNK)]
    tokenizer = Tokenizer(WordLevel({w: i + 7 for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    register(steady, "cli-words", [i + 7 for i in range(3 * CHUNK)], {"disk": 2})
    run = at(steady, "lookup", "--model", MODEL, "--text", " ".join(words), "--tokenizer", str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "disk x2" in next(line for line in run.stdout.splitlines() if "cli-words" in line)
    # A random preset: kvtier_engine's byte-level tokenizer, the one `kvtier_engine serve` uses for it.
    text = "kvtier " * (2 * CHUNK // 7 + 1)
    register(steady, "cli-bytes", list(text.encode()), {"cpu": 2})
    run = at(steady, "--json", "lookup", "--model", MODEL, "--text", text, "--tokenizer", "random:llama-tiny",
             "--instance", "cli-bytes")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["instances"][0]["hit_tokens"] == 2 * CHUNK


def test_unknown_instance_exits_5(steady):
    failed(at(steady, "pin", "--model", MODEL, "--tokens-file", "-", "--instance", "nobody", stdin="1 2 3"),
           5, "404", "nobody")
    failed(at(steady, "clear", "--instance", "nobody"), 5, "404")
    failed(at(steady, "move", "--model", MODEL, "--tokens-file", "-", "--instance", "nobody", "--to", "disk",
              stdin="1"), 5, "404")


def test_an_instance_that_does_not_answer_exits_1(steady):
    tokens = prompt(3, 2 * CHUNK)
    register(steady, "cli-deaf", tokens, {"cpu": 2})  # its command port refuses: the controller says 502
    failed(at(steady, "pin", "--model", MODEL, "--tokens-file", "-", "--instance", "cli-deaf",
              stdin=json.dumps(tokens)), 1, "502")


def test_a_down_instance_exits_6(quick):
    controller = quick
    register(controller, "cli-gone", prompt(4, CHUNK), {"cpu": 1})
    wait_until(lambda: not instances(controller.client())["cli-gone"]["up"], "cli-gone marked down")
    failed(at(controller, "pin", "--model", MODEL, "--tokens-file", "-", "--instance", "cli-gone", stdin="1"),
           6, "409", "cli-gone", "down")
    run = at(controller, "instances")
    assert "down" in next(line for line in run.stdout.splitlines() if "cli-gone" in line)


def test_stats(steady):
    run = at(steady, "stats")
    assert run.returncode == 0, run.stderr
    assert "instances up" in run.stdout and "requests" in run.stdout
    reply = json.loads(at(steady, "stats", "--json").stdout)
    assert reply["instances_up"] >= 0 and "/v1/instances" in reply["requests"]


# -- a real CacheEngine instance that joined the fleet -------------------------------------------

@pytest.fixture(scope="module")
def engine(fleet, quick):
    [instance] = fleet.start_instances(["cli-engine"], controller=quick)
    wait_up(quick.client(), ["cli-engine"])
    return instance


def command(controller, tokens_file: Path, *args: str) -> str:
    """`kvtier ARGS --model MODEL --tokens-file F --instance cli-engine`: its stdout (it must succeed)."""
    run = at(controller, *args, "--model", MODEL, "--tokens-file", str(tokens_file),
             "--instance", "cli-engine")
    assert run.returncode == 0 and run.stderr == "", (args, run.stderr)
    return run.stdout


def test_a_real_instance_through_the_cli(quick, engine, tmp_path):
    seed, n = 10, 4 * CHUNK
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(" ".join(map(str, prompt(seed, n))))
    assert engine.store(seed, n) == 4
    wait_hits(quick.client(), prompt(seed, n), {"cli-engine": n}, "the stored chunks indexed")
    row = next(line for line in at(quick, "instances").stdout.splitlines() if "cli-engine" in line)
    assert " up " in f" {row} " and MODEL in row

    out = command(quick, tokens_file, "lookup")
    assert f"longest cached prefix: {n} tokens (100%)" in out
    assert "cpu x4" in next(line for line in out.splitlines() if "cli-engine" in line)

    assert command(quick, tokens_file, "pin").startswith("pinned 4 chunks on 1 instance")
    assert engine.stats()["pinned"] == 4
    assert command(quick, tokens_file, "unpin").startswith("unpinned 4 chunks on 1 instance")
    assert engine.stats()["pinned"] == 0

    assert command(quick, tokens_file, "move", "--to", "disk").startswith("moved 4 chunks to disk")
    assert engine.tiers(seed, n) == {"cpu": [False] * 4, "disk": [True] * 4}
    assert command(quick, tokens_file, "move", "--to", "cpu", "--copy").startswith("copied 4 chunks to cpu")
    assert engine.tiers(seed, n) == {"cpu": [True] * 4, "disk": [True] * 4}
    run = at(quick, "move", "--model", MODEL, "--tokens-file", str(tokens_file), "--instance", "cli-engine",
             "--to", "nvme")
    failed(run, 1, "400", "nvme")  # the instance's own refusal, passed on

    run = at(quick, "clear", "--instance", "cli-engine")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("removed 8 chunks on 1 instance")  # 4 in cpu, 4 on disk
    assert engine.lookup(seed, n) == 0
    wait_hits(quick.client(), prompt(seed, n), {"cli-engine": 0}, "the cleared chunks left the index")
