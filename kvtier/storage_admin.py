"""Administrative calls of a StorageManager: pins and leases, moves and copies between tiers, clears,
and the local tiers' keys for a fleet agent or vLLM's KV events (listeners and a snapshot).

Where it runs: these functions are the manager's methods (bound in kvtier.storage, `guarded` there
where they use the tiers or the I/O queues) and take its lock like its own code does; they decide
no eviction, demotion or promotion themselves (a move up is a retrieve with promotion). Moves and
clears are blocking administrative calls. The tiers they take are objects: names are resolved by
`CacheEngine.tier`.

A removal below (a move up, a clear) is marked on the write-behind while it runs, so that no
background write overlapping it counts as having written the chunk down (see kvtier.write_behind).

Local tiers are host memory and the writable tiers below that index their keys in this process
(`KeyedTier`: the disk tier); shared stores (Redis, kvtier_server) are other processes' and report
nothing, nor does a read-only tier (P2P: what it reads are other instances' chunks). Moves and clears
go to writable tiers only (`StorageManager.writable`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from kvtier.keys import ChunkKey, ChunkSpan
from kvtier.policy import IndexListener
from kvtier.tiers.base import Tier, TierUsage
from kvtier.tiers.cpu import CpuTier

if TYPE_CHECKING:
    from kvtier.storage import StorageManager


def pin(manager: StorageManager, keys: Sequence[ChunkKey]) -> int:
    """Pin keys (no tier evicts them until unpinned). Returns how many were newly pinned."""
    with manager._lock:
        return manager.pins.pin(keys)


def unpin(manager: StorageManager, keys: Sequence[ChunkKey]) -> int:
    with manager._lock:
        manager.cpu.room_below()
        return manager.pins.unpin(keys)


def lease(manager: StorageManager, keys: Sequence[ChunkKey]) -> None:
    """Keep keys in some tier for a request until `release` (counted per request)."""
    with manager._lock:
        manager.pins.lease(keys)


def release(manager: StorageManager, keys: Sequence[ChunkKey]) -> None:
    with manager._lock:
        manager.cpu.room_below()
        manager.pins.release(keys)


def move_down(manager: StorageManager, keys: Sequence[ChunkKey], tier: Tier, copy: bool = False) -> int:
    """Write CPU-resident `keys` to `tier` (one of `manager.writable`) and drop them from the CPU
    tier (`copy`: keep them there too). Returns how many chunks left the CPU tier (`copy`: how
    many `tier` holds now)."""
    _check_tier(manager, tier)
    with manager._lock:
        entries = [(k, e) for k in keys if (e := manager.cpu.get(k)) is not None]
        writes = [manager._writes.submit_locked(k, e, [tier]) for k, e in entries]
    moved = 0
    for (key, entry), write in zip(entries, writes):
        if not write.result():
            continue
        if copy:
            moved += 1
            continue
        with manager._lock:
            if manager.cpu.get(key) is entry:
                manager.cpu.pop(key).detach(manager.pool)
                moved += 1
    return moved


def move_up(manager: StorageManager, spans: Sequence[ChunkSpan], copy: bool = False) -> int:
    """Load lower-tier chunks of `spans` into the CPU tier and remove them below (a relocation:
    they are written back down if evicted later; `copy`: they stay below too). Returns how many
    chunks moved (`copy`: how many were loaded)."""
    if copy:
        return _copy_up(manager, spans)
    n = manager.get(spans, None, promote=True)
    with manager._lock:
        # Held while their copies below go, so no eviction can drop (or write down and then
        # lose to the removal) a chunk whose only other copy is being deleted.
        held = [(s.key, e) for s in spans[:n] if (e := manager.cpu.peek(s.key)) is not None]
        for _, entry in held:
            entry.hold()
        manager._holders += 1
        manager._writes.begin_removal_locked()
    keys = [key for key, _ in held]
    below: set[ChunkKey] = set()
    try:
        for tier in manager.writable:  # a read-only tier (P2P: peers' memory) is not ours to remove from
            below.update(k for k, found in zip(keys, tier.has(keys)) if found)
            tier.remove(keys)
    finally:
        with manager._lock:
            for _, entry in held:
                entry.persisted = False
                entry.release(manager.pool)
            _end_removal_locked(manager)
            manager._let_go_locked()
    return len(below)


def _copy_up(manager: StorageManager, spans: Sequence[ChunkSpan]) -> int:
    with manager._lock:
        below = [s.key for s in spans if not manager.cpu.holds(s.key)]
    served = {s.key for s in spans[:manager.get(spans, None, promote=True)]}
    with manager._lock:
        return sum(key in served and key in manager.cpu for key in below)


def clear(manager: StorageManager, tier: Tier | CpuTier | None = None) -> None:
    """Drop every chunk from `tier` (or all tiers, and all pins, when None). Leases stay: their
    requests release them."""
    if tier is not None:
        _check_tier(manager, tier, cpu=True)
    manager._writes.drain()  # no background write may hold a slab or land after the clear
    if tier is None or tier is manager.cpu:
        with manager._lock:
            for key, _ in manager.cpu.items():
                manager.cpu.pop(key).detach(manager.pool)
    lower = [t for t in manager.writable if tier is None or tier is t]
    if lower:
        with manager._lock:
            manager._writes.begin_removal_locked()
            manager._writes.clears += 1
        try:
            for t in lower:
                t.clear()
        finally:
            with manager._lock:
                # `persisted` does not say which tier holds the copy: forget them all, and the
                # next eviction writes each chunk down again (a tier still holding it says so).
                for _, entry in manager.cpu.items():
                    entry.persisted = False
                _end_removal_locked(manager)
    if tier is None:
        with manager._lock:
            manager.pins.clear_pins()


def _end_removal_locked(manager: StorageManager) -> None:
    manager._writes.end_removal_locked()
    manager.cpu.room_below()


def _check_tier(manager: StorageManager, tier: Tier | CpuTier, cpu: bool = False) -> None:
    """A writable tier object of this manager (a name, say, is not: `CacheEngine.tier` resolves
    names; a read-only tier, P2P, is neither moved to nor cleared)."""
    if not (any(tier is t for t in manager.writable) or (cpu and tier is manager.cpu)):
        name = getattr(tier, "name", tier)
        raise ValueError(f"tier {name!r} is not one this storage may {'clear' if cpu else 'move to'}")


# -- local tiers' keys, for a fleet agent (kvtier.fleet.engine_member) -----------------------------

@runtime_checkable
class KeyedTier(Protocol):
    """A tier below that indexes its keys in this process and reports them (the disk tier)."""

    name: str

    def keys(self) -> list[ChunkKey]: ...
    def set_key_listener(self, listener: IndexListener | None) -> None: ...
    def usage(self) -> TierUsage: ...


def local_tiers(manager: StorageManager) -> list[KeyedTier]:
    """The tiers below host memory that are this process's own, fastest first."""
    return [tier for tier in manager.writable if isinstance(tier, KeyedTier)]


