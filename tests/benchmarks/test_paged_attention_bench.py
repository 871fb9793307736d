"""Tests for benchmarks/paged_attention.py: one case of each table kind on a small shape times both
paths and finds them giving the same attention."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import paged_attention  # noqa: E402

from kvtier_engine.layers import cpu_attention  # noqa: E402
from kvtier_engine.models.presets import PRESETS  # noqa: E402


@pytest.mark.skipif(cpu_attention.FLASH is None, reason="this torch has no CPU flash kernel")
@pytest.mark.parametrize("table", ["contiguous", "fragmented"])
@pytest.mark.parametrize("new", [1, 16])
def test_a_case_times_both_paths_and_they_agree(table, new):
    row = paged_attention.case(PRESETS["llama-small"], 1100, new, table, repeats=2)  # in place for both
    assert (row["context"], row["new_tokens"], row["table"]) == (1100, new, table)
    for path in ("gather", "in_place"):
        assert 0 < row[path]["min"] <= row[path]["ms_per_layer"] <= row[path]["max"]
    assert row["speedup"] > 0
    assert row["max_abs_diff"] < 1e-5
