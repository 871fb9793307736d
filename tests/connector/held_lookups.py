"""A slow lookup without sleeps: `HeldLookups` holds a tier's `has` (a lookup's round trip to a
shared store) on an Event the test sets, as tests/held_reads.py holds reads.

    held = HeldLookups(engine.storage.lower[-1], monkeypatch)   # that tier's `has` now waits...
    held.arm()                                                  # ...from its next call on
    ...                                                         # a lookup asks it: held.entered is set
    held.open()                                                 # the held call (and later ones) go on

Tests open it at teardown too (`held.open()` in a finaliser), so that no thread is left waiting.
"""

from __future__ import annotations

import threading

WAIT_S = 30.0  # a held call gives up (failing) after this long: a test that forgets to open never hangs


class HeldLookups:
    def __init__(self, tier, monkeypatch, armed: bool = True):
        self.entered, self.opened = threading.Event(), threading.Event()
        self.armed = armed
        self.calls = 0  # calls of `has` while armed
        has = tier.has

        def held(keys):
            if self.armed:
                self.calls += 1
                self.entered.set()
                assert self.opened.wait(WAIT_S), "the test never opened the held lookup"
            return has(keys)

        monkeypatch.setattr(tier, "has", held)

    def arm(self) -> None:
        self.armed = True

    def open(self) -> None:
        self.opened.set()
