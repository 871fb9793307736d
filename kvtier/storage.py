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
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from kvtier.keys import ChunkKey, ChunkSpan
from kvtier.layout import KVLayout
from kvtier.memory import MemoryPool, Slab
from kvtier.metrics import Metrics
from kvtier.record import CODEC_RAW, RecordHeader, encode_header, tensor_bytes
from kvtier.tiers.base import PutItem, Tier
from kvtier.tiers.cpu import CpuEntry, CpuTier
from kvtier.transfers import TransferQueue

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Read:
    """One chunk of a retrieve: where it comes from and the slab it is (or will be) in."""

    span: ChunkSpan
    entry: CpuEntry
    from_cpu: bool


class StorageManager:
    def __init__(self, layout: KVLayout, pool: MemoryPool, lower: Sequence[Tier], metrics: Metrics, *,
                 pinned: set[ChunkKey] | None = None, write_through: bool = True,
                 promote_on_hit: bool = True, io_threads: int = 4):
        self.layout = layout
        self.pool = pool
        self.lower = list(lower)
        self.metrics = metrics
        self.write_through = write_through
        self.promote_on_hit = promote_on_hit
        # One pin set shared with every tier (they read it through `is_pinned` when evicting).
        self.pinned: set[ChunkKey] = set() if pinned is None else pinned
        self.cpu = CpuTier(pool, self.pinned.__contains__)
        # Cached: KVLayout.element_size builds a tensor per call, a few us per chunk on the hot path.
        self._token_bytes = layout.bytes_per_token
        # A typed alias of the arena's storage (a zero-byte view at slab 0; only its storage is
        # used): one `as_strided` over it names a run of chunks in consecutive slabs, where slicing
        # a slab and viewing it twice costs ~7 us per chunk, a tenth of copying 512 KiB.
        self._typed = pool.tensor(Slab(0, "alias"), 0).view(layout.dtype)
        self._typed_base = self._typed.storage_offset()
        self._slab_elems = pool.slab_stride // layout.element_size
        self._lock = threading.Lock()
        self._demoting: dict[ChunkKey, CpuEntry] = {}
        self._writes = TransferQueue(io_threads, "kvtier-write")
        self._reads = TransferQueue(io_threads, "kvtier-read")

    # -- lookup --------------------------------------------------------------------------------

    def contains_prefix(self, keys: Sequence[ChunkKey]) -> int:
        """How many leading `keys` some tier holds. No payload I/O, no side effects."""
        with self._lock:
            n = 0
            while n < len(keys) and (keys[n] in self.cpu or keys[n] in self._demoting):
                n += 1
            rest = keys[n:]
            # A later chunk can be in CPU while an earlier one is only below (eviction demotes a
            # prompt's oldest, i.e. first, chunks first), so CPU residency counts past the gap too.
            present = [k in self.cpu or k in self._demoting for k in rest]
        if not rest:
            return n
        for tier in self.lower:
            for i, found in enumerate(tier.has(rest)):
                present[i] = present[i] or found
            if all(present):
                break
        for found in present:
            if not found:
                break
            n += 1
        return n

    # -- store ---------------------------------------------------------------------------------

    def put(self, spans: Sequence[ChunkSpan], kv: torch.Tensor) -> int:
        """Store the chunks of `kv` ([2, L, T, H*D]) named by `spans`. Returns chunks newly stored."""
        with self._lock:
            new = [s for s in spans if s.key not in self.cpu and s.key not in self._demoting]
            for s in spans:
                self.cpu.get(s.key)  # a re-store refreshes recency
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
                if s.key in self.cpu or s.key in self._demoting:  # a concurrent store won
                    self.pool.free(slab)
                    continue
                entry = CpuEntry(slab, s.num_tokens, s.num_tokens * self._token_bytes)
                slab.owner = "cpu"
                self.cpu.insert(s.key, entry)
                stored += 1
                if self.write_through and self.lower:
                    entry.readers += 1
                    self._writes.submit(self._write_down, s.key, entry)
        self.metrics.inc("stored_chunks", stored)
        self.metrics.tier_inc(self.cpu.name, "bytes_written",
                              sum(s.num_tokens for s in new[:len(slabs)]) * self._token_bytes)
        return stored

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
            slabs = self._slab_view(slab, k, t)
            (slabs if into_slabs else tokens).copy_(tokens if into_slabs else slabs)
            i += k

    def _slab_view(self, slab: Slab, count: int, num_tokens: int) -> torch.Tensor:
        """`count` consecutive slabs from `slab` on, each a `num_tokens` chunk: [count, 2, L, T, H*D]."""
        layers, h = self.layout.num_layers, self.layout.hidden
        shape = (count, 2, layers, num_tokens, h)
        strides = (self._slab_elems, layers * num_tokens * h, num_tokens * h, h, 1)
        return self._typed.as_strided(shape, strides, self._typed_base + slab.index * self._slab_elems)

    def _alloc_locked(self, owner: str):
        """A free slab, evicting LRU chunks as needed; None if nothing can be evicted right now."""
        while True:
            slab = self.pool.alloc(owner)
            if slab is not None:
                return slab
            if self._demoting and not self.pool.free_slabs:
                # Demotions in flight will free slabs soon; evicting more now would push the whole
                # tier to disk for one allocation.
                return None
            victim = self.cpu.pop_victim()
            if victim is None:
                return None
            key, entry = victim
            self.metrics.tier_inc(self.cpu.name, "evictions")
            if entry.persisted or not self.lower:
                self._detach_locked(entry)
            else:
                self._demoting[key] = entry
                entry.readers += 1
                self.metrics.inc("demotions")
                self._writes.submit(self._write_down, key, entry)

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

    def _write_down(self, key: ChunkKey, entry: CpuEntry, tiers: Sequence[Tier] | None = None) -> bool:
        """Background job: write one CPU chunk to the lower tiers. The caller leased the entry."""
        ok = False
        try:
            payload = self.pool.tensor(entry.slab, entry.nbytes)
            header = encode_header(key, self.layout.chunk_shape(entry.num_tokens), self.layout.dtype,
                                   tensor_bytes(payload))
            for tier in tiers or self.lower:
                ok = tier.put([PutItem(key, header, payload)])[0] or ok
        finally:
            with self._lock:
                entry.persisted = entry.persisted or ok
                if self._demoting.get(key) is entry:
                    del self._demoting[key]
                    entry.detached = True
                self._release_locked(entry)
        return ok

    # -- retrieve ------------------------------------------------------------------------------

    def get(self, spans: Sequence[ChunkSpan], out: torch.Tensor) -> int:
        """Copy the stored chunks for `spans` into `out[:, :, start:end]`, in order, stopping at the
        first chunk that no tier can serve. Returns how many chunks were copied."""
        plan = self._plan_reads(spans)
        lower = [r for r in plan if not r.from_cpu]
        # Start the first lower tier's reads, then copy the CPU hits while they run.
        started = self._submit_gets(self.lower[0], lower, range(len(lower))) if lower else []
        self._copy([(r.span, r.entry.slab) for r in plan if r.from_cpu], out, into_slabs=False)
        found = iter(self._collect_lower(lower, started))
        ok = [r.from_cpu or next(found) for r in plan]
        n = ok.index(False) if False in ok else len(plan)
        self._copy([(r.span, r.entry.slab) for r in plan[:n] if not r.from_cpu], out, into_slabs=False)
        self._finish_reads(plan, n)
        cpu_hits = len(plan) - len(lower)
        self.metrics.tier_inc(self.cpu.name, "hits", cpu_hits)
        self.metrics.tier_inc(self.cpu.name, "misses", len(spans) - cpu_hits)
        self.metrics.tier_inc(self.cpu.name, "bytes_read", sum(r.entry.nbytes for r in plan if r.from_cpu))
        return n

    def _plan_reads(self, spans: Sequence[ChunkSpan]) -> list[_Read]:
        """Lease CPU hits and allocate slabs for the rest, in prefix order."""
        plan = []
        with self._lock:
            for s in spans:
                entry = self.cpu.get(s.key) or self._demoting.get(s.key)
                if entry is not None:
                    entry.readers += 1
                    plan.append(_Read(s, entry, True))
                    continue
                slab = self._alloc_locked("read") if self.lower else None
                if slab is None:
                    break
                entry = CpuEntry(slab, s.num_tokens, s.num_tokens * self._token_bytes, persisted=True,
                                 readers=1, detached=True)
                plan.append(_Read(s, entry, False))
        return plan

    def _submit_gets(self, tier: Tier, reads: list[_Read], todo) -> list[tuple[list[int], Future]]:
        """Split one tier's batch across the read threads (disk reads overlap, sockets pipeline)."""
        todo = list(todo)
        workers = min(self._reads.threads, len(todo))
        jobs = []
        for w in range(workers):
            part = todo[w::workers]
            keys = [reads[i].span.key for i in part]
            dests = [self.pool.tensor(reads[i].entry.slab, self.pool.slab_stride) for i in part]
            jobs.append((part, self._reads.submit(tier.get, keys, dests)))
        return jobs

    def _collect_lower(self, reads: list[_Read], started) -> list[bool]:
        """Wait for the reads; ask the next tier for what the previous one missed; check geometry."""
        results: list[RecordHeader | None] = [None] * len(reads)
        jobs = started
        for t, tier in enumerate(self.lower):
            if t:
                todo = [i for i, h in enumerate(results) if h is None]
                if not todo:
                    break
                jobs = self._submit_gets(tier, reads, todo)
            asked = 0
            for part, future in jobs:
                asked += len(part)
                try:
                    headers = future.result()
                except Exception:  # a tier must not raise; if one does, its chunks are misses
                    logger.exception("%s: get failed", tier.name)
                    self.metrics.tier_inc(tier.name, "errors")
                    continue
                for i, header in zip(part, headers):
                    results[i] = self._checked(tier, header, reads[i].span)
            hits = sum(results[i] is not None for part, _ in jobs for i in part)
            self.metrics.tier_inc(tier.name, "hits", hits)
            self.metrics.tier_inc(tier.name, "misses", asked - hits)
        return [h is not None for h in results]

    def _checked(self, tier: Tier, header: RecordHeader | None, span: ChunkSpan) -> RecordHeader | None:
        if header is None or self._fits(header, span):
            return header
        logger.warning("%s: record %s has shape %s dtype %s, expected %s; dropping", tier.name, header.key,
                       header.shape, header.dtype, self.layout)
        self.metrics.tier_inc(tier.name, "corrupt")
        tier.remove([header.key])
        return None

    def _fits(self, header: RecordHeader, span: ChunkSpan) -> bool:
        return (header.codec == CODEC_RAW and header.dtype == self.layout.dtype
                and header.shape == self.layout.chunk_shape(span.num_tokens))

    def _finish_reads(self, plan: list[_Read], n: int, promote: bool | None = None) -> int:
        """Release leases; keep the first `n` lower-tier reads in the CPU tier (promotion)."""
        promote = self.promote_on_hit if promote is None else promote
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
            new = [k for k in keys if k not in self.pinned]
            self.pinned.update(new)
        return len(new)

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        with self._lock:
            gone = [k for k in keys if k in self.pinned]
            self.pinned.difference_update(gone)
        return len(gone)

    def move_down(self, keys: Sequence[ChunkKey], tier_name: str) -> int:
        """Write CPU-resident `keys` to the named lower tier and drop them from the CPU tier.
        Blocking (an administrative call). Returns how many chunks left the CPU tier."""
        tier = self.tier(tier_name)
        with self._lock:
            entries = [(k, e) for k in keys if (e := self.cpu.get(k)) is not None]
            for _, entry in entries:
                entry.readers += 1
        moved = 0
        for key, entry in entries:
            if self._write_down(key, entry, [tier]):
                with self._lock:
                    if self.cpu.get(key) is entry:
                        self._detach_locked(self.cpu.pop(key))
                        moved += 1
        return moved

    def move_up(self, spans: Sequence[ChunkSpan]) -> int:
        """Load lower-tier chunks of `spans` into the CPU tier and remove them below (a relocation:
        they are written back down if evicted later). Returns how many chunks moved."""
        plan = self._plan_reads(spans)
        lower = [r for r in plan if not r.from_cpu]
        found = self._collect_lower(lower, self._submit_gets(self.lower[0], lower, range(len(lower)))
                                    if lower else [])
        ok = iter(found)
        keep = [r.from_cpu or next(ok) for r in plan]
        n = keep.index(False) if False in keep else len(plan)
        moved = plan[:n]
        for r in moved:
            r.entry.persisted = False
        self._finish_reads(plan, n, promote=True)
        below = set()
        for tier in self.lower:
            present = tier.has([r.span.key for r in moved])
            below.update(r.span.key for r, p in zip(moved, present) if p)
            tier.remove([r.span.key for r in moved])
        return sum(1 for r in moved if not r.from_cpu or r.span.key in below)

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
                self.pinned.clear()

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
                    "owners": self.pool.owners(), "pinned_chunks": len(self.pinned),
                    "demoting_chunks": len(self._demoting), "pending_writes": self._writes.pending,
                    "pinned_memory": self.pool.pinned}

    def close(self) -> None:
        self._writes.close()
        self._reads.close()
        for tier in self.lower:
            tier.close()
