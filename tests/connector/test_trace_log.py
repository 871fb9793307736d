"""Tests for kvtier/connector/trace_log.py: the `trace_log:` file, served through the bundled engine on
random:llama-tiny with 256-token chunks and read back with kvtier.sim.trace.read_trace (one line per
request, ids that name prefixes, lengths, no token ids, max_bytes, refused paths, off by default),
then the writer alone on a FakeClock (timestamps, flushing, a write that fails part-way)."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FakeClock
from native_paths import use_native

from kvtier import load_config, native_keys
from kvtier.config import KvtierConfig
from kvtier.connector.trace_log import COUNTERS, FLUSH_LINES, FLUSH_S, TraceLog, hash_ids
from kvtier.keys import Namespace, TokenDatabase
from kvtier.sim.trace import read_trace
from kvtier_engine import LLM, SamplingParams

from .conftest import prompt

CHUNK = 256
FIELDS = {"timestamp", "input_length", "output_length", "block_size", "hash_ids"}
BASE = prompt(600, seed=1)
SHARED = BASE[:512] + prompt(100, seed=2)  # BASE's first two chunks, then its own


def config(tmp_path: Path, **trace_log: object) -> KvtierConfig:
    """CPU tier only, 256-token chunks, and a `trace_log:` section with `trace_log` unless empty."""
    text = f"chunk_size: {CHUNK}\ncpu:\n  capacity: 16MiB\n  pin_memory: off\ndisk: null\n"
    if trace_log:
        text += "trace_log:\n" + "".join(f"  {key}: {value}\n" for key, value in trace_log.items())
    path = tmp_path / "kvtier.yaml"
    path.write_text(text)
    return load_config(path, env={})


def serve(kv_config: KvtierConfig, requests: list[tuple[list[int], int]]
          ) -> tuple[list[list[int]], dict, TokenDatabase]:
    """Each (prompt, max_tokens) generated in turn on llama-tiny; (the outputs, the connector's stats
    after the engine closed, kvtier's TokenDatabase there)."""
    outputs = []
    with LLM("random:llama-tiny", kvtier_config=kv_config, device="cpu", kv_cache_bytes=4 << 20) as llm:
        for tokens, n in requests:
            outputs.append(llm.generate(tokens, SamplingParams(temperature=0, max_tokens=n,
                                                               ignore_eos=True))[0].token_ids)
    return outputs, llm.engine.scheduler.connector.stats(), llm.engine.kvtier.db


def ids_of(keys) -> list[int]:
    return [int.from_bytes(key.digest[:8], "big") >> 11 for key in keys]


def test_each_request_is_one_line_whose_ids_name_its_prompts_chunks(tmp_path):
    path = tmp_path / "trace.jsonl"
    short, exact = prompt(10, seed=3), BASE[:512]
    requests = [(BASE, 3), (BASE, 5), (SHARED, 4), (short, 2), (exact, 1)]
    outputs, stats, db = serve(config(tmp_path, path=path), requests)

    trace, skipped = read_trace(path)
    assert skipped == [] and len(trace) == len(requests)
    assert [len(out) for out in outputs] == [3, 5, 4, 2, 1]
    assert [(r.input_length, r.output_length) for r in trace] == [
        (600, 3), (600, 5), (612, 4), (10, 2), (512, 1)]
    assert [len(r.hash_ids) for r in trace] == [math.ceil(len(p) / CHUNK) for p, _ in requests]
    assert [len(r.hash_ids) for r in trace] == [3, 3, 3, 1, 2]
    first, again, shared, alone, whole = (r.hash_ids for r in trace)
    assert again == first  # the same prompt
    assert shared[:2] == first[:2] and shared[2] != first[2]  # a 512-token prefix in common, then not
    assert whole == first[:2] and alone[0] not in first
    # The chunk keys' digests (the partial chunk's chained as save_partial_chunks keys it), 53 bits.
    assert list(first) == ids_of(TokenDatabase(db.namespace, CHUNK, save_partial=True).keys(BASE))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(line) == FIELDS and line["block_size"] == CHUNK for line in lines)
    stamps = [line["timestamp"] for line in lines]
    assert all(type(t) is int for t in stamps) and stamps[0] == 0 and stamps == sorted(stamps)
    assert {k: stats[k] for k in COUNTERS} == {"trace_lines": 5, "trace_lines_dropped": 0, "trace_errors": 0}
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_the_file_holds_no_token_ids(tmp_path):
    path = tmp_path / "trace.jsonl"
    outputs, _, _ = serve(config(tmp_path, path=path), [(BASE, 6), (SHARED, 6)])

    text = path.read_text()
    for tokens in (BASE, SHARED, *outputs):
        for sep in (",", ", ", " "):
            assert sep.join(map(str, tokens[4:8])) not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 2 and all(set(line) == FIELDS for line in lines)
    assert all(h >= 1 << 20 for line in lines for h in line["hash_ids"])  # no id is a token id (< 512)


