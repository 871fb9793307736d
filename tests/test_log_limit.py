"""Tests for kvtier/log_limit.py: the first event of a key logged at once, later ones counted and
reported with the next line after the period, keys apart, memory bounded, threads safe.

A fake clock stands in for time.monotonic, so no test sleeps.
"""

from __future__ import annotations

import logging
import threading

import pytest

from kvtier.log_limit import LogLimiter

LOGGER = logging.getLogger("kvtier.tests.log_limit")


@pytest.fixture(autouse=True)
def capture(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER.name)


def test_the_first_event_is_logged_at_once_with_its_level_and_arguments(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=60, clock=clock)

    assert limiter.warning("write", "write %s failed: %s", "a.kvr", "EIO") is True

    assert caplog.messages == ["write a.kvr failed: EIO"]
    assert caplog.records[0].levelno == logging.WARNING and caplog.records[0].name == LOGGER.name
    assert caplog.records[0].filename == "test_log_limit.py"  # where it happened, not log_limit.py
    limiter.log(logging.INFO, "other", "info")
    assert caplog.records[1].levelno == logging.INFO and caplog.records[1].filename == "test_log_limit.py"


def test_events_within_the_period_are_counted_and_reported_with_the_next_line(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=60, clock=clock)
    limiter.warning("write", "write %d failed", 0)
    for i in range(1, 100):
        clock.now += 0.5
        assert limiter.warning("write", "write %d failed", i) is False
    assert caplog.messages == ["write 0 failed"]

    clock.now = 1000.0 + 60  # a period after the first line
    assert limiter.warning("write", "write %d failed", 100) is True

    assert caplog.messages == ["write 0 failed", "write 100 failed (99 more since the last report)"]
    clock.now += 59.9  # the period restarts with each line
    assert limiter.warning("write", "write %d failed", 101) is False
    clock.now += 0.1
    assert limiter.warning("write", "write %d failed", 102) is True
    assert caplog.messages[-1] == "write 102 failed (1 more since the last report)"


def test_a_line_after_a_quiet_period_carries_no_count(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=60, clock=clock)
    limiter.warning("read", "read failed")
    clock.now += 600

    assert limiter.warning("read", "read failed") is True

    assert caplog.messages == ["read failed", "read failed"]


def test_keys_are_limited_apart(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=60, clock=clock)

    for _ in range(10):
        limiter.warning("write", "write failed")
        limiter.warning("corrupt", "corrupt record")
        limiter.error(("disk", "get"), "get failed")

    assert caplog.messages == ["write failed", "corrupt record", "get failed"]


def test_a_message_without_arguments_may_hold_a_percent_sign(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=60, clock=clock)
    limiter.warning("full", "disk 100% full")
    limiter.warning("full", "disk 100% full")
    clock.now += 60

    limiter.warning("full", "disk 100% full")

    assert caplog.messages == ["disk 100% full", "disk 100% full (1 more since the last report)"]


def test_exc_info_carries_the_traceback(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=60, clock=clock)
    try:
        raise OSError("boom")
    except OSError:
        limiter.error("job", "job failed", exc_info=True)

    assert caplog.records[0].levelno == logging.ERROR
    assert caplog.records[0].exc_info[1].args == ("boom",)


def test_a_period_of_zero_logs_every_event(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=0, clock=clock)

    for _ in range(3):
        limiter.warning("write", "write failed")

    assert caplog.messages == ["write failed"] * 3


def test_keys_are_bounded_and_new_keys_share_one_line_while_all_are_recent(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=60, max_keys=4, clock=clock)
    for i in range(4):
        limiter.warning(i, "key %d", i)

    for i in range(4, 1000):  # a caller passing ever new keys: memory and lines stay bounded
        limiter.warning(i, "key %d", i)

    assert caplog.messages == ["key 0", "key 1", "key 2", "key 3", "key 4"]  # key 4 opened the shared one
    assert len(limiter._keys) == 5  # max_keys + the shared overflow key
    limiter.warning(0, "key %d", 0)  # a remembered key keeps its own limit
    assert len(caplog.messages) == 5


def test_a_key_whose_period_passed_makes_room_for_a_new_one(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=60, max_keys=2, clock=clock)
    limiter.warning("a", "a")
    clock.now += 30
    limiter.warning("b", "b")
    clock.now += 30  # "a" is a period old, "b" is not

    assert limiter.warning("c", "c") is True

    assert caplog.messages == ["a", "b", "c"] and set(limiter._keys) == {"b", "c"}
    assert limiter.warning("b", "b") is False  # "b" kept its limit


def test_threads_log_each_key_once_per_period_and_lose_no_count(clock, caplog):
    limiter = LogLimiter(LOGGER, period_s=60, clock=clock)
    start = threading.Barrier(8)
    logged = []

    def worker() -> None:
        start.wait()
        logged.append(sum(limiter.warning("write", "write failed") for _ in range(1000)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    clock.now += 60
    limiter.warning("write", "write failed")

    assert sum(logged) == 1
    assert caplog.messages == ["write failed", "write failed (7999 more since the last report)"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        LogLimiter(LOGGER, period_s=-1)
    with pytest.raises(ValueError):
        LogLimiter(LOGGER, max_keys=0)
