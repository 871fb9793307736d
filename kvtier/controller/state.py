"""The controller's state: the registered instances and the chunk index (key -> which instances hold
it, in which tiers). Two implementations behind one protocol: in this process's memory
(kvtier.controller.memory_state) or in Redis (kvtier.controller.redis_state), where several
controllers behind one address share it and answer the same.

Where it runs: the controller's request handlers (FastAPI's thread pool: many threads at once) and
its sweeper thread. Implementations are thread-safe. Every method may raise `StateUnavailable`
(Redis down or timing out): the app answers 503 and the agents retry; nothing here blocks longer
than the configured round-trip timeout per call.

Time is passed in (`now`, seconds of a monotonic or wall clock the caller chooses), so tests drive
heartbeat timeouts without sleeping. An instance is up while `now - last_heartbeat <= timeout`;
a down instance's keys are never returned by `holders` (so a SIGKILLed instance leaves every answer
within the timeout), and `sweep` deletes them.

Tier masks: an instance registers its tiers fastest first; bit i of a mask is its tier i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kvtier.errors import KvtierError
from kvtier.fleet.messages import EventsReply, KeyEvent, Registration, TierUsage


class StateUnavailable(KvtierError):
    """The index cannot be read or written now (Redis down or slow): 503, retry later."""


class UnknownInstance(KvtierError, KeyError):
    """No instance with this id is registered."""


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    registration: Registration
    last_heartbeat: float  # `now` of its last registration or heartbeat
    tiers: tuple[TierUsage, ...]  # its latest usage report
    up: bool
    chunks_indexed: int  # keys of this instance in the index

    @property
    def instance_id(self) -> str:
        return self.registration.instance_id

    def tier_names(self) -> list[str]:
        return [t.name for t in self.registration.tiers]


class FleetState(Protocol):
    session: str  # new whenever this state starts empty: instances re-register when it changes
    # True when no call waits on the network (this process's memory): the app may answer small
    # lookups on its event loop instead of a thread-pool hop.
    in_process: bool

    def register(self, registration: Registration, now: float) -> None:
        """Add or replace an instance. Replacing drops every key it had (it re-sends them)."""
        ...

    def heartbeat(self, instance_id: str, session: str, tiers: list[TierUsage], now: float) -> bool:
        """Record a heartbeat. False when the id or the session is unknown, or the instance was
        marked down (its keys are gone): the instance must register again."""
        ...

    def apply(self, instance_id: str, session: str, seq: int, events: list[KeyEvent],
              now: float) -> EventsReply:
        """Apply one batch of key events in order (tiers by name, unknown tier names ignored).
        `known=False` as for heartbeats; `resync=True` when `seq` is not the previous seq + 1 (a batch
        was lost): the batch is still applied, and the instance should send a reset and its keys."""
        ...

    def instances(self, now: float) -> list[InstanceRecord]:
        ...

    def instance(self, instance_id: str, now: float) -> InstanceRecord:
        """One instance (up or down); UnknownInstance when none has the id."""
        ...

    def holders(self, keys: list[bytes]) -> list[dict[str, int]]:
        """Per key (24 bytes), the instances that are up and hold it -> tier mask. One round trip."""
        ...

    def sweep(self, now: float) -> int:
        """Forget the keys (and after a grace period the records) of instances that are down.
        Returns the keys removed. Called by the app's sweeper thread every second or so."""
        ...

    def index_size(self) -> tuple[int, int]:
        """(key-instance entries in the index, bytes of memory they take here; 0 for Redis)."""
        ...

    def close(self) -> None:
        ...
