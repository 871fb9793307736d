"""StorageManager: tier order, admission, demotion, promotion, prefix lookup and pins.

Where it runs: in the process that owns the KV cache, called from any thread; one lock guards the
CPU tier, the memory pool and the pin set. Payload copies and all tier I/O happen outside the lock.

Tier order is the CPU tier, then the record tiers in `lower` (disk, later remote ones). The manager
never branches on a tier's name or class: a lower tier is anything that follows `kvtier.tiers.base.Tier`.

    put:    copy each new chunk into a slab (evicting LRU chunks to make room), index it in the CPU
            tier, and (write-through) queue a background write to every lower tier.
    evict:  a chunk with a copy below (or that the tiers below refused) is dropped; one without is
            demoted: it stays readable from its slab until the background write lands.
    get:    CPU hits copy straight out of their slabs; lower-tier hits are read into new slabs on
            the read threads, verified, copied out and kept in the CPU tier (promotion). A prefix
            larger than host memory streams in waves: each wave's slabs are freed once copied out.
    lookup: the number of leading keys present in some tier; index only, no payload I/O.

Host memory holds at most one entry per key (indexed in the CPU tier, or being demoted), and every
slab belongs to exactly one entry or one in-flight read; `check_invariants` asserts it.

Leases (see kvtier.pins) keep a chunk in some tier: a leased chunk is the CPU tier's last victim and
leaves host memory only through a write that a tier below confirms, never by being dropped.

Memory exhaustion is explicit: when no slab is free and nothing is evictable right now (all pinned or in
flight), the rest of a store is rejected and counted, and a retrieve stops its prefix there. A store
never waits; a retrieve that holds no memory yet waits (at most READ_WAIT_S) for memory others will give
back, one that holds some only for background writes, which never wait on a retrieve: two retrieves
never wait on each other. Nothing is dropped without a counter. close() refuses new calls and waits
(bounded) for those in flight before it stops the I/O threads and closes the tiers (kvtier.call_gate).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from kvtier.call_gate import CallGate, guarded
from kvtier.invariants import check_invariants, pool_stats, refresh_usage
from kvtier.errors import UnknownTier
from kvtier.keys import ChunkKey, ChunkSpan
from kvtier.layout import KVLayout
from kvtier.log_limit import LogLimiter
from kvtier.memory import MemoryPool, Slab
from kvtier.metrics import Metrics
from kvtier.pins import PinTable
from kvtier.slab_io import ChunkRead, SlabIO
from kvtier.tiers.base import Tier
from kvtier.tiers.cpu import CpuEntry, CpuTier
from kvtier.transfers import TransferQueue

logger = logging.getLogger(__name__)

# How long one wave of a retrieve waits for memory to be given back before serving a shorter prefix.
READ_WAIT_S = 5.0
# How long close() waits for calls in flight to return before it releases the tiers under them.
CLOSE_WAIT_S = 30.0


class StorageManager:
    def __init__(self, layout: KVLayout, pool: MemoryPool, lower: Sequence[Tier], metrics: Metrics, *,
                 pins: PinTable | None = None, write_through: bool = True,
                 promote_on_hit: bool = True, io_threads: int = 4, clean_ahead: int | None = None):
        self.layout = layout
        self.pool = pool
        self.lower = list(lower)
        self.metrics = metrics
        self._log = LogLimiter(logger)  # a full CPU tier refuses every store: one line a minute
        self.write_through = write_through
        self.promote_on_hit = promote_on_hit
        # One pin table shared with every tier (they read it through `is_pinned` when evicting).
        self.pins = PinTable() if pins is None else pins
        self.cpu = CpuTier(pool, self.pins.is_pinned, is_leased=self.pins.is_leased)
        self._lock = threading.Lock()
        # Signalled whenever memory may have been given back: a write landed, a read wave or a
        # store finished, a move released its hold.
        self._progress = threading.Condition(self._lock)
        self._writes_in_flight = 0
        self._holders = 0  # read waves, stores and moves holding slabs or readers they will give back
        # A write's success counts only if no removal below (clear, move up) overlapped it: such a
        # removal may have deleted what it wrote. Bumped when one starts and when one ends.
        self._removal_gen = 0
        self._removing = 0
        self._gate = CallGate("kvtier storage")  # calls that use the I/O queues or the tiers
        # Write-back keeps this many of the next eviction victims written below already, so that
        # evicting them frees a slab at once instead of waiting for a demotion.
        self._clean_ahead = max(1, pool.num_slabs // 16) if clean_ahead is None else clean_ahead
        self._demoting: dict[ChunkKey, CpuEntry] = {}
        self._refused: list[CpuEntry] = []  # leased, refused below (see `_demoted_locked`)
        self._writes = TransferQueue(io_threads, "kvtier-write")
        self._reads = TransferQueue(io_threads, "kvtier-read")
        self._io = SlabIO(pool, layout, self.lower, metrics, self._reads)

    # -- lookup --------------------------------------------------------------------------------

    @guarded
    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading `keys` some tier holds. No payload I/O, no side effects."""
        keys = list(keys)
        with self._lock:
            present = self.cpu.present(keys)
            if self._demoting:
                present = [p or k in self._demoting for p, k in zip(present, keys)]
        n = present.index(False) if False in present else len(keys)
        # Ask the tiers below from the first CPU gap on: a later chunk can be in CPU while an earlier
        # one is only below (a store inserts a prompt first chunk first, so LRU evicts that first).
        rest, present = keys[n:], present[n:]
        for tier in self.lower:
            if all(present):
                break
            present = [p or found for p, found in zip(present, tier.has(rest))]
        return n + (present.index(False) if False in present else len(present))

    # -- store ---------------------------------------------------------------------------------

    @guarded
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
            slabs.sort(key=lambda slab: slab.index)  # consecutive chunks in consecutive slabs: one copy
            self._holders += 1
        rejected = len(new) - len(slabs)
        self.metrics.inc("deduplicated_chunks", len(spans) - len(new))
        if rejected:
            self.metrics.tier_inc(self.cpu.name, "rejected", rejected)
            self._log.warning("full", "CPU tier full of pinned or in-flight chunks: %d not stored", rejected)
        try:
            self._io.copy(list(zip(new, slabs)), kv, into_slabs=True)
        except BaseException:  # a tensor that cannot be read (meta, a failed device): nothing stored
            with self._lock:
                for slab in slabs:
                    self.pool.free(slab)
                self._holders -= 1
                self._progress.notify_all()
            raise
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
            self._holders -= 1
            self._progress.notify_all()
        self.metrics.inc("stored_chunks", stored)
        self.metrics.tier_inc(self.cpu.name, "bytes_written",
                              self.layout.chunk_bytes(sum(s.num_tokens for s in new[:len(slabs)])))
        return stored

    def _held_locked(self, key: ChunkKey) -> CpuEntry | None:
        """The host-memory entry for `key`: indexed in the CPU tier (marked recently used), or still
        readable from its slab while being demoted."""
        return self.cpu.get(key) or self._demoting.get(key)

    # -- eviction and background writes -------------------------------------------------------

    def _alloc_locked(self, owner: str) -> Slab | None:
        """A free slab, evicting LRU chunks to make one. Evicting a chunk that has no copy below
        starts its demotion and returns None (its slab is freed when the write lands): one
        allocation never pushes more than one chunk to disk. The caller rejects or waits."""
        while (slab := self.pool.alloc(owner)) is None:
            victim = self.cpu.pop_victim(leased=bool(self.lower))
            if victim is None:
                return None
            key, entry = victim
            self.metrics.tier_inc(self.cpu.name, "evictions")
            # A leased chunk is always written down (a tier that holds it answers from its index):
            # `persisted` may be stale, the tier having evicted its copy before the lease. One the
            # tiers below refused is dropped, as with no tier below, not written again.
            done_below = entry.persisted or entry.write_failed
            if not self.lower or (done_below and not self.pins.is_leased(key)):
                self._detach_locked(entry)
                continue
            if key in self._demoting:
                raise RuntimeError(f"{key} has two host copies: one indexed, one being demoted")
            self._demoting[key] = entry
            self.metrics.inc("demotions")
            self._submit_write_locked(key, entry)
            return None
        return slab

    def _alloc_for_read_locked(self, holding: bool, deadline: float) -> Slab | None:
        """A slab for a lower-tier read. A wave that holds nothing yet waits (until `deadline`) for
        anything in flight to give memory back; one that holds memory waits only for background
        writes, which never wait on a retrieve, so two retrieves never wait on each other."""
        while (slab := self._alloc_locked("read")) is None:
            if self._gate.closed or not (self._writes_in_flight or (not holding and self._holders)):
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._progress.wait(remaining)
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
            if not (entry.persisted or entry.write_failed):
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
        gen = None if self._removing else self._removal_gen
        # Counted once the queue took it (the job takes this lock, held here, before it ends).
        future = self._writes.submit(self._write_down, key, entry, tiers, gen, entry.persisted)
        entry.readers += 1  # the slab must outlive the write
        self._writes_in_flight += 1
        return future

    def _write_down(self, key: ChunkKey, entry: CpuEntry, tiers: Sequence[Tier] | None,
                    gen: int | None, confirm: bool) -> bool:
        """Background job: write one CPU chunk to `tiers` (None: all below); True if any of them
        holds it now. `confirm`: the chunk was written below before, so ask first."""
        ok = False
        try:
            ok = self._io.write(key, entry, self.lower if tiers is None else tiers, confirm)
        finally:
            with self._lock:
                entry.write_failed |= not ok and tiers is None
                ok = ok and gen == self._removal_gen
                # A write to every tier below that fails means none holds it (put answers True
                # for a record already there): forget a stale claim.
                entry.persisted = ok or (entry.persisted and tiers is not None)
                self._writes_in_flight -= 1
                self._progress.notify_all()
                if self._demoting.get(key) is entry:  # the first of its writes to land decides
                    self._demoted_locked(key, entry, ok)
                self._release_locked(entry)
        return ok

    def _demoted_locked(self, key: ChunkKey, entry: CpuEntry, ok: bool) -> None:
        """A demotion's write landed (`ok`) or failed: the entry leaves host memory, except a leased
        one with no copy below, which goes back into the CPU tier (a lease keeps it in some tier)."""
        del self._demoting[key]
        if ok or not self.pins.is_leased(key):
            entry.detached = True
        else:
            # Not the next victim again: the tiers below are as full now, and every allocation
            # would re-write it while a retrieve waits on those writes until READ_WAIT_S.
            entry.refused = True
            self._refused.append(entry)
            self.cpu.insert(key, entry)

    def _room_below_locked(self) -> None:
        """Room may have appeared below (a release, unpin or removal): try refused entries again."""
        for entry in self._refused:
            entry.refused = False
        self._refused.clear()

    # -- retrieve ------------------------------------------------------------------------------

    @guarded
    def get(self, spans: Sequence[ChunkSpan], out: torch.Tensor | None, promote: bool | None = None) -> int:
        """Copy the stored chunks for `spans` into `out[:, :, start:end]` (no copy when `out` is
        None), in order, stopping at the first chunk no tier can serve. Returns chunks served.
        A prefix larger than the free CPU memory streams in waves; only the last wave is promoted
        (the earlier ones' slabs are what the next wave reads into)."""
        promote = self.promote_on_hit if promote is None else promote
        done = cpu_hits = cpu_bytes = 0
        while done < len(spans):
            plan = self._plan_wave(spans[done:])
            if not plan:
                break
            n = 0
            try:
                n = self._io.read(plan, out)
            finally:
                self._finish_wave(plan, n, promote and len(plan) == len(spans) - done)
            done, cpu_hits = done + n, cpu_hits + sum(r.from_cpu for r in plan)
            cpu_bytes += sum(r.entry.nbytes for r in plan if r.from_cpu)
            if n < len(plan):
                break
        self.metrics.tier_inc(self.cpu.name, "hits", cpu_hits)
        self.metrics.tier_inc(self.cpu.name, "bytes_read", cpu_bytes)
        self.metrics.tier_inc(self.cpu.name, "misses", len(spans) - cpu_hits)
        return done

    def _plan_wave(self, spans: Sequence[ChunkSpan]) -> list[ChunkRead]:
        """Hold the host copies of the leading chunks of `spans` and allocate slabs for the lower-tier
        ones, in order, until memory runs out: one wave. Everything in it is held (readers)."""
        deadline = time.monotonic() + READ_WAIT_S
        plan: list[ChunkRead] = []
        with self._lock:
            if self._gate.closed:  # close() is waiting for this retrieve: serve what it has
                return plan
            # This prefix's resident chunks become the most recently used, the last one oldest: when
            # making room for an earlier chunk must evict one of them, it takes the one needed last.
            for s in reversed(spans):
                self.cpu.get(s.key)
            for s in spans:
                entry = self.cpu.peek(s.key) or self._demoting.get(s.key)
                if entry is None:
                    slab = self._alloc_for_read_locked(bool(plan), deadline) if self.lower else None
                    if slab is None:
                        break
                    entry = CpuEntry(slab, s.num_tokens, self.layout.chunk_bytes(s.num_tokens),
                                     persisted=True, detached=True)
                    plan.append(ChunkRead(s, entry, from_cpu=False))
                else:
                    plan.append(ChunkRead(s, entry, from_cpu=True))
                entry.readers += 1
            self._holders += bool(plan)
        return plan

    def _finish_wave(self, plan: list[ChunkRead], n: int, promote: bool) -> None:
        """Let go of the wave; keep the first `n` lower-tier reads in the CPU tier when `promote`,
        unless the key got a host copy meanwhile (a store, or a demotion in flight): one per key."""
        promoted = 0
        with self._lock:
            for i, r in enumerate(plan):
                key = r.span.key
                if r.from_cpu or i >= n or not promote or key in self.cpu or key in self._demoting:
                    self._release_locked(r.entry)
                    continue
                r.entry.readers, r.entry.detached = 0, False
                r.entry.slab.owner = "cpu"
                self.cpu.insert(key, r.entry)
                promoted += 1
            self._holders -= 1
            self._progress.notify_all()
        self.metrics.inc("promotions", promoted)

    # -- administration ------------------------------------------------------------------------

    def pin(self, keys: Sequence[ChunkKey]) -> int:
        """Pin keys (no tier evicts them until unpinned). Returns how many were newly pinned."""
        with self._lock:
            return self.pins.pin(keys)

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            self._room_below_locked()
            return self.pins.unpin(keys)

    def lease(self, keys: Sequence[ChunkKey]) -> None:
        """Keep keys in some tier for a request until `release` (counted per request)."""
        with self._lock:
            self.pins.lease(keys)

    def release(self, keys: Sequence[ChunkKey]) -> None:
        with self._lock:
            self._room_below_locked()
            self.pins.release(keys)

    @guarded
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

    @guarded
    def move_up(self, spans: Sequence[ChunkSpan]) -> int:
        """Load lower-tier chunks of `spans` into the CPU tier and remove them below (a relocation:
        they are written back down if evicted later). Returns how many chunks moved."""
        n = self.get(spans, None, promote=True)
        with self._lock:
            # Held while their copies below go, so no eviction can drop (or write down and then
            # lose to the removal) a chunk whose only other copy is being deleted.
            held = [(s.key, e) for s in spans[:n] if (e := self.cpu.peek(s.key)) is not None]
            for _, entry in held:
                entry.readers += 1
            self._holders += 1
            self._begin_removal_locked()
        keys = [key for key, _ in held]
        below: set[ChunkKey] = set()
        try:
            for tier in self.lower:
                below.update(k for k, found in zip(keys, tier.has(keys)) if found)
                tier.remove(keys)
        finally:
            with self._lock:
                for _, entry in held:
                    entry.persisted = False
                    self._release_locked(entry)
                self._end_removal_locked()
                self._holders -= 1
                self._progress.notify_all()
        return len(below)

    def _begin_removal_locked(self) -> None:
        """Copies below are about to be deleted: a background write overlapping the deletion may
        have written what it deletes, so its success must not mark a CPU entry as written below."""
        self._removing += 1
        self._removal_gen += 1

    def _end_removal_locked(self) -> None:
        """The deletion is done (call after resetting `persisted` of what it removed, in the same
        locked section)."""
        self._removing -= 1
        self._removal_gen += 1
        self._room_below_locked()

    def tier(self, name: str) -> Tier:
        for tier in self.lower:
            if tier.name == name:
                return tier
        known = [self.cpu.name] + [t.name for t in self.lower]
        raise UnknownTier(f"no tier named {name!r}; this engine has {known}")

    @guarded
    def clear(self, tier_name: str | None = None) -> None:
        """Drop every chunk from one tier (or all tiers, and all pins, when `tier_name` is None).
        Leases stay: their requests release them."""
        if tier_name not in (None, self.cpu.name):
            self.tier(tier_name)  # validate the name before doing anything
        self._writes.drain()  # no background write may hold a slab or land after the clear
        if tier_name in (None, self.cpu.name):
            with self._lock:
                for key, _ in self.cpu.items():
                    self._detach_locked(self.cpu.pop(key))
        lower = [tier for tier in self.lower if tier_name in (None, tier.name)]
        if lower:
            with self._lock:
                self._begin_removal_locked()
            try:
                for tier in lower:
                    tier.clear()
            finally:
                with self._lock:
                    # `persisted` does not say which tier holds the copy: forget them all, and the
                    # next eviction writes each chunk down again (a tier still holding it says so).
                    for _, entry in self.cpu.items():
                        entry.persisted = False
                    self._end_removal_locked()
        if tier_name is None:
            with self._lock:
                self.pins.clear_pins()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued background writes. True when all landed within `timeout`."""
        return self._writes.drain(timeout)

    # The accounting, read under the lock (see kvtier.invariants): stats, gauges, invariants.
    refresh_usage, pool_stats, check_invariants = refresh_usage, pool_stats, check_invariants

    def close(self) -> None:
        """Refuse new calls (KvtierError), let those in flight finish (at most CLOSE_WAIT_S; a
        retrieve stops at its current wave), drain background writes, release the tiers. Once."""
        if not self._gate.shut():
            return
        with self._lock:
            self._progress.notify_all()  # retrieves waiting for memory stop waiting
        if left := self._gate.wait_idle(CLOSE_WAIT_S):
            logger.error("closing kvtier storage with %d calls in flight after %.0f s", left, CLOSE_WAIT_S)
        self._writes.close()
        self._reads.close()
        for tier in self.lower:
            tier.close()
