"""CacheEngine: the library API that connectors, the cache server and the controller call.

    eng = CacheEngine(load_config("configs/cpu_disk.yaml"), layout, model_id="demo")
    eng.store(tokens, kv)          # kv: [2, L, T, H*D], T == len(tokens); copies, then returns
    n = eng.lookup(tokens)         # chunk-aligned prefix hit length in tokens; no payload I/O
    kv2, n = eng.retrieve(tokens)  # kv2[:, :, :n] is what was stored, bit for bit
    eng.pin(tokens); eng.unpin(tokens); eng.move(tokens, "disk"); eng.clear("cpu"); eng.tier("disk")
    eng.pin_keys(keys); eng.unpin_keys(keys); eng.move_keys(keys, "cpu", copy=True)  # the controller's
    eng.compress(tokens, "cachegen-2", "disk"); eng.decompress(tokens)  # recode records below (kvtier.recode)
    eng.stats(); eng.prometheus_text(); eng.flush(); eng.close()

With a `controller:` section in its config, the engine joins a fleet (kvtier.fleet.agent): a background
thread registers it with kvtier_controller, reports its keys and runs the controller's commands
through `kvtier.fleet.engine_member.EngineMember`; `close()` stops it first. With a `p2p:` section
too, it reads the chunks it misses from peers and serves its own to them (kvtier.p2p.setup).

Thread-safe. `store` copies the KV into host memory before it returns (the caller may reuse `kv`)
and queues lower-tier writes in the background; it never waits on the disk. `retrieve` blocks until
the returned prefix is in the output tensor. All token arguments take a list of ints or a 1-D
integer tensor / array.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import os
from collections.abc import Sequence

import numpy as np
import torch

from kvtier import recode
from kvtier.config import KvtierConfig
from kvtier.errors import KvtierError, UnknownTier
from kvtier.keys import ChunkKey, ChunkSpan, Namespace, TokenDatabase, token_count
from kvtier.layout import KVLayout
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.packed_keys import packed_keys
from kvtier.pins import PinTable
from kvtier.storage import StorageManager
from kvtier.tiers.base import Tier
from kvtier.tiers.build import build_lower_tiers, cpu_admission, tier_names, tier_policies, tier_policy
from kvtier.tiers.cpu import CpuTier

logger = logging.getLogger(__name__)

Tokens = Sequence[int] | torch.Tensor | np.ndarray
_PIN_MEMORY = {"auto": None, "on": True, "off": False}


def _shifted(spans: list[ChunkSpan], start: int) -> list[ChunkSpan]:
    """The spans at or after token `start`, renumbered so that `start` is token 0 of a buffer."""
    if not start:
        return spans
    return [ChunkSpan(s.key, s.start - start, s.end - start) for s in spans if s.start >= start]


class CacheEngine:
    def __init__(self, config: KvtierConfig, layout: KVLayout, model_id: str, tp_rank: int = 0,
                 tp_size: int = 1):
        self.config = config
        self.layout = layout
        self.db = TokenDatabase(Namespace.for_layout(model_id, layout, tp_rank, tp_size, config.salt),
                                config.chunk_size, config.save_partial_chunks)
        self.metrics = Metrics(tier_names(config))
        pool = MemoryPool(config.cpu.capacity, layout.chunk_bytes(config.chunk_size),
                          pin=_PIN_MEMORY[config.cpu.pin_memory])
        pins = PinTable()
        cpu_policy = tier_policy("cpu.policy", config.cpu.policy, pool.capacity_bytes)
        lower = build_lower_tiers(config, self.db.namespace_digest, pins.__contains__, self.metrics)
        threads = config.disk.io_threads if config.disk is not None else min(4, os.cpu_count() or 1)
        self._fleet, self._p2p = None, None
        try:
            if config.p2p is not None:  # the last tier below: peers' memory (kvtier.p2p.setup: the order)
                from kvtier.p2p.setup import PeerToPeer

                self._p2p = PeerToPeer.build(config, pool, self.db.namespace_digest, self.metrics)
            self.storage = StorageManager(layout, pool, [*lower, *([self._p2p.tier] if self._p2p else [])],
                                          self.metrics, pins=pins, write_through=config.write_through,
                                          promote_on_hit=config.promote_on_hit, io_threads=threads,
                                          cpu_policy=cpu_policy, cpu_admits=cpu_admission(config))
        except BaseException:  # nothing owns the tiers yet: close them here
            self._close_storage(None)
            for tier in lower:
                tier.close()
            raise
        logger.info("kvtier engine for %s (%s): tiers %s, cpu %d MiB, chunk %d tokens", model_id,
                    layout.describe(), self.metrics.tiers, pool.capacity_bytes >> 20, config.chunk_size)
        try:
            if self._p2p is not None:
                self._p2p.start(self.storage)
            if config.controller is not None:
                from kvtier.fleet.engine_member import join_fleet  # only when configured (HTTP stack)

                self._fleet = join_fleet(self)
        except BaseException:
            self._close_storage(self.storage)
            raise

    # -- data path -----------------------------------------------------------------------------

    def store(self, tokens: Tokens, kv: torch.Tensor, start: int = 0) -> int:
        """Cache the KV of `tokens` (whole chunks; the partial tail only if configured).
        `kv` holds tokens `start:` (a chunk boundary; the chunks before it are left alone, e.g.
        stored by an earlier call). Returns the number of chunks newly stored."""
        with self.metrics.timed("store"):
            self._check_start(start)
            self.layout.check_kv(kv, token_count(tokens) - start)
            return self.storage.put(_shifted(self.db.spans(tokens), start), kv)

    def _check_start(self, start: int) -> None:
        if start < 0 or start % self.db.chunk_size:
            raise ValueError(f"start must be a non-negative multiple of {self.db.chunk_size}, got {start}")

    def lookup(self, tokens: Tokens, only: Sequence[Tier] | None = None) -> int | None:
        """The number of leading tokens whose KV is cached (a chunk boundary). No payload I/O.
        With `only` (some of the tiers below: the local ones), host memory and those tiers are asked,
        and the answer is None (nothing counted) unless they hold every chunk of `tokens`."""
        with self.metrics.timed("lookup") as timing:
            # Only counted: packed (no object each, not remembered) where the extension takes them.
            keys = packed_keys(tokens, self.db.namespace_digest, self.db.chunk_size, self.db.save_partial)
            if keys is None:
                keys = self.db.keys(tokens)
            hit = self.storage.contains_prefix(keys, True if only is None else only)
            if only is not None and hit < len(keys):
                timing.discard()  # (the full lookup that follows is the one timed: not twice)
                return None
            count = token_count(tokens)
            n = self.db.chunk_end(hit - 1, count) if hit else 0
        self.metrics.inc("lookup_tokens", count)
        self.metrics.inc("hit_tokens", n)
        return n

    def retrieve(self, tokens: Tokens, out: torch.Tensor | None = None, start: int = 0,
                 known_hit: int | None = None) -> tuple[torch.Tensor, int]:
        """The cached KV prefix of `tokens`: `(kv, n)` with `kv[:, :, :n - start]` as stored for
        tokens `start:n` (`start` a chunk boundary: the caller already holds the tokens before it;
        n >= start whenever n > 0). `kv` is `out` narrowed when given (`[2, L, T, H*D]` with T at least
        the cached part; `len(tokens) - start` always suffices), else a new tensor.
        `known_hit`: what a `lookup` of `tokens` just returned (the connector's scheduler side). The
        chunks within it are read without asking the tiers first whether they hold them (a round
        trip per load on a shared store); one that is gone by now ends the prefix there, as always.
        It must be a non-negative integer (ValueError if negative, TypeError if not an integer)."""
        with self.metrics.timed("retrieve"):
            self._check_start(start)
            spans = self.db.spans(tokens)
            spans = _shifted(spans[:self._hit_chunks(spans, known_hit)], start)
            want = spans[-1].end if spans else 0
            if out is None:
                out = torch.empty(self.layout.chunk_shape(want), dtype=self.layout.dtype)
            else:
                self.layout.check_kv(out, want, exact=False)
            got = self.storage.get(spans, out)
            n = spans[got - 1].end + start if got else 0
        self.metrics.inc("lookup_tokens", token_count(tokens))
        self.metrics.inc("hit_tokens", n)
        return out[:, :, :max(n - start, 0)], n

    def _hit_chunks(self, spans: list[ChunkSpan], known_hit: int | None) -> int:
        """How many leading `spans` to read: those within `known_hit` tokens, else those the tiers hold."""
        if known_hit is None:
            return self.storage.contains_prefix([s.key for s in spans])
        # A lookup's answer is a token count: a float or a negative count is a caller's bug, which
        # read as "no hit" (or rounded down) would pass unnoticed as a slow miss.
        if isinstance(known_hit, bool) or operator.index(known_hit) < 0:
            raise ValueError(f"known_hit must be a non-negative token count, got {known_hit!r}")
        return sum(s.end <= known_hit for s in spans)  # spans are in token order

    def lease(self, tokens: Tokens, num_tokens: int) -> list[ChunkKey]:
        """Keep the cached chunks covering the first `num_tokens` of `tokens` in some tier until
        `release` (for a load that will follow): the CPU tier may still push them down to a tier
        below, which keeps them. Returns the keys to pass to `release`; counted per caller."""
        keys = self.db.keys(tokens)[:-(-num_tokens // self.db.chunk_size)] if num_tokens > 0 else []
        self.storage.lease(keys)
        return keys

    def release(self, keys: Sequence[ChunkKey]) -> None:
        self.storage.release(keys)

    # -- administration ------------------------------------------------------------------------
    # On a prompt's tokens, or on its chunk keys (`*_keys`: the controller's commands carry keys,
    # computed with this engine's namespace and chunk size); the token calls are the key calls.

    def pin(self, tokens: Tokens) -> int:
        """Pin the cached prefix of `tokens`: no tier evicts it. Returns chunks newly pinned."""
        return self.pin_keys(self.db.keys(tokens))

    def pin_keys(self, keys: Sequence[ChunkKey]) -> int:
        """Pin the leading `keys` some tier holds. Returns chunks newly pinned."""
        keys = list(keys)
        return self.storage.pin(keys[: self.storage.contains_prefix(keys)])

    def unpin(self, tokens: Tokens) -> int:
        return self.unpin_keys(self.db.keys(tokens))

    def unpin_keys(self, keys: Sequence[ChunkKey]) -> int:
        return self.storage.unpin(keys)

    @property
    def p2p_url(self) -> str | None:
        """Where peers read this engine's chunks (kvtier://host:port), when it has a `p2p:` section."""
        return None if self._p2p is None else self._p2p.url

    @property
    def instance_id(self) -> str | None:
        """This engine's id in its fleet, as the controller's /v1/route names it; None without a
        `controller:` section (or once closed)."""
        return None if self._fleet is None else self._fleet.instance_id

    def expect_from_peer(self, tokens: Tokens, p2p_url: str, ttl_s: float) -> int:
        """A peer (a prefill instance, through a request's kv_transfer_params) holds the chunks of
        `tokens`: for the next `ttl_s` they are read from `p2p_url` whatever the controller says
        (kvtier.p2p.directory's hints). Returns the chunks named. KvtierError without a p2p: section."""
        if self._p2p is None:
            raise KvtierError("loading KV from a peer needs a p2p: section in the kvtier config")
        keys = self.db.keys(tokens)
        self._p2p.directory.hint(keys, p2p_url, ttl_s)
        return len(keys)

    def tier(self, name: str) -> Tier | CpuTier:
        """The tier called `name` ("cpu", "disk", ...); UnknownTier (a ValueError) if there is none."""
        tiers = [self.storage.cpu, *self.storage.lower]
        for tier in tiers:
            if tier.name == name:
                return tier
        raise UnknownTier(f"no tier named {name!r}; this engine has {[t.name for t in tiers]}")

    def move(self, tokens: Tokens, tier: str, copy: bool = False) -> int:
        """Relocate the cached prefix of `tokens` into `tier` ("cpu", "disk", ...); `copy`: keep
        the source copies too. Returns chunks moved (copied)."""
        return self._move(self.db.spans(tokens), tier, copy)

    def move_keys(self, keys: Sequence[ChunkKey], tier: str, copy: bool = False,
                  num_tokens: int | None = None) -> int:
        """`move` for the leading `keys` held, of a prompt of `num_tokens` tokens. Keys carry no
        length: with save_partial_chunks and no `num_tokens`, the last one may name a partial chunk,
        which a move up would read at the wrong shape (and drop as corrupt), so a move up then leaves
        the last key out."""
        size = self.db.chunk_size
        spans = [ChunkSpan(key, i * size, self.db.chunk_end(i, (i + 1) * size if num_tokens is None
                                                            else num_tokens))
                 for i, key in enumerate(keys)]
        if spans and spans[-1].end <= spans[-1].start:
            raise ValueError(f"{len(keys)} keys do not fit a prompt of {num_tokens} tokens")
        if spans and num_tokens is None and self.db.save_partial and self.tier(tier) is self.storage.cpu:
            spans.pop()
        return self._move(spans, tier, copy)

    def _move(self, spans: list[ChunkSpan], tier: str, copy: bool) -> int:
        target = self.tier(tier)
        if target is not self.storage.cpu and not target.writable:
            raise ValueError(f"tier {tier!r} serves reads only (peers' chunks): nothing moves to it")
        spans = spans[: self.storage.contains_prefix([s.key for s in spans])]
        if target is self.storage.cpu:
            return self.storage.move_up(spans, copy=copy)
        return self.storage.move_down([s.key for s in spans], target, copy=copy)

    def compress(self, tokens: Tokens, codec: str, tier: str) -> int:
        """Recode the cached prefix's chunks in `tier` (disk, ...) with `codec`: kvtier.recode."""
        return recode.compress(self, self.db.keys(tokens), codec, tier)

    def compress_keys(self, keys: Sequence[ChunkKey], codec: str, tier: str) -> int:
        return recode.compress(self, keys, codec, tier)

    def decompress(self, tokens: Tokens, tier: str | None = None) -> int:
        """Recode them raw in `tier` (every writable tier below when None). Returns chunks recoded."""
        return recode.decompress(self, self.db.keys(tokens), tier)

    def decompress_keys(self, keys: Sequence[ChunkKey], tier: str | None = None) -> int:
        return recode.decompress(self, keys, tier)

    def clear(self, tier: str | None = None) -> None:
        """Drop every chunk from `tier` (every tier, and every pin, when None). Leases stay."""
        self.storage.clear(None if tier is None else self.tier(tier))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until queued background writes have landed. True if all did within `timeout`."""
        return self.storage.flush(timeout)

    def stats(self) -> dict:
        """Per-tier chunks, bytes, hits, misses, evictions (and more) and eviction `policy` (None for
        a store that evicts by its own), engine counters, latencies."""
        self.storage.refresh_usage()
        snapshot = self.metrics.snapshot()
        for name, policy in tier_policies(self.config).items():
            snapshot["tiers"][name]["policy"] = policy
        snapshot["tiers"]["cpu"]["admission"] = self.config.cpu.admission
        if self.config.disk is not None:
            snapshot["tiers"]["disk"]["gds"] = self._gds_status()
        return {**snapshot, "pool": dataclasses.asdict(self.storage.pool_stats())}

    def _gds_status(self) -> dict:
        """Whether the disk tier reads straight into GPU memory, and why (kvtier.tiers.gds)."""
        status = getattr(self.tier("disk"), "gds_status", None)  # (a coded disk tier hides it)
        if status is None:
            codec = self.config.disk.codec
            return {"enabled": False, "detail": f"disk.codec is {codec!r}: records are decoded on the host"}
        return dataclasses.asdict(status)

    def prometheus_text(self) -> str:
        self.storage.refresh_usage()
        return self.metrics.prometheus_text()

    def close(self) -> None:
        """Leave the fleet, drain background writes and release the tiers. The engine is unusable
        afterwards."""
        fleet, self._fleet = self._fleet, None
        try:
            if fleet is not None:
                fleet.close()  # first: no command (nor a peer's question about us) reaches a closed storage
        finally:
            self._close_storage(self.storage)

    def _close_storage(self, storage: StorageManager | None) -> None:
        """Close `storage`; with P2P, between the peer server and the endpoint (kvtier.p2p.setup)."""
        p2p, self._p2p = self._p2p, None
        if p2p is not None:
            p2p.close(storage)
        elif storage is not None:
            storage.close()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

