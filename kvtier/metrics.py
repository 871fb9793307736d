"""Counters and latency histograms behind `CacheEngine.stats()`, exported as Prometheus text.

Each CacheEngine owns one `Metrics` with its own `CollectorRegistry` (no process-global state, so
two engines in one process never mix numbers). Hot paths update a counter once per batch, never per
chunk. Occupancy gauges are refreshed from the tiers when stats or the exposition are read.

Tier counters (`tier_inc(tier, name, n)`, exported as `kvtier_tier_<name>_total{tier=...}`): one
style for every tier, so that a number means the same thing whichever tier it comes from.

- Units: every tier counter counts chunks (one chunk = one record), except `bytes_read` and
  `bytes_written`, which count payload bytes (the KV, not the record header). `n` is an int >= 0.
- `errors`: chunks whose operation failed with an I/O or connection error (a failed pipelined or
  batched call counts every chunk it carried, not 1; a call about no chunk in particular, such as
  `usage` or `clear`, counts 1). A failure is counted where it is caught: by the tier (a `Tier`
  never raises for a failing medium), or by `kvtier/transfers.py` for a tier that raised anyway.
- `corrupt`: records dropped because they failed validation (`kvtier.record.verify`) or do not fit
  the request (codec, shape, dtype): each is deleted from the tier and never served.
- `rejected`: chunks a store did not take for want of room (everything evictable is pinned or in
  flight) or because the store refused them (kvtier_server's INVALID or TOO_LARGE); not failures.
- `declined`: chunks a store put in the tier as its next victims instead of into its eviction order
  (its admission rule, `kvtier.admission`); they are held, and written below, all the same.
- `evictions`: chunks the tier itself evicted to make room (the CPU tier's include those demoted).
  Stores that evict on their own (Redis, kvtier_server) are not counted here.
- `hits`, `misses`: counted by whoever asked, once per batch: the StorageManager for the CPU tier,
  `kvtier/transfers.py` for the tiers below. A tier never counts its own hits or misses.

`tier_inc` enforces what it can: the name is one of `TIER_COUNTERS`, the tier one this `Metrics`
was made for (a count for another would reach no snapshot), and `n` an integer (`operator.index`:
numpy integers are fine, floats are not) that is not negative.

Engine counters (`inc`) count tokens (`*_tokens`), chunks (`*_chunks`, `promotions`, `demotions`),
payload bytes (`*_bytes`) or leases (`p2p_leases*`). `kvtier_server` keeps its own counters
(`StoreCounters`, `ServerStats`, returned by STATS) in the same units: records where a name is about
records (`hits`, `evictions`, `spill_errors`), requests, frames or connections where it says so
(`errors` there is requests that failed).
"""

from __future__ import annotations

import operator
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets from 50 us to 10 s: lookups live at the low end, disk retrieves of many
# 32 MiB chunks at the high end.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)

TIER_COUNTERS = {
    "hits": "chunks served by this tier",
    "misses": "chunks looked for in this tier and not found there",
    "evictions": "chunks evicted from this tier",
    "corrupt": "records that failed validation and were dropped",
    "errors": "chunks whose operation failed with an I/O or connection error",
    "bytes_read": "payload bytes read from this tier",
    "bytes_written": "payload bytes written to this tier",
    "rejected": "chunks this tier could not accept (full of pinned or in-flight chunks)",
    "declined": "chunks stored as this tier's next victims by its admission rule",
}
ENGINE_COUNTERS = {
    "lookup_tokens": "tokens asked for by lookup and retrieve",
    "hit_tokens": "tokens found by lookup and retrieve",
    "stored_chunks": "chunks newly stored",
    "deduplicated_chunks": "chunks a store skipped because they were already cached",
    "promotions": "chunks copied up into the CPU tier on a hit",
    "demotions": "chunks written down to a lower tier when evicted from the CPU tier",
    # The P2P endpoint (kvtier.p2p.peer_server): what this instance served to its peers.
    "p2p_served_chunks": "chunks served to peers (TCP replies and leased slabs)",
    "p2p_served_bytes": "payload bytes served to peers",
    "p2p_leases": "leases granted to peers",
    "p2p_leases_expired": "leases that expired before their reader released them",
    # Codecs (kvtier.codecs; per tier in the config): what was coded on the way down, decoded on the way up.
    "coded_chunks": "chunks written below by a codec other than raw",
    "coded_raw_bytes": "KV bytes of those chunks before coding",
    "coded_bytes": "payload bytes of those chunks after coding",
    "decoded_chunks": "coded records decoded on a read from below",
    "decode_failures": "coded records that failed to decode (dropped as corrupt)",
    # Bandwidth-adaptive levels (kvtier.tiers.adaptive): the level each loaded chunk arrived at.
    "adaptive_level1_chunks": "chunks an adaptive tier loaded at cachegen level 1",
    "adaptive_level2_chunks": "chunks an adaptive tier loaded at cachegen level 2",
    "adaptive_level3_chunks": "chunks an adaptive tier loaded at cachegen level 3",
    "adaptive_late_chunks": "chunks an adaptive tier left to recompute: no level could arrive in time",
    # CacheBlend (kvtier.blend, the engine's blended prefill): counted once per blended request.
    "blend_requests": "requests whose prompt was blended from cached passages",
    "blend_failures": "planned blends that raised; their requests were computed by a normal prefill",
    "blend_segments_hit": "passages of blended requests whose cached KV was loaded",
    "blend_tokens_reused": "prompt tokens of blended requests that kept their loaded KV",
    "blend_tokens_recomputed": "prompt tokens of blended requests past the head computed in every layer",
}
# Host memory and what holds it, refreshed with the tier occupancy (gauges, not counters).
POOL_GAUGES = {
    "leased_chunks": "chunks leased by requests about to load them",
    "pinned_chunks": "chunks pinned by users",
    "pool_slabs_used": "memory-pool slabs in use (CPU tier, in-flight reads and demotions)",
    "pool_slabs_total": "memory-pool slabs",
    "pool_bytes_used": "memory-pool bytes in use",
}
OPERATIONS = ("lookup", "store", "retrieve")


