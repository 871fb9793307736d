"""Request traces in the Mooncake JSONL format: one JSON object a line with `timestamp` (ms),
`input_length` and `output_length` (tokens) and `hash_ids` (the prompt's block ids, prefix-chained by
the trace's producer: equal ids mean equal prefixes up to that block).

A trace comes from outside: every field is checked, and a malformed line is named by its number. The
caller chooses whether such a line is fatal (`TraceError`) or skipped (and reported back).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 16 << 20  # a line longer than this is malformed, not read whole into memory


class TraceError(ValueError):
    """A malformed trace line (its file and number in the message)."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse_line(text: str) -> TraceRequest:
    """One line as a request; ValueError saying what is wrong."""
    record = json.loads(text)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    ids = record.get("hash_ids")
    if not isinstance(ids, list) or not all(type(h) is int and h >= 0 for h in ids):
        raise ValueError("hash_ids must be a list of non-negative integers")
    lengths = [record.get(name, 0) for name in ("input_length", "output_length")]
    if not all(type(n) is int and n >= 0 for n in lengths):
        raise ValueError("input_length and output_length must be non-negative integers")
    timestamp = record.get("timestamp", 0)
    if type(timestamp) not in (int, float) or timestamp < 0:
        raise ValueError("timestamp must be a non-negative number")
    return TraceRequest(float(timestamp), lengths[0], lengths[1], tuple(ids))


def read_trace(path: str | Path, on_error: Literal["fail", "skip"] = "fail"
               ) -> tuple[list[TraceRequest], list[str]]:
    """(the requests, one message per skipped line). With on_error "fail" the first malformed line
    raises TraceError; blank lines are ignored."""
    requests, skipped = [], []
    with open(path, "rb") as file:
        for number, raw in enumerate(iter(lambda: file.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if not raw.strip():
                continue
            try:
                if len(raw) > MAX_LINE_BYTES:
                    raise ValueError(f"longer than {MAX_LINE_BYTES} bytes")
                requests.append(parse_line(raw.decode("utf-8")))
            except (ValueError, UnicodeDecodeError, RecursionError) as error:  # (deep nesting)
                message = f"{path}:{number}: {error}"
                if on_error == "fail":
                    raise TraceError(message) from None
                skipped.append(message)
                if len(raw) > MAX_LINE_BYTES:  # the rest of that line
                    while raw and not raw.endswith(b"\n"):
                        raw = file.readline(MAX_LINE_BYTES + 1)
    for message in skipped[:3]:
        logger.warning("skipped %s", message)
    return requests, skipped
