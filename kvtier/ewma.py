"""A rate as the ratio of two exponentially weighted moving averages: bytes per second of a tier's
reads, raw bytes per coded byte of a codec's output (kvtier.tiers.adaptive).

A ratio of averages, not an average of ratios: each sample weighs by its size, so one tiny or
near-instant read (a coarse clock's zero duration) moves the estimate by a bounded step instead of
by orders of magnitude. Not thread-safe on its own: its owner's lock guards it.
"""

from __future__ import annotations

import math

EWMA_WEIGHT = 0.25  # of the newest sample: the last few samples dominate, so a change shows quickly


class RateEwma:
    """amount / over, each an EWMA of the samples; `prior` until the first sample, which replaces
    it (a prior guessed elsewhere is not averaged with what is measured here)."""

    def __init__(self, prior: float | None = None, weight: float = EWMA_WEIGHT):
        self.prior = prior
        self.weight = weight
        self._amount = self._over = 0.0
        self._seen = False

    def add(self, amount: float, over: float) -> None:
        # (`not ... >` refuses NaN too: one NaN sample would make the rate NaN for good)
        if not (0 < over < math.inf and 0 <= amount < math.inf):
            raise ValueError(f"a rate sample needs a finite amount >= 0 over a finite positive denominator, "
                             f"got {amount} over {over}")
        keep = 1.0 - self.weight if self._seen else 0.0
        self._amount = keep * self._amount + (1.0 - keep) * amount
        self._over = keep * self._over + (1.0 - keep) * over
        self._seen = True

    @property
    def rate(self) -> float | None:
        return self._amount / self._over if self._seen else self.prior
