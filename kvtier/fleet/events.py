"""EventQueue: the key events an instance owes its controller, between the tiers that report them and
the agent thread that sends them (kvtier.fleet.agent).

Where it runs: `append` is the member's key listener (kvtier.fleet.member.KeyListener), called on
any thread that changes a tier, under that tier's lock: O(1) (a list append, or a new run), no I/O,
and the queue's own lock is held only for that. `drain`, `clear` and the rest run on the
agent's thread.

Bounded: at most `max_keys` keys wait here. An event beyond that is dropped and counted, and from
then on every event is dropped until `clear()` (the agent's full re-send): the controller gets a
prefix of the events, never a log with a hole in it, then a reset and the full key set. `drain()`
hands the waiting events to the agent and empties the queue at once (a swap), so up to twice
`max_keys` keys are held while a drained lot is being sent.

Consecutive events with the same (op, tier) share one run (`stored cpu k1 k2 k3`): the usual traffic
(a prompt's chunks stored one after another, an eviction sweep) travels as a few KeyEvents.
`batches` cuts runs into EventBatch-sized lists of at most MAX_EVENT_KEYS keys (a reset or clear
event counts as one), converting keys to hex only then, off the tiers' locks.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from kvtier.fleet.messages import MAX_EVENT_KEYS, KeyEvent

# (op, tier, keys): one KeyEvent's worth, keys as 24-byte digests
Run = tuple[str, "str | None", list[bytes]]


class EventQueue:
    def __init__(self, max_keys: int):
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self.dropped = 0  # events dropped since the queue was made (never reset)
        self._lock = threading.Lock()
        self._runs: list[Run] = []
        self._keys = 0
        self._overflowed = False

    def append(self, op: str, tier: str, key: bytes) -> None:
        """Queue one event (the key listener). Never blocks beyond the queue's short lock."""
        with self._lock:
            if self._overflowed or self._keys >= self.max_keys:
                self._overflowed = True
                self.dropped += 1
                return
            self._keys += 1
            last = self._runs[-1] if self._runs else None
            if last is not None and last[0] == op and last[1] == tier:
                last[2].append(key)
            else:
                self._runs.append((op, tier, [key]))

    def __len__(self) -> int:
        """Keys waiting."""
        return self._keys

    @property
    def overflowed(self) -> bool:
        """Events were dropped since the last `clear()`: the controller needs a full re-send."""
        return self._overflowed

    def drain(self) -> list[Run]:
        """Take every waiting event, oldest first (pass them to `batches`)."""
        with self._lock:
            runs, self._runs, self._keys = self._runs, [], 0
        return runs

    def clear(self) -> None:
        """Forget the waiting events and the overflow, before a full re-send: call it before taking
        the member's key snapshot, so that what happens during the snapshot is queued after it."""
        with self._lock:
            self._runs, self._keys, self._overflowed = [], 0, False


def batches(runs: Iterable[Run], max_keys: int = MAX_EVENT_KEYS) -> Iterator[list[KeyEvent]]:
    """The runs as lists of KeyEvents, each list at most `max_keys` keys (an event without keys
    counts as one), in order; a run longer than the room left is split across lists."""
    batch: list[KeyEvent] = []
    room = max_keys
    for op, tier, keys in runs:
        start = 0
        while True:
            if room == 0:
                yield batch
                batch, room = [], max_keys
            part = keys[start:start + room]
            batch.append(KeyEvent(op=op, tier=tier, keys=[key.hex() for key in part]))
            room -= max(len(part), 1)
            start += len(part)
            if start >= len(keys):
                break
    if batch:
        yield batch
