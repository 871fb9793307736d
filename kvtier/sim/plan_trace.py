"""A trace for the capacity planner (`kvtier.sim.plan`): its requests and how many tokens a hash id
stands for.

Mooncake's public traces use 512-token blocks and do not say so; the trace log kvtier's connector
writes adds `block_size` (256, kvtier's chunk) to every line. A trace is one producer's output, so
the field describes the whole file: every well-formed line carries the same value, or none does.
A disagreement or a bad value is therefore an error about the file, whatever `on_error` says about
malformed lines (skipping one line could not make the others agree).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from kvtier.sim.tiers import BLOCK_TOKENS
from kvtier.sim.trace import MAX_LINE_BYTES, TraceError, TraceRequest, parse_line, read_trace

logger = logging.getLogger(__name__)

FIELD = "block_size"


@dataclass(frozen=True, slots=True)
class PlanTrace:
    requests: list[TraceRequest]
    skipped: list[str]  # one `path:line: what` per malformed line skipped
    block_tokens: int  # tokens per hash id
    declared: bool  # block_tokens came from the lines' `block_size`


def load_trace(path: str | Path, on_error: Literal["fail", "skip"] = "fail",
               block_tokens: int | None = None) -> PlanTrace:
    """The trace at `path`. `block_tokens` is used when the lines declare no `block_size` (default
    512, Mooncake's); when they do, it must be None or equal. TraceError for a malformed line (with
    on_error "fail") or a bad `block_size`, ValueError for a disagreement, OSError for the file."""
    if block_tokens is not None and block_tokens <= 0:
        raise ValueError(f"block tokens must be a positive number of tokens, got {block_tokens}")
    requests, skipped = read_trace(path, on_error)
    declared, declaring = declared_block_size(path)
    if declared is None:
        return PlanTrace(requests, skipped, block_tokens or BLOCK_TOKENS, False)
    if declaring != len(requests):
        raise ValueError(f"{path}: {declaring} of {len(requests)} requests say {FIELD} {declared}, the "
                         f"others say nothing: a trace's lines carry the same {FIELD} or none does")
    if block_tokens not in (None, declared):
        raise ValueError(f"{path}: its lines say {FIELD} {declared}, not the {block_tokens} tokens asked for")
    logger.info("%s: %d tokens per hash id (its %s)", path, declared, FIELD)
    return PlanTrace(requests, skipped, declared, True)


def declared_block_size(path: str | Path) -> tuple[int | None, int]:
    """(the `block_size` the well-formed lines declare or None, how many lines declare it). Lines
    that read_trace refuses are left to it. TraceError naming the line for a bad value or the first
    line that disagrees with an earlier one."""
    found: int | None = None
    first = declaring = 0
    with open(path, "rb") as file:
        for number, raw in enumerate(_lines(file), start=1):
            if FIELD.encode() not in raw:  # most traces never name it: no second parse for them
                continue
            try:
                text = raw.decode("utf-8")
                parse_line(text)
            except (ValueError, UnicodeDecodeError, RecursionError):
                continue
            value = json.loads(text).get(FIELD)
            if value is None:
                continue
            if type(value) is not int or value <= 0:
                raise TraceError(f"{path}:{number}: {FIELD} must be a positive integer, got {value!r}")
            if found is None:
                found, first = value, number
            elif value != found:
                raise TraceError(f"{path}:{number}: {FIELD} {value} differs from line {first}'s {found}")
            declaring += 1
    return found, declaring


def _lines(file: BinaryIO) -> Iterator[bytes]:
    """The file's lines numbered as read_trace numbers them; one longer than MAX_LINE_BYTES (which
    read_trace refuses) as b"", without reading it whole."""
    for raw in iter(lambda: file.readline(MAX_LINE_BYTES + 1), b""):
        if len(raw) > MAX_LINE_BYTES:
            while raw and not raw.endswith(b"\n"):
                raw = file.readline(MAX_LINE_BYTES + 1)
            raw = b""
        yield raw
