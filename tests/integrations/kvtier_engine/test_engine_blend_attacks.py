"""CacheBlend through the engine under attack: batches, aborts, preemption, odd prompts, tier trouble.

Same setting as test_engine_blend.py (the tiny random preset, fp32 on the CPU, token-id prompts cut
on SEP). Each test states the rule it holds the engine to: greedy answers as if alone (or, at ratio
1.0, as if kvtier were off), every lease returned, no approximate KV saved or served as exact.
"""

from __future__ import annotations

import logging
import threading

import pytest
from connector.conftest import flip_payload_byte

from kvtier import load_config
from kvtier.config import ConfigError
from kvtier.connector import blend_plan
from kvtier_engine import LLM, SamplingParams, model_runner
from kvtier_engine.blend_step import BlendUnavailable
from kvtier_engine.block_pool import BlockPool
from kvtier_engine.llm_engine import RequestOutput

from .test_engine_blend import (
    BASE,
    BLEND,
    CHUNK,
    MODEL,
    PARAMS,
    SEP,
    baseline,
    blend_engine,
    parts,
    prompt,
    run,
)


def leased(llm: LLM) -> int:
    return llm.engine.kvtier.stats()["pool"]["leased_chunks"]


def blend_llm(tmp_path, text: str, **options) -> LLM:
    path = tmp_path / f"attack-{abs(hash((text, tuple(sorted(options.items())))))}.yaml"
    path.write_text(text)
    options.setdefault("enable_prefix_caching", False)
    return LLM(MODEL, kvtier_config=load_config(path, env={}), **options)


def drive(llm: LLM, requests: dict[str, list[int]],
          params: SamplingParams = PARAMS) -> dict[str, RequestOutput]:
    """Add every request, step until all are done; request id -> its last output."""
    engine = llm.engine
    for rid, ids in requests.items():
        engine.add_request(ids, params, request_id=rid)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = o
    assert engine.wait_for_saves(30)
    return out


# -- several blends in one step ------------------------------------------------------------------


def test_blends_batched_with_prefills_and_decodes_answer_as_if_alone(tmp_path):
    p = parts(43)
    first = prompt(p, "head1", ("p1", "p2", "p3"))
    decoding = p["head2"] + p["q"]  # no separator: a normal request, already decoding
    others = {"blend-a": prompt(p, "head2", ("p3", "p1", "p2")),
              "blend-b": prompt(p, "head1", ("p2", "p3", "p1")),
              "plain": p["p2"] + p["head1"]}
    long_params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with blend_engine(tmp_path) as llm:
        run(llm, first)
        engine = llm.engine
        engine.add_request(decoding, long_params, request_id="decoding")
        engine.step()  # its prefill: it decodes beside the blends below
        outs = drive(llm, others)
        together = {rid: o.token_ids for rid, o in outs.items()}
        assert engine.kvtier.stats()["blend_requests"] == 2
        assert leased(llm) == 0
    alone = {}
    for rid, ids in {**others, "decoding": decoding}.items():
        with blend_engine(tmp_path) as llm:
            run(llm, first)
            alone[rid] = llm.generate(ids, long_params if rid == "decoding" else PARAMS)[0].token_ids
    assert together == alone


