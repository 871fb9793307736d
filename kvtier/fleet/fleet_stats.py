"""FleetStats: what a fleet member's agent has done, as `FleetHandle.stats()` (kvtier.fleet.agent)
returns it to its owner (a CacheEngine's stats, tests, logs). A value: no locks, no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FleetStats:
    instance_id: str
    command_url: str
    registered: bool  # the controller knows this instance now (as far as the agent can tell)
    registrations: int
    heartbeats: int  # heartbeats the controller acknowledged
    batches_sent: int
    events_queued: int  # keys waiting to be sent
    events_dropped: int  # key events the bounded queue dropped (each led to a re-send)
    resyncs: int  # full re-sends (reset + every key) begun
    errors: int  # failed exchanges with the controller
    commands: int  # controller commands run
    last_error: str | None
