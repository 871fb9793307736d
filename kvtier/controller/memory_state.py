"""The controller's state in this process's memory (the default `FleetState`).

    _instances: instance id -> _Instance (its registration, heartbeat, usage, last seq, keys)
    _Instance.keys: 24-byte chunk key -> tier mask (bit i: its registered tier i)

One dict of keys per instance, not one dict over the fleet: a reset (every re-registration and
resync) or a sweep of a dead instance drops one dict in O(1) instead of scanning 1M entries under
the lock, and a tier mask below 257 is one of CPython's cached small ints, so an entry costs the
dict slot and the 24-byte key object only. Measured (tests/controller/test_memory_state.py,
tracemalloc): ~100 bytes per (key, instance) entry, so 1M chunks over 8 instances take ~100 MB.
(Keys as 128-bit ints under per-namespace dicts would save ~13%, at the cost of a conversion per
probe and a second level of dicts; not worth it.)

Up or down is derived from time, never stored: an instance is up while `now - last_heartbeat <=
heartbeat_timeout_s`. A late heartbeat or event batch from an instance that is down is refused
(it must register again and re-send), whether or not `sweep` has run, so answers do not depend on
when the sweeper last woke. Once a sweep has dropped an instance's keys, it stays refused even for a
request whose `now` (read before the sweep's) still finds it up: else it would be up again with
none of its keys and no reason to resend them. `holders` takes no `now`: it leaves out the
instances that were down at the latest `now` this state was given (the sweeper passes one every
second; `fleet_lookup` also filters by its own `instances(now)`).

Where it runs: the controller's request threads, its sweeper thread, and its event loop (lookups
and routes of small bodies: kvtier.controller.app.INLINE_BODY_BYTES). Thread-safe: one lock,
held for dict operations only (hex keys are parsed and dropped dicts freed outside it), and by
`holders` per slice of keys, so a huge lookup cannot keep heartbeats out for seconds (a lookup may
then see an event batch applied midway: answers are advice, the next lookup sees it whole).
"""

from __future__ import annotations

import sys
import threading
import uuid
from dataclasses import dataclass, field

from kvtier.controller.state import InstanceRecord, UnknownInstance
from kvtier.fleet.messages import EventsReply, KeyEvent, Registration, TierUsage

HOLDERS_SLICE = 8192  # keys probed per hold of the lock (~10 ms at 8 instances)
FORGET_AFTER_S = 3600.0  # a down instance's record is kept this long (shown down, commands get 409)


@dataclass(slots=True)
class _Instance:
    registration: Registration
    last_heartbeat: float
    tiers: tuple[TierUsage, ...]
    bits: dict[str, int]  # tier name -> its bit in a mask
    seq: int | None = None  # of the last event batch since registering
    keys: dict[bytes, int] = field(default_factory=dict)
    swept: bool = False  # its keys were dropped: only a registration brings it back


def tier_bits(registration: Registration) -> dict[str, int]:
    """Tier name -> mask bit, fastest tier = bit 0 (a repeated name keeps its first bit)."""
    bits: dict[str, int] = {}
    for i, tier in enumerate(registration.tiers):
        bits.setdefault(tier.name, 1 << i)
    return bits


def parse_events(events: list[KeyEvent], bits: dict[str, int]) -> list[tuple[str, int, list[bytes]]]:
    """(op, mask bits, keys as bytes) per event; an event naming a tier the instance did not register
    is dropped; `cleared` without a tier means every tier."""
    everything = sum(bits.values())
    parsed = []
    for event in events:
        if event.tier is None:
            mask = everything
        elif event.tier in bits:
            mask = bits[event.tier]
        else:
            continue
        parsed.append((event.op, mask, [bytes.fromhex(h) for h in event.keys]))
    return parsed


def _apply_event(keys: dict[bytes, int], op: str, mask: int, batch: list[bytes]) -> None:
    if op == "stored":
        for key in batch:
            keys[key] = keys.get(key, 0) | mask
        return
    if op == "cleared":
        batch = list(keys)
    for key in batch:
        left = keys.get(key, 0) & ~mask
        if left:
            keys[key] = left
        else:
            keys.pop(key, None)


