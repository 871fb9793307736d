"""Tests for kvtier/p2p/leases.py: the lease table, on a clock the test moves by hand.

The table only keeps books, so the chunks here are stand-ins (HeldChunk with no real entry); what
matters is that each lease's chunks leave the table exactly once: by end, expiry or close.
"""

from __future__ import annotations

import threading

import pytest
from conftest import FakeClock

from kvtier.keys import ChunkKey
from kvtier.p2p.holding import HeldChunk
from kvtier.p2p.leases import LeaseTable


def chunks(n: int, first: int = 0) -> list[HeldChunk]:
    return [HeldChunk(ChunkKey(b"\0" * 8, i.to_bytes(16, "little")), i, b"", 0, None)
            for i in range(first, first + n)]


@pytest.fixture
def expired() -> list[list[HeldChunk]]:
    return []


@pytest.fixture
def table(clock: FakeClock, expired) -> LeaseTable:
    return LeaseTable(10.0, 8, expired.append, clock=clock)


def test_a_lease_holds_its_chunks_until_it_ends_once(table):
    held = chunks(3)
    lease = table.grant(held)
    assert lease and table.active() == (1, 3)
    assert table.end(lease) == held
    assert table.active() == (0, 0)
    assert table.end(lease) == []  # never twice
    assert table.end(12345) == []


def test_leases_are_bounded_by_max_chunks(table):
    first = table.grant(chunks(5))
    assert table.grant(chunks(4, 5)) is None  # 9 > 8: the caller lets these go itself
    second = table.grant(chunks(3, 5))
    assert table.active() == (2, 8)
    assert first != second
    table.end(first)
    assert table.grant(chunks(5, 8)) is not None


def test_leases_expire_on_their_own_in_order(table, clock, expired):
    a = table.grant(chunks(2))
    clock.now += 6
    b_held = chunks(1, 2)
    b = table.grant(b_held)
    clock.now += 4  # a's deadline
    assert table.expire() == 1
    assert expired == [chunks(2)]
    assert table.end(a) == []  # expired: ending it again gives nothing back
    assert table.active() == (1, 1)
    clock.now += 5.9
    assert table.expire() == 0
    clock.now += 0.1
    assert table.expire() == 1 and expired[-1] == b_held
    assert table.end(b) == [] and table.active() == (0, 0)


def test_close_ends_every_lease_and_grants_no_more(table, expired):
    table.grant(chunks(2))
    table.grant(chunks(3, 2))
    assert sorted(h.slot for h in table.close()) == [0, 1, 2, 3, 4]
    assert table.active() == (0, 0)
    assert table.grant(chunks(1)) is None
    assert table.expire() == 0 and expired == []


def test_ids_are_unpredictable_and_never_zero(table):
    ids = [table.grant(chunks(1, i)) for i in range(8)]
    assert len(set(ids)) == 8 and 0 not in ids
    assert ids != sorted(ids) or ids[1] - ids[0] != 1  # not a counter


def test_an_empty_lease_and_bad_bounds_are_refused(clock):
    with pytest.raises(ValueError):
        LeaseTable(0, 8, lambda held: None)
    with pytest.raises(ValueError):
        LeaseTable(1.0, 0, lambda held: None)
    with pytest.raises(ValueError):
        LeaseTable(1.0, 8, lambda held: None).grant([])


def test_concurrent_end_and_expire_give_each_lease_back_once(clock):
    # Readers releasing while the sweeper expires: every chunk comes back exactly once.
    back: list[HeldChunk] = []
    lock = threading.Lock()

    def give_back(held):
        with lock:
            back.extend(held)

    table = LeaseTable(1.0, 10_000, give_back, clock=clock)
    ids = [table.grant(chunks(1, i)) for i in range(2000)]
    clock.now += 1

    def release():
        for lease in ids:
            give_back(table.end(lease))

    threads = [threading.Thread(target=release) for _ in range(3)] + [threading.Thread(target=table.expire)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(h.slot for h in back) == list(range(2000))
    assert table.active() == (0, 0)
