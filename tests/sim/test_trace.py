"""Tests for kvtier/sim/trace.py: Mooncake JSONL traces read and checked, a malformed line named by
its number, fatal or skipped as the caller chooses."""

from __future__ import annotations

import json

import pytest

from kvtier.sim.trace import MAX_LINE_BYTES, TraceError, TraceRequest, read_trace

GOOD = {"timestamp": 5, "input_length": 700, "output_length": 20, "hash_ids": [0, 1]}


def write(tmp_path, lines: list[str]):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_trace_is_read_into_requests_and_blank_lines_are_ignored(tmp_path):
    path = write(tmp_path, [json.dumps(GOOD), "", json.dumps({**GOOD, "hash_ids": [0, 2, 3]})])
    requests, skipped = read_trace(path)
    assert requests == [TraceRequest(5.0, 700, 20, (0, 1)), TraceRequest(5.0, 700, 20, (0, 2, 3))]
    assert skipped == []


@pytest.mark.parametrize("bad, why", [
    ("{not json", "Expecting"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({**GOOD, "hash_ids": [0, -1]}), "hash_ids"),
    (json.dumps({**GOOD, "hash_ids": [0, 1.5]}), "hash_ids"),
    (json.dumps({**GOOD, "hash_ids": [True]}), "hash_ids"),
    (json.dumps({**GOOD, "input_length": "700"}), "input_length"),
    (json.dumps({**GOOD, "output_length": -3}), "output_length"),
    (json.dumps({**GOOD, "timestamp": None}), "timestamp"),
    ("[" * 100_000 + "]" * 100_000, "recursion"),
])
def test_a_malformed_line_is_named_by_its_number_and_is_fatal_or_skipped(tmp_path, bad, why):
    path = write(tmp_path, [json.dumps(GOOD), bad, json.dumps(GOOD)])
    with pytest.raises(TraceError, match=rf"trace.jsonl:2: .*{why}"):
        read_trace(path)
    requests, skipped = read_trace(path, on_error="skip")
    assert len(requests) == 2 and len(skipped) == 1 and ":2: " in skipped[0]


def test_a_huge_line_is_malformed_without_being_read_whole(tmp_path):
    path = tmp_path / "trace.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(GOOD) + "\n")
        f.write('{"hash_ids": [' + "1, " * (MAX_LINE_BYTES // 3 + 10) + "1]}\n")
        f.write(json.dumps(GOOD) + "\n")
    requests, skipped = read_trace(path, on_error="skip")
    assert len(requests) == 2 and len(skipped) == 1 and ":2: longer than" in skipped[0]