class Metrics:
    def __init__(self, tiers: list[str]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.tiers = list(tiers)
        self._tier = {name: Counter(f"kvtier_tier_{name}", doc, ["tier"], registry=self.registry)
                      for name, doc in TIER_COUNTERS.items()}
        self._engine = {name: Counter(f"kvtier_{name}", doc, registry=self.registry)
                        for name, doc in ENGINE_COUNTERS.items()}
        reg = self.registry
        self._chunks = Gauge("kvtier_tier_chunks", "chunks held by the tier", ["tier"], registry=reg)
        self._bytes = Gauge("kvtier_tier_bytes", "bytes held by the tier", ["tier"], registry=reg)
        self._capacity = Gauge("kvtier_tier_capacity_bytes", "byte bound of the tier", ["tier"], registry=reg)
        self._pool = {name: Gauge(f"kvtier_{name}", doc, registry=reg) for name, doc in POOL_GAUGES.items()}
        self._latency = Histogram("kvtier_operation_seconds", "latency of CacheEngine operations",
                                  ["op"], buckets=LATENCY_BUCKETS, registry=self.registry)
        # Every series exists at zero from the start, so exports are stable; the children are
        # looked up once here, not per increment.
        self._tier_children = {(tier, name): counter.labels(tier=tier)
                               for tier in self.tiers for name, counter in self._tier.items()}
        self._op_latency = {op: self._latency.labels(op=op) for op in OPERATIONS}

    def tier_inc(self, tier: str, name: str, amount: int = 1) -> None:
        """Add `amount` (chunks, or bytes for bytes_*: see the module docstring) to a tier counter."""
        child = self._tier_children.get((tier, name))
        if child is None:
            known = sorted(TIER_COUNTERS) if name not in TIER_COUNTERS else self.tiers
            what = f"tier counter {name!r}" if name not in TIER_COUNTERS else f"tier {tier!r}"
            raise KeyError(f"no {what} here; known: {', '.join(known)}")
        if amount:
            child.inc(operator.index(amount))

    def inc(self, name: str, amount: int = 1) -> None:
        counter = self._engine.get(name)
        if counter is None:
            raise KeyError(f"no engine counter {name!r}; known: {', '.join(sorted(ENGINE_COUNTERS))}")
        if amount:
            counter.inc(operator.index(amount))

    def timed(self, op: str) -> _Timed:
        """A context that observes its duration as the latency of `op` (on exit, raised or not)."""
        return _Timed(self._op_latency.get(op) or self._latency.labels(op=op))

    def set_usage(self, tier: str, chunks: int, nbytes: int, capacity: int) -> None:
        self._chunks.labels(tier=tier).set(chunks)
        self._bytes.labels(tier=tier).set(nbytes)
        self._capacity.labels(tier=tier).set(capacity)

    def set_pool(self, **values: int) -> None:
        """Set the POOL_GAUGES (every one of them, by name)."""
        if values.keys() != POOL_GAUGES.keys():
            raise ValueError(f"pool gauges are {sorted(POOL_GAUGES)}, got {sorted(values)}")
        for name, value in values.items():
            self._pool[name].set(value)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def snapshot(self) -> dict:
        """Plain-dict view: per-tier counters and occupancy, engine counters and pool gauges, latency
        summaries."""
        tiers = {}
        for tier in self.tiers:
            row = {"chunks": int(self.value("kvtier_tier_chunks", {"tier": tier})),
                   "bytes": int(self.value("kvtier_tier_bytes", {"tier": tier})),
                   "capacity_bytes": int(self.value("kvtier_tier_capacity_bytes", {"tier": tier}))}
            for name in TIER_COUNTERS:
                row[name] = int(self.value(f"kvtier_tier_{name}_total", {"tier": tier}))
            tiers[tier] = row
        engine = {name: int(self.value(f"kvtier_{name}_total")) for name in ENGINE_COUNTERS}
        engine.update({name: int(self.value(f"kvtier_{name}")) for name in POOL_GAUGES})
        latency = {}
        for op in OPERATIONS:
            count = self.value("kvtier_operation_seconds_count", {"op": op})
            total = self.value("kvtier_operation_seconds_sum", {"op": op})
            latency[op] = {"count": int(count), "mean_s": total / count if count else 0.0}
        return {"tiers": tiers, **engine, "latency": latency}

    def prometheus_text(self) -> str:
        return generate_latest(self.registry).decode()


class _Timed:
    """`Metrics.timed`'s context: a class with the histogram child looked up once, not a generator
    context manager that looked it up on exit (1.5 us a call against 3.4: a 32K-token tensor's
    lookup takes 50-90 us in all, and its target is 100)."""

    __slots__ = ("_child", "_start")

    def __init__(self, child) -> None:
        self._child = child

    def __enter__(self) -> _Timed:
        self._start = time.perf_counter()
        return self

    def discard(self) -> None:
        """Observe nothing on exit: the operation did not happen after all (a probe with no answer)."""
        self._child = None

    def __exit__(self, *exc_info: object) -> None:  # (returns None: an exception goes on)
        if self._child is not None:
            self._child.observe(time.perf_counter() - self._start)
