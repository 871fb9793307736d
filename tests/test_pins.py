"""Tests for kvtier/pins.py: user pins (a set) and request leases (counted), and what `in` says."""

from __future__ import annotations

import pytest

from kvtier.keys import ChunkKey
from kvtier.pins import PinTable

NS = b"\x01" * 8
A, B, C = (ChunkKey(NS, bytes([i]) * 16) for i in range(3))


def test_pinning_twice_is_one_pin_and_the_counts_say_what_changed():
    pins = PinTable()
    assert pins.pin([A, B]) == 2
    assert pins.pin([A, C]) == 1
    assert pins.num_pinned == 3 and A in pins

    assert pins.unpin([A, A]) == 1
    assert pins.unpin([A]) == 0
    assert A not in pins and B in pins and pins.num_pinned == 2


def test_a_lease_is_counted_and_holds_until_the_last_release():
    pins = PinTable()
    pins.lease([A, B])
    pins.lease([A])  # a second request loading the same chunk
    assert pins.num_leased == 2 and A in pins and B in pins

    pins.release([A, B])
    assert A in pins and B not in pins  # the other request still holds A
    pins.release([A])
    assert A not in pins and pins.num_leased == 0


def test_releasing_more_than_was_leased_raises():
    pins = PinTable()
    pins.lease([A])
    pins.release([A])
    with pytest.raises(RuntimeError, match="released more often than taken"):
        pins.release([A])
    with pytest.raises(RuntimeError, match="released more often than taken"):
        pins.release([B])
    assert pins.num_leased == 0


def test_a_pin_and_a_lease_on_one_chunk_are_independent():
    pins = PinTable()
    pins.pin([A])
    pins.lease([A])
    pins.unpin([A])
    assert A in pins  # still leased
    pins.pin([A])
    pins.release([A])
    assert A in pins  # still pinned


def test_clear_pins_drops_user_pins_and_keeps_leases():
    pins = PinTable()
    pins.pin([A, B])
    pins.lease([C])
    pins.clear_pins()
    assert (A in pins, B in pins, C in pins) == (False, False, True)
    assert (pins.num_pinned, pins.num_leased) == (0, 1)


def test_membership_of_something_that_is_not_a_key_is_false():
    assert "not a key" not in PinTable()


def test_is_pinned_and_is_leased_tell_a_pin_from_a_lease():
    pins = PinTable()
    a, b = A, B
    pins.pin([a])
    pins.lease([b])
    assert (pins.is_pinned(a), pins.is_leased(a)) == (True, False)
    assert (pins.is_pinned(b), pins.is_leased(b)) == (False, True)
    assert a in pins and b in pins  # what the tiers below ask: either keeps a chunk


def test_a_release_that_raises_releases_nothing():
    # release([A, B]) with B not leased raised only after releasing A: the caller's error left A
    # unprotected while its request still counted on it (and a retry released A twice).
    pins = PinTable()
    pins.lease([A])
    pins.lease([A, C])
    with pytest.raises(RuntimeError, match="released more often"):
        pins.release([A, C, B])
    with pytest.raises(RuntimeError, match="released more often"):
        pins.release([C, C])
    assert pins.num_leased == 2 and pins.is_leased(A) and pins.is_leased(C)
    pins.release([A, C])
    pins.release([A])
    assert pins.num_leased == 0