class MemoryState:
    in_process = True  # FleetState: no call waits on the network

    def __init__(self, heartbeat_timeout_s: float, forget_after_s: float = FORGET_AFTER_S):
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
        self.session = uuid.uuid4().hex
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.forget_after_s = max(forget_after_s, heartbeat_timeout_s)
        self._lock = threading.Lock()
        self._instances: dict[str, _Instance] = {}
        self._now = float("-inf")  # the latest `now` given: what `holders` calls the present

    def _seen(self, now: float) -> None:
        self._now = max(self._now, now)

    def _down(self, inst: _Instance, now: float) -> bool:
        return now - inst.last_heartbeat > self.heartbeat_timeout_s

    def _live(self, instance_id: str, session: str, now: float) -> _Instance | None:
        """The instance if it may report (known, this session, up); under the lock."""
        inst = self._instances.get(instance_id)
        if inst is None or session != self.session or inst.swept or self._down(inst, now):
            return None
        return inst

    def register(self, registration: Registration, now: float) -> None:
        inst = _Instance(registration, now, tuple(registration.tiers), tier_bits(registration))
        with self._lock:
            self._seen(now)
            old = self._instances.get(registration.instance_id)
            self._instances[registration.instance_id] = inst
        del old  # its key dict is freed here, outside the lock

    def heartbeat(self, instance_id: str, session: str, tiers: list[TierUsage], now: float) -> bool:
        with self._lock:
            self._seen(now)
            inst = self._live(instance_id, session, now)
            if inst is None:
                return False
            inst.last_heartbeat = max(inst.last_heartbeat, now)
            inst.tiers = tuple(tiers)
            return True

    def apply(self, instance_id: str, session: str, seq: int, events: list[KeyEvent],
              now: float) -> EventsReply:
        with self._lock:
            self._seen(now)
            inst = self._live(instance_id, session, now)
            bits = inst.bits if inst is not None else {}
        if inst is None:
            return EventsReply(known=False)
        parsed = parse_events(events, bits)  # hex parsing outside the lock
        dropped = []
        with self._lock:
            if self._instances.get(instance_id) is not inst or inst.swept:  # re-registered or swept
                return EventsReply(known=False)
            resync = inst.seq is not None and seq != inst.seq + 1
            inst.seq = seq
            for op, mask, batch in parsed:
                if op == "reset":
                    dropped.append(inst.keys)
                    inst.keys = {}
                else:
                    _apply_event(inst.keys, op, mask, batch)
        return EventsReply(known=True, resync=resync)

    def _record(self, inst: _Instance, now: float) -> InstanceRecord:
        return InstanceRecord(inst.registration, inst.last_heartbeat, inst.tiers,
                              not self._down(inst, now), len(inst.keys))

    def instances(self, now: float) -> list[InstanceRecord]:
        with self._lock:
            self._seen(now)
            return [self._record(self._instances[i], now) for i in sorted(self._instances)]

    def instance(self, instance_id: str, now: float) -> InstanceRecord:
        with self._lock:
            self._seen(now)
            inst = self._instances.get(instance_id)
            if inst is None:
                raise UnknownInstance(f"no instance {instance_id!r} is registered")
            return self._record(inst, now)

    def holders(self, keys: list[bytes]) -> list[dict[str, int]]:
        # The lock is taken per HOLDERS_SLICE keys: a 1M-key lookup (chunk size 1) probes for
        # seconds, and heartbeats waiting that long behind a few of them would time instances out.
        out: list[dict[str, int]] = []
        for start in range(0, len(keys), HOLDERS_SLICE):
            with self._lock:
                up = [(i, inst.keys) for i, inst in self._instances.items()
                      if inst.keys and not self._down(inst, self._now)]
                for key in keys[start:start + HOLDERS_SLICE]:
                    held = {}
                    for instance_id, held_keys in up:
                        mask = held_keys.get(key)
                        if mask:
                            held[instance_id] = mask
                    out.append(held)
        return out

    def sweep(self, now: float) -> int:
        dropped = []
        with self._lock:
            self._seen(now)
            for instance_id, inst in list(self._instances.items()):
                if not self._down(inst, now):
                    continue
                dropped.append(inst.keys)
                inst.keys, inst.swept = {}, True
                if now - inst.last_heartbeat > self.forget_after_s:
                    del self._instances[instance_id]
        return sum(len(keys) for keys in dropped)  # the dicts are freed after the lock

    def index_size(self) -> tuple[int, int]:
        """Entries, and their bytes: each key dict's table (sys.getsizeof) plus its key objects
        (masks are cached small ints); within ~10% of tracemalloc's count (tested)."""
        with self._lock:
            dicts = [inst.keys for inst in self._instances.values()]
            entries = sum(len(keys) for keys in dicts)
            table = sum(sys.getsizeof(keys) for keys in dicts)
        return entries, table + entries * _KEY_OBJECT_BYTES

    def close(self) -> None:
        pass


# A 24-byte bytes object: 57 bytes by sys.getsizeof, 64 as pymalloc allocates it (8-byte classes).
_KEY_OBJECT_BYTES = (sys.getsizeof(bytes(24)) + 7) // 8 * 8
