"""CacheBlend through the connector (issue 14): the bundled engine reuses the KV of passages it saw
before, in another order and behind another head.

The model is the tiny random preset (2 layers: check layer 1), fp32 on the CPU, the device prefix
cache off so a prompt is computed, loaded from kvtier's prefix, or blended. Prompts are token ids:
a head, then passages and a question, each after the separator id SEP (outside the random ids).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch

from kvtier import load_config
from kvtier.blend.segments import SegmentKeys, split_segments
from kvtier.connector.blend_io import SegmentIO
from kvtier.connector.metadata import BlendLoadSpec, PassageSpans
from kvtier_engine import LLM, SamplingParams
from kvtier_engine import llm_engine as llm_engine_module
from kvtier_engine.blend_step import BlendUnavailable, select_after
from kvtier_engine.layers.attention import ContiguousKVCache

MODEL = "random:llama-tiny"
CHUNK = 16
SEP = 300
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
BASE = f"chunk_size: {CHUNK}\ncpu:\n  capacity: 64MiB\ndisk: null\n"
BLEND = BASE + "blend:\n  separator_ids: [{sep}]\n  ratio: {ratio}\n  min_tokens: 16\n"


def parts(seed: int = 3) -> dict[str, list[int]]:
    """Two heads (32 tokens: two chunks), three passages (partial tails), a question: random ids < 256."""
    rng = np.random.default_rng(seed)
    sizes = {"head1": 32, "head2": 32, "p1": 40, "p2": 37, "p3": 50, "q": 12}
    return {name: rng.integers(0, 256, n).tolist() for name, n in sizes.items()}


def prompt(p: dict[str, list[int]], head: str, order: tuple[str, ...]) -> list[int]:
    ids = list(p[head])
    for name in (*order, "q"):
        ids += [SEP, *p[name]]
    return ids


def engine(tmp_path, text: str | None) -> LLM:
    if text is None:
        return LLM(MODEL, enable_prefix_caching=False)
    path = tmp_path / f"kvtier-{abs(hash(text))}.yaml"
    path.write_text(text)
    return LLM(MODEL, kvtier_config=load_config(path, env={}), enable_prefix_caching=False)


def blend_engine(tmp_path, ratio: float = 0.15) -> LLM:
    return engine(tmp_path, BLEND.format(sep=SEP, ratio=ratio))


def run(llm: LLM, ids: list[int]):
    out = llm.generate(ids, PARAMS)[0]
    assert llm.engine.wait_for_saves(30)
    return out


def baseline(tmp_path, ids: list[int]) -> list[int]:
    with engine(tmp_path, None) as llm:
        return run(llm, ids).token_ids


def test_shuffled_passages_behind_another_head_are_blended(tmp_path):
    p = parts()
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p3", "p1", "p2"))
    with blend_engine(tmp_path) as llm:
        assert run(llm, first).metrics.blend_segments_hit == 0  # nothing held yet: stores the passages
        out = run(llm, second)
        stats, text = llm.engine.kvtier.stats(), llm.engine.prometheus_text()
    m = out.metrics
    assert m.blend_segments_hit == 3
    assert m.blend_tokens_reused > 0
    assert m.blend_tokens_recomputed < len(second)
    assert len(out.token_ids) == PARAMS.max_tokens
    # The counters add up: one blended request, its rows after the head (none: head2 is new) split
    # between reused and recomputed, and the engine counters equal the request's.
    assert m.blend_tokens_reused + m.blend_tokens_recomputed == len(second)
    assert (stats["blend_requests"], stats["blend_segments_hit"], stats["blend_tokens_reused"],
            stats["blend_tokens_recomputed"]) == (1, 3, m.blend_tokens_reused, m.blend_tokens_recomputed)
    assert "kvtier_blend_requests_total 1.0" in text
    assert f"kvtier_blend_tokens_reused_total {float(m.blend_tokens_reused)}" in text


def test_ratio_one_answers_what_an_engine_without_kvtier_answers(tmp_path):
    p = parts(5)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p2", "p3", "p1"))
    with blend_engine(tmp_path, ratio=1.0) as llm:
        run(llm, first)
        out = run(llm, second)
    assert out.metrics.blend_segments_hit == 3
    assert out.metrics.blend_tokens_reused == 0  # ratio 1: every row recomputed
    assert out.token_ids == baseline(tmp_path, second)


def test_a_blended_request_saves_no_prefix_chunk_beyond_its_head(tmp_path):
    p = parts(7)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head1", ("p3", "p2", "p1"))
    with blend_engine(tmp_path) as llm:
        run(llm, first)
        out = run(llm, second)
        assert out.metrics.blend_segments_hit == 3
        assert out.metrics.tokens_loaded == 32  # the head, from kvtier's prefix
        assert out.metrics.blend_tokens_reused + out.metrics.blend_tokens_recomputed == len(second) - 32
        # Its approximate KV past the head (prompt and decode) was never stored under prefix keys.
        assert llm.engine.kvtier.lookup(second + out.token_ids) == 32


def test_a_passage_read_that_falls_short_computes_the_request_normally(tmp_path, monkeypatch):
    p = parts(11)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p2", "p1", "p3"))
    with blend_engine(tmp_path) as llm:
        run(llm, first)
        storage = llm.engine.kvtier.storage
        real_get = storage.get
        monkeypatch.setattr(storage, "get", lambda spans, out, promote=None: min(real_get(spans, out), 1))
        out = run(llm, second)
        monkeypatch.undo()
        assert out.metrics.blend_segments_hit == 0
        assert llm.engine.kvtier.stats()["blend_requests"] == 0
        # Computed exactly, so its prefix chunks are saved as usual.
        assert llm.engine.kvtier.lookup(second) == len(second) - len(second) % CHUNK
    assert out.token_ids == baseline(tmp_path, second)


def test_a_failing_passage_read_computes_the_request_normally(tmp_path, monkeypatch):
    p = parts(13)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p3", "p2", "p1"))
    with blend_engine(tmp_path) as llm:
        run(llm, first)

        def broken(self, spec):
            raise OSError("tier down")

        monkeypatch.setattr(SegmentIO, "_shift", broken)
        out = run(llm, second)
    assert out.metrics.blend_segments_hit == 0
    assert out.token_ids == baseline(tmp_path, second)


@pytest.mark.parametrize("shape", ["no separator", "single segment"])
def test_prompts_without_passages_take_the_prefix_caching_path(tmp_path, caplog, shape):
    p = parts(17)
    ids = p["head1"] + p["p1"] + p["q"] if shape == "no separator" else p["head1"] + [SEP] + p["q"]
    other = p["head2"] + p["p2"] if shape == "no separator" else p["head2"] + [SEP] + p["p2"]
    results = {}
    for name, text in (("blend", BLEND.format(sep=SEP, ratio=0.15)), ("plain", BASE)):
        level = caplog.at_level(logging.INFO, logger="kvtier.connector.blend_plan")
        with level, engine(tmp_path, text) as llm:
            caplog.clear()
            outs = [run(llm, ids), run(llm, ids), run(llm, other)]
            said = [r for r in caplog.records if "holds no separator" in r.getMessage()]
        results[name] = ([o.token_ids for o in outs], [o.metrics.tokens_loaded for o in outs], len(said))
    assert results["blend"][:2] == results["plain"][:2]
    assert results["blend"][1][1] > 0  # the repeated prompt was loaded from kvtier's prefix
    assert results["blend"][2] == (1 if shape == "no separator" else 0)  # said once, not per request


def test_a_model_whose_rope_cannot_be_shifted_refuses_to_start(tmp_path, monkeypatch):
    real_load = llm_engine_module.load_model

    def yarn_model(*args, **kwargs):
        model = real_load(*args, **kwargs)
        # A copy: the preset's config is shared, and ModelConfig itself refuses yarn at construction.
        config = copy.copy(model.config)
        object.__setattr__(config, "rope_scaling", {"rope_type": "yarn", "factor": 4.0})
        model.config = config
        return model

    monkeypatch.setattr(llm_engine_module, "load_model", yarn_model)
    with pytest.raises(BlendUnavailable, match=r"`blend:`.*'yarn'"):
        blend_engine(tmp_path)


def test_a_check_layer_past_the_model_refuses_to_start(tmp_path):
    text = BLEND.format(sep=SEP, ratio=0.15) + "  check_layer: 2\n"
    with pytest.raises(BlendUnavailable, match="check_layer"):
        engine(tmp_path, text)


def test_a_stored_passage_holds_its_keys_as_if_it_began_at_position_zero(tmp_path):
    """Layer 0's K depends on a token and its position only: the record of a passage seen at
    position 32, 73 or 111 must hold the layer-0 K of that passage prefilled alone from position 0."""
    p = parts(19)
    ids = prompt(p, "head1", ("p1", "p2", "p3"))
    with blend_engine(tmp_path) as llm:
        run(llm, ids)
        kvtier, model = llm.engine.kvtier, llm.engine.model
        planner = llm.engine.scheduler.connector.blend
        passages = planner.passages(ids)
        assert [s.start for s in passages] == [32, 73, 111]
        for passage in passages:
            spans = planner.keys.spans(ids, passage)
            stored = torch.zeros(kvtier.layout.chunk_shape(len(ids)), dtype=kvtier.layout.dtype)
            assert kvtier.storage.get(spans, stored) == len(spans)
            alone = torch.tensor(ids[passage.start:passage.end])
            cache = ContiguousKVCache(model.config, len(alone), torch.float32, "cpu")
            with torch.no_grad():
                model(alone, torch.arange(len(alone)), cache)
            k0 = stored[0, 0, passage.start:passage.end].unflatten(-1, (model.config.num_kv_heads, -1))
            torch.testing.assert_close(k0, cache.k[0], atol=1e-5, rtol=0)


def test_a_16_bit_engine_with_layer_wise_loads_blends(tmp_path):
    """A GPU engine's setting on the CPU: bfloat16 KV (the self-test's 16-bit tolerance) and the head
    copied into the paged cache layer by layer on the load thread while the blend waits for it."""
    p = parts(23)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head1", ("p2", "p1", "p3"))
    path = tmp_path / "bf16.yaml"
    path.write_text(BLEND.format(sep=SEP, ratio=0.15))
    with LLM(MODEL, kvtier_config=load_config(path, env={}), enable_prefix_caching=False,
             dtype="bfloat16") as llm:
        llm.engine.connector.layerwise = True
        run(llm, first)
        out = run(llm, second)
    assert out.metrics.tokens_loaded == 32
    assert out.metrics.blend_segments_hit == 3
    assert len(out.token_ids) == PARAMS.max_tokens


def test_a_prompt_that_takes_several_steps_is_not_blended(tmp_path):
    """A blend computes the rest of the prompt in one step; a token budget that cannot hold it
    leaves the request to chunked prefill (prefix caching only), answering exactly."""
    p = parts(29)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p3", "p1", "p2"))
    path = tmp_path / "small-steps.yaml"
    path.write_text(BLEND.format(sep=SEP, ratio=0.15))
    with LLM(MODEL, kvtier_config=load_config(path, env={}), enable_prefix_caching=False,
             max_num_batched_tokens=64) as llm:
        run(llm, first)
        out = run(llm, second)
        assert llm.engine.kvtier.stats()["blend_requests"] == 0
    assert out.metrics.blend_segments_hit == 0
    assert out.token_ids == baseline(tmp_path, second)


def test_a_head_whose_kvtier_hit_ends_inside_a_block_is_blended(tmp_path, monkeypatch):
    """A tier whose prefix hit ends mid-block (40 of a 48-token head: a stored partial chunk): the head
    is rounded down to 32, the prefix load stops there, rows 32..47 are blended like any other."""
    p = parts(31)
    p["head1"] = p["head1"] + p["head2"][:16]  # 48 tokens: three chunks
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head1", ("p3", "p1", "p2"))
    with blend_engine(tmp_path, ratio=1.0) as llm:
        run(llm, first)
        kvtier = llm.engine.kvtier
        real_lookup = kvtier.lookup
        monkeypatch.setattr(kvtier, "lookup", lambda tokens: min(real_lookup(tokens), 40))
        out = run(llm, second)
    m = out.metrics
    assert (m.tokens_loaded, m.blend_segments_hit) == (32, 3)
    assert m.blend_tokens_reused + m.blend_tokens_recomputed == len(second) - 32
    assert out.token_ids == baseline(tmp_path, second)


def test_prefill_tokens_computed_counts_rows_computed_through_every_layer(tmp_path):
    p = parts(37)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head1", ("p2", "p3", "p1"))
    with blend_engine(tmp_path) as llm:
        one = run(llm, first)
        two = run(llm, second)
        text = llm.engine.prometheus_text()
    m = two.metrics
    assert m.blend_tokens_reused > 0
    assert m.prefill_tokens_computed == m.blend_tokens_recomputed
    assert m.prefill_tokens_computed + m.blend_tokens_reused + m.tokens_loaded == len(second)
    assert one.metrics.prefill_tokens_computed == len(first)  # not blended: every row computed
    total = float(one.metrics.prefill_tokens_computed + m.prefill_tokens_computed)
    assert f"kvtier_engine_prefill_tokens_computed_total {total}" in text


def test_the_device_prefix_cache_never_serves_blended_blocks_as_exact(tmp_path):
    """With the device prefix cache on, a blended request publishes its head's blocks and no block
    past it: the same prompt again finds the head on the device, and is blended again."""
    p = parts(41)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head1", ("p3", "p2", "p1"))
    path = tmp_path / "device-cache.yaml"
    path.write_text(BLEND.format(sep=SEP, ratio=0.15))
    with LLM(MODEL, kvtier_config=load_config(path, env={}), enable_prefix_caching=True) as llm:
        run(llm, first)
        two = run(llm, second)
        three = run(llm, second)
    assert two.metrics.blend_segments_hit == 3
    assert two.metrics.tokens_cached_on_device == 32  # head1's blocks, left by the first prompt
    assert three.metrics.tokens_cached_on_device == 32  # not the blended blocks past it
    assert three.metrics.blend_segments_hit == 3
    assert three.token_ids == two.token_ids
    m = three.metrics
    assert m.prefill_tokens_computed + m.blend_tokens_reused + m.tokens_cached_on_device == len(second)


@pytest.mark.parametrize("ratio", [0.15, 1.0])
def test_a_first_passage_the_device_prefix_cache_reaches_into_is_blended(tmp_path, ratio):
    # A 31-token head and the 1-token separator fill two blocks: the device prefix cache holds the
    # first block of the first passage too (every passage starts with SEP), so the head ends inside
    # that passage. It is still a blend hit: the rows before the head come from the device, exact.
    p = parts()
    p["head1"] = p["head1"][:31]
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head1", ("p3", "p1", "p2"))
    path = tmp_path / "kvtier.yaml"
    path.write_text(BLEND.format(sep=SEP, ratio=ratio))
    with LLM(MODEL, kvtier_config=load_config(path, env={})) as llm:  # device prefix caching on
        run(llm, first)
        out = run(llm, second)
    m = out.metrics
    assert m.tokens_cached_on_device == 32  # the head's 31 tokens + SEP: block-aligned
    assert m.blend_segments_hit == 3
    assert m.blend_tokens_reused > 0 if ratio < 1 else m.blend_tokens_reused == 0
    if ratio == 1.0:
        assert out.token_ids == baseline(tmp_path, second)


def test_a_single_segment_at_position_zero_is_bit_equal_to_prefix_caching(tmp_path):
    """A passage that opens the prompt (no head) sits at position 0, where its record's normalising
    shift is the identity: what the engine stored under its segment keys, and what a blend reads back
    through the worker's passage read (moved by +0), are the very bytes prefix caching stored and
    loads for those tokens."""
    p = parts(23)
    ids = [SEP, *p["p1"], SEP, *p["q"]]  # passage rows 0..40, then the question
    with blend_engine(tmp_path) as llm:
        run(llm, ids)
        kvtier = llm.engine.kvtier
        passage = split_segments(ids, [SEP])[0]
        assert (passage.kind, passage.start) == ("passage", 0)
        spans = SegmentKeys(kvtier.db.namespace_digest, CHUNK).spans(ids, passage)
        read = llm.engine.connector.segments.read(
            BlendLoadSpec("r", ids, 0, [PassageSpans(passage.start, passage.end, spans)]))
        prefix, n = kvtier.retrieve(ids)
    full = passage.end - passage.end % CHUNK  # the passage's whole chunks: rows 0..31
    assert read is not None and read.cached[:passage.end].all() and n >= full
    assert torch.equal(read.kv[:, :, :full], prefix[:, :, :full])


def test_the_head_rows_neither_count_toward_the_ratio_nor_are_picked():
    head, t = 8, 28  # 20 cached rows after the head, the head's rows deviate most
    k_loaded = torch.zeros(t, 1, 2)
    k_new = torch.zeros(t, 1, 2)
    k_new[:head] = 100.0
    k_new[head:, 0, 0] = torch.arange(20, dtype=torch.float32)
    cached = torch.ones(t, dtype=torch.bool)
    cached[head + 1] = False
    rows = select_after(head)(k_new, k_loaded, cached, 0.15).tolist()
    # ceil(0.15 * 19) = 3 of the cached rows after the head (the most deviating), plus the uncached one
    assert rows == [head + 1, t - 3, t - 2, t - 1]
