"""The suite's one way to wait for state that has no event to wait on: another process's counters,
a log line, a server coming up, a tier's back-off letting a probe through.

`wait_until` checks the condition itself (never a fixed sleep standing in for it) and gives up at a
deadline, so a wait is as short as the system allows and never longer than the bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE_S = 20.0
POLL_S = 0.02  # between checks of state in another process: short, and cheap for the process polled


def wait_until(condition: Callable[[], T], what: str, timeout_s: float = DEADLINE_S,
               required: bool = True) -> T:
    """Check `condition` until it returns something truthy, and return that. At `timeout_s`, fail
    with `what` (an AssertionError), or, when not `required`, return the last falsy value."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() >= deadline:
            if required:
                raise AssertionError(f"{what}: not within {timeout_s} s")
            return value
        time.sleep(POLL_S)
    return value