def add_key_listener(manager: StorageManager, listener: IndexListener) -> None:
    """Report every key stored into or evicted from host memory or a local tier to `listener`, from
    now on, beside the listeners already there (a fleet agent and vLLM's KV events may both listen)."""
    with manager._lock:
        manager.key_listeners = (*manager.key_listeners, listener)
        _install_listeners(manager)


def remove_key_listener(manager: StorageManager, listener: IndexListener) -> None:
    """Stop reporting to `listener` (added by `add_key_listener`); the others go on."""
    with manager._lock:
        kept = list(manager.key_listeners)
        if listener in kept:
            kept.remove(listener)
        manager.key_listeners = tuple(kept)
        _install_listeners(manager)


def _install_listeners(manager: StorageManager) -> None:
    """Each index has one listener slot: it gets the only listener, or one that calls them all."""
    listeners = manager.key_listeners
    slot = None if not listeners else listeners[0] if len(listeners) == 1 else functools.partial(
        _fan_out, listeners)
    manager.cpu.set_key_listener(slot)
    for tier in local_tiers(manager):
        tier.set_key_listener(slot)


def _fan_out(listeners: tuple[IndexListener, ...], op: str, tier: str, key: ChunkKey) -> None:
    """Every listener hears the change, even after one of them raised (the index counts and logs that)."""
    failed: Exception | None = None
    for listener in listeners:
        try:
            listener(op, tier, key)
        except Exception as error:
            failed = error
    if failed is not None:
        raise failed


def key_snapshot(manager: StorageManager) -> dict[str, list[ChunkKey]]:
    """Every key host memory and each local tier hold now (tier name -> keys), fastest first."""
    with manager._lock:
        snapshot = {manager.cpu.name: manager.cpu.keys()}
    for tier in local_tiers(manager):
        snapshot[tier.name] = tier.keys()
    return snapshot


def local_usage(manager: StorageManager) -> list[tuple[str, TierUsage]]:
    """(name, usage) of host memory and each local tier, fastest first."""
    with manager._lock:
        usage = [(manager.cpu.name, manager.cpu.usage())]
    return usage + [(tier.name, tier.usage()) for tier in local_tiers(manager)]
