"""kvtier_engine.sampling: parameter validation, greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import pytest
import torch

from kvtier_engine.sampling import SamplingParams, filtered_probs, generator_for, sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(max_tokens=0)])
def test_invalid_params_raise(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_a_single_stop_string_becomes_a_tuple():
    assert SamplingParams(stop="\n").stop == ("\n",)


def test_greedy_is_argmax_whatever_the_seed():
    rows = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, seed=s) for s in range(4)]
    got = sample(rows, params, [generator_for(p) for p in params])
    assert torch.equal(got, rows.argmax(dim=-1))


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
