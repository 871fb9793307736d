"""A slow tier without sleeps: `Gate` holds a tier's reads until the test opens it.

    gate = Gate(engine.kvtier.storage.lower[0], monkeypatch)   # the disk tier's `get` now waits
    ...                                                        # a load starts: gate.entered is set
    gate.open()                                                # the held read (and later ones) go on

A test opens its gates at teardown too (a fixture's finaliser), so that no thread is left waiting.
"""

from __future__ import annotations

import threading

WAIT_S = 30.0  # a held read gives up (failing) after this long: a test that forgets to open never hangs


class Gate:
    """Holds a tier's reads until `open()`; `entered` is set when the first one arrives."""

    def __init__(self, tier, monkeypatch):
        self.entered, self.opened = threading.Event(), threading.Event()
        get = tier.get

        def held(*args, **kwargs):
            self.entered.set()
            assert self.opened.wait(WAIT_S), "the test never opened the gate"
            return get(*args, **kwargs)

        monkeypatch.setattr(tier, "get", held)

    def open(self) -> None:
        self.opened.set()
