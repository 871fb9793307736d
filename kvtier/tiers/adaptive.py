"""Bandwidth-adaptive levels (issue 13, CacheGen's streaming adaptation): a tier that holds each chunk
at several cachegen levels and, when loading under a deadline (`load_slo_s`), reads each chunk at
the highest level whose bytes arrive in time at the bandwidth it has measured; a chunk no level can
deliver in time is late (returned None: the engine recomputes it).

    put(items)   a raw item is coded at every level (`kvtier.codecs.records.encode_chunk`): the top
                 level under the chunk's key, each lower one under `level_key(key, level)`, lower
                 levels written first (a reader that sees the base finds them, unless evicted since).
                 A level the codec did not shrink is not stored (the base serves it). Items already
                 coded (a `compress`) pass through, base key only. Cost: each chunk is coded
                 len(levels) times on the write thread (three encodes where a CodedTier runs one),
                 and the tier holds all three: ~0.49x the raw bytes at the study's ratios, about
                 twice a cachegen-3 CodedTier's (and `usage` counts records, three per chunk).
    get(keys)    plans, per call: deadline = clock() + load_slo_s; every chunk gets the lowest level in
                 key order while the estimated bytes fit bandwidth x time left (the rest are late:
                 the prefix stays a prefix), then chunks are raised, in key order, to the highest
                 level whose extra bytes still fit (when none fits, the first is still read at
                 the lowest level once per PROBE_EVERY_S: only reads retrain a bandwidth that one
                 stalled read collapsed). O(chunks x levels). One `inner.get` for the plan;
                 a missing lower-level record falls back to the base key while that still fits
                 (from the first that does not, every chunk is late: still a prefix).
                 Headers come back as the inner tier wrote them, with the base key: TierReader
                 decodes them after `get` (not here) and removes a bad one by its base key.
    remove/clear remove the derived records as well; `has` and `visible` (what `wrap` reports to
                 the fleet) know only base keys.

Estimates: bytes of a chunk at a level = raw bytes (its destination's size: the pool slab, so a
partial last chunk is over-estimated, never under) / that level's ratio, an EWMA of what this tier's
puts coded (the study's 7.97, 6.79, 4.62 until its first put); bandwidth = an EWMA of this tier's reads
(bytes that arrived / seconds), none before its first read (until then every chunk goes at the top).
Decoding (on the same read thread, after `get`) is not budgeted: only the transfer is.

Where it runs: the StorageManager's I/O threads, like any tier. TierReader splits a batch over the
read threads and each share plans alone: a thread's reads measure its share of the bandwidth, so the
shares together fit the deadline (a late chunk of one share can sit before a served one of another:
the engine keeps the prefix). Thread-safe: the estimates live under one lock, taken briefly a few
times per call, never around coding, planning or I/O. Memory: `put` holds its batch's coded payloads
(about half the raw size) and the codec's working copies; `get` only per-call lists.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import xxhash

from kvtier.codecs.records import codec_named, encode_chunk
from kvtier.ewma import RateEwma
from kvtier.keys import ChunkKey
from kvtier.metrics import Metrics
from kvtier.record import CODEC_RAW, decode_header
from kvtier.tiers.base import PutItem, Tier
from kvtier.tiers.coded import count_coded, raw_chunk
from kvtier.tiers.wrapped import WrappedTier

if TYPE_CHECKING:
    from kvtier.record import RecordHeader

LEVELS = (1, 2, 3)
STUDY_RATIOS = {1: 7.97, 2: 6.79, 3: 4.62}  # x smaller than fp16 (benchmarks/README.md, cachegen_study.py)
MIN_READ_S = 1e-6  # a read that took no measurable time (a coarse or fake clock) counts as this long
# With every chunk late, one is still read at the lowest level this often (seconds): only reads train
# the bandwidth, so after one stalled read (a suspend, a stuck link) nothing would ever be read again.
PROBE_EVERY_S = 1.0
# Derived digests start with this tag (real ones do so with probability 2^-32), then 96 bits of hash:
# a collision between two chunks' derived keys would serve one chunk's KV for the other.
_LEVEL_TAG = b"\x00kvL"


def level_key(key: ChunkKey, level: int) -> ChunkKey:
    """The key of `key`'s record at `level`: the chunk's namespace (a disk tier files and walks one
    namespace, and its clear, like Redis's and kvtier_server's, covers that namespace) and a tagged
    digest hashed from the level and the whole key."""
    return ChunkKey(key.namespace, _LEVEL_TAG + xxhash.xxh3_128_digest(bytes([level]) + key)[:12])


def is_level_key(key: ChunkKey) -> bool:
    return key.digest.startswith(_LEVEL_TAG)


@dataclasses.dataclass(frozen=True, slots=True)
class _Coded:
    """One put item's records (lower levels first, the base last) and what its coding measured."""

    records: list[PutItem]
    raw_bytes: int  # 0: passed through as it came (already coded)
    sizes: dict[int, int]  # level -> payload bytes at that level (raw_bytes where not shrunk)


