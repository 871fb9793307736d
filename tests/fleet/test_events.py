"""EventQueue and batches: order kept, runs coalesced, bounded with drops counted, batches cut at the
key limit."""

from __future__ import annotations

import threading

import pytest
from fleet_doubles import key

from kvtier.fleet.events import EventQueue, batches
from kvtier.fleet.messages import MAX_EVENT_KEYS


def flat(batch_lists) -> list[tuple[str, str | None, str | None]]:
    """(op, tier, key hex) per key, (op, tier, None) for an event without keys, in order."""
    out = []
    for events in batch_lists:
        for e in events:
            out += [(e.op, e.tier, k) for k in e.keys] or [(e.op, e.tier, None)]
    return out


def test_consecutive_same_op_and_tier_share_one_event_in_order():
    q = EventQueue(100)
    for i in range(3):
        q.append("stored", "cpu", key(i))
    q.append("evicted", "cpu", key(1))
    q.append("stored", "disk", key(1))
    q.append("stored", "disk", key(2))
    assert len(q) == 6
    [events] = list(batches(q.drain()))
    assert [(e.op, e.tier, e.keys) for e in events] == [
        ("stored", "cpu", [key(0).hex(), key(1).hex(), key(2).hex()]),
        ("evicted", "cpu", [key(1).hex()]),
        ("stored", "disk", [key(1).hex(), key(2).hex()]),
    ]
    assert len(q) == 0 and q.drain() == []


def test_overflow_drops_and_counts_and_keeps_dropping_until_clear():
    q = EventQueue(3)
    for i in range(5):
        q.append("stored", "cpu", key(i))
    assert q.overflowed and q.dropped == 2 and len(q) == 3
    # After a drain there is room again, but what follows a hole must not be sent: still dropped.
    assert flat(batches(q.drain())) == [("stored", "cpu", key(i).hex()) for i in range(3)]
    q.append("stored", "cpu", key(9))
    assert q.dropped == 3 and len(q) == 0 and q.overflowed
    q.clear()
    assert not q.overflowed and q.dropped == 3
    q.append("evicted", "cpu", key(9))
    assert flat(batches(q.drain())) == [("evicted", "cpu", key(9).hex())]


def test_clear_forgets_waiting_events():
    q = EventQueue(10)
    q.append("stored", "cpu", key(1))
    q.clear()
    assert len(q) == 0 and q.drain() == []


def test_batches_are_cut_at_the_key_limit_and_a_reset_counts_as_one():
    runs = [("reset", None, []), ("stored", "cpu", [key(i) for i in range(7)]),
            ("stored", "disk", [key(i) for i in range(2)])]
    got = list(batches(runs, max_keys=4))
    assert [sum(max(len(e.keys), 1) for e in events) for events in got] == [4, 4, 2]
    assert [[(e.op, e.tier, len(e.keys)) for e in events] for events in got] == [
        [("reset", None, 0), ("stored", "cpu", 3)],
        [("stored", "cpu", 4)],
        [("stored", "disk", 2)],
    ]
    assert flat(got) == flat([[e] for events in got for e in events])  # order kept across the cuts
    assert [k for _, _, k in flat(got)][1:8] == [key(i).hex() for i in range(7)]


def test_batches_default_to_the_message_limit():
    keys = [key(i) for i in range(MAX_EVENT_KEYS + 1)]
    got = list(batches([("stored", "cpu", keys)]))
    assert [len(events[0].keys) for events in got] == [MAX_EVENT_KEYS, 1]


def test_no_events_no_batches():
    assert list(batches([])) == []


def test_appends_from_many_threads_are_all_counted_within_the_bound():
    q = EventQueue(5_000)
    start = threading.Barrier(4)

    def writer(t: int) -> None:
        start.wait()
        for i in range(2_000):
            q.append("stored", f"t{t}", key(t * 10_000 + i))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = flat(batches(q.drain()))
    assert len(kept) == 5_000 and q.dropped == 3_000 and q.overflowed
    for t in range(4):  # each thread's events keep their order
        mine = [k for _, tier, k in kept if tier == f"t{t}"]
        assert mine == [key(t * 10_000 + i).hex() for i in range(len(mine))]


def test_max_keys_must_be_positive():
    with pytest.raises(ValueError, match="max_keys"):
        EventQueue(0)
