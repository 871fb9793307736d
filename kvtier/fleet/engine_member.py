"""A CacheEngine as a fleet member (`kvtier.fleet.member.FleetMember`): what the fleet agent
registers, reports and runs for it.

Where it runs: `describe`, `tier_usage` and `key_snapshot` on the agent's thread, `run` on the
command server's threads, the key listener on whatever thread changes a tier (under that tier's
lock). Thread-safe: it holds no state of its own and calls the engine's thread-safe methods, and
the StorageManager's key calls (`kvtier.storage_admin`), which take the locks of the tiers they read.

Reported tiers are this process's own, fastest first: host memory ("cpu") and the tiers below that
index their keys here (the disk tier). Shared stores (Redis, kvtier_server) are not reported: they
are other processes' caches, shared by many engines; nor is the P2P tier (it only reads peers'
chunks: `Tier.writable` False; the description's `p2p_url` says where peers read ours). Commands
act on the engine's tiers: pin/move on the leading keys it holds (as `CacheEngine.pin` / `move` on a
prompt's tokens), unpin on every key given, compress/decompress on the records of the leading keys
held in one tier below (decompress: in every writable one when no tier is named; kvtier.recode),
clear on one tier or on every reported one, stats on none; an unknown tier or codec, a compress of
host memory, or a move, compress or clear of the read-only P2P tier is a ValueError (a 400).
`join_fleet(engine)` starts the fleet agent for an engine whose config has a `controller:` section.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier import storage_admin
from kvtier.fleet.description import MemberDescription
from kvtier.fleet.member import KeyListener
from kvtier.fleet.messages import Command, CommandReply, TierUsage
from kvtier.keys import ChunkKey

if TYPE_CHECKING:
    from kvtier.engine import CacheEngine


class EngineMember:
    def __init__(self, engine: CacheEngine):
        self.engine = engine
        self._listener: KeyListener | None = None

    def describe(self) -> MemberDescription:
        db = self.engine.db
        return MemberDescription("engine", db.namespace.model_id, db.namespace_digest.hex(), db.chunk_size,
                                 db.save_partial, self.engine.layout.describe(), self.engine.p2p_url)

    def tier_usage(self) -> list[TierUsage]:
        return [TierUsage(name=name, chunks=u.chunks, bytes_used=u.bytes, capacity_bytes=u.capacity_bytes)
                for name, u in storage_admin.local_usage(self.engine.storage)]

    def key_snapshot(self) -> dict[str, list[bytes]]:
        return storage_admin.key_snapshot(self.engine.storage)  # type: ignore[return-value]

    def set_key_listener(self, listener: KeyListener | None) -> None:
        """The agent's one listener (None: none); other listeners of the storage are left alone."""
        if self._listener is not None:
            storage_admin.remove_key_listener(self.engine.storage, self._listener)  # type: ignore[arg-type]
        self._listener = listener
        if listener is not None:
            storage_admin.add_key_listener(self.engine.storage, listener)  # type: ignore[arg-type]

    def run(self, command: Command) -> CommandReply:
        engine, keys = self.engine, [ChunkKey.from_hex(k) for k in command.keys]
        if command.op == "pin":
            chunks = engine.pin_keys(keys)
        elif command.op == "unpin":
            chunks = engine.unpin_keys(keys)
        elif command.op == "move":
            if command.tier is None:
                raise ValueError("a move needs the tier to move to")
            chunks = engine.move_keys(keys, command.tier, copy=command.copy_, num_tokens=command.num_tokens)
        elif command.op == "compress":
            if command.tier is None or command.codec is None:
                raise ValueError("a compress needs the codec and the tier whose records to recode")
            chunks = engine.compress_keys(keys, command.codec, command.tier)
        elif command.op == "decompress":
            chunks = engine.decompress_keys(keys, command.tier)
        elif command.op == "clear":
            chunks = self._clear(command.tier)
        else:  # stats
            chunks = 0
        return CommandReply(chunks=chunks, tiers=self.tier_usage())

    def _clear(self, tier: str | None) -> int:
        """Clear one tier, or every reported tier when None; how many chunks left the reported tiers
        (from their usage before and after: chunks stored meanwhile make it an estimate). A shared
        store (Redis, kvtier_server) is cleared only when named: it holds other engines' chunks too,
        so "clear everything" from the fleet leaves it alone (a kvtier_server joins by itself)."""
        storage = self.engine.storage
        before = dict(storage_admin.local_usage(storage))
        names = [tier] if tier is not None else list(before)
        for name in names:
            self.engine.clear(name)  # UnknownTier (a ValueError) before anything is cleared
        return sum(max(0, before[name].chunks - usage.chunks)
                   for name, usage in storage_admin.local_usage(storage) if name in names)


def join_fleet(engine: CacheEngine):
    """Start the fleet agent for `engine` (its config's `controller:` section): a handle to close.
    With P2P, the controller then leaves this instance out of the peers it names to it."""
    from kvtier.fleet.agent import join_fleet as join  # (the HTTP stack)

    handle = join(engine.config.controller, EngineMember(engine))
    if engine._p2p is not None:
        engine._p2p.joined(handle.instance_id)
    return handle
