"""Tests for kvtier/ewma.py: a rate from two EWMAs, its prior, and samples weighed by size."""

import pytest

from kvtier.ewma import RateEwma


def test_rate_ewma_weighs_samples_by_size():
    rate = RateEwma(prior=2.0, weight=0.5)
    assert rate.rate == 2.0
    rate.add(100, 10)  # the first sample replaces the prior
    assert rate.rate == 10.0
    rate.add(1, 1e-6)  # tiny and instant: averages of amounts and durations, not of rates
    assert rate.rate == pytest.approx(50.5 / 5.0000005)
    with pytest.raises(ValueError):
        rate.add(1, 0)
