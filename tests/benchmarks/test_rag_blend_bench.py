"""Smoke tests of benchmarks/rag_blend.py's pieces on a seeded tiny model and a byte tokenizer (the
benchmark itself runs SmolLM2 for minutes): cutting passages, prompts splitting into head + passages +
suffix, passages stored alone and loaded at new positions through kvtier, the methods' prefills, and the
target verdicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvtier_engine.models.loader import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import rag_blend  # noqa: E402
from byte_tokenizer import ByteTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return load_model("random:llama-tiny", torch.float32)


def pool_of(n: int) -> list[rag_blend.Passage]:
    tok, sep = ByteTokenizer(), ByteTokenizer().encode(rag_blend.SEPARATOR)
    return [rag_blend.Passage(f"m{i}", sep + tok.encode(f"From m{i}:\n" + f"f{i}(x) returns x {i}. " * 4),
                              (f"f{i}",)) for i in range(n)]


@pytest.fixture
def store(model):
    store = rag_blend.PassageStore(model, capacity=64 << 20)
    yield store
    store.close()


def test_passages_join_paragraphs_to_the_lower_bound_and_are_cut_at_the_upper():
    encode = ByteTokenizer().encode
    paragraphs = ["a" * 30, "b" * 30, "c" * 100, "d" * 10]
    passages = rag_blend.cut_passages(paragraphs, encode, 50, 80)
    assert passages == [encode("a" * 30 + "\n\n" + "b" * 30), encode("c" * 100)[:80]]  # "d" never fills one


def test_a_prompt_splits_into_head_passages_in_its_order_and_the_question_suffix():
    tok, pool = ByteTokenizer(), pool_of(6)
    prompt = rag_blend.build_prompt(tok, pool, np.random.default_rng(1), 4)
    assert [s.kind for s in prompt.segments] == ["head", "passage", "passage", "passage", "passage", "suffix"]
    assert len(set(prompt.passages)) == 4
    for seg, i in zip(prompt.segments[1:-1], prompt.passages):
        assert prompt.ids[seg.start:seg.end] == pool[i].ids
    assert prompt.ids[: prompt.segments[0].end] == tok.encode(rag_blend.SYSTEM)
    asked = prompt.question.split("what does ")[1].split(" do?")[0]
    assert asked in {name for i in prompt.passages for name in pool[i].names}


def test_passages_stored_alone_load_at_their_new_positions(model, store):
    """Layer 0's K depends only on the token and its position, so the loaded K of every row (head by
    prefix keys, passages by segment keys shifted from position 0) equals a full prefill's there."""
    tok, pool = ByteTokenizer(), pool_of(5)
    prompt = rag_blend.build_prompt(tok, pool, np.random.default_rng(0), 3)
    store.store_head(prompt.ids[: prompt.segments[0].end])
    for i in prompt.passages:
        store.store_passage(pool[i].ids)
    k, v, cached = store.load(prompt)
    full = rag_blend.prefill(model, prompt.ids)
    suffix = prompt.segments[-1]
    assert cached[: suffix.start].all() and not cached[suffix.start:].any()
    torch.testing.assert_close(k[0, : suffix.start], full.k[0, : suffix.start], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v[0, : suffix.start], full.v[0, : suffix.start], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(k[1, : suffix.start], full.k[1, : suffix.start], atol=1e-3)  # context differs


def test_methods_prefill_the_prompt_and_ratio_one_and_prefix_match_full_prefill(model, store):
    tok, pool = ByteTokenizer(), pool_of(4)
    prompt = rag_blend.build_prompt(tok, pool, np.random.default_rng(2), 3)
    store.store_head(prompt.ids[: prompt.segments[0].end])
    for i in prompt.passages:
        store.store_passage(pool[i].ids)
    full = rag_blend.prefill(model, prompt.ids, 8)
    prefix = rag_blend.prefix_prefill(store, prompt, 8)
    exact, recomputed = rag_blend.blend(store, prompt, 1.0, rag_blend.selection.select_rows, 8)
    cheap, few = rag_blend.blend(store, prompt, 0.0, rag_blend.selection.select_rows, 8)
    assert recomputed == len(prompt.ids) and few == len(prompt.ids) - prompt.segments[-1].start
    for cache in (prefix, exact):
        torch.testing.assert_close(cache.last_logits, full.last_logits, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(cheap.last_logits, full.last_logits, atol=1e-4)
    answer = rag_blend.greedy(model, full, 8, eos=None)
    assert len(answer) == 8 and full.num_tokens == len(prompt.ids) + 7
    full.num_tokens = len(prompt.ids)
    ref = rag_blend.answer_logits(model, full, answer)
    assert ref.shape == (8, model.config.vocab_size) and full.num_tokens == len(prompt.ids)
    torch.testing.assert_close(rag_blend.answer_logits(model, exact, answer), ref, atol=1e-4, rtol=1e-4)


def summary_of(kl: dict[str, float], top1: float, blend_s: float) -> dict:
    def method(name: str) -> dict:
        return {"top1": top1, "kl": kl[name], "kl_max": kl[name], "recomputed_share": 0.2, "identical": True}

    names = [f"blend {r:g}" for r in rag_blend.RATIOS] + ["random 0.15"]
    row = {"ttft_s": {"full": 1.0, "prefix": 0.9, "kvtier load": 0.01} | {n: blend_s for n in names},
           "methods": {n: method(n) for n in names}}
    return rag_blend.summarise([row, row])


def test_targets_pass_and_fail_on_their_bounds():
    kl = {"blend 0": 1.0, "blend 0.05": 0.8, "blend 0.15": 0.5, "blend 0.3": 0.3, "blend 1": 0.0,
          "random 0.15": 0.9}
    verdicts = rag_blend.targets(summary_of(kl, 0.95, 0.25))
    assert all(v["pass"] for v in verdicts.values())
    failing = rag_blend.targets(summary_of(kl | {"blend 0.15": 0.95}, 0.85, 0.4))
    assert [v["pass"] for v in failing.values()] == [False, False, False, False]
    assert failing["TTFT >= 3x faster than full prefill"]["value"] == pytest.approx(2.5)


def test_the_context_source_stores_each_passage_from_a_donor_prompt_and_loads_it_at_its_new_place(model,
                                                                                                  store):
    """--source context: passages cut from earlier donor prompts' full prefills (none behind the same
    passages as in the measured prompt). Layer 0's K is position-only, so it loads exactly; deeper
    layers carry the donor's context, which differs from the measured prompt's."""
    tok, pool = ByteTokenizer(), pool_of(6)
    prompt = rag_blend.build_prompt(tok, pool, np.random.default_rng(4), 4)
    donors = rag_blend.donor_prompts(tok, pool, [prompt], np.random.default_rng(5), (2, 3))
    assert sorted(i for d in donors for i in d.passages) == sorted(prompt.passages)
    before = {(i, tuple(prompt.passages[:j])) for j, i in enumerate(prompt.passages)}
    assert not any((i, tuple(d.passages[:j])) in before for d in donors for j, i in enumerate(d.passages))
    store.store_head(prompt.ids[: prompt.segments[0].end])
    for donor in donors:
        rag_blend.store_cut(store, donor, rag_blend.prefill(model, donor.ids))
    k, v, cached = store.load(prompt)
    full = rag_blend.prefill(model, prompt.ids)
    suffix = prompt.segments[-1]
    assert cached[: suffix.start].all()
    torch.testing.assert_close(k[0, : suffix.start], full.k[0, : suffix.start], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(k[1, : suffix.start], full.k[1, : suffix.start], atol=1e-3)


def test_main_quick_writes_a_report_per_source(tmp_path, model, monkeypatch):
    monkeypatch.setattr(rag_blend, "load_model", lambda *args: model)
    monkeypatch.setattr(rag_blend, "load_tokenizer", lambda *args: ByteTokenizer())
    monkeypatch.setattr(rag_blend, "passage_pool", lambda tok: pool_of(6))
    monkeypatch.setattr(rag_blend, "ANSWER_TOKENS", 6)
    threads = torch.get_num_threads()
    try:  # one thread: on a loaded machine two threads of a tiny model are ~10x slower
        for source in rag_blend.SOURCES:
            rag_blend.main(["--quick", "--source", source, "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    context = json.loads((tmp_path / "rag_blend_quick.json").read_text())
    alone = json.loads((tmp_path / "rag_blend_alone_quick.json").read_text())
    assert (context["source"], alone["source"]) == ("context", "alone")
    assert context["summary"]["blend 1"]["kl"] < 1e-6 and alone["summary"]["blend 1"]["kl"] < 1e-6
    assert context["summary"]["blend 0"]["kl"] != alone["summary"]["blend 0"]["kl"]