# -- aborts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before its step", "mid chunked prefill", "while decoding"])
def test_an_aborted_blend_returns_every_lease_and_saves_no_blended_kv(tmp_path, when):
    p = parts(47)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head1", ("p3", "p2", "p1"))
    options = {"max_num_batched_tokens": 64} if when == "mid chunked prefill" else {}
    with blend_llm(tmp_path, BLEND.format(sep=SEP, ratio=0.15), **options) as llm:
        run(llm, first)
        engine = llm.engine
        rid = engine.add_request(second, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
        if when != "before its step":
            engine.step()
            if when == "while decoding":
                assert engine.kvtier.stats()["blend_requests"] == 1
                engine.step()
        engine.abort(rid)
        while engine.has_unfinished():
            engine.step()
        assert engine.wait_for_saves(30)
        assert leased(llm) == 0
        assert engine.scheduler.connector._states == {}
        assert engine.scheduler.pool.num_free == len(engine.scheduler.pool.blocks)
        if when == "while decoding":  # nothing past the exact head went under prefix keys
            assert engine.kvtier.lookup(second) == 32


# -- preemption -----------------------------------------------------------------------------------


def test_a_preempted_blend_is_recomputed_correctly(tmp_path):
    """A paged cache that holds two prompts only until they decode: the later one (a blend) is
    preempted and recomputed. At ratio 1.0 both answer exactly as an engine without kvtier."""
    p = parts(53)
    p["q"] = p["q"][:11]  # prompts of 32 + 41 + 38 + 51 + 12 = 174 tokens... padded to 176 below
    first = prompt(p, "head1", ("p1", "p2", "p3"))
    second = prompt(p, "head2", ("p2", "p3", "p1"))
    plain = p["head1"] + p["p3"] + p["p1"] + p["p2"] + p["q"][:7]
    second += [7] * (176 - len(second))
    plain += [9] * (176 - len(plain))
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers, block size, kv heads, head dim, fp32
    with blend_llm(tmp_path, BLEND.format(sep=SEP, ratio=1.0), kv_cache_bytes=22 * block_bytes) as llm:
        run(llm, first)
        outs = drive(llm, {"plain": plain, "blend": second})
        stats = llm.engine.kvtier.stats()
        assert leased(llm) == 0
    assert outs["blend"].metrics.num_preemptions == 1
    assert stats["blend_requests"] == 2  # blended, preempted, blended again from its own tokens
    m = outs["blend"].metrics
    assert (m.blend_tokens_reused, m.blend_tokens_recomputed) == (0, 2 * len(second))  # prompt rows only
    together = {rid: o.token_ids for rid, o in outs.items()}
    assert together == {"plain": baseline(tmp_path, plain), "blend": baseline(tmp_path, second)}


def test_a_blend_that_raises_computes_its_request_normally_beside_the_other_blend(tmp_path, monkeypatch,
                                                                                 caplog):
    """Two blends in one step; one raises after scribbling over its blocks past the head. It is
    computed as a normal prefill from its head in the same step (the scribbles overwritten before
    they are read), logged once and counted; the other still blends. At ratio 1.0 both answer what
    an engine without kvtier answers."""
    p = parts(47)
    first = prompt(p, "head1", ("p1", "p2", "p3"))
    requests = {"broken": prompt(p, "head1", ("p3", "p1", "p2")),
                "fine": prompt(p, "head2", ("p2", "p3", "p1"))}
    real = model_runner.run_blend

    def flaky(model, cache, s, load, config):
        if s.request.request_id != "broken":
            return real(model, cache, s, load, config)
        cache.kv[:, :, s.block_ids[s.num_computed // cache.block_size:]] = 1e4  # a part-written blend
        raise RuntimeError("injected: a blend that breaks part-way")

    with blend_engine(tmp_path, ratio=1.0) as llm:
        run(llm, first)
        monkeypatch.setattr(model_runner, "run_blend", flaky)
        with caplog.at_level(logging.ERROR, logger="kvtier_engine.model_runner"):
            out = drive(llm, requests)
        engine = llm.engine
        assert engine.runner.blend_failures == 1 and engine.kvtier.stats()["blend_requests"] == 1
        assert engine.kvtier.stats()["blend_failures"] == 1
        ran = [r.request_ids for r in engine.step_log if "broken" in r.request_ids]
        assert ran[0] == ("broken", "fine")  # one step: the fall-back did not wait for another
        # Its KV is exact: saved under prefix keys as usual, unlike a blended request's.
        assert engine.kvtier.lookup(requests["broken"]) == len(requests["broken"]) // CHUNK * CHUNK
        assert leased(llm) == 0
    broken, fine = out["broken"].metrics, out["fine"].metrics
    assert (broken.blend_segments_hit, fine.blend_segments_hit) == (0, 3)
    assert (broken.tokens_loaded, broken.prefill_tokens_computed) == (32, len(requests["broken"]) - 32)
    assert {rid: o.token_ids for rid, o in out.items()} == {rid: baseline(tmp_path, ids)
                                                            for rid, ids in requests.items()}
    failures = [r for r in caplog.records if "blending failed" in r.getMessage()]
    assert len(failures) == 1 and "broken" in failures[0].getMessage()


# -- odd prompts ----------------------------------------------------------------------------------


def _shapes(p: dict[str, list[int]]) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (a prompt that stores passages, one that could reuse them)."""
    s = [SEP]
    return {
        "separator at position 0": (s + p["p1"] + s + p["p2"] + s + p["q"],
                                    s + p["p2"] + s + p["p1"] + s + p["q"]),
        "only passages": (s + p["p1"] + s + p["p2"] + s + p["p3"], s + p["p3"] + s + p["p1"] + s + p["p2"]),
        "consecutive separators": (p["head1"] + s + s + p["p1"] + s + s + s + p["p2"] + s + p["q"],
                                   p["head2"] + s + p["p2"] + s + s + p["p1"] + s + s + p["q"]),
        "separator at the very end": (p["head1"] + s + p["p1"] + s + p["p2"] + s,
                                      p["head2"] + s + p["p2"] + s + p["p1"] + s),
    }


@pytest.mark.parametrize("shape", list(_shapes(parts())))
def test_odd_separator_placements_answer_exactly_at_ratio_one(tmp_path, shape):
    first, second = _shapes(parts(59))[shape]
    with blend_engine(tmp_path, ratio=1.0) as llm:
        run(llm, first)
        out = run(llm, second)
        assert leased(llm) == 0
    assert out.metrics.blend_segments_hit >= 1
    m = out.metrics
    assert m.prefill_tokens_computed + m.blend_tokens_reused + m.tokens_loaded == len(second)
    assert out.token_ids == baseline(tmp_path, second)


def test_a_prompt_of_64_passages_is_blended(tmp_path):
    p = parts(61)
    passages = [p["p1"][:17] + [i] for i in range(64)]  # distinct, 18 tokens each
    first = [t for ps in passages for t in (SEP, *ps)] + [SEP, *p["q"]]
    second = p["head1"] + [t for ps in reversed(passages) for t in (SEP, *ps)] + [SEP, *p["q"]]
    with blend_engine(tmp_path, ratio=1.0) as llm:
        run(llm, first)
        out = run(llm, second)
        assert leased(llm) == 0
    assert out.metrics.blend_segments_hit == 64
    assert out.token_ids == baseline(tmp_path, second)


@pytest.mark.parametrize("min_tokens", [0, 1000])
def test_min_tokens_at_its_extremes(tmp_path, min_tokens):
    p = parts(67)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p3", "p1", "p2"))
    text = BLEND.format(sep=SEP, ratio=1.0).replace("min_tokens: 16", f"min_tokens: {min_tokens}")
    with blend_llm(tmp_path, text) as llm:
        run(llm, first)
        out = run(llm, second)
    assert out.metrics.blend_segments_hit == (3 if min_tokens == 0 else 0)
    assert out.token_ids == baseline(tmp_path, second)


def test_a_prompt_past_the_context_is_refused(tmp_path):
    p = parts(71)
    with blend_llm(tmp_path, BLEND.format(sep=SEP, ratio=0.15), max_model_len=64) as llm:
        with pytest.raises(ValueError, match="context"):
            llm.engine.add_request(prompt(p, "head1", ("p1",)), PARAMS)
        assert not llm.engine.has_requests()


def test_a_separator_past_the_vocabulary_refuses_to_start(tmp_path):
    with pytest.raises(BlendUnavailable, match=r"separator_ids.*\[512\].*vocabulary"):
        blend_llm(tmp_path, BLEND.format(sep=512, ratio=0.15))


def test_a_separator_that_never_occurs_leaves_prefix_caching_and_says_so_once(tmp_path, caplog):
    p = parts(73)
    ids = [prompt(p, "head1", ("p1", "p2")), prompt(p, "head1", ("p1", "p2")), prompt(p, "head2", ("p3",))]
    outs = {}
    for name, text in (("blend", BLEND.format(sep=400, ratio=0.15)), ("plain", BASE)):
        level = caplog.at_level(logging.INFO, logger="kvtier.connector.blend_plan")
        with level, blend_llm(tmp_path, text) as llm:
            caplog.clear()
            got = [run(llm, i) for i in ids]
            said = [r for r in caplog.records if "holds no separator" in r.getMessage()]
        outs[name] = [(o.token_ids, o.metrics.tokens_loaded, o.metrics.blend_segments_hit) for o in got]
        outs[name] = outs[name], len(said)
    assert outs["blend"][0] == outs["plain"][0]  # prefix caching unchanged
    assert outs["blend"][1] == 1


def test_min_tokens_below_zero_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BLEND.format(sep=SEP, ratio=0.15).replace("min_tokens: 16", "min_tokens: -1"))
    with pytest.raises(ConfigError, match="min_tokens"):
        load_config(path, env={})


# -- tiers ----------------------------------------------------------------------------------------


def disk_blend(tmp_path, ratio: float, cpu: str = "64MiB") -> str:
    return (f"chunk_size: {CHUNK}\ncpu:\n  capacity: {cpu}\ndisk:\n  path: {tmp_path / 'disk'}\n"
            f"  capacity: 256MiB\nblend:\n  separator_ids: [{SEP}]\n  ratio: {ratio}\n  min_tokens: 16\n")


def on_disk_only(llm: LLM, ids: list[int]):
    """Run `ids` (its passages saved), then leave what kvtier holds on disk only; its CacheEngine."""
    run(llm, ids)
    kvtier = llm.engine.kvtier
    assert kvtier.flush()
    kvtier.clear("cpu")
    return kvtier


def test_a_passage_held_on_disk_only_is_blended(tmp_path):
    p = parts(79)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p3", "p1", "p2"))
    with blend_llm(tmp_path, disk_blend(tmp_path, 1.0)) as llm:
        kvtier = on_disk_only(llm, first)
        out = run(llm, second)
        assert kvtier.stats()["tiers"]["disk"]["hits"] > 0
        assert leased(llm) == 0
    assert out.metrics.blend_segments_hit == 3
    assert out.token_ids == baseline(tmp_path, second)


def test_a_corrupt_passage_record_on_disk_is_a_miss_and_the_request_computed_normally(tmp_path):
    p = parts(83)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p3", "p1", "p2"))
    with blend_llm(tmp_path, disk_blend(tmp_path, 0.15)) as llm:
        kvtier = on_disk_only(llm, first)
        planner = llm.engine.scheduler.connector.blend
        p1 = planner.passages(first)[0]
        path = kvtier.storage.lower[0].path_for(planner.keys.spans(first, p1)[0].key)
        flip_payload_byte(path, 0xFF)
        out = run(llm, second)
        assert kvtier.stats()["tiers"]["disk"]["corrupt"] == 1
        assert kvtier.stats()["blend_requests"] == 0
        assert leased(llm) == 0
    assert out.metrics.blend_segments_hit == 0
    assert out.token_ids == baseline(tmp_path, second)


def test_two_engines_saving_the_same_passages_on_one_disk_at_once(tmp_path):
    p = parts(89)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p2", "p3", "p1"))
    text = disk_blend(tmp_path, 1.0)
    engines = [blend_llm(tmp_path, text), blend_llm(tmp_path, text)]
    try:
        threads = [threading.Thread(target=run, args=(llm, first)) for llm in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for llm in engines:
            assert llm.engine.kvtier.flush()
    finally:
        for llm in engines:
            llm.close()
    with blend_llm(tmp_path, text) as llm:  # a third engine: finds them on disk
        out = run(llm, second)
    assert out.metrics.blend_segments_hit == 3
    assert out.token_ids == baseline(tmp_path, second)


# -- other models -----------------------------------------------------------------------------------


def test_a_sliding_window_model_blends_exactly_at_ratio_one(tmp_path, checkpoint_dir):
    path = str(checkpoint_dir("mistral-window-8"))  # 3 layers, an 8-token window, 128 positions
    p = {k: v[:20] for k, v in parts(97).items()}
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head1", ("p3", "p1", "p2"))
    config = tmp_path / "window.yaml"
    config.write_text(BLEND.format(sep=SEP, ratio=1.0))
    with LLM(path, kvtier_config=load_config(config, env={}), enable_prefix_caching=False) as llm:
        run(llm, first)
        out = run(llm, second)
    with LLM(path, enable_prefix_caching=False) as llm:
        expected = run(llm, second).token_ids
    assert out.metrics.blend_segments_hit == 3
    assert out.token_ids == expected


def test_a_float16_engine_blends_like_a_float16_engine_without_kvtier_at_ratio_one(tmp_path):
    p = parts(101)
    first, second = prompt(p, "head1", ("p1", "p2", "p3")), prompt(p, "head2", ("p3", "p1", "p2"))
    with blend_llm(tmp_path, BLEND.format(sep=SEP, ratio=1.0), dtype="float16") as llm:
        run(llm, first)
        out = run(llm, second)
    with LLM(MODEL, enable_prefix_caching=False, dtype="float16") as llm:
        expected = run(llm, second).token_ids
    assert out.metrics.blend_segments_hit == 3
    assert out.token_ids == expected


def test_the_block_pool_never_publishes_a_sequence_past_its_cacheable_head():
    pool = BlockPool(16, block_size=4)
    tokens = list(range(17))
    pool.allocate("blended", tokens)
    pool.cache_only_upto("blended", 8)
    pool.cache_only_upto("blended", 12)  # a limit only ever narrows
    pool.publish("blended", tokens, 17)
    pool.allocate("later", tokens)
    assert pool.block_table("later")[:2] == pool.block_table("blended")[:2]  # the head: exact, shared
    pool.free("later")
    assert pool.allocate("again", tokens) == 8
    with pytest.raises(ValueError, match="blocks"):
        pool.cache_only_upto("again", 6)
    pool.free("blended")
    pool.free("again")
    pool.allocate("fresh", tokens)  # the limit went with the sequence: a fresh one publishes all
    pool.publish("fresh", tokens, 17)
    assert pool.allocate("after", tokens) == 16


def test_passages_past_the_cap_are_computed_and_said_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(blend_plan, "MAX_PASSAGES", 8)
    p = parts(61)
    passages = [[i, *p["p1"][:17]] for i in range(12)]  # distinct from their first chunk on
    first = [t for ps in passages for t in (SEP, *ps)] + [SEP, *p["q"]]
    second = p["head1"] + [t for ps in reversed(passages) for t in (SEP, *ps)] + [SEP, *p["q"]]
    with caplog.at_level(logging.WARNING, logger="kvtier.connector.blend_plan"), \
            blend_engine(tmp_path, ratio=1.0) as llm:
        run(llm, first)
        out = run(llm, second)
        assert leased(llm) == 0
    assert out.metrics.blend_segments_hit == 4  # the first 8 of `second` are the last 8 saved: 4 held
    assert out.token_ids == baseline(tmp_path, second)
    assert len([r for r in caplog.records if "only its first 8" in r.getMessage()]) == 1
