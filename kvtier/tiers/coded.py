"""CodedTier: a tier whose writes are coded by the codec its config names (`codec: cachegen-2` on
a disk, redis or remote section), so that the bytes crossing the medium shrink several times.

    tier = wrap(CodedTier, DiskTier(...), codec_named("cachegen-2"), metrics)   # kvtier.tiers.wrapped

Only writes change: `put` codes each raw record (`kvtier.codecs.records.encode_chunk`, which keeps a
chunk raw when the codec refuses it, e.g. non-finite KV for a lossy level, or would not shrink it)
and passes records already coded through untouched (a `CacheEngine.compress` chose their codec), then
hands the batch to the inner tier in one `put`. Reads pass through: every record comes back as
stored and `kvtier.transfers.TierReader` decodes it on the read thread, so a chunk is decoded once,
when promoted into host memory, and a tier holds records of several codecs at once (a codec changed
in the config) without any of them becoming unreadable. `with_codec` builds the wrapper a tier's
config section asks for (`build_lower_tiers`).

Where it runs: `put` on the StorageManager's write threads (coding costs CPU there, not on the
retrieving thread). Thread-safe: the codec holds only its settings and the wrapper no state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from kvtier.codecs.base import RAW_ID, Codec
from kvtier.codecs.records import RAW, codec_named, encode_chunk
from kvtier.config_checks import ADAPTIVE
from kvtier.metrics import Metrics
from kvtier.record import decode_header
from kvtier.tiers.base import PutItem, Tier
from kvtier.tiers.wrapped import WrappedTier, wrap

logger = logging.getLogger(__name__)


class CodedTier(WrappedTier):
    def __init__(self, inner: Tier, codec: Codec, metrics: Metrics):
        super().__init__(inner)
        self.codec = codec
        self.metrics = metrics

    def put(self, items: Sequence[PutItem]) -> list[bool]:
        coded = [self._coded(item) for item in items]
        stored = self.inner.put([item for item, _ in coded])
        # Counted once stored: the counters say what the tier holds in coded form.
        count_coded(self.metrics, [(raw, item.payload.nbytes) for (item, raw), ok in zip(coded, stored)
                                   if ok and raw])
        return stored

    def _coded(self, item: PutItem) -> tuple[PutItem, int]:
        """(the item to store, the raw bytes it coded: 0 when it is stored as it came)."""
        chunk = raw_chunk(item)
        if chunk is None:
            return item, 0  # already coded (a compress chose its codec): kept as it is
        coded_header, coded = encode_chunk(item.key, chunk, self.codec)
        if decode_header(coded_header).codec == RAW_ID:
            return item, 0  # refused or not smaller: stored raw, as it came
        return PutItem(item.key, coded_header, np.frombuffer(coded, dtype=np.uint8)), chunk.nbytes


def raw_chunk(item: PutItem) -> torch.Tensor | None:
    """The chunk a raw record carries, as a [2, L, T, C] tensor over its payload (no copy: a slab or
    a numpy array); None for a record already coded."""
    header = decode_header(item.header)
    if header.codec != RAW_ID:
        return None
    payload = item.payload
    raw = torch.from_numpy(payload) if isinstance(payload, np.ndarray) else payload
    return raw.view(header.dtype).view(header.shape)


def count_coded(metrics: Metrics, stored: Sequence[tuple[int, int]]) -> None:
    """The coded_* engine counters for chunks stored coded: (raw bytes, coded bytes) of each."""
    if stored:
        metrics.inc("coded_chunks", len(stored))
        metrics.inc("coded_raw_bytes", sum(raw for raw, _ in stored))
        metrics.inc("coded_bytes", sum(size for _, size in stored))


def with_codec(tier: Tier, codec: str, load_slo_s: float | None, *, namespace: bytes,
               metrics: Metrics) -> Tier:
    """`tier` as its config section's `codec` asks: itself for raw (so code reaching a tier's
    internals through the StorageManager keeps working), a `CodedTier` for one cachegen level, an
    `AdaptiveTier` for `cachegen-adaptive` (a chunk at several levels, read under `load_slo_s`)."""
    if codec == RAW:
        return tier
    if codec == ADAPTIVE:
        from kvtier.tiers.adaptive import AdaptiveTier  # imported only when configured

        return wrap(AdaptiveTier, tier, metrics=metrics, load_slo_s=load_slo_s, namespace=namespace)
    return wrap(CodedTier, tier, codec_named(codec), metrics)
