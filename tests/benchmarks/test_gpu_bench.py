"""Smoke test of benchmarks/gpu.py on the CPU (`--device cpu --quick`: the same code a GPU machine
runs, at small sizes; CI has no GPU), and of benchmarks/paged_copy.py. The numbers themselves are
not asserted (performance lives in benchmarks/), only that every section measured what it says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import gpu  # noqa: E402
import paged_copy  # noqa: E402


def test_the_cpu_smoke_run_measures_every_section_and_writes_json_and_a_plot(tmp_path):
    out = gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    transfers, ttft = out["results"]["transfers"], out["results"]["ttft"]
    assert [r["copy"].split(",")[0] for r in transfers] == ["save"] * 4 + ["load"] * 4 + ["verify"] * 2
    assert all(r["gb_per_s"] > 0 and r["bytes"] == 4 * 2 * 512 * 8 * 128 * 2 for r in transfers)
    assert out["results"]["attention"] == []  # Triton runs on CUDA only: skipped, and said so
    assert [r["tokens"] for r in ttft] == [512, 1024]
    for row in ttft:  # every warm prompt but its last token came from kvtier
        assert row["tokens_loaded"] == row["tokens"] - 1
        assert all(row[k] > 0 for k in ("cold_s", "warm_cpu_layerwise_on_s", "warm_disk_s"))
    assert len(out["targets"]) == 7 and "warm TTFT at the longest prompt >= 25x faster" in out["targets"]
    assert "load, kvtier -> paged blocks (H2D + scatter) >= 0.9x pinned copy" in out["targets"]
    assert json.loads((tmp_path / "gpu_quick.json").read_text())["settings"]["device"] == "cpu"
    assert (tmp_path / "gpu_quick.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_default_run_says_how_to_run_it(capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--out", "/nonexistent"])
    assert "no CUDA GPU here: run on a GPU machine, or pass --device cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu", "--sections", "transfers,warp"])
    assert "unknown sections ['warp']" in capsys.readouterr().err


def test_paged_copy_measures_the_limit_both_paths_and_the_native_copies():
    rows = paged_copy.measure(tokens=32, repeats=1)
    labels = [r["copy"] for r in rows]
    assert labels[:3] == ["contiguous copy (limit)", "gather, torch", "scatter, torch"]
    assert len(labels) == (6 if paged_copy.cpu_ops.native is not None else 3)
    assert all(r["gb_per_s"] > 0 and r["bytes"] == 2 * 32 * 32 * 8 * 128 * 2 for r in rows)
