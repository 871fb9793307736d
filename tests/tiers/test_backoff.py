"""Tests for kvtier/tiers/backoff.py, on a fake clock: no sleeping, no wall time."""

from __future__ import annotations

import pytest

from kvtier.tiers.backoff import Backoff


def test_a_healthy_medium_is_always_ready(clock):
    backoff = Backoff(1.0, 8.0, clock=clock)

    assert all(backoff.ready() for _ in range(3))
    assert backoff.succeeded() is False  # nothing to come back from


def test_a_failure_blocks_until_the_delay_then_lets_exactly_one_probe_through(clock):
    backoff = Backoff(1.0, 8.0, clock=clock)

    assert backoff.failed() is True  # up -> down: the moment to log
    clock.now += 0.75
    assert not backoff.ready()
    clock.now += 0.25
    assert [backoff.ready() for _ in range(3)] == [True, False, False]


def test_failed_probes_double_the_delay_up_to_the_cap(clock):
    backoff = Backoff(1.0, 5.0, clock=clock)
    backoff.failed()
    delays = []
    for _ in range(5):
        start = clock.now
        while not backoff.ready():
            clock.now += 0.25
        delays.append(clock.now - start)
        assert backoff.failed() is False  # still down: logged once only
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_success_ends_the_outage_and_resets_the_delay(clock):
    backoff = Backoff(1.0, 8.0, clock=clock)
    backoff.failed()
    clock.now += 1.0
    assert backoff.ready()
    backoff.failed()  # delay now 2 s

    clock.now += 2.0
    assert backoff.ready()
    assert backoff.succeeded() is True  # down -> up: the moment to log
    assert backoff.succeeded() is False
    assert backoff.ready()
    backoff.failed()
    clock.now += 1.0
    assert backoff.ready()  # back to the initial delay


def test_a_probe_that_never_reports_does_not_wedge_the_medium(clock):
    backoff = Backoff(1.0, 8.0, clock=clock)
    backoff.failed()
    clock.now += 1.0
    assert backoff.ready()  # this probe is lost: neither failed() nor succeeded()

    clock.now += 1.0
    assert backoff.ready()  # another caller may probe one delay later


def test_zero_delay_retries_every_call(clock):
    backoff = Backoff(0.0, 0.0, clock=clock)
    backoff.failed()

    assert backoff.ready() and backoff.ready()


def test_a_cap_below_the_first_delay_keeps_the_delay_constant(clock):
    backoff = Backoff(2.0, 1.0, clock=clock)  # e.g. retry_after_s: 60 with the default retry_max_s
    backoff.failed()
    for _ in range(3):
        clock.now += 1.5
        assert not backoff.ready()
        clock.now += 0.5
        assert backoff.ready()
        backoff.failed()


@pytest.mark.parametrize(("initial", "cap"), [(-1.0, 1.0), (1.0, -1.0)])
def test_negative_delays_are_refused(initial, cap):
    with pytest.raises(ValueError, match="back-off"):
        Backoff(initial, cap)
