"""kvtier/codecs/quantize.py: scales rounded up, half-a-bin error, zero tokens, bad inputs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.codecs import quantize as q


def test_scales_are_the_smallest_fp16_at_or_above_max_abs():
    x = np.random.default_rng(0).laplace(size=(2, 3, 50, 16)).astype(np.float32) * 3.7
    s = q.scales(x)
    peak = np.abs(x).max(axis=-1)
    assert s.dtype == np.float16
    assert (s.astype(np.float32) >= peak).all()
    below = np.nextafter(s, np.float16(0)).astype(np.float32)
    assert (below < peak).all()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), half_bins=st.sampled_from([2, 4, 8, 16, 32, 128]),
       spread=st.floats(1e-3, 1e3))
def test_error_within_half_a_bin(seed, half_bins, spread):
    rng = np.random.default_rng(seed)
    x = (rng.laplace(size=(2, 2, 8, 24)) * spread).astype(np.float32)
    m = q.levels(np.full((2, 2), 2 * half_bins))
    s = q.scales(x)
    sym = q.quantize(x, s, m)
    assert sym.max() <= 2 * m.max()
    x_hat = q.dequantize(sym, s, m)
    half_bin = s.astype(np.float64)[..., None] / (2 * m[:, :, None, None])
    err = np.abs(x.astype(np.float64) - x_hat)
    assert (err <= half_bin * (1 + 1e-5)).all()


def test_all_zero_token_decodes_to_zero():
    x = np.zeros((2, 1, 3, 8), dtype=np.float32)
    x[0, 0, 1] = 1.5
    m = q.levels(np.full((2, 1), 16))
    s = q.scales(x)
    x_hat = q.dequantize(q.quantize(x, s, m), s, m)
    assert (x_hat[:, :, [0, 2]] == 0).all() and x_hat[0, 0, 1].max() == pytest.approx(1.5, rel=1e-3)


@pytest.mark.parametrize("bins", [2, 7, 258, 0])
def test_bad_bins_are_refused(bins):
    with pytest.raises(ValueError):
        q.levels(np.array([[bins]]))


@pytest.mark.parametrize("bad", [np.inf, np.nan, 1e6])
def test_non_finite_or_out_of_fp16_range_is_refused(bad):
    x = np.ones((2, 1, 2, 4), dtype=np.float32)
    x[1, 0, 1, 2] = bad
    with pytest.raises(ValueError):
        q.scales(x)
