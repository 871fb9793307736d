"""Tests for kvtier/server/budget.py: bounds on bytes received and replies queued, as stories of waiters.

In-process: waiters are small objects that ask again when woken, as a connection does.
"""

from __future__ import annotations

import pytest

from kvtier.server.budget import ByteBudget, ReceiveRate


class Waiter:
    def __init__(self, budget: ByteBudget, n: int):
        self.budget, self.n, self.admitted = budget, n, False

    def ask(self) -> bool:
        self.admitted = self.budget.reserve(self.n, self)
        return self.admitted

    def resume(self) -> None:
        self.ask()


def test_waiters_are_admitted_in_order_as_bytes_are_released():
    budget = ByteBudget(10)
    a, b, c, small = (Waiter(budget, n) for n in (6, 6, 3, 2))
    assert a.ask() and not b.ask() and not c.ask()
    assert not small.ask()  # it would fit, but b and c came first: a large frame is never starved

    budget.release(6)  # a's frame is answered

    assert b.admitted and c.admitted and not small.admitted  # 6 + 3 fit, then 2 more do not
    assert (budget.used, budget.waiting, budget.waits) == (9, 1, 3)
    budget.release(9)
    assert small.admitted and budget.used == 2


def test_a_frame_over_the_limit_is_admitted_alone_rather_than_never():
    budget = ByteBudget(10)
    big = Waiter(budget, 25)
    assert big.ask() and budget.used == 25
    other = Waiter(budget, 1)
    assert not other.ask()
    budget.release(25)
    assert other.admitted


def test_a_cancelled_head_lets_the_next_waiter_in():
    budget = ByteBudget(10)
    first, gone, next_ = Waiter(budget, 8), Waiter(budget, 5), Waiter(budget, 2)
    first.ask(), gone.ask(), next_.ask()

    budget.cancel(gone)  # its connection closed while waiting

    assert next_.admitted and budget.used == 10 and budget.waiting == 0


def test_releasing_more_than_reserved_is_a_bug_not_a_clamp():
    budget = ByteBudget(10)
    with pytest.raises(RuntimeError):
        budget.release(1)


class Replier:
    """A connection answering requests: asks for room, then charges the reply it made."""

    def __init__(self, budget: ByteBudget, reply: int):
        self.budget, self.reply, self.answered = budget, reply, 0

    def answer(self) -> bool:
        if not self.budget.wait_for_room(self):
            return False
        self.budget.charge(self.reply)
        self.answered += 1
        return True

    def resume(self) -> None:
        self.answer()


def test_replies_wait_for_room_and_overshoot_by_at_most_one_reply():
    budget = ByteBudget(10)
    a, b = Replier(budget, 6), Replier(budget, 6)
    assert a.answer() and a.answer()  # 6 < 10: room for one more reply, which goes over
    assert not a.answer() and not b.answer() and budget.used == 12

    budget.release(6)  # a's first reply is sent: 6 < 10, a was first in line

    assert (a.answered, b.answered, budget.used, budget.waiting) == (3, 0, 12, 1)
    budget.release(12)
    assert b.answered == 1 and budget.used == 6 and budget.waits == 2


def test_the_receive_rate_is_judged_per_window_and_a_kept_rate_starts_the_next():
    rate = ReceiveRate(1000, 2.0)  # bytes/s, over windows of 2 s
    rate.restart(100.0)
    rate.received(1500)
    assert not rate.too_slow(101.9)  # the window is not over yet, whatever came so far
    rate.received(600)
    assert not rate.too_slow(102.0)  # 2100 bytes in 2 s: kept, and a new window starts here
    rate.received(1999)
    assert rate.too_slow(104.0)  # 1999 bytes in the next 2 s: too slow
    rate.restart(104.0)  # e.g. a budget held the connection: it is judged afresh
    assert not rate.too_slow(105.0)