def test_an_aborted_request_is_logged_with_what_it_generated(tmp_path):
    path = tmp_path / "trace.jsonl"
    with LLM("random:llama-tiny", kvtier_config=config(tmp_path, path=path), device="cpu",
             kv_cache_bytes=4 << 20) as llm:
        engine = llm.engine
        request_id = engine.add_request(BASE, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        generated = 0
        while generated < 3:
            outputs = [o for o in engine.step() if o.request_id == request_id]
            generated = len(outputs[0].token_ids) if outputs else generated
        engine.abort(request_id)

    (line,), _ = read_trace(path)
    assert (line.input_length, line.output_length, len(line.hash_ids)) == (600, generated, 3)


def test_max_bytes_stops_logging_with_one_warning_and_counts_the_rest(tmp_path, caplog):
    path = tmp_path / "trace.jsonl"
    caplog.set_level(logging.WARNING, "kvtier.connector.trace_log")
    requests = [(BASE, 1), (SHARED, 1), (BASE, 2), (BASE, 3)]
    _, stats, _ = serve(config(tmp_path, path=path, max_bytes=300), requests)

    trace, _ = read_trace(path)
    assert 1 <= len(trace) < 4 and os.path.getsize(path) <= 300
    assert [r.output_length for r in trace] == [1, 1, 2][:len(trace)]  # the first ones, then none
    assert stats["trace_lines"] == len(trace) and stats["trace_lines_dropped"] == 4 - len(trace)
    assert stats["trace_errors"] == 0
    assert len([r for r in caplog.records if "max_bytes" in r.getMessage()]) == 1


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "directory", "fifo", "device"])
def test_a_path_that_is_not_a_regular_file_is_refused_counted_and_serving_goes_on(tmp_path, caplog, kind):
    path, target = tmp_path / "trace.jsonl", tmp_path / "elsewhere.jsonl"
    if kind == "symlink":
        target.write_text("")
    if kind.endswith("symlink"):
        path.symlink_to(target)
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # no reader: an open that waited for one would hang the engine's start
    else:
        path = Path(os.devnull)  # opens (a character device), then refused: not a regular file
    caplog.set_level(logging.WARNING, "kvtier.connector.trace_log")

    outputs, stats, _ = serve(config(tmp_path, path=path), [(BASE, 2), (SHARED, 2)])

    assert [len(out) for out in outputs] == [2, 2]
    assert {k: stats[k] for k in COUNTERS} == {"trace_lines": 0, "trace_lines_dropped": 0, "trace_errors": 1}
    assert len([r for r in caplog.records if str(path) in r.getMessage()]) == 1
    if kind.endswith("symlink"):
        assert path.is_symlink() and (target.read_text() == "" if kind == "symlink" else not target.exists())


def test_off_by_default_no_file_and_no_counters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kv_config = config(tmp_path)
    assert kv_config.trace_log == KvtierConfig().trace_log and KvtierConfig().trace_log.path == ""

    outputs, stats, _ = serve(kv_config, [(BASE, 2)])

    assert len(outputs[0]) == 2 and not set(COUNTERS) & set(stats)
    assert sorted(os.listdir(tmp_path)) == ["kvtier.yaml"]


# -- the writer alone: a TokenDatabase, requests as the connector sees them, a FakeClock --------------


@dataclass
class Req:
    request_id: str
    all_token_ids: list[int]


@pytest.fixture
def db() -> TokenDatabase:
    return TokenDatabase(Namespace("trace-test", "layout"), CHUNK)


@pytest.mark.parametrize("native", [True, False])
def test_hash_ids_are_the_chained_keys_partial_chunk_included(monkeypatch, db, native):
    use_native(monkeypatch, native_keys, native)
    partial = TokenDatabase(db.namespace, CHUNK, save_partial=True)
    for n in (1, 255, 256, 257, 600):
        tokens = prompt(n, seed=n)
        assert hash_ids(tokens, db.namespace_digest, CHUNK).tolist() == ids_of(partial.keys(tokens))


