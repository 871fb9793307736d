"""Worker side of CacheBlend: read a blended request's passages, save passages under segment keys.

Where it runs: owned by a `KvtierWorkerConnector` (`enable_blend`). `read` runs on the forward pass's
thread in `start_load_kv` (tier I/O, blocking, like prefix loads); `store` on the connector's saver
thread (the KV was gathered from the paged cache before the step ended). No state of its own
beyond the engine and the model's RoPE frequencies: safe from both threads.

Positions: a segment chunk's record holds K as if its passage began at position 0
(`kvtier.blend.segments`). `read` moves it by `+passage.start`, `store` normalises by
`-passage.start` (`kvtier.blend.rope_shift.shift_keys`); V is stored as computed.

A read that misses any planned chunk (evicted since the lookup, corrupt, a tier failing) returns
None: the request is then computed normally, never blended from a partial read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier.blend.rope_shift import shift_keys
from kvtier.connector.metadata import BlendLoadSpec, SegmentSaveSpec
from kvtier.engine import CacheEngine
from kvtier.keys import ChunkSpan
from kvtier.log_limit import LogLimiter

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BlendLoad:
    """A blended request's loaded passages over its whole prompt: `kv` [2, L, T, H*D] (host; K at the
    rows' present positions), `cached` bool [T]: the rows `kv` holds. Head rows are the runner's."""

    kv: torch.Tensor
    cached: torch.Tensor
    segments_hit: int


class SegmentIO:
    def __init__(self, engine: CacheEngine, inv_freq: torch.Tensor):
        self.engine = engine
        self.inv_freq = inv_freq.detach().to("cpu", torch.float64)
        self._log = LogLimiter(logger)

    def read_all(self, specs: list[BlendLoadSpec]) -> dict[str, BlendLoad]:
        """Request id -> its passages, for the specs whose passages were all read. Releases every
        spec's lease, whatever happens."""
        loads, read = {}, 0
        try:
            for spec in specs:
                read += 1  # `read` releases the lease whatever happens
                if (load := self.read(spec)) is not None:
                    loads[spec.request_id] = load
        finally:
            for spec in specs[read:]:
                self.engine.release(spec.lease)
        return loads

    def read(self, spec: BlendLoadSpec) -> BlendLoad | None:
        """The passages of `spec` read and moved into place, or None if any planned chunk is missing.
        Releases the spec's lease whatever happens."""
        layout = self.engine.layout
        try:
            kv = torch.empty(layout.chunk_shape(len(spec.token_ids)), dtype=layout.dtype)
            cached = torch.zeros(len(spec.token_ids), dtype=torch.bool)
            for passage in spec.passages:
                got = self.engine.storage.get(passage.spans, kv)  # spans are prompt-absolute rows
                if got < len(passage.spans):
                    self._log.warning("short", "request %s: %d of %d chunks of a passage read; computing "
                                      "it normally", spec.request_id, got, len(passage.spans))
                    return None
                a, b = passage.spans[0].start, passage.spans[-1].end
                kv[0, :, a:b] = self._shift(kv[0, :, a:b], passage.start)
                cached[a:b] = True
        except Exception:  # a tier failing in an unexpected way: no blend, never a failed step
            self._log.error("read", "reading the passages of request %s failed; computing it normally",
                            spec.request_id, exc_info=True)
            return None
        finally:
            self.engine.release(spec.lease)
        return BlendLoad(kv, cached, len(spec.passages))

    def save_all(self, specs: list[SegmentSaveSpec], cache, submit: Callable) -> None:
        """On the forward pass's thread: gather each spec's rows from the paged `cache` (a `PagedKV`),
        then `submit(self.store, spec, kv)` to the saver thread. Never raises."""
        bs = cache.block_size
        for spec in specs:
            try:  # from the first passage's block on: the head's rows are not saved here
                base = spec.passages[0].spans[0].start // bs * bs
                kv = cache.gather(list(spec.block_ids[base // bs:]), spec.passages[-1].end - base)
                submit(self.store, spec, kv, base)
            except Exception:
                self._log.error("gather", "gathering the passages of request %s failed", spec.request_id,
                                exc_info=True)

    def store(self, spec: SegmentSaveSpec, kv: torch.Tensor, base: int = 0) -> int:
        """Store each passage's chunks from `kv` ([2, L, >= last end - base, H*D], the request's rows
        from `base`, gathered for this save: its K rows are shifted in place) with K normalised to the
        passage at position 0. Returns chunks newly stored; never raises (a
        passage that cannot be stored is simply not cached)."""
        stored = 0
        try:
            for passage in spec.passages:  # (passages never overlap: each shifts its own rows of `kv`)
                a, b = passage.spans[0].start - base, passage.spans[-1].end - base
                kv[0, :, a:b] = self._shift(kv[0, :, a:b], -passage.start)  # `kv` is this save's own
                spans = [ChunkSpan(s.key, s.start - base, s.end - base) for s in passage.spans]
                stored += self.engine.storage.put(spans, kv)  # rows of `kv`
        except Exception:
            self._log.error("save", "saving the passages of request %s failed", spec.request_id,
                            exc_info=True)
        return stored

    def _shift(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """`k` [L, n, H*D] moved by `delta` positions, in the same layout."""
        layout = self.engine.layout
        heads = k.unflatten(-1, (layout.num_kv_heads, layout.head_dim))
        return shift_keys(heads, delta, self.inv_freq).flatten(-2)

