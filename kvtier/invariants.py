"""Accounting invariants of a StorageManager, checked from outside its hot paths: for tests (after
any sequence of operations, `flush()` + `clear()` must leave nothing behind) and for leak hunts;
and the same accounting as stats and gauges (`pool_stats`, `refresh_usage`).

It reads the manager's private state under the manager's lock and changes nothing but gauges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.storage import StorageManager


def check_invariants(manager: StorageManager, empty: bool = False) -> None:
    """Raise RuntimeError naming every broken accounting invariant. For tests and leak hunts, at
    a quiet moment (no call in flight): every slab in use belongs to exactly one CPU entry, no
    entry is read or demoted, no write is in flight. `empty` (after `flush()` + `clear()`, all
    leases released): nothing in host memory, no pins or leases, no chunk or byte in any tier."""
    with manager._lock:
        entries = [e for _, e in manager.cpu.items()]
        owners, nbytes = manager.pool.owners(), sum(e.nbytes for e in entries)
        broken = [f"{name} is {value}" for name, value in [
            ("writes in flight", manager._writes.in_flight), ("queued writes", manager._writes.queued),
            ("holders", manager._holders), ("demoting chunks", manager.cpu.num_demoting),
            ("removals in progress", manager._writes.removing),
            ("CPU entries being read", sum(e.readers > 0 for e in entries)),
            ("CPU entries marked detached", sum(e.detached for e in entries)),
            ("CPU entries without a live slab", sum(not manager.pool.is_live(e.slab) for e in entries)),
            ("slabs in use beyond the CPU tier's", manager.pool.used_slabs - len(entries)),
            ("slab owners other than cpu", {o: n for o, n in owners.items() if o != "cpu"}),
            ("CPU tier bytes minus its entries'", manager.cpu.usage().bytes - nbytes),
        ] if value]
        if empty:
            usage = [(f"{t.name} chunks and bytes", (u.chunks, u.bytes)) for t in manager.lower
                     for u in [t.usage()] if u.chunks or u.bytes]
            broken += [f"{name} is {value}" for name, value in [
                ("slabs in use", manager.pool.used_slabs), ("pinned chunks", manager.pins.num_pinned),
                ("leased chunks", manager.pins.num_leased), *usage] if value]
    if broken:
        raise RuntimeError("storage invariants broken: " + "; ".join(broken))


@dataclass(frozen=True, slots=True)
class PoolStats:
    """The memory pool's accounting at one moment (`CacheEngine.stats()["pool"]` is its `asdict`)."""

    slab_bytes: int  # one slab's stride: the chunk size rounded up to 4 KiB
    slabs: int
    used_slabs: int
    used_bytes: int
    owners: dict[str, int]  # live slabs per owner ("cpu", "read", "store")
    pinned_chunks: int
    leased_chunks: int
    demoting_chunks: int  # out of the CPU index, readable until their write below lands
    pending_writes: int  # background writes queued or running
    failed_writes: int  # background write jobs that raised
    pinned_memory: bool  # the arena is page-locked
    platform: str  # the device platform whose host memory it is (kvtier.platforms)
    capabilities: dict[str, bool]  # what that platform can do (pinned memory, async copies, GDS)


def pool_stats(manager: StorageManager) -> PoolStats:
    """The memory pool's accounting, for `CacheEngine.stats()`."""
    with manager._lock:
        pool, pins, writes = manager.pool, manager.pins, manager._writes
        return PoolStats(pool.slab_stride, pool.num_slabs, pool.used_slabs, pool.used_bytes, pool.owners(),
                         pins.num_pinned, pins.num_leased, manager.cpu.num_demoting, writes.queued,
                         writes.failed, pool.pinned, pool.platform.name, pool.platform.capabilities())


def refresh_usage(manager: StorageManager) -> None:
    """Set the usage, pool, lease and pin gauges from the current accounting."""
    with manager._lock:
        usage, pool, pins = manager.cpu.usage(), manager.pool, manager.pins
        manager.metrics.set_pool(leased_chunks=pins.num_leased, pinned_chunks=pins.num_pinned,
                                 pool_slabs_used=pool.used_slabs, pool_slabs_total=pool.num_slabs,
                                 pool_bytes_used=pool.used_bytes)
    manager.metrics.set_usage(manager.cpu.name, usage.chunks, usage.bytes, usage.capacity_bytes)
    for tier in manager.lower:
        u = tier.usage()
        manager.metrics.set_usage(tier.name, u.chunks, u.bytes, u.capacity_bytes)