@dataclasses.dataclass(frozen=True, slots=True)
class Estimates:
    bandwidth: float | None  # bytes per second, None before the first read
    ratios: dict[int, float]  # level -> raw bytes per stored byte


def plan_levels(raw: Sequence[float], ratios: Sequence[float], budget: float) -> list[int | None]:
    """Per chunk the index into `ratios` (levels, ascending) to read it at, or None for late ones
    (always a suffix): first the lowest level for each chunk in order while the sum fits `budget`,
    then each chunk in order raised to the highest level whose extra bytes still fit."""
    cost = [[nbytes / ratio for ratio in ratios] for nbytes in raw]
    plan: list[int | None] = []
    spent = 0.0
    for c in cost:
        if spent + c[0] > budget:
            break
        plan.append(0)
        spent += c[0]
    for i in range(len(plan)):
        c = cost[i]
        for level in range(len(ratios) - 1, 0, -1):
            extra = c[level] - c[0]
            if spent + extra <= budget:
                plan[i] = level
                spent += extra
                break
    return plan + [None] * (len(raw) - len(plan))


class AdaptiveTier(WrappedTier):
    def __init__(self, inner: Tier, *, metrics: Metrics, load_slo_s: float, namespace: bytes,
                 levels: Sequence[int] = LEVELS, clock: Callable[[], float] = time.monotonic):
        super().__init__(inner)
        levels = tuple(sorted(set(levels)))
        if not levels or not set(levels) <= set(LEVELS):
            raise ValueError(f"adaptive levels must be some of {LEVELS}, got {levels}")
        if not load_slo_s > 0:  # (also refuses NaN)
            raise ValueError(f"load_slo_s must be a positive number of seconds, got {load_slo_s}")
        self.metrics, self.load_slo_s, self.namespace = metrics, float(load_slo_s), namespace
        self.levels, self.top = levels, levels[-1]
        self._codecs = {level: codec_named(f"cachegen-{level}") for level in levels}
        self._clock = clock
        self._lock = threading.Lock()
        self._bandwidth = RateEwma()
        self._ratios = {level: RateEwma(STUDY_RATIOS[level]) for level in levels}
        self._probed = -math.inf  # clock() of the last probe (`_plan`)

    def visible(self, key: ChunkKey) -> bool:
        return key.namespace == self.namespace and not is_level_key(key)

    def estimates(self) -> Estimates:
        with self._lock:
            return Estimates(self._bandwidth.rate, {lv: r.rate for lv, r in self._ratios.items()})

    # -- writes --------------------------------------------------------------------------------

    def put(self, items: Sequence[PutItem]) -> list[bool]:
        coded = [self._code(item) for item in items]
        self._learn(coded)
        results = self.inner.put([record for c in coded for record in c.records])
        stored, orphans, at = [], [], 0
        for c in coded:
            at += len(c.records)
            stored.append(results[at - 1])  # each item's base record is its last
            if not results[at - 1]:
                orphans += [record.key for record in c.records[:-1]]  # unreachable without a base
        if orphans:
            self.inner.remove(orphans)
        # Counted once stored, as a CodedTier counts: what the tier holds in coded form (the base).
        count_coded(self.metrics, [(c.raw_bytes, c.sizes[self.top]) for c, ok in zip(coded, stored)
                                   if ok and c.raw_bytes and c.sizes[self.top] < c.raw_bytes])
        return stored

    def _code(self, item: PutItem) -> _Coded:
        """The records of one item: its lower levels (those that shrank), then its base."""
        chunk = raw_chunk(item)
        if chunk is None:
            return _Coded([item], 0, {})
        records, sizes = [], {}
        for level in self.levels:
            key = item.key if level == self.top else level_key(item.key, level)
            head, payload = encode_chunk(key, chunk, self._codecs[level])
            sizes[level] = len(payload)
            if level == self.top or decode_header(head).codec != CODEC_RAW:
                records.append(PutItem(key, head, np.frombuffer(payload, dtype=np.uint8)))
        return _Coded(records, chunk.nbytes, sizes)

    def _learn(self, coded: list[_Coded]) -> None:
        """Train the ratios on a batch's sizes: one sample per level per call."""
        raw = sum(c.raw_bytes for c in coded)
        if raw:
            sizes = {level: sum(c.sizes.get(level, 0) for c in coded) for level in self.levels}
            with self._lock:
                for level, size in sizes.items():
                    self._ratios[level].add(raw, size)

    def remove(self, keys: Sequence[ChunkKey]) -> int:
        keys = list(keys)
        removed = self.inner.remove(keys)  # the base first: `has` stops promising the chunk
        self.inner.remove([level_key(key, level) for key in keys for level in self.levels[:-1]])
        return removed

    # -- reads ---------------------------------------------------------------------------------

    def get(self, keys: Sequence[ChunkKey],
            dests: Sequence[torch.Tensor | np.ndarray]) -> list[RecordHeader | None]:
        deadline = self._clock() + self.load_slo_s
        keys, dests = list(keys), list(dests)
        raw = [float(dest.nbytes) for dest in dests]
        plan = self._plan(raw, deadline)
        top = len(self.levels) - 1
        picked = [i for i, p in enumerate(plan) if p is not None]  # a prefix: the rest are late
        read = [keys[i] if plan[i] == top else level_key(keys[i], self.levels[plan[i]]) for i in picked]
        results: list[RecordHeader | None] = [None] * len(keys)
        missing = []  # lower-level records not found: the base may still make it in time
        for i, header in zip(picked, self._read(read, [dests[i] for i in picked]), strict=True):
            if header is not None:
                results[i] = dataclasses.replace(header, key=keys[i])
            elif plan[i] != top:
                missing.append(i)
        first_late = len(picked)
        if missing:
            taken = self._fall_back(missing, keys, dests, raw, deadline, results)
            for i in taken:
                plan[i] = top
            if len(taken) < len(missing):
                first_late = missing[len(taken)]
        # No hole: a chunk after a late one is late too, read or not (the engine uses a prefix).
        results[first_late:] = [None] * (len(keys) - first_late)
        # A chunk served from a lower level's record keeps its base record as recent (the disk
        # tier's LRU would otherwise evict the base of the hottest chunks first, and `has` with it).
        self.touch([keys[i] for i in range(first_late) if results[i] is not None and plan[i] != top])
        served = [0] * len(self.levels)
        for i in range(first_late):
            served[plan[i]] += results[i] is not None
        for level, n in zip(self.levels, served):
            self.metrics.inc(f"adaptive_level{level}_chunks", n)
        self.metrics.inc("adaptive_late_chunks", len(keys) - first_late)
        return results

    def _snapshot(self) -> tuple[float | None, list[float]]:
        with self._lock:
            return self._bandwidth.rate, [self._ratios[level].rate for level in self.levels]

    def _plan(self, raw: list[float], deadline: float) -> list[int | None]:
        bandwidth, ratios = self._snapshot()
        if bandwidth is None:  # nothing measured yet: assume the top level fits
            return [len(self.levels) - 1] * len(raw)
        plan = plan_levels(raw, ratios, bandwidth * max(0.0, deadline - self._clock()))
        if plan and plan[0] is None and self._may_probe():
            plan[0] = 0  # a probe: costs one lowest-level chunk past the SLO, once per PROBE_EVERY_S
        return plan

    def _may_probe(self) -> bool:
        now = self._clock()
        with self._lock:  # one probe per interval across the read threads
            if not now - self._probed >= PROBE_EVERY_S:
                return False
            self._probed = now
            return True

    def _fall_back(self, todo: list[int], keys: list[ChunkKey], dests: list, raw: list[float],
                   deadline: float, results: list) -> list[int]:
        """Read the base records of `todo` in key order while they fit the time left (at the
        bandwidth the first read just updated); the rest are late. Fills `results`; returns the
        chunks it read (a prefix of `todo`)."""
        bandwidth, ratios = self._snapshot()
        room = (bandwidth or 0.0) * max(0.0, deadline - self._clock())
        take = []
        for i in todo:
            cost = raw[i] / ratios[-1]
            if cost > room:
                break
            take.append(i)
            room -= cost
        for i, header in zip(take, self._read([keys[i] for i in take], [dests[i] for i in take]),
                             strict=True):
            results[i] = header  # (read by the base key: its header says so already)
        return take

    def _read(self, keys: list[ChunkKey], dests: list) -> list[RecordHeader | None]:
        """`inner.get`, timed: the bytes that arrived train the bandwidth (misses add nothing)."""
        if not keys:
            return []
        start = self._clock()
        headers = self.inner.get(keys, dests)
        took = self._clock() - start
        nbytes = sum(h.payload_len for h in headers if h is not None)
        if nbytes:
            with self._lock:
                self._bandwidth.add(nbytes, max(took, MIN_READ_S))
        return headers

