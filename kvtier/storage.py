"""StorageManager: tier order, admission, demotion, promotion, prefix lookup and pins.

Where it runs: in the process that owns the KV cache, called from any thread; one lock guards the
CPU tier, the memory pool and the pin set. Payload copies and all tier I/O happen outside the lock.

Tier order is the CPU tier, then the record tiers in `lower` (disk, later remote ones). The manager
never branches on a tier's name or class: a lower tier is anything that follows `kvtier.tiers.base.Tier`.

    put:    copy each new chunk into a slab (evicting LRU chunks to make room), index it in the CPU
            tier, and (write-through) queue a background write to every lower tier.
    evict:  a chunk with a copy below is dropped; one without is demoted: it stays readable from
            its slab until the background write lands, then the slab is freed.
    get:    CPU hits copy straight out of their slabs; lower-tier hits are read into new slabs on
            the read threads, verified, copied out and kept in the CPU tier (promotion).
    lookup: the number of leading keys present in some tier; index only, no payload I/O.

Memory exhaustion is explicit: when no slab is free and nothing is evictable right now (all pinned
or in flight), the rest of a store is rejected and counted, and a retrieve stops its prefix there.
Nothing waits on the disk while holding a caller, and nothing is dropped without a counter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from kvtier.keys import ChunkKey, ChunkSpan
from kvtier.layout import KVLayout
from kvtier.memory import MemoryPool, Slab
from kvtier.metrics import Metrics
from kvtier.pins import PinTable
from kvtier.record import encode_header, tensor_bytes
from kvtier.tiers.base import PutItem, Tier
from kvtier.tiers.cpu import CpuEntry, CpuTier
from kvtier.transfers import ReadRequest, TierReader, TransferQueue

logger = logging.getLogger(__name__)

# How long a retrieve waits for background writes to free a slab before serving a shorter prefix.
READ_WAIT_S = 5.0


@dataclass(slots=True)
class _Read:
    """One chunk of a retrieve: where it comes from and the slab it is (or will be) in."""

    span: ChunkSpan
    entry: CpuEntry | None  # None until a slab is allocated for a lower-tier read
    from_cpu: bool


class StorageManager:
    def __init__(self, layout: KVLayout, pool: MemoryPool, lower: Sequence[Tier], metrics: Metrics, *,
                 pins: PinTable | None = None, write_through: bool = True,
                 promote_on_hit: bool = True, io_threads: int = 4, clean_ahead: int | None = None):
        self.layout = layout
        self.pool = pool
        self.lower = list(lower)
        self.metrics = metrics
        self.write_through = write_through
        self.promote_on_hit = promote_on_hit
        # One pin table shared with every tier (they read it through `is_pinned` when evicting).
        self.pins = PinTable() if pins is None else pins
        self.cpu = CpuTier(pool, self.pins.__contains__)
        self._lock = threading.Lock()
        # Signalled whenever a background write lands: a slab may have been freed or made clean.
        self._write_landed = threading.Condition(self._lock)
        self._writes_in_flight = 0
        # Write-back keeps this many of the next eviction victims written below already, so that
        # evicting them frees a slab at once instead of waiting for a demotion.
        self._clean_ahead = max(1, pool.num_slabs // 16) if clean_ahead is None else clean_ahead
        self._demoting: dict[ChunkKey, CpuEntry] = {}
        self._writes = TransferQueue(io_threads, "kvtier-write")
        self._reads = TransferQueue(io_threads, "kvtier-read")
        self._reader = TierReader(self.lower, layout.dtype, metrics, self._reads)

    # -- lookup --------------------------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading `keys` some tier holds. No payload I/O, no side effects."""
        keys = list(keys)
        with self._lock:
            present = self.cpu.present(keys)
            if self._demoting:
                present = [p or k in self._demoting for p, k in zip(present, keys)]
        n = present.index(False) if False in present else len(keys)
        # Ask the tiers below from the first CPU gap on: a later chunk can be in CPU while an earlier
        # one is only below (eviction takes a prompt's oldest, i.e. first, chunks first).
        rest, present = keys[n:], present[n:]
        for tier in self.lower:
            if all(present):
                break
            present = [p or found for p, found in zip(present, tier.has(rest))]
        return n + (present.index(False) if False in present else len(present))

    # -- store ---------------------------------------------------------------------------------

    def put(self, spans: Sequence[ChunkSpan], kv: torch.Tensor) -> int:
        """Store the chunks of `kv` ([2, L, T, H*D]) named by `spans`. Returns chunks newly stored."""
        with self._lock:
            # (_held_locked marks held chunks recently used: a re-store refreshes recency.)
            new = [s for s in spans if self._held_locked(s.key) is None]
            slabs = []
            for _ in new:
                slab = self._alloc_locked("store")
                if slab is None:
                    break
                slabs.append(slab)
            slabs.sort(key=lambda slab: slab.index)  # consecutive chunks in consecutive slabs: see _copy
        rejected = len(new) - len(slabs)
        self.metrics.inc("deduplicated_chunks", len(spans) - len(new))
        if rejected:
            self.metrics.tier_inc(self.cpu.name, "rejected", rejected)
            logger.warning("CPU tier full of pinned or in-flight chunks: %d chunks not stored", rejected)
        self._copy(list(zip(new, slabs)), kv, into_slabs=True)
        stored = 0
        with self._lock:
            for s, slab in zip(new, slabs):
                if self._held_locked(s.key) is not None:  # a concurrent store won
                    self.pool.free(slab)
                    continue
                entry = CpuEntry(slab, s.num_tokens, self.layout.chunk_bytes(s.num_tokens))
                slab.owner = "cpu"
                self.cpu.insert(s.key, entry)
                stored += 1
                if self.write_through and self.lower:
                    self._submit_write_locked(s.key, entry)
            if not self.write_through and self.lower:
                self._clean_ahead_locked()
        self.metrics.inc("stored_chunks", stored)
        self.metrics.tier_inc(self.cpu.name, "bytes_written",
                              self.layout.chunk_bytes(sum(s.num_tokens for s in new[:len(slabs)])))
        return stored

    def _held_locked(self, key: ChunkKey) -> CpuEntry | None:
        """The host-memory entry for `key`: indexed in the CPU tier (marked recently used), or still
        readable from its slab while being demoted."""
        return self.cpu.get(key) or self._demoting.get(key)

    def _copy(self, chunks: list[tuple[ChunkSpan, Slab]], kv: torch.Tensor, into_slabs: bool) -> None:
        """Copy chunks between `kv` ([2, L, T, H*D]) and their slabs, one copy per run of equal-size
        chunks that follow each other in `kv` and in the arena (a prompt stored in one call does):
        a copy costs ~10 us beyond its bytes, a fifth of copying a 512 KiB chunk."""
        i = 0
        while i < len(chunks):
            span, slab = chunks[i]
            t, k = span.num_tokens, 1
            while (i + k < len(chunks) and chunks[i + k][1].index == slab.index + k
                   and chunks[i + k][0].start == span.start + k * t and chunks[i + k][0].num_tokens == t):
                k += 1
            tokens = kv.narrow(2, span.start, k * t).unflatten(2, (k, t)).movedim(2, 0)
            slabs = self.pool.chunk_run(slab, k, self.layout.dtype, self.layout.chunk_shape(t))
            (slabs if into_slabs else tokens).copy_(tokens if into_slabs else slabs)
            i += k

    # -- eviction and background writes -------------------------------------------------------

    def _alloc_locked(self, owner: str) -> Slab | None:
        """A free slab, evicting LRU chunks to make one. Evicting a chunk that has no copy below
        starts its demotion and returns None (its slab is freed when the write lands): one
        allocation never pushes more than one chunk to disk. The caller rejects or waits."""
        while (slab := self.pool.alloc(owner)) is None:
            victim = self.cpu.pop_victim()
            if victim is None:
                return None
            key, entry = victim
            self.metrics.tier_inc(self.cpu.name, "evictions")
            if entry.persisted or not self.lower:
                self._detach_locked(entry)
                continue
            self._demoting[key] = entry
            self.metrics.inc("demotions")
            self._submit_write_locked(key, entry)
            return None
        return slab

    def _alloc_waiting_locked(self, owner: str, deadline: float) -> Slab | None:
        """`_alloc_locked`, but wait (until `deadline`) while background writes may free a slab."""
        while (slab := self._alloc_locked(owner)) is None and self._writes_in_flight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._write_landed.wait(remaining)
        return slab

    def _clean_ahead_locked(self) -> None:
        """Write-back, when the pool is nearly full: start background writes of the next few
        eviction victims that have no copy below, so the evictions that follow free at once."""
        if self.pool.free_slabs >= self._clean_ahead:
            return
        budget = self._clean_ahead - self._writes_in_flight
        for key, entry in self.cpu.eviction_order():
            if budget <= 0:
                break
            if not entry.persisted:
                self._submit_write_locked(key, entry)
                budget -= 1

    def _detach_locked(self, entry: CpuEntry) -> None:
        """The entry left the CPU index: free its slab now, or when its last reader is done."""
        entry.detached = True
        if entry.readers == 0:
            self.pool.free(entry.slab)

    def _release_locked(self, entry: CpuEntry) -> None:
        entry.readers -= 1
        if entry.readers < 0:
            raise RuntimeError("CPU entry released more often than leased")
        if entry.readers == 0 and entry.detached:
            self.pool.free(entry.slab)

    def _submit_write_locked(self, key: ChunkKey, entry: CpuEntry,
                             tiers: Sequence[Tier] | None = None) -> Future:
        entry.readers += 1  # the slab must outlive the write
        self._writes_in_flight += 1
        return self._writes.submit(self._write_down, key, entry, tiers or self.lower)

    def _write_down(self, key: ChunkKey, entry: CpuEntry, tiers: Sequence[Tier]) -> bool:
        """Background job: write one CPU chunk to `tiers`; True if any of them holds it now."""
        ok = False
        try:
            payload = self.pool.tensor(entry.slab, entry.nbytes)
            header = encode_header(key, self.layout.chunk_shape(entry.num_tokens), self.layout.dtype,
                                   tensor_bytes(payload))
            for tier in tiers:
                ok = tier.put([PutItem(key, header, payload)])[0] or ok
        finally:
            with self._lock:
                entry.persisted = entry.persisted or ok
                if self._demoting.get(key) is entry:
                    del self._demoting[key]
                    entry.detached = True
                self._release_locked(entry)
                self._writes_in_flight -= 1
                self._write_landed.notify_all()
        return ok

    # -- retrieve ------------------------------------------------------------------------------

    def get(self, spans: Sequence[ChunkSpan], out: torch.Tensor | None, promote: bool | None = None) -> int:
        """Copy the stored chunks for `spans` into `out[:, :, start:end]` (no copy when `out` is
        None), in order, stopping at the first chunk no tier can serve. Returns chunks served.
        A prefix larger than the free CPU memory is staged in waves."""
        done = cpu_hits = 0
        while done < len(spans):
            plan = self._plan_reads(spans[done:])
            if not plan:
                break
            n, hits = self._serve(plan, out, self.promote_on_hit if promote is None else promote)
            done, cpu_hits = done + n, cpu_hits + hits
            if n < len(plan):
                break
        self.metrics.tier_inc(self.cpu.name, "hits", cpu_hits)
        self.metrics.tier_inc(self.cpu.name, "misses", len(spans) - cpu_hits)
        return done

    def _plan_reads(self, spans: Sequence[ChunkSpan]) -> list[_Read]:
        """Lease the CPU-resident chunks, then allocate slabs for the others, in prefix order.
        Leasing first means making room for a read never evicts a later part of this prefix."""
        deadline = time.monotonic() + READ_WAIT_S
        with self._lock:
            plan = []
            for s in spans:
                entry = self._held_locked(s.key)
                if entry is not None:
                    entry.readers += 1
                plan.append(_Read(s, entry, entry is not None))
            for i, r in enumerate(plan):
                if r.from_cpu:
                    continue
                slab = self._alloc_waiting_locked("read", deadline) if self.lower else None
                if slab is None and len(plan) > i + 1:
                    # The pool may be full of this very prefix: serve the part before this chunk
                    # first (a wave), letting go of the leases after it.
                    for later in plan[i + 1:]:
                        if later.from_cpu:
                            self._release_locked(later.entry)
                    plan = plan[:i + 1]
                    slab = self._alloc_waiting_locked("read", deadline)
                if slab is None:  # (nothing after chunk i is leased any more)
                    return plan[:i]
                r.entry = CpuEntry(slab, r.span.num_tokens, self.layout.chunk_bytes(r.span.num_tokens),
                                   persisted=True, readers=1, detached=True)
        return plan

    def _serve(self, plan: list[_Read], out: torch.Tensor | None, promote: bool) -> tuple[int, int]:
        """Read the planned chunks below, copy the good prefix out, promote. Returns (served, cpu hits)."""
        lower = [r for r in plan if not r.from_cpu]
        # Start the lower-tier reads, then copy the CPU hits while they run.
        pending = self._reader.start([
            ReadRequest(r.span.key, self.pool.tensor(r.entry.slab, self.pool.slab_stride),
                        self.layout.chunk_shape(r.span.num_tokens)) for r in lower])
        if out is not None:
            self._copy([(r.span, r.entry.slab) for r in plan if r.from_cpu], out, into_slabs=False)
        found = iter(self._reader.finish(pending))
        ok = [r.from_cpu or next(found) for r in plan]
        n = ok.index(False) if False in ok else len(plan)
        if out is not None:
            self._copy([(r.span, r.entry.slab) for r in plan[:n] if not r.from_cpu], out, into_slabs=False)
        self._finish_reads(plan, n, promote)
        cpu = [r for r in plan if r.from_cpu]
        self.metrics.tier_inc(self.cpu.name, "bytes_read", sum(r.entry.nbytes for r in cpu))
        return n, len(cpu)

    def _finish_reads(self, plan: list[_Read], n: int, promote: bool) -> int:
        """Release leases; keep the first `n` lower-tier reads in the CPU tier (promotion)."""
        promoted = 0
        with self._lock:
            for i, r in enumerate(plan):
                if r.from_cpu or i >= n or not promote or r.span.key in self.cpu:
                    self._release_locked(r.entry)
                    continue
                r.entry.readers, r.entry.detached = 0, False
                r.entry.slab.owner = "cpu"
                self.cpu.insert(r.span.key, r.entry)
                promoted += 1
        self.metrics.inc("promotions", promoted)
        return promoted

    # -- administration ------------------------------------------------------------------------

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        """Pin keys (no tier evicts them until unpinned). Returns how many were newly pinned."""
        with self._lock:
            return self.pins.pin(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            return self.pins.unpin(keys)

    def lease(self, keys: Sequence[ChunkKey]) -> None:
        """Hold keys against eviction for a request until `release` (counted per request)."""
        with self._lock:
            self.pins.lease(keys)

    def release(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            self.pins.release(keys)

    def move_down(self, keys: Sequence[ChunkKey], tier_name: str) -> int:
        """Write CPU-resident `keys` to the named lower tier and drop them from the CPU tier.
        Blocking (an administrative call). Returns how many chunks left the CPU tier."""
        tier = self.tier(tier_name)
        with self._lock:
            entries = [(k, e) for k in keys if (e := self.cpu.get(k)) is not None]
            writes = [self._submit_write_locked(k, e, [tier]) for k, e in entries]
        moved = 0
        for (key, entry), write in zip(entries, writes):
            if write.result():
                with self._lock:
                    if self.cpu.get(key) is entry:
                        self._detach_locked(self.cpu.pop(key))
                        moved += 1
        return moved

    def move_up(self, spans: Sequence[ChunkSpan]) -> int:
        """Load lower-tier chunks of `spans` into the CPU tier and remove them below (a relocation:
        they are written back down if evicted later). Returns how many chunks moved."""
        n = self.get(spans, None, promote=True)
        keys = [s.key for s in spans[:n]]
        with self._lock:
            entries = [self.cpu.get(k) for k in keys]
            for entry in entries:
                if entry is not None:
                    entry.persisted = False
        below = set()
        for tier in self.lower:
            below.update(k for k, found in zip(keys, tier.has(keys)) if found)
            tier.remove(keys)
        return len(below)

    def tier(self, name: str) -> Tier:
        for tier in self.lower:
            if tier.name == name:
                return tier
        known = [self.cpu.name] + [t.name for t in self.lower]
        raise ValueError(f"no tier named {name!r}; this engine has {known}")

    def clear(self, tier_name: str | None = None) -> None:
        """Drop every chunk from one tier (or all tiers, and all pins, when `tier_name` is None)."""
        if tier_name not in (None, self.cpu.name):
            self.tier(tier_name)  # validate the name before doing anything
        self._writes.drain()  # no background write may hold a slab or land after the clear
        if tier_name in (None, self.cpu.name):
            with self._lock:
                for key, _ in self.cpu.items():
                    self._detach_locked(self.cpu.pop(key))
        for tier in self.lower:
            if tier_name in (None, tier.name):
                tier.clear()
        if tier_name is None:
            with self._lock:
                self.pins.clear_pins()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued background writes. True when all landed within `timeout`."""
        return self._writes.drain(timeout)

    def refresh_usage(self) -> None:
        with self._lock:
            usage = self.cpu.usage()
        self.metrics.set_usage(self.cpu.name, usage.chunks, usage.bytes, usage.capacity_bytes)
        for tier in self.lower:
            u = tier.usage()
            self.metrics.set_usage(tier.name, u.chunks, u.bytes, u.capacity_bytes)

    def pool_stats(self) -> dict:
        with self._lock:
            return {"slab_bytes": self.pool.slab_stride, "slabs": self.pool.num_slabs,
                    "used_slabs": self.pool.used_slabs, "used_bytes": self.pool.used_bytes,
                    "owners": self.pool.owners(), "pinned_chunks": self.pins.num_pinned,
                    "leased_chunks": self.pins.num_leased,
                    "demoting_chunks": len(self._demoting), "pending_writes": self._writes.pending,
                    "failed_writes": self._writes.failed,
                    "pinned_memory": self.pool.pinned}

    def close(self) -> None:
        self._writes.close()
        self._reads.close()
        for tier in self.lower:
            tier.close()
