"""Smoke test of benchmarks/disagg.py: `--quick` (llama-tiny, 2 short requests decoding while one
300-token prompt arrives; colocated, and disaggregated behind the proxy, as real processes) measures
both setups and its decode instance loads the long prompt's KV; and the statistics of
disagg_load.py on streams made up here. The numbers themselves are not asserted (performance lives
in benchmarks/README.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import disagg  # noqa: E402
from disagg_load import Stream, in_flight, summarise  # noqa: E402


@pytest.mark.timeout(120)  # about 16 s on the 2-core VM: five processes start
def test_the_quick_run_measures_both_setups_and_the_decode_loads_the_long_prompt(tmp_path):
    disagg.main(["--quick", "--out", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    report = json.loads((tmp_path / "disagg_quick.json").read_text())
    assert (tmp_path / "disagg_quick.png").stat().st_size > 0
    assert not (tmp_path / "work").exists()  # the instances' configs and logs went with the run
    results = {r["setup"]["name"]: r for r in report["results"]}
    assert list(results) == ["colocated", "disaggregated"]
    for result in results.values():
        assert result["errors"] == [] and result["shorts_finished_early"] == 0
        assert result["itl"]["overall"]["n"] > 0 and result["itl"]["overall"]["p50_ms"] > 0
        assert result["long_ttft"]["n"] == 1 and result["long_ttft"]["p50_ms"] > 0
    (colocated,) = results["colocated"]["longs"]
    assert colocated["routed"] == "" and colocated["tokens_loaded"] == 0
    (moved,) = results["disaggregated"]["longs"]
    assert moved["routed"] == "disaggregated" and moved["prompt_tokens"] == 300
    assert moved["tokens_loaded"] == 299 and moved["loaded_ok"]  # all but the last token, over P2P
    assert moved["tokens"] == 8 and moved["server_ttft_s"] > 0


def stream(kind: str, sent: float, arrivals: list[float], done: float, loaded: int = 0) -> Stream:
    return Stream(kind, 11, sent, [(t, 1) for t in arrivals], done, True,
                  kvtier={"ttft_s": 0.5, "tokens_loaded": loaded})


def test_gaps_are_split_by_whether_a_long_request_was_in_flight():
    shorts = [stream("short", 0.0, [1.0, 1.1, 1.2, 3.0, 3.1, 6.0, 6.1], 6.1),
              stream("short", 0.0, [1.0, 1.1, 4.0, 6.2], 6.2)]
    longs = [stream("long", 2.0, [3.5], 4.0, loaded=10), stream("long", 3.0, [4.5], 5.0, loaded=10)]
    assert in_flight(longs) == [(2.0, 5.0)]  # overlapping requests: one window
    summary = summarise(shorts, longs, steady=1.0, disaggregated=True)
    during, outside = summary["itl"]["during_long"], summary["itl"]["outside_long"]
    assert during["n"] == 3 and during["max_ms"] == pytest.approx(2900)  # 1.1 -> 4.0 lands inside
    assert outside["n"] == 6 and outside["max_ms"] == pytest.approx(2900)  # 3.1 -> 6.0 lands outside
    assert summary["itl"]["overall"]["n"] == 9
    assert summary["long_busy_s"] == pytest.approx(3.0)
    assert summary["short_tokens_per_s"]["during_long"] == pytest.approx(3 / 3.0)
    assert summary["long_ttft"]["p50_ms"] == pytest.approx(1500)
    assert all(row["loaded_ok"] for row in summary["longs"])  # 10 == 11 prompt tokens - 1
