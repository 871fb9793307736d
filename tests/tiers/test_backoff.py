"""Tests for kvtier/tiers/backoff.py (Backoff, FailureGuard), on a fake clock: no sleeping, no wall time."""

from __future__ import annotations

import logging

import pytest

from kvtier.log_limit import LogLimiter
from kvtier.tiers.backoff import Backoff, Failure, FailureGuard


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


def test_hold_backs_off_for_the_longest_delay_and_logs_once(clock):
    backoff = Backoff(1.0, 8.0, clock=clock)

    assert backoff.hold() is True  # the moment to log
    clock.now += 7.5
    assert not backoff.ready()
    clock.now += 0.5
    assert [backoff.ready() for _ in range(2)] == [True, False]
    assert backoff.hold() is False  # the probe was refused again: no second line
    clock.now += 8.0
    assert backoff.ready()
    assert backoff.succeeded() is True
    assert backoff.ready() and backoff.failed() is True  # an outage now starts at the first delay
    clock.now += 1.0
    assert backoff.ready()


# -- FailureGuard ----------------------------------------------------------------------------------


class Medium:
    """A round trip whose outcome the test sets: `fail` is raised when set, else `value` returned."""

    def __init__(self):
        self.calls = 0
        self.fail: Exception | None = None
        self.value = "reply"

    def __call__(self):
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return self.value


class Refusal(Exception):
    pass


class WrongToken(Exception):
    pass


def classify(exc: Exception) -> Failure | None:
    kinds = {ConnectionError: Failure.OUTAGE, Refusal: Failure.REFUSED, WrongToken: Failure.MISCONFIGURED,
             ZeroDivisionError: Failure.BUG}
    return kinds.get(type(exc))


@pytest.fixture
def guarded(clock):
    errors = []
    log = LogLimiter(logging.getLogger("test_guard"), clock=clock)
    guard = FailureGuard("test tier", Backoff(1.0, 8.0, clock=clock), errors.append, log, classify)
    return guard, Medium(), errors


def lines(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test_guard" and r.levelno == level]


def test_an_outage_is_a_miss_counted_per_chunk_then_one_probe_per_delay(guarded, clock, caplog):
    guard, medium, errors = guarded
    medium.fail = ConnectionError("refused")
    caplog.set_level(logging.INFO, "test_guard")

    assert guard.call(4, medium) is None
    assert [guard.call(2, medium) for _ in range(5)] == [None] * 5  # backing off: not called
    assert medium.calls == 1 and errors == [4]
    clock.now += 1.0
    assert guard.call(3, medium) is None and guard.call(3, medium) is None
    assert medium.calls == 2 and errors == [4, 3]  # one probe, failed: the delay doubles
    medium.fail = None
    clock.now += 1.0
    assert guard.call(1, medium) is None and medium.calls == 2
    clock.now += 1.0
    assert guard.call(1, medium) == "reply" and guard.call(1, medium) == "reply"
    assert medium.calls == 4 and errors == [4, 3]

    assert lines(caplog, logging.WARNING) == [
        "test tier unavailable (ConnectionError: refused); serving misses, retrying after 1 s"]
    assert lines(caplog, logging.INFO) == ["test tier is back"]


def test_a_refused_command_is_counted_but_never_backs_off(guarded, clock, caplog):
    guard, medium, errors = guarded
    medium.fail = Refusal("NOPERM")

    assert [guard.call(2, medium) for _ in range(3)] == [None] * 3
    assert medium.calls == 3 and errors == [2, 2, 2]  # every call reached the medium
    assert len(lines(caplog, logging.WARNING)) == 1  # at most a line a minute
    medium.fail = None
    assert guard.call(2, medium) == "reply"


def test_a_refusal_answers_a_probe_so_the_medium_is_back(guarded, clock):
    guard, medium, errors = guarded
    medium.fail = ConnectionError("down")
    guard.call(1, medium)
    clock.now += 1.0
    medium.fail = Refusal("OOM")
    assert guard.call(1, medium) is None
    medium.fail = None
    assert guard.call(1, medium) == "reply"  # no delay left to wait out


def test_a_misconfiguration_logs_one_error_and_asks_again_once_per_max_delay(guarded, clock, caplog):
    guard, medium, errors = guarded
    medium.fail = WrongToken("server answered UNAUTHORIZED: wrong token")

    assert guard.call(1, medium) is None  # refused: held for max_s (8 s)
    for _ in range(48):  # asked every 0.5 s for 24 s: one probe per 8 s (at 8, 16 and 24 s)
        clock.now += 0.5
        assert guard.call(1, medium) is None
    assert medium.calls == 4 and errors == [1] * 4
    errors_logged = lines(caplog, logging.ERROR)
    assert len(errors_logged) == 1 and "wrong token" in errors_logged[0]
    assert "refuses this client as configured" in errors_logged[0] and "every 8 s" in errors_logged[0]
    assert lines(caplog, logging.WARNING) == []  # not an outage

    medium.fail = None  # the server's token was fixed
    clock.now += 8.0
    assert guard.call(1, medium) == "reply" and guard.call(1, medium) == "reply"


def test_an_unexpected_exception_logs_its_traceback_and_counts_as_an_outage(guarded, clock, caplog):
    guard, medium, errors = guarded
    medium.fail = ZeroDivisionError("bug")

    assert guard.call(2, medium) is None and guard.call(2, medium) is None
    assert medium.calls == 1 and errors == [2]
    (bug,) = [r for r in caplog.records if r.name == "test_guard" and r.levelno == logging.ERROR]
    assert bug.exc_info is not None and bug.exc_info[0] is ZeroDivisionError


def test_what_the_tier_does_not_classify_propagates_uncounted(guarded):
    guard, medium, errors = guarded
    medium.fail = KeyError("not the medium's")

    with pytest.raises(KeyError):
        guard.call(3, medium)
    assert errors == [] and guard.call(3, lambda: "fine") == "fine"


def test_a_call_for_no_chunks_counts_one_error(guarded):
    guard, medium, errors = guarded
    medium.fail = ConnectionError("down")

    assert guard.call(0, medium) is None and errors == [1]
