"""`kvtier plan` (kvtier/cli/plan.py) as a user runs it: `python -m kvtier.cli plan` in a subprocess
on small traces written to tmp_path, no controller anywhere. The hand-made trace is
tests/sim/test_plan.py's cycle: three one-token blocks used twice, so the infinite cache hits 3 of 6
tokens and an LRU cache needs all 3 blocks to hit anything."""

from __future__ import annotations

import json

import pytest
from test_cli import failed, kvtier

KIB_128 = 128 * 1024  # llama-3.1-8b's KV for one token: a one-token block
GOOD = [{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [b]} for b in (1, 2, 3, 1, 2, 3)]
SMALL = ["--block-tokens", "1", "--policies", "lru", "--capacities", "128KiB,256KiB,384KiB"]


def write(tmp_path, records=GOOD, name="trace.jsonl", raw: dict[int, str] | None = None):
    lines = [json.dumps(r) for r in records]
    for number, text in (raw or {}).items():
        lines.insert(number - 1, text)
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_tables_and_the_json_on_a_hand_made_trace(tmp_path):
    out = tmp_path / "plan.json"
    run = kvtier("plan", str(write(tmp_path)), *SMALL, "--disk", "256KiB", "--json", str(out))
    assert run.returncode == 0, run.stderr
    for words in ("6 requests", "3 distinct blocks", "token hit rate 50.00%", "lru: cpu alone",
                  "lru: disk under cpu 128.0 KiB (1 block)", "lru: remote under", "hit rate x6 codec"):
        assert words in run.stdout, (words, run.stdout)
    data = json.loads(out.read_text())
    assert data["traffic"]["infinite_hit_rate"] == 0.5 and data["model"] == "llama-3.1-8b"
    cpu, disk, remote = data["policies"]["lru"]
    assert [r["hit_rate"] for r in cpu["rows"]] == [0.0, 0.0, 0.5]
    assert cpu["reaches_target"] == {"blocks": 3, "tokens": 3, "bytes": 3 * KIB_128}
    assert [r["capacity"]["blocks"] for r in disk["rows"]] == [2, 3]
    assert disk["rows"][1]["tiers"]["disk"]["bytes_read"] == 3 * KIB_128
    assert disk["reaches_target_compressed"]["bytes"] == 2 * KIB_128  # x6: 2 blocks of bytes hold 12
    assert [r["capacity"]["blocks"] for r in remote["rows"]] == [3]


def test_the_plot_is_a_png(tmp_path):
    png = tmp_path / "plan.png"
    run = kvtier("plan", str(write(tmp_path)), *SMALL, "--quiet", "--plot", str(png))
    assert run.returncode == 0, run.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_the_lines_block_size_sets_the_tokens_per_hash_id_and_partial_blocks_are_not_stored(tmp_path):
    # kvtier's own trace log: 300 tokens = a whole 256-token chunk and a partial one (never stored),
    # so the second cycle hits 256 tokens of each 300.
    records = [{**r, "input_length": 300, "hash_ids": [r["hash_ids"][0], 10 + r["hash_ids"][0]],
                "block_size": 256} for r in GOOD]
    out = tmp_path / "plan.json"
    run = kvtier("plan", str(write(tmp_path, records)), "--policies", "lru", "--quiet", "--json", str(out))
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["block_tokens"] == 256 and data["trace"]["block_tokens_declared"] is True
    assert data["settings"]["block_bytes"] == 256 * KIB_128 and data["settings"]["store_partial"] is False
    assert data["traffic"]["infinite_hit_rate"] == 3 * 256 / (6 * 300)
    assert "6 distinct blocks of 256 tokens" in run.stdout and "partial last block: not stored" in run.stdout


BAD_LINE_3 = {3: '{"hash_ids": [1, "two"]}'}


def test_a_malformed_line_fails_by_default_naming_its_line(tmp_path):
    path = write(tmp_path, raw=BAD_LINE_3)
    failed(kvtier("plan", str(path), *SMALL), 2, f"{path}:3:", "hash_ids")


