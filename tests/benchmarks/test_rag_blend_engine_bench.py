"""Smoke tests of benchmarks/rag_blend_engine.py's pieces on the tiny random preset and a byte
tokenizer (the benchmark itself runs SmolLM2 for minutes): the workload (warm-up holding every passage
once, passage sets asked in new orders), the engine setups end to end (a measured prompt is blended,
ratio 1.0 answers what no kvtier answers) and the JSON the README quotes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import rag_blend  # noqa: E402
import rag_blend_engine as bench  # noqa: E402
from byte_tokenizer import ByteTokenizer  # noqa: E402

MODEL = "random:llama-tiny"
CHUNK = 16




def pool_of(n: int) -> list[rag_blend.Passage]:
    """`n` passages of about 90 bytes (over blend's 64-token minimum), each naming a function."""
    tok, sep = ByteTokenizer(), ByteTokenizer().encode(rag_blend.SEPARATOR)
    return [rag_blend.Passage(f"m{i}", sep + tok.encode(f"From m{i}:\n" + f"f{i}(x) returns x {i}. " * 4),
                              (f"f{i}",)) for i in range(n)]


def test_the_warm_up_holds_every_passage_once_and_each_set_comes_back_in_new_orders(tmp_path):
    pool = pool_of(13)
    args = bench.parse_args(["--sets", "3", "--orders", "3", "--passages", "4", "4", "--out", str(tmp_path)])
    work = bench.workload(ByteTokenizer(), pool, args)
    warmed = [i for p in work.warm_up for i in p.passages]
    assert sorted(warmed) == list(range(len(pool)))  # every passage of the pool, once
    assert len(work.measured) == 9 and sorted(work.sets) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert work.sets[:3] == [0, 1, 2]  # interleaved over the sets
    for s in range(3):
        prompts = [p for p, ps in zip(work.measured, work.sets) if ps == s]
        assert len({frozenset(p.passages) for p in prompts}) == 1  # the same passages ...
        assert all(len(p.passages) == 4 for p in prompts)
        for p in prompts:  # ... each the pool's passage at its segment
            for seg, i in zip(p.segments[1:-1], p.passages):
                assert p.ids[seg.start:seg.end] == pool[i].ids
    assert len({tuple(p.passages) for p in work.measured}) > 3  # in new orders


def test_the_setups_configure_kvtier_and_blend_as_named():
    configs = {s.name: bench.kvtier_config(s, [1, 2], CHUNK) for s in bench.SETUPS}
    assert configs["no kvtier"] is None
    assert configs["kvtier prefix"].blend is None and configs["kvtier prefix"].disk is None
    blend = configs["kvtier blend 0.15"].blend
    assert (blend.separator_ids, blend.ratio, blend.check_layer) == ((1, 2), 0.15, rag_blend.CHECK_LAYER)
    assert configs["kvtier blend 1.0"].blend.ratio == 1.0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The whole benchmark, --quick, on the tiny model: one JSON + PNG."""
    out = tmp_path_factory.mktemp("rag_blend_engine")
    assert bench.main(["--quick", "--out", str(out)], model=MODEL, tokenizer=ByteTokenizer(), pool=pool_of(8),
                      chunk_size=CHUNK) == 0
    assert (out / "rag_blend_engine_quick.png").stat().st_size > 0
    return json.loads((out / "rag_blend_engine_quick.json").read_text())


def test_measured_prompts_are_blended_and_ratio_one_answers_what_no_kvtier_answers(report):
    queries = [q for q in report["queries"] if q["phase"] == "measured"]
    assert len(queries) == 4 * len(bench.SETUPS)
    blended = [q for q in queries if q["setup"] == "kvtier blend 0.15"]
    assert all(q["segments_hit"] > 0 and q["reused"] > 0 for q in blended)
    for setup in ("no kvtier", "kvtier prefix"):
        assert all(q["segments_hit"] == q["reused"] == 0 for q in queries if q["setup"] == setup)
    ref = {q["prompt"]: q["answer"] for q in queries if q["setup"] == "no kvtier"}
    exact = [q for q in queries if q["setup"] == "kvtier blend 1.0"]
    assert all(q["segments_hit"] > 0 and q["reused"] == 0 for q in exact)  # blended, every row recomputed
    assert all(q["answer"] == ref[q["prompt"]] for q in exact)
    assert all(len(q["answer"]) > 0 for q in queries)
    # The warm-up saw every passage first: nothing to blend yet.
    assert all(q["segments_hit"] == 0 for q in report["queries"] if q["phase"] == "warm-up")


def test_the_json_has_the_fields_the_readme_quotes(report):
    rows = {r["setup"]: r for r in report["summary"]}
    assert list(rows) == [s.name for s in bench.SETUPS]
    for r in rows.values():
        for key in ("ttft_p50_s", "ttft_mean_s", "speedup_vs_no_kvtier", "speedup_vs_prefix", "computed",
                    "loaded", "device_cached", "segments_hit", "passages", "reused", "recomputed",
                    "identical_share", "first_token_agreement", "prompts", "prompt_tokens"):
            assert key in r, key
        assert r["ttft_p50_s"] > 0
    assert rows["no kvtier"]["speedup_vs_no_kvtier"] == rows["kvtier prefix"]["speedup_vs_prefix"] == 1.0
    assert rows["no kvtier"]["identical_share"] == rows["kvtier blend 1.0"]["identical_share"] == 1.0
    assert rows["kvtier blend 0.15"]["reused"] > 0
    s = report["settings"]
    assert (s["chunk_size"], s["separator_ids"], s["measured_prompts"]) == (CHUNK, list(b"\n\n## "), 4)
    for key in ("cpu_model", "cores", "load_avg_before", "load_avg_after", "device"):
        assert key in report["machine"]
