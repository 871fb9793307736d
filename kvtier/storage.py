"""StorageManager: tier order, admission, demotion, promotion, prefix lookup and pins.

Where it runs: in the process that owns the KV cache, called from any thread; one lock guards the
CPU tier, the memory pool and the pin set. Payload copies and all tier I/O happen outside the lock.

Tier order is the CPU tier, then the record tiers in `lower` (disk, remote ones, P2P last). The manager
never branches on a tier's name or class: a lower tier is anything that follows `kvtier.tiers.base.Tier`;
writes and demotions go to its `writable` ones only (a P2P tier serves reads only).

    put:    copy each new chunk into a slab (evicting in the order of the CPU tier's policy,
            `cpu_policy`, LRU by default, to make room), index it in the CPU tier, and
            (write-through) queue a background write to every lower tier. A store larger
            than host memory streams in waves: the next wave's slabs are the last one's, written.
    evict:  a chunk with a copy below (or that the tiers below refused) is dropped; one without is
            demoted: it stays readable from its slab until the background write lands.
    get:    CPU hits copy straight out of their slabs; lower-tier hits are read into new slabs on
            the read threads, verified, copied out and kept in the CPU tier (promotion). A prefix
            larger than host memory streams in waves: each wave's slabs are freed once copied out.
    lookup: the number of leading keys present in some tier (or in host memory: `cpu_prefix`); index only.

Host memory holds at most one entry per key (indexed in the CPU tier, or being demoted), and every slab
belongs to one entry or one in-flight read (`check_invariants`). Leases (kvtier.pins) keep a chunk in some
tier: a leased chunk is the CPU tier's last victim and leaves host memory only through a write that a tier
below confirms. Helpers: kvtier.write_behind, kvtier.storage_admin (pins, moves, clears), kvtier.lookup.

Memory exhaustion is explicit: when no slab is free and nothing is evictable right now (all pinned or in
flight), the rest of a store is rejected and counted, and a retrieve stops its prefix there. A store
larger than host memory streams down in waves: a wave that holds nothing yet waits (at most
STORE_WAIT_S) for background writes only; a retrieve that holds no memory yet waits (at most
READ_WAIT_S) for memory others will give back, one that holds some only for background writes, which
never wait on a store or a retrieve: no two calls wait on each other. Nothing is dropped without a
counter. close() refuses new calls and waits (bounded) for those in flight (a store or retrieve stops at
its current wave) before it stops the I/O threads and closes the tiers (kvtier.call_gate).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partialmethod

import torch

from kvtier import storage_admin as admin
from kvtier.call_gate import CallGate, guarded
from kvtier.invariants import check_invariants, pool_stats, refresh_usage
from kvtier.job_queue import TransferQueue
from kvtier.keys import ChunkKey, ChunkSpan
from kvtier.layout import KVLayout
from kvtier.log_limit import LogLimiter
from kvtier.lookup import prefix_length
from kvtier.memory import MemoryPool, Slab
from kvtier.metrics import Metrics
from kvtier.pins import PinTable
from kvtier.policy import EvictionPolicy
from kvtier.slab_io import ChunkRead, SlabIO
from kvtier.tiers import gds
from kvtier.tiers.base import Tier, writable_tiers
from kvtier.tiers.cpu import CpuEntry, CpuTier
from kvtier.write_behind import WriteBehind

logger = logging.getLogger(__name__)

# How long one wave of a retrieve waits for memory to be given back before serving a shorter prefix.
READ_WAIT_S = 5.0
# How long one wave of a store larger than free host memory waits for background writes to free a slab.
STORE_WAIT_S = 5.0
# How long close() waits for calls in flight to return before it releases the tiers under them.
CLOSE_WAIT_S = 30.0


class StorageManager:
    def __init__(self, layout: KVLayout, pool: MemoryPool, lower: Sequence[Tier], metrics: Metrics, *,
                 pins: PinTable | None = None, write_through: bool = True,
                 promote_on_hit: bool = True, io_threads: int = 4, clean_ahead: int | None = None,
                 cpu_policy: EvictionPolicy | None = None, cpu_admits: Callable[[int], bool] | None = None):
        self.layout, self.pool = layout, pool
        self.lower, self.writable = list(lower), writable_tiers(lower)  # writes: to `writable` only
        self.metrics = metrics
        self._log = LogLimiter(logger)  # a full CPU tier refuses every store: one line a minute
        self.write_through = write_through
        self.promote_on_hit = promote_on_hit
        # Whether a stored chunk of n tokens joins the CPU tier's policy (kvtier.admission); default all.
        self._admits = cpu_admits or (lambda num_tokens: True)
        # One pin table shared with every tier (they read it through `is_pinned` when evicting).
        self.pins = PinTable() if pins is None else pins
        self.cpu = CpuTier(pool, self.pins.is_pinned, cpu_policy, is_leased=self.pins.is_leased)
        self._lock = threading.Lock()
        self.key_listeners: tuple = ()  # storage_admin.add_key_listener: told of every local key change
        # Signalled whenever memory may have been given back: a write landed, a wave, store or move let go.
        self._progress = threading.Condition(self._lock)
        self._holders = 0  # read waves, stores and moves holding slabs or readers they will give back
        self._gate = CallGate("kvtier storage")  # calls that use the I/O queues or the tiers
        # Write-back keeps this many of the next eviction victims written below already, so that
        # evicting them frees a slab at once instead of waiting for a demotion.
        self._clean_ahead = max(1, pool.num_slabs // 16) if clean_ahead is None else clean_ahead
        self._reads = TransferQueue(io_threads, "kvtier-read")
        self._io = SlabIO(pool, layout, self.lower, metrics, self._reads)
        self._writes = WriteBehind(self._progress, self._io, pool, self.writable, io_threads,
                                   landed=self._demoted_locked)

    @guarded
    def contains_prefix(self, keys: Sequence[ChunkKey], lower: bool | Sequence[Tier] = True) -> int:
        """How many leading `keys` some tier holds (host memory alone if not `lower`; with tiers, host
        memory and those of the tiers below only). No payload I/O."""
        below = self.lower if lower is True else (lower or ())
        with self._lock:  # (a full hit in host memory, the common case, asks no tier below)
            held, rest, in_memory = self.cpu.probe_prefix(keys, bool(below))
        return held + (prefix_length(rest, in_memory, below) if rest else 0)
    cpu_prefix = partialmethod(contains_prefix, lower=False)  # a load of the rest needs a tier below

    # -- store ---------------------------------------------------------------------------------

    @guarded
    def put(self, spans: Sequence[ChunkSpan], kv: torch.Tensor) -> int:
        """Store the chunks of `kv` ([2, L, T, H*D]) named by `spans`. Returns chunks newly stored.
        A store larger than the free host memory streams down in waves (with a tier below to take
        the writes): each wave is copied into the slabs there are and written through, and the next
        waits for those writes to land and free slabs."""
        with self._lock:
            # (`held` marks held chunks recently used: a re-store refreshes recency.)
            new = [s for s in spans if self.cpu.held(s.key) is None]
        self.metrics.inc("deduplicated_chunks", len(spans) - len(new))
        done = stored = 0
        while done < len(new) and not (done and self._gate.closed):  # close(): stop at this wave
            wave = new[done:]
            with self._lock:
                slabs = self._store_slabs_locked(len(wave), time.monotonic() + STORE_WAIT_S)
                if not slabs:
                    break
                self._holders += 1
            wave = wave[:len(slabs)]
            stored += self._store_wave(wave, slabs, kv)
            done += len(wave)
            if not self.writable:  # a next wave would evict this one's chunks: a suffix is no use
                break
        if rejected := len(new) - done:
            self.metrics.tier_inc(self.cpu.name, "rejected", rejected)
            self._log.warning("full", "CPU tier full of pinned or in-flight chunks: %d not stored", rejected)
        return stored

    def _store_slabs_locked(self, count: int, deadline: float) -> list[Slab]:
        """Up to `count` slabs for a store wave, taken as they are free or evictable. For the first,
        the wave waits (until `deadline`) while background writes are in flight: one landing frees
        a slab. Without a tier below nothing is in flight, and what does not fit is not stored."""
        slabs: list[Slab] = []
        while len(slabs) < count:
            slab = self._alloc_locked("store")
            if slab is not None:
                slabs.append(slab)
                continue
            remaining = deadline - time.monotonic()
            if slabs or self._gate.closed or not self._writes.in_flight or remaining <= 0:
                break
            self._progress.wait(remaining)
        slabs.sort(key=lambda slab: slab.index)  # consecutive chunks in consecutive slabs: one copy
        return slabs

    def _store_wave(self, wave: Sequence[ChunkSpan], slabs: list[Slab], kv: torch.Tensor) -> int:
        """Copy one wave into its slabs and index it (the store's hold ends). Chunks stored."""
        try:
            self.pool.copy_chunks(list(zip(wave, slabs)), kv, self.layout, into_slabs=True)
        except BaseException:  # a tensor that cannot be read (meta, a failed device): nothing stored
            with self._lock:
                for slab in slabs:
                    self.pool.free(slab)
                self._let_go_locked()
            raise
        with self._lock:
            stored = self._admit_locked(list(wave), slabs)
        self.metrics.inc("stored_chunks", stored)
        self.metrics.tier_inc(self.cpu.name, "bytes_written",
                              self.layout.chunk_bytes(sum(s.num_tokens for s in wave)))
        return stored

    def _admit_locked(self, new: list[ChunkSpan], slabs: list[Slab]) -> int:
        """Index the copied chunks in the CPU tier (and write them through); a key a concurrent
        store won meanwhile gives its slab back. Ends the store's hold. Returns chunks stored."""
        stored = declined = 0
        for s, slab in zip(new, slabs):
            if self.cpu.held(s.key) is not None:  # a concurrent store won
                self.pool.free(slab)
                continue
            entry = CpuEntry(slab, s.num_tokens, self.layout.chunk_bytes(s.num_tokens))
            slab.owner = "cpu"
            admit = self._admits(s.num_tokens)
            self.cpu.insert(s.key, entry, admit)
            stored += 1
            declined += not admit
            if self.write_through and self.writable:
                self._writes.submit_locked(s.key, entry)
        if declined:
            self.metrics.tier_inc(self.cpu.name, "declined", declined)
        if not self.write_through and self.writable and self.pool.free_slabs < self._clean_ahead:
            self._writes.clean_ahead_locked(self.cpu.eviction_order(), self._clean_ahead)
        self._let_go_locked()
        return stored

    def _let_go_locked(self) -> None:
        """A store, read wave or move gave back what it held: waits for memory may go on."""
        self._holders -= 1
        self._progress.notify_all()

    # -- eviction and demotion -----------------------------------------------------------------

    def _alloc_locked(self, owner: str) -> Slab | None:
        """A free slab, evicting LRU chunks to make one. Evicting a chunk that has no copy below
        starts its demotion and returns None (its slab is freed when the write lands): one
        allocation never pushes more than one chunk to disk. The caller rejects or waits."""
        while (slab := self.pool.alloc(owner)) is None:
            victim = self.cpu.pop_victim(leased=bool(self.writable))
            if victim is None:
                return None
            key, entry = victim
            self.metrics.tier_inc(self.cpu.name, "evictions")
            # A leased chunk is always written down (a tier that holds it answers from its index):
            # `persisted` may be stale, the tier having evicted its copy before the lease. One the
            # tiers below refused is dropped, as with no tier below, not written again.
            done_below = entry.persisted or entry.write_failed
            if not self.writable or (done_below and not self.pins.is_leased(key)):
                entry.detach(self.pool)
                continue
            self.cpu.demote(key, entry)
            self.metrics.inc("demotions")
            self._writes.submit_locked(key, entry)
            return None
        return slab

    def _alloc_for_read_locked(self, holding: bool, deadline: float) -> Slab | None:
        """A slab for a lower-tier read. A wave that holds nothing yet waits (until `deadline`) for
        anything in flight to give memory back; one that holds memory waits only for background
        writes, which never wait on a retrieve, so two retrieves never wait on each other."""
        while (slab := self._alloc_locked("read")) is None:
            if self._gate.closed or not (self._writes.in_flight or (not holding and self._holders)):
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._progress.wait(remaining)
        return slab

    def _demoted_locked(self, key: ChunkKey, entry: CpuEntry, ok: bool) -> None:
        """A background write of `entry` landed (`ok`) or failed. The first write of a demotion to
        land decides: the entry leaves host memory, except a leased one with no copy below, which
        goes back into the CPU tier (a lease keeps it in some tier)."""
        if not self.cpu.demoted(key, entry):
            return
        if ok or not self.pins.is_leased(key):
            entry.detached = True  # (the write's own reader frees the slab as it lets go)
        else:  # refused: not the next victim again, or a retrieve would wait on its every re-write
            self.cpu.refuse(key, entry)

    # -- retrieve ------------------------------------------------------------------------------

    def reads_into(self, device: torch.device) -> bool:
        """Whether a retrieve into a tensor on `device` reads disk chunks straight into it (GDS)."""
        return self._io.direct_disk is not None and device.type in gds.DEVICE_TYPES

    @guarded
    def get(self, spans: Sequence[ChunkSpan], out: torch.Tensor | None, promote: bool | None = None) -> int:
        """Copy the stored chunks for `spans` into `out[:, :, start:end]` (no copy when `out` is
        None), in order, stopping at the first chunk no tier can serve. Returns chunks served.
        A prefix larger than the free CPU memory streams in waves; only the last wave is promoted
        (the earlier ones' slabs are what the next wave reads into)."""
        promote = self.promote_on_hit if promote is None else promote
        done = cpu_hits = cpu_bytes = 0
        direct = out is not None and self.reads_into(out.device)
        while done < len(spans):
            plan = self._plan_wave(spans[done:], direct)
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

    def _plan_wave(self, spans: Sequence[ChunkSpan], direct: bool = False) -> list[ChunkRead]:
        """Hold the host copies of the leading chunks of `spans` and allocate slabs for the lower-tier
        ones, in order, until memory runs out: one wave. Everything in it is held (readers). With
        `direct`, chunks the CPU tier lacks and the GPUDirect disk tier has take no slab: they are
        read straight into the retrieve's device tensor (`ChunkRead.device`)."""
        deadline = time.monotonic() + READ_WAIT_S
        plan: list[ChunkRead] = []
        on_disk = self._io.direct_disk.has([s.key for s in spans]) if direct else [False] * len(spans)
        with self._lock:
            if self._gate.closed:  # close() is waiting for this retrieve: serve what it has
                return plan
            # This prefix's resident chunks become the most recently used, the last one oldest: when
            # making room for an earlier chunk must evict one of them, it takes the one needed last.
            for s in reversed(spans):
                self.cpu.get(s.key)
            for s, disk_only in zip(spans, on_disk):
                entry = self.cpu.held(s.key, touch=False)
                from_cpu = entry is not None
                if not from_cpu and disk_only:
                    plan.append(ChunkRead(s, None, False, device=True))
                    continue
                if not from_cpu:
                    slab = self._alloc_for_read_locked(bool(plan), deadline) if self.lower else None
                    if slab is None:
                        break
                    entry = CpuEntry(slab, s.num_tokens, self.layout.chunk_bytes(s.num_tokens),
                                     persisted=True, detached=True)
                plan.append(ChunkRead(s, entry, from_cpu))
                entry.hold()
            self._holders += bool(plan)
        return plan

    def _finish_wave(self, plan: list[ChunkRead], n: int, promote: bool) -> None:
        """Let go of the wave; keep the first `n` lower-tier reads in the CPU tier when `promote`,
        unless the key got a host copy meanwhile (a store, or a demotion in flight): one per key."""
        promoted = 0
        with self._lock:
            for i, r in enumerate(plan):
                key = r.span.key
                if r.entry is None:  # read straight into device memory: nothing held, nothing to keep
                    continue
                if r.from_cpu or i >= n or not promote or self.cpu.holds(key):
                    r.entry.release(self.pool)
                    continue
                r.entry.attach()
                self.cpu.insert(key, r.entry)
                promoted += 1
            self._let_go_locked()
        self.metrics.inc("promotions", promoted)

    # -- administration: pins, leases, moves, clears (kvtier.storage_admin); the accounting, read
    # under the lock (kvtier.invariants): stats, gauges, invariants.
    pin, unpin, lease, release = admin.pin, admin.unpin, admin.lease, admin.release
    move_down, move_up, clear = guarded(admin.move_down), guarded(admin.move_up), guarded(admin.clear)
    refresh_usage, pool_stats, check_invariants = refresh_usage, pool_stats, check_invariants

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for queued background writes. True when all landed within `timeout`."""
        return self._writes.drain(timeout)

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