def test_a_malformed_line_is_skipped_and_reported_on_request(tmp_path):
    path, out = write(tmp_path, raw=BAD_LINE_3), tmp_path / "plan.json"
    run = kvtier("plan", str(path), *SMALL, "--on-error", "skip", "--json", str(out))
    assert run.returncode == 0, run.stderr
    assert "skipped 1 malformed lines" in run.stdout and f"{path}:3:" in run.stdout
    data = json.loads(out.read_text())
    assert data["skipped_lines"]["count"] == 1 and ":3:" in data["skipped_lines"]["lines"][0]
    assert data["traffic"]["requests"] == 6


@pytest.mark.parametrize("args, words", [
    (["--capacities", "0%"], ["--capacities", "positive"]),
    (["--capacities=-5%"], ["--capacities", "positive"]),
    (["--capacities", "64"], ["--capacities", "give a share"]),
    (["--capacities", "1KiB"], ["--capacities", "less than one block"]),
    (["--cpu", "0GiB"], ["--cpu", "positive"]),
    (["--policies", "lru,nope"], ["--policies", "unknown eviction policy nope", "known: lru"]),
    (["--model", "gpt-9"], ["--model", "unknown model 'gpt-9'"]),
    (["--layout", "layers=32"], ["--layout", "missing"]),
    (["--model", "qwen2.5-7b", "--layout", "layers=1,kv_heads=1,head_dim=1"], ["not allowed with"]),
    (["--codec-ratio", "0.5"], ["--codec-ratio", ">= 1"]),
    (["--codec-ratio", "six"], ["--codec-ratio", "expected a number"]),
    (["--target", "150%"], ["--target"]),
    (["--block-tokens", "0"], ["--block-tokens", "positive"]),
    (["--on-error", "ignore"], ["--on-error", "invalid choice"]),
    (["--controller", "http://x"], ["unrecognized arguments: --controller"]),
    (["--json", "/nonexistent/dir/plan.json"], ["--json", "no such folder"]),
])
def test_bad_options_exit_2_with_one_line(tmp_path, args, words):
    failed(kvtier("plan", str(write(tmp_path)), *args), 2, *words)


def mixed_block_sizes(tmp_path):
    return write(tmp_path, [{**r, "block_size": 256 * (1 + i // 3)} for i, r in enumerate(GOOD)])


@pytest.mark.parametrize("make, args, words", [
    (lambda p: p / "missing.jsonl", [], ["missing.jsonl: cannot read it: No such file"]),
    (lambda p: p, [], ["cannot read it", "directory"]),
    (lambda p: write(p, []), [], ["trace.jsonl: no requests in the trace"]),
    (mixed_block_sizes, [], ["trace.jsonl:4: block_size 512 differs from line 1's 256"]),
    (mixed_block_sizes, ["--on-error", "skip"], ["trace.jsonl:4: block_size 512 differs"]),
])
def test_bad_trace_files_exit_2_with_one_line(tmp_path, make, args, words):
    failed(kvtier("plan", str(make(tmp_path)), *args), 2, *words)


def test_the_global_json_flag_is_not_plans(tmp_path):
    failed(kvtier("--json", "plan", str(write(tmp_path))), 2, "--json PATH after the command")


def test_a_tier_the_tiers_above_make_needless_says_so(tmp_path):
    out = tmp_path / "plan.json"
    run = kvtier("plan", str(write(tmp_path)), "--block-tokens", "1", "--policies", "lru", "--cpu", "384KiB",
                 "--capacities", "128KiB,256KiB,384KiB,512KiB", "--quiet", "--json", str(out))
    assert run.returncode == 0, run.stderr
    assert "not needed: the tiers above reach it alone" in run.stdout
    disk = json.loads(out.read_text())["policies"]["lru"][1]
    assert disk["fixed_hit_rate"] == 0.5 and disk["reaches_target"]["blocks"] == 0