def test_timestamps_are_ms_from_the_first_request_to_each_first_contact(tmp_path, db):
    clock = FakeClock(1000.0)
    log = TraceLog(str(tmp_path / "t.jsonl"), 1 << 20, db, clock)
    first, second = Req("a", prompt(300, seed=1)), Req("b", prompt(20, seed=2))
    log.arrived(first)
    clock.now += 0.25
    log.arrived(second)
    clock.now += 1.25
    log.arrived(first)  # a later contact: its arrival stays
    second.all_token_ids += [7, 8]
    log.finished(second)  # finished first: its line comes first
    log.finished(first)
    log.close()

    trace, _ = read_trace(tmp_path / "t.jsonl")
    assert [(r.timestamp, r.input_length, r.output_length, len(r.hash_ids)) for r in trace] == [
        (250.0, 20, 2, 1), (0.0, 300, 0, 2)]


def test_lines_are_flushed_every_flush_lines_and_after_flush_s(tmp_path, db):
    clock, path = FakeClock(), tmp_path / "t.jsonl"
    log = TraceLog(str(path), 1 << 20, db, clock)

    def finish(i: int) -> None:
        log.finished(Req(str(i), prompt(5, seed=i)))

    def lines() -> int:
        return len(path.read_bytes().splitlines())

    for i in range(FLUSH_LINES - 1):
        finish(i)
    assert lines() == 0
    finish(FLUSH_LINES)
    assert lines() == FLUSH_LINES
    finish(FLUSH_LINES + 1)
    assert lines() == FLUSH_LINES
    clock.now += FLUSH_S
    finish(FLUSH_LINES + 2)
    assert lines() == FLUSH_LINES + 2
    finish(FLUSH_LINES + 3)
    log.close()
    log.close()  # once is enough; a request finished after it is not logged
    finish(FLUSH_LINES + 4)
    assert lines() == FLUSH_LINES + 3 and log.stats()["trace_lines"] == FLUSH_LINES + 3


def test_a_write_that_fails_part_way_is_counted_and_the_next_line_starts_afresh(tmp_path, db, caplog):
    """A file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) fails a write as a full disk does: the
    kernel writes up to the limit, then refuses (EFBIG)."""
    limit, path = 1 << 20, tmp_path / "t.jsonl"
    path.write_bytes(b"")
    os.truncate(path, limit - 40)  # sparse; 40 bytes left, less than a line
    clock = FakeClock()
    log = TraceLog(str(path), 1 << 30, db, clock)
    clock.now += FLUSH_S  # every line is written at once
    caplog.set_level(logging.WARNING, "kvtier.connector.trace_log")
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        log.finished(Req("torn", prompt(600, seed=1)))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert log.stats() == {"trace_lines": 0, "trace_lines_dropped": 1, "trace_errors": 1}
    assert os.path.getsize(path) == limit
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1

    log.finished(Req("next", prompt(300, seed=2)))
    log.close()

    trace, skipped = read_trace(path, on_error="skip")
    assert [(r.input_length, len(r.hash_ids)) for r in trace] == [(300, 2)] and len(skipped) == 1
    assert log.stats() == {"trace_lines": 1, "trace_lines_dropped": 1, "trace_errors": 1}


def test_kvtier_plan_replays_the_log_the_engine_wrote(tmp_path):
    # The user's path end to end: serve with the log on, then `kvtier plan LOG` in a subprocess.
    path, out = tmp_path / "trace.jsonl", tmp_path / "plan.json"
    serve(config(tmp_path, path=path), [(BASE, 2), (SHARED, 2), (BASE, 2), (prompt(300, seed=4), 2)])
    run = subprocess.run([sys.executable, "-m", "kvtier.cli", "plan", str(path), "--policies", "lru,adaptive",
                          "--capacities", "50%,100%", "--quiet", "--json", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    # 4 requests of 600, 612, 600 and 300 tokens in whole 256-token chunks: BASE's 2 whole chunks
    # (the third is partial, never stored) are hit by SHARED (2 chunks) and BASE again (2).
    assert data["traffic"]["requests"] == 4 and data["traffic"]["input_tokens"] == 600 + 612 + 600 + 300
    assert data["traffic"]["infinite_hit_rate"] == pytest.approx(4 * 256 / 2112)
    assert set(data["policies"]) == {"lru", "adaptive"}
