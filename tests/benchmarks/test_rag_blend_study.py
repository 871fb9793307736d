"""Smoke tests of benchmarks/rag_blend_study.py on a seeded 5-layer tiny model (std 0.2 weights: its
attention is peaked enough that a passage's context moves its KV) and a byte tokenizer: the oracle source
at ratio 0 reproduces full prefill (shifting and merging are exact), donor prompts give every passage a
new context, the sink selector adds each passage's first rows, and every variant runs with sane rows."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier_engine.models.loader import random_model
from kvtier_engine.models.presets import PRESETS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import rag_blend  # noqa: E402
import rag_blend_study as study  # noqa: E402
from byte_tokenizer import ByteTokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model's ops are microseconds: with the 2 cores shared, a second torch thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    model = random_model(dataclasses.replace(PRESETS["llama-tiny"], num_layers=5))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.mul_(10.0)  # std 0.02 -> 0.2
    return model


def pool_of(n: int) -> list[rag_blend.Passage]:
    tok, sep = ByteTokenizer(), ByteTokenizer().encode(rag_blend.SEPARATOR)
    return [rag_blend.Passage(f"m{i}", sep + tok.encode(f"From m{i}:\n" + f"f{i}(x) gives {i} x. " * 3),
                              (f"f{i}",)) for i in range(n)]


def prompts_of(pool, count: int, n: int) -> list[rag_blend.Prompt]:
    rng = np.random.default_rng(0)
    return [rag_blend.build_prompt(ByteTokenizer(), pool, rng, n) for _ in range(count)]


def test_donors_hold_every_passage_once_and_never_behind_the_same_passages():
    pool = pool_of(8)
    prompts = prompts_of(pool, 3, 4)
    donors = rag_blend.donor_prompts(ByteTokenizer(), pool, prompts, np.random.default_rng(1), (2, 3))
    held = [i for d in donors for i in d.passages]
    assert sorted(held) == sorted({i for p in prompts for i in p.passages})
    assert all(2 <= len(d.passages) <= 3 for d in donors[:-1]) and donors[-1].passages
    before = {(i, tuple(p.passages[:j])) for p in prompts for j, i in enumerate(p.passages)}
    assert not any((i, tuple(d.passages[:j])) in before for d in donors for j, i in enumerate(d.passages))


def test_the_oracle_source_at_ratio_0_is_full_prefill_and_passages_alone_are_not(model):
    pool = pool_of(5)
    prompt = prompts_of(pool, 1, 3)[0]
    ref, cache = study.reference(model, prompt, eos=None)
    head = prompt.ids[: prompt.segments[0].end]
    stores = {src: rag_blend.PassageStore(model, capacity=64 << 20) for src in ("oracle", "alone")}
    try:
        for store in stores.values():
            store.store_head(head)
        rag_blend.store_cut(stores["oracle"], prompt, cache)
        for i in prompt.passages:
            stores["alone"].store_passage(pool[i].ids)
        loads = {src: store.load(prompt) for src, store in stores.items()}
    finally:
        for store in stores.values():
            store.close()
    q, out = study.quality(model, prompt, ref, loads["oracle"], study.Variant("oracle", 0.0))
    assert q["kl"] < 1e-6 and q["top1"] == 1.0 and q["identical"]
    torch.testing.assert_close(out.last_logits, ref.logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.k, ref.k, atol=1e-4, rtol=0)  # shifted to 0 and back: exact to fp32
    alone, _ = study.quality(model, prompt, ref, loads["alone"], study.Variant("alone", 0.0))
    assert alone["kl"] > 1e-4  # the same check fails for KV computed without the passage's context


def test_the_sink_selector_adds_each_passages_first_rows():
    pool = pool_of(5)
    prompt = prompts_of(pool, 1, 3)[0]
    t = len(prompt.ids)
    cached = torch.ones(t, dtype=torch.bool)
    k = torch.zeros(t, 2, 4)
    chosen = study.selector(study.Variant(sink_rows=2, ratio=0.0), prompt, None)(k, k, cached, 0.0)
    starts = [s.start for s in prompt.segments if s.kind == "passage"]
    assert chosen.tolist() == sorted(r for s in starts for r in (s, s + 1))
    score = torch.arange(t, dtype=torch.float32)
    top = study.selector(study.Variant(oracle_select=True, ratio=0.1), prompt, score)(k, k, cached, 0.1)
    assert top.tolist() == list(range(t - len(top), t))


def test_every_variant_runs_and_its_rows_are_sane(model, tmp_path):
    pool = pool_of(8)
    prompts = prompts_of(pool, 2, 3)
    args = argparse.Namespace(seed=0, passages=(2, 3))
    stores, donors = study.build_stores(model, ByteTokenizer(), pool, prompts, args)
    vs = study.variants(check_layers=(2, 4))
    try:
        rows = [study.measure_prompt(model, stores, p, None, 1, vs) for p in prompts]
    finally:
        for store in stores.values():
            store.close()
    assert donors and len({v.name for v in vs}) == len(vs)
    for row in rows:
        assert set(row["variants"]) == {v.name for v in vs}
        for name, q in row["variants"].items():
            assert 0.0 <= q["top1"] <= 1.0 and q["kl"] > -1e-6 and q["kl_max"] >= q["kl"] - 1e-9, name
            assert 0.0 < q["recomputed_share"] <= 1.0, name
        share = {r: row["variants"][study.Variant(ratio=r).name]["recomputed_share"]
                 for r in (0.0, 0.15, 0.3)}
        assert share[0.0] < share[0.15] < share[0.3]
        assert row["variants"]["oracle 0 c1 K"]["kl"] < 1e-6
        assert all(t > 0 for t in row["ttft_s"].values()) and "full" in row["ttft_s"]
        assert row["diagnostics"]["selected share by offset"]["first row"] <= 1.0
    summary = study.summarise(rows, vs)
    assert summary[study.Variant().name]["ttft_s"] > 0
    assert summary["alone 0.15 c1 K oracle-select"]["ttft_s"] is None  # a bound, not timed
    assert summary["alone 0.15 c1 V"]["ttft_s"] == summary["alone 0.15 c1 KV"]["ttft_s"]  # timed once
    diag = study.mean_diagnostics(rows)
    assert len(diag["alone K first row"]) == model.config.num_layers
    study.plot(tmp_path / "study.png", summary, diag)
    assert (tmp_path / "study.png").stat().st_size > 0
