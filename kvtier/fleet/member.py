"""What the fleet agent needs from the instance it represents: a CacheEngine
(kvtier.fleet.engine_member) or kvtier_server's store (kvtier.fleet.server_member).

Where it runs: `describe`, `tier_usage` and `key_snapshot` on the agent's thread; `run` on the
command server's threads; the key listener on whatever thread changes a tier (a store, an eviction,
a background write), under that tier's lock: it must only append to a bounded queue and return.
No torch here: kvtier_server joins a fleet without importing it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

from kvtier.fleet.messages import Command, CommandReply, TierUsage

# (op, tier name, 24-byte key): a key was stored in or left one tier of this instance.
KeyListener = Callable[[Literal["stored", "evicted"], str, bytes], None]


class Description(Protocol):
    kind: Literal["engine", "server"]
    model_id: str | None
    namespace: str | None  # 16 hex characters, or None for a server (many namespaces)
    chunk_size: int
    save_partial_chunks: bool
    layout: str
    p2p_url: str | None  # where peers read its chunks (an engine with a `p2p:` section), else None


class FleetMember(Protocol):
    def describe(self) -> Description: ...

    def tier_usage(self) -> list[TierUsage]:
        """Every tier this instance reports on, fastest first (the order of its tier masks)."""
        ...

    def key_snapshot(self) -> dict[str, list[bytes]]:
        """Every key each tier holds now (tier name -> keys), for a full re-send. Consistent per
        tier; a key stored or evicted while this runs also arrives as an event after it."""
        ...

    def set_key_listener(self, listener: KeyListener | None) -> None:
        """Call `listener` for every key stored in or removed from a reported tier, from now on."""
        ...

    def run(self, command: Command) -> CommandReply:
        """Execute one controller command (see kvtier.fleet.messages.Command). Raises ValueError
        for a command this instance cannot do (an unknown tier, a move on a server): a 400."""
        ...
