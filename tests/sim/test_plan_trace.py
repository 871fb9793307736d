"""Tests for kvtier/sim/plan_trace.py: a trace's tokens per hash id, from the lines' `block_size`
(kvtier's connector trace log) or the caller's default (Mooncake's 512), and the file-level errors."""

from __future__ import annotations

import json

import pytest

from kvtier.sim.plan_trace import load_trace
from kvtier.sim.trace import MAX_LINE_BYTES, TraceError

LINE = {"timestamp": 0, "input_length": 300, "output_length": 1, "hash_ids": [1, 2]}
SIZED = {**LINE, "block_size": 256}


def write(tmp_path, *records, raw: tuple[str, ...] = ()):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(line + "\n" for line in raw))
    return path


def test_without_block_size_the_callers_value_is_used_else_mooncakes_512(tmp_path):
    path = write(tmp_path, LINE, LINE)
    trace = load_trace(path)
    assert (len(trace.requests), trace.block_tokens, trace.declared) == (2, 512, False)
    assert load_trace(path, block_tokens=16).block_tokens == 16


def test_the_lines_block_size_is_used_when_every_line_says_the_same(tmp_path):
    trace = load_trace(write(tmp_path, SIZED, SIZED, SIZED))
    assert (len(trace.requests), trace.block_tokens, trace.declared) == (3, 256, True)
    assert load_trace(write(tmp_path, SIZED), block_tokens=256).block_tokens == 256


def test_a_block_size_that_differs_from_an_earlier_lines_is_named_by_its_line(tmp_path):
    path = write(tmp_path, SIZED, SIZED, {**SIZED, "block_size": 512})
    with pytest.raises(TraceError, match=r"trace.jsonl:3: block_size 512 differs from line 1's 256"):
        load_trace(path)
    with pytest.raises(TraceError, match=":3: "):  # the lines describe the whole file: not skippable
        load_trace(path, on_error="skip")


def test_lines_with_and_without_block_size_do_not_mix(tmp_path):
    with pytest.raises(ValueError, match="1 of 2 requests say block_size 256"):
        load_trace(write(tmp_path, LINE, SIZED))


@pytest.mark.parametrize("value", [0, -256, "256", 25.6, True])
def test_a_block_size_that_is_not_a_positive_integer_is_refused(tmp_path, value):
    with pytest.raises(TraceError, match=r"trace.jsonl:2: block_size must be a positive integer"):
        load_trace(write(tmp_path, SIZED, {**SIZED, "block_size": value}))


def test_asking_for_other_block_tokens_than_the_lines_say_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="its lines say block_size 256, not the 512 tokens asked for"):
        load_trace(write(tmp_path, SIZED), block_tokens=512)
    with pytest.raises(ValueError, match="positive"):
        load_trace(write(tmp_path, LINE), block_tokens=0)


def test_a_skipped_malformed_line_neither_counts_nor_votes(tmp_path):
    bad = json.dumps({**SIZED, "block_size": 512, "hash_ids": [-1]})  # malformed: its block_size is moot
    path = write(tmp_path, SIZED, raw=(bad, json.dumps(SIZED)))
    trace = load_trace(path, on_error="skip")
    assert (len(trace.requests), trace.block_tokens, len(trace.skipped)) == (2, 256, 1)
    assert ":2: " in trace.skipped[0]
    with pytest.raises(TraceError, match=":2: hash_ids"):
        load_trace(path)


def test_a_huge_skipped_line_keeps_the_line_numbers_of_the_block_size_check(tmp_path):
    path = tmp_path / "trace.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(SIZED) + "\n")
        f.write('{"block_size": 9, "hash_ids": [' + "1, " * (MAX_LINE_BYTES // 3 + 10) + "1]}\n")
        f.write(json.dumps({**SIZED, "block_size": 128}) + "\n")
    with pytest.raises(TraceError, match=r":3: block_size 128 differs from line 1's 256"):
        load_trace(path, on_error="skip")
