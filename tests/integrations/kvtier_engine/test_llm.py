"""Tests for kvtier_engine/llm.py and llm_engine.py: the whole engine (scheduler, paged cache, model
runner, detokenizer) against Hugging Face transformers, and the engine's own behaviour.

Correctness: on the tiny checkpoints of conftest.py (Llama, Qwen2, Mistral without and with an
8-token sliding window), `LLM.generate` picks exactly HF's greedy tokens, and the logits it sampled
from (recorded per request and step) are HF's to 1e-4 in fp32, with prompts of mixed lengths batched
together, prefill cut into 8-token chunks, requests preempted and recomputed, and prefixes found in
the device cache. The prompts are token ids; the checkpoints have no tokenizer, so the engine's is
the byte-level one, whose EOS (257) a random model may well pick: every request sets `ignore_eos`.
"""

from __future__ import annotations

import pytest
import torch

from kvtier_engine import LLM, LLMEngine, SamplingParams
from kvtier_engine.llm_engine import EngineOptions

ATOL = 1e-4
NEW_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
# kv_cache_bytes per 16-token block of the tiny checkpoints: K and V, 3 layers, 2 heads of 16, fp32.
BLOCK_BYTES = 2 * 3 * 16 * 2 * 16 * 4


def prompts(lengths: list[int], seed: int = 0, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


class LogitsRecorder:
    """Records, per request, the logits each of its tokens was sampled from (one row per step), by
    wrapping the engine's scheduler and model: it changes nothing they compute."""

    def __init__(self, engine: LLMEngine):
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.steps: list[int] = []
        self._sampling: list[str] = []
        schedule, logits = engine.scheduler.schedule, engine.model.logits

        def recording_schedule():
            out = schedule()
            self.steps.append(out.step)
            self._sampling = [s.request.request_id for s in out.scheduled if s.completes_sequence]
            return out

        def recording_logits(hidden: torch.Tensor) -> torch.Tensor:
            out = logits(hidden)
            for request_id, row in zip(self._sampling, out, strict=True):
                self.rows.setdefault(request_id, []).append(row.detach().clone())
            return out

        engine.scheduler.schedule = recording_schedule
        engine.model.logits = recording_logits

    def of(self, request_id: str) -> torch.Tensor:
        return torch.stack(self.rows[request_id])


def hf_generate(hf_model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        ids = torch.tensor([prompt])  # an explicit mask: HF would take token 0 (its pad id) for padding
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                do_sample=False)
    return out[0, len(prompt):].tolist()


def hf_logits(hf_model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """HF's logits for every output token: rows len(prompt)-1 .. of a forward over prompt + output."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + output[:-1]])).logits[0]
    return logits[len(prompt) - 1:]


def make_llm(ref, **options) -> LLM:
    """An engine on the checkpoint, in fp32 on the CPU, with 1 MiB of paged cache unless told."""
    options = {"device": "cpu", "dtype": "float32", "kv_cache_bytes": 1 << 20, **options}
    return LLM(str(ref.path), **options)


def assert_matches_hf(ref, recorder: LogitsRecorder, batch: list[list[int]], outputs) -> None:
    for prompt, out in zip(batch, outputs, strict=True):
        assert out.finish_reason == "length" and len(out.token_ids) == NEW_TOKENS
        assert out.token_ids == hf_generate(ref.hf_model, prompt), f"prompt of {len(prompt)} tokens"
        error = (recorder.of(out.request_id) - hf_logits(ref.hf_model, prompt, out.token_ids)).abs().max()
        assert error < ATOL, f"prompt of {len(prompt)} tokens: logits off by {error}"


# -- against Hugging Face ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "mistral-window-8"])
def test_a_batch_of_mixed_length_prompts_matches_hf(reference, name):
    ref = reference(name)
    batch = prompts([40, 7, 23, 1])
    with make_llm(ref) as llm:
        recorder = LogitsRecorder(llm.engine)
        outputs = llm.generate(batch, GREEDY)
    assert recorder.steps[:1] == [1] and len(recorder.steps) == NEW_TOKENS  # all four in every step
    assert_matches_hf(ref, recorder, batch, outputs)


@pytest.mark.parametrize("name", ["llama", "mistral-window-8"])
def test_chunked_prefill_matches_hf(reference, name):
    ref = reference(name)
    batch = prompts([40, 13, 3], seed=1)
    with make_llm(ref, max_num_batched_tokens=8) as llm:
        recorder = LogitsRecorder(llm.engine)
        outputs = llm.generate(batch, GREEDY)
    assert len(recorder.steps) > (40 + 13 + 3) // 8  # the prompts really went in 8-token pieces
    assert_matches_hf(ref, recorder, batch, outputs)


def test_preempted_requests_are_recomputed_and_still_match_hf(reference):
    ref = reference("llama")
    # Three 24-token prompts take 2 blocks each, all of a 6-block cache; each needs a third block
    # for its 33rd token, so decoding must preempt.
    batch = prompts([24, 24, 24], seed=2)
    with make_llm(ref, kv_cache_bytes=6 * BLOCK_BYTES) as llm:
        recorder = LogitsRecorder(llm.engine)
        outputs = llm.generate(batch, GREEDY)
    assert llm.engine.scheduler.pool.num_free == 6
    assert sum(out.metrics.num_preemptions for out in outputs) > 0
    assert_matches_hf(ref, recorder, batch, outputs)


def test_a_prefix_found_in_the_device_cache_gives_the_same_output(reference):
    ref = reference("qwen2")
    first, other = prompts([40, 20], seed=3)
    second = first[:35] + other  # two 16-token blocks in common
    with make_llm(ref) as llm:
        recorder = LogitsRecorder(llm.engine)
        cold = llm.generate(first, GREEDY)[0]
        warm = llm.generate(second, GREEDY)[0]
    assert cold.metrics.tokens_cached_on_device == 0 and cold.metrics.prefill_tokens_computed == 40
    assert warm.metrics.tokens_cached_on_device == 32
    assert warm.metrics.prefill_tokens_computed == len(second) - 32
    assert_matches_hf(ref, recorder, [first, second], [cold, warm])


def test_the_whole_prompt_cached_still_computes_its_last_token(reference):
    ref = reference("llama")
    prompt = prompts([32], seed=4)[0]
    with make_llm(ref) as llm:
        cold, warm = llm.generate([prompt], GREEDY)[0], llm.generate([prompt], GREEDY)[0]
    assert warm.metrics.tokens_cached_on_device == 16  # the block holding the last token is recomputed
    assert warm.metrics.prefill_tokens_computed == 16
    assert warm.token_ids == cold.token_ids == hf_generate(ref.hf_model, prompt)


# -- sampling, stopping, metrics ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    with LLM("random:llama-tiny", device="cpu", kv_cache_bytes=1 << 20) as llm:
        yield llm


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(tiny):
    batch = prompts([12, 30, 5], seed=5, vocab=256)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=7, ignore_eos=True)
    alone = tiny.generate(batch[0], seeded)[0]
    again = tiny.generate(batch[0], seeded)[0]
    # Beside an unseeded request and a seeded one, both finishing before it: the batch changes under it.
    in_batch = tiny.generate([batch[1], batch[0], batch[2]], [
        SamplingParams(max_tokens=3, ignore_eos=True), seeded,
        SamplingParams(temperature=0.5, max_tokens=9, seed=1, ignore_eos=True)])

    assert len(set(alone.token_ids)) > 3  # really sampled, not one token repeated
    assert again.token_ids == alone.token_ids
    assert in_batch[1].token_ids == alone.token_ids
    other_seed = tiny.generate(batch[0], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=8,
                                                        ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


def test_max_tokens_ends_a_request_with_reason_length(tiny):
    out = tiny.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.finished and out.finish_reason == "length" and len(out.token_ids) == 5


def test_a_stop_string_ends_the_request_and_is_cut_from_the_text(tiny):
    prompt = prompts([10], seed=6, vocab=256)[0]
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=3, ignore_eos=True)
    free = tiny.generate(prompt, params)[0]
    stop = next(free.text[i:i + 2] for i in range(4, len(free.text) - 1) if free.text[i:i + 2].isascii())
    expected = free.text[:free.text.find(stop)]

    out = tiny.generate(prompt, SamplingParams(temperature=1.0, max_tokens=40, seed=3, stop=(stop,),
                                               ignore_eos=True))[0]

    assert out.finish_reason == "stop" and out.text == expected
    assert len(out.token_ids) < 40 and out.token_ids == free.token_ids[:len(out.token_ids)]


def test_request_metrics_of_a_cold_request(tiny):
    prompt = prompts([27], seed=7, vocab=256)[0]
    out = tiny.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    m = out.metrics
    assert m.ttft_s > 0 and m.e2e_s >= m.ttft_s
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.prefill_tokens_computed == 27
    assert (m.tokens_cached_on_device, m.tokens_loaded, m.num_preemptions) == (0, 0, 0)


def test_step_counter_starts_at_one_rises_by_one_and_never_resets(reference):
    ref = reference("llama")
    with make_llm(ref, max_num_batched_tokens=16) as llm:
        recorder = LogitsRecorder(llm.engine)
        llm.generate(prompts([20, 9]), GREEDY)
        first_call = len(recorder.steps)
        llm.generate(prompts([5], seed=8), GREEDY)
    assert recorder.steps == list(range(1, len(recorder.steps) + 1))
    assert len(recorder.steps) > first_call > 1


def test_step_by_step_outputs_stream_tokens_and_text(tiny):
    engine = tiny.engine
    request_id = engine.add_request([72, 105], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == request_id]
    assert [len(o.new_token_ids) for o in outputs] == [1] * 6
    assert [t for o in outputs for t in o.new_token_ids] == outputs[-1].token_ids
    assert "".join(o.new_text for o in outputs) == outputs[-1].text
    assert [o.finished for o in outputs] == [False] * 5 + [True]


def test_abort_retires_a_running_request_and_frees_its_blocks():
    engine = LLMEngine(EngineOptions("random:llama-tiny", device="cpu", kv_cache_bytes=1 << 20))
    free = engine.scheduler.pool.num_free
    request_id = engine.add_request(list(range(40)), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.scheduler.pool.num_free < free

    engine.abort(request_id)
    engine.abort(request_id)  # a second abort is a no-op

    assert not engine.has_unfinished() and engine.scheduler.pool.num_free == free
    assert 'kvtier_engine_requests_total{finish_reason="abort"} 1.0' in engine.prometheus_text()
    engine.close()


def test_bad_requests_are_rejected(tiny):
    engine = tiny.engine
    with pytest.raises(ValueError, match="must be in"):
        engine.add_request([1, 512])
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([])
    engine.add_request([1], SamplingParams(max_tokens=1), request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], request_id="dup")
    engine.abort("dup")
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request([1], SamplingParams(max_tokens=1 << 20))
    assert not engine.has_unfinished()



# -- failures: one request's, or one step's -------------------------------------------------------

# `disk: null`: the default config has a disk tier in ~/.cache, which would carry chunks across runs.
KVTIER_PARTIAL = "chunk_size: 32\nsave_partial_chunks: true\ncpu:\n  capacity: 16MiB\ndisk: null\n"


def kvtier_engine(tmp_path, **options) -> LLMEngine:
    """llama-tiny on the CPU with kvtier (CPU tier) saving partial chunks too."""
    config = tmp_path / "kvtier.yaml"
    config.write_text(KVTIER_PARTIAL)
    return LLMEngine(EngineOptions("random:llama-tiny", kvtier_config=str(config), device="cpu",
                                   kv_cache_bytes=1 << 20, **options))


class FailNextForward:
    """Fault injection: the model's next forward pass raises, as on a device that failed once."""

    def __init__(self, engine: LLMEngine):
        self.armed = False
        self._forward = engine.model.hidden_states
        engine.model.hidden_states = self

    def __call__(self, *args):
        if self.armed:
            self.armed = False
            raise RuntimeError("injected: the forward pass failed")
        return self._forward(*args)


def saves_of(engine: LLMEngine, request_id: str) -> list[tuple[int, int]]:
    return [(e.start, e.end) for e in engine.connector.events
            if e.kind == "save" and e.request_id == request_id]


def test_a_request_whose_logits_are_not_finite_fails_alone_and_the_batch_goes_on(tmp_path):
    engine = kvtier_engine(tmp_path)
    free = engine.scheduler.pool.num_free
    params = SamplingParams(temperature=1.0, max_tokens=4, seed=1, ignore_eos=True)
    bad = engine.add_request(prompts([40], seed=1)[0], params)
    good = engine.add_request(prompts([40], seed=2)[0], params)
    logits = engine.model.logits

    def poisoned(hidden: torch.Tensor) -> torch.Tensor:  # `bad` is the batch's first row
        out = logits(hidden)
        out[0] = float("nan")
        return out

    engine.model.logits = poisoned
    first = {o.request_id: o for o in engine.step()}
    engine.model.logits = logits
    outputs = [o for _ in range(10) if engine.has_unfinished() for o in engine.step()]
    engine.wait_for_saves()

    assert (first[bad].finished, first[bad].finish_reason) == (True, "error")
    assert not first[good].finished
    done = [o for o in outputs if o.request_id == good and o.finished]
    assert len(done) == 1 and done[0].finish_reason == "length" and len(done[0].token_ids) == 4
    assert saves_of(engine, bad) == []  # the KV behind non-finite logits is not trusted
    assert saves_of(engine, good)[0] == (0, 32)
    assert not engine.has_unfinished() and engine.scheduler.pool.num_free == free
    assert 'kvtier_engine_requests_total{finish_reason="error"} 1.0' in engine.prometheus_text()
    engine.close()


def test_a_failed_forward_with_save_partial_chunks_fails_its_batch_and_holds_nothing(tmp_path):
    # The failed step skipped the connector's wait_for_save/get_finished: the aborted request's
    # final save (a partial chunk) kept its blocks held, and the server's loop gave up for good.
    engine = kvtier_engine(tmp_path, enable_prefix_caching=False)
    free = engine.scheduler.pool.num_free
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompt, other, later = prompts([60, 50, 20], seed=3)
    engine.add_request(prompt, greedy)
    while engine.has_unfinished():
        engine.step()
    engine.wait_for_saves()
    fault = FailNextForward(engine)
    again = engine.add_request(prompt, greedy)  # loads 32 tokens from kvtier, under a lease
    beside = engine.add_request(other, greedy)
    fault.armed = True

    with pytest.raises(RuntimeError) as failed:
        engine.step()
    failed_step = engine.scheduler.step
    assert sorted(failed.value.request_ids) == sorted([again, beside])
    assert not engine.has_requests()
    for _ in range(3):  # what is left (final saves, none here) is handed over in a step
        if engine.has_unfinished():
            engine.step()
    assert not engine.has_unfinished() and engine.scheduler.pool.num_free == free
    assert [e for e in engine.connector.events if e.kind == "save" and e.step >= failed_step] == []
    assert engine.connector.stats["loads"] == 1  # the lease was taken, and given back by the load:
    assert "kvtier_leased_chunks 0.0" in engine.prometheus_text().splitlines()
    served = engine.add_request(later, greedy)
    outputs = [o for _ in range(10) if engine.has_unfinished() for o in engine.step()]
    assert [o.finish_reason for o in outputs if o.request_id == served and o.finished] == ["length"]
    engine.close()


def test_free_kv_blocks_is_right_before_the_first_step_and_after_an_abort():
    engine = LLMEngine(EngineOptions("random:llama-tiny", device="cpu", kv_cache_bytes=1 << 20))
    total = len(engine.scheduler.pool.blocks)

    def free_blocks() -> float:
        line = next(line for line in engine.prometheus_text().splitlines()
                    if line.startswith("kvtier_engine_free_kv_blocks "))
        return float(line.split()[-1])

    assert free_blocks() == total
    request_id = engine.add_request(list(range(1, 41)), SamplingParams(max_tokens=50))
    engine.step()
    assert free_blocks() < total
    engine.abort(request_id)  # the engine is idle now: no step will run to update the gauge
    assert free_blocks() == total
    engine.close()


def test_logprobs_are_hf_log_softmax_of_the_sampled_token_and_the_top_ones(reference):
    ref = reference("llama")
    batch = prompts([9, 21])
    params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3),
              GREEDY]  # the second asks for none: it gets none, in the same batch
    with make_llm(ref) as llm:
        outputs = llm.generate(batch, params)
    asked, plain = outputs
    assert plain.logprobs == () and len(asked.logprobs) == NEW_TOKENS
    want = torch.log_softmax(hf_logits(ref.hf_model, batch[0], asked.token_ids), dim=-1)
    for step, (token, lp) in enumerate(zip(asked.token_ids, asked.logprobs)):
        assert lp.chosen.token_id == token and abs(lp.chosen.logprob - float(want[step, token])) < ATOL
        top = torch.topk(want[step], 3)
        assert [t.token_id for t in lp.top] == top.indices.tolist()
        assert max(abs(t.logprob - v) for t, v in zip(lp.top, top.values.tolist())) < ATOL
        assert lp.chosen.text == llm.tokenizer.decode([token])
