"""kvtier_engine.sampling: parameter validation, greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import pytest
import torch

from kvtier_engine.sampling import (
    MAX_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MIN_TEMPERATURE,
    InvalidSamplingParams,
    SamplingParams,
    filtered_probs,
    generator_for,
    logprobs_of,
    sample,
)

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(max_tokens=0)])
def test_invalid_params_raise(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.mark.parametrize("bad, param", [
    (dict(temperature=1e-39), "temperature"),  # overflowed the sampler: every request of its step failed
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_k=True), "top_k"), (dict(max_tokens=2.5), "max_tokens"),
    (dict(seed=1 << 64), "seed"), (dict(stop=("x",) * (MAX_STOP_STRINGS + 1)), "stop"),
    (dict(stop="x" * (MAX_STOP_CHARS + 1)), "stop"), (dict(stop=("",)), "stop"),
    (dict(ignore_eos=1), "ignore_eos"),
])
def test_params_that_are_not_finite_or_out_of_range_are_refused_naming_the_parameter(bad, param):
    with pytest.raises(InvalidSamplingParams) as err:
        SamplingParams(**bad)
    assert err.value.param == param


def test_sampler_does_not_overflow_at_the_smallest_temperature():
    # Logits/temperature overflowed float32 to inf, and softmax of inf - inf is NaN: the sampler
    # raised for the whole batch. Large but finite logits at the smallest temperature are the case
    # validation still lets through.
    huge = LOGITS * 1e36
    probs = filtered_probs(huge, SamplingParams(temperature=MIN_TEMPERATURE))
    assert torch.isfinite(probs).all() and probs.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    params = [SamplingParams(temperature=MIN_TEMPERATURE, top_k=3),
              SamplingParams(temperature=MIN_TEMPERATURE, top_p=0.5)]
    assert sample(torch.stack([huge, -huge]), params, [None, None]) == [0, 4]


def test_a_row_of_logits_that_is_not_finite_fails_alone():
    rows = torch.stack([LOGITS, torch.full_like(LOGITS, float("nan")), LOGITS.clone()])
    rows[2, 1] = float("inf")
    params = [SamplingParams(temperature=0.5, seed=1)] * 2 + [SamplingParams(temperature=0)]
    got = sample(rows, params, [generator_for(p) for p in params])
    assert got[1:] == [None, None] and got[0] in range(5)


def test_a_single_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="\n").stop == ("\n",)


def test_greedy_is_argmax_whatever_the_seed():
    rows = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, seed=s) for s in range(4)]
    got = sample(rows, params, [generator_for(p) for p in params])
    assert got == rows.argmax(dim=-1).tolist()


def test_top_k_keeps_exactly_the_k_most_likely():
    probs = filtered_probs(LOGITS, SamplingParams(top_k=2))
    assert (probs > 0).tolist() == [True, True, False, False, False]
    assert probs.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    base = torch.softmax(LOGITS, dim=-1)  # ~[0.56, 0.21, 0.13, 0.08, 0.03]
    probs = filtered_probs(LOGITS, SamplingParams(top_p=0.7))
    assert (probs > 0).tolist() == [True, True, False, False, False]
    assert probs[0] / probs[1] == pytest.approx((base[0] / base[1]).item())
    tiny_p = filtered_probs(LOGITS, SamplingParams(top_p=0.01))
    assert (tiny_p > 0).tolist() == [True, False, False, False, False]  # the top token always stays


def test_low_temperature_sharpens_high_temperature_flattens():
    cold = filtered_probs(LOGITS, SamplingParams(temperature=0.25))
    hot = filtered_probs(LOGITS, SamplingParams(temperature=4.0))
    assert cold[0] > torch.softmax(LOGITS, -1)[0] > hot[0]


def test_a_seeded_request_repeats_and_is_independent_of_its_batch():
    rows = torch.zeros(3, 1000)  # uniform: every draw is pure chance
    seeded = SamplingParams(temperature=1.0, seed=1234)
    gen = generator_for(seeded)
    alone = [int(sample(rows[:1], [seeded], [gen])[0]) for _ in range(5)]
    gen, other = generator_for(seeded), generator_for(SamplingParams(seed=99))
    batched = [int(sample(rows[:2], [seeded, SamplingParams(seed=99)], [gen, other])[0]) for _ in range(5)]
    assert alone == batched
    assert len(set(alone)) > 1  # it is really sampling


@pytest.mark.parametrize("top_p", [1e-300, 1e-46])
def test_a_top_p_below_float32s_range_keeps_the_top_token_and_samples(top_p):
    """Regression: top_p rounded to 0 in float32, every token was dropped, the row summed to 0 and
    the request failed with a 500 (temperature 100, top_p 1e-300), though top_p is in (0, 1]."""
    params = SamplingParams(temperature=100.0, top_p=top_p)
    probs = filtered_probs(LOGITS, params)
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert sample(LOGITS[None], [params], [None]) == [0]


def test_logprobs_of_gives_the_chosen_and_top_tokens_of_the_model_distribution():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, 0.5, 4.0, -1.0]])
    want = torch.log_softmax(logits, dim=-1)
    first, second = logprobs_of(logits, [2, 3], [2, 0])
    assert first.chosen.token_id == 2 and first.chosen.logprob == pytest.approx(float(want[0, 2]))
    assert [lp.token_id for lp in first.top] == [1, 2]
    assert [lp.logprob for lp in first.top] == pytest.approx([float(want[0, 1]), float(want[0, 2])])
    assert second.chosen.logprob == pytest.approx(float(want[1, 3])) and second.top == ()


def test_logprobs_param_is_bounded():
    assert SamplingParams(logprobs=MAX_LOGPROBS).logprobs == MAX_LOGPROBS
    for bad in (-1, MAX_LOGPROBS + 1, 1.0, True):
        with pytest.raises(InvalidSamplingParams) as err:
            SamplingParams(logprobs=bad)
        assert err.value.param == "logprobs"
