"""Recoding the records a tier below holds with another codec: `CacheEngine.compress` / `decompress`
and their key forms (what the controller's compress and decompress commands run).

    compress(engine, keys, "cachegen-2", "disk")  # -> chunks recoded
    decompress(engine, keys, None)                # raw again, in every writable tier below

What: the chunks of the cached prefix of `keys` (as a move: the leading keys some tier holds) that
the tier holds, BATCH_CHUNKS at a time, so memory stays a few raw chunks whatever the prompt's length.
Per chunk: `get` into a buffer of the raw chunk's size (a coded record is never larger), decode in
place when coded (`records.decode_in_place`), code with the target codec (`records.encode_chunk`:
raw when the codec refuses the chunk or would not shrink it), then `remove` the old record and `put`
the new one. Left alone: a record already in the target codec and level; one that is not a chunk of
this engine's layout (a retrieve drops it as corrupt); one that fails to decode is dropped, as a
retrieve would drop it (counted `corrupt` and `decode_failures`).

Readers: between the remove and the put, a retrieve of the chunk misses in that tier and recomputes
(or finds it in another tier); it never reads a mixed record (tiers replace a record whole and
verify its checksum). A store writing the chunk in between wins: the put finds the key there.

Pinned and leased chunks are skipped (checked again just before each batch's remove): the remove
drops the old record before the put writes the new one, and a put can be refused (a disk full of
pinned chunks), which would lose a chunk that a pin or lease promises to keep. Unpin to recode them.

A put the tier refuses (no room, a failing medium) loses the chunk from that tier: the tier counts
it (`rejected` or `errors`), it is logged, and it is not counted as recoded. Host memory or another
tier may still hold it; a host copy that counted on that record below is marked unwritten, so an
eviction writes it down again (the removal is marked on the write-behind, as a move up's is).

Wrappers (kvtier.tiers.coded, .adaptive): records are read from the innermost tier (an adaptive
tier would pick a level), removed through the wrapper (which removes its derived records too), and
put through it when coded (wrappers pass a coded record through) but below it when raw (a codec
wrapper would code a raw record again).

Where it runs: on the caller's thread (a blocking administrative call, like a move), inside the
storage's call gate, so `close` waits for it. It uses the StorageManager's gate, lock, pins and
write-behind as kvtier.storage_admin does (a manager's administrative call kept beside its caller).
Thread-safe: the tiers are, and host-memory state is touched under the storage lock only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvtier.codecs import cachegen_format, records
from kvtier.codecs.base import CACHEGEN_ID, RAW_ID, Codec
from kvtier.codecs.records import decode_or_drop
from kvtier.errors import CorruptRecord
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.record import RecordHeader, decode_header
from kvtier.tiers.base import PutItem, Tier
from kvtier.tiers.coded import count_coded
from kvtier.tiers.wrapped import WrappedTier

if TYPE_CHECKING:
    from kvtier.engine import CacheEngine

logger = logging.getLogger(__name__)
_log = LogLimiter(logger)

BATCH_CHUNKS = 4  # chunks read, recoded and written back at a time (a raw-sized buffer each)


@dataclass(frozen=True, slots=True)
class _Recoded:
    item: PutItem
    codec: int  # the new record's codec id
    raw_bytes: int  # the chunk's KV bytes


def compress(engine: CacheEngine, keys: Sequence[ChunkKey], codec: str, tier: str) -> int:
    """Recode the cached prefix's chunks that `tier` holds with `codec` (one of CODEC_NAMES).
    Returns chunks recoded. ValueError for an unknown codec, "cpu" (host memory holds raw KV) or
    a read-only tier; UnknownTier (a ValueError) for a tier this engine lacks."""
    target = records.codec_named(codec)
    return _recode(engine, list(keys), target, [_lower_tier(engine, tier)])


def decompress(engine: CacheEngine, keys: Sequence[ChunkKey], tier: str | None = None) -> int:
    """Recode them raw in `tier`, or in every writable tier below when None. Returns chunks recoded."""
    tiers = engine.storage.writable if tier is None else [_lower_tier(engine, tier)]
    return _recode(engine, list(keys), records.codec_named(records.RAW), tiers)


def _lower_tier(engine: CacheEngine, name: str) -> Tier:
    tier = engine.tier(name)  # UnknownTier, naming the engine's tiers
    below = [t.name for t in engine.storage.writable]
    if tier is engine.storage.cpu:
        raise ValueError(f"tier {name!r} is host memory, which holds raw KV: codecs apply to the tiers "
                         f"below ({', '.join(below) or 'none here'})")
    if not tier.writable:
        raise ValueError(f"tier {name!r} serves reads only (peers' chunks): nothing is recoded there; "
                         f"writable tiers: {', '.join(below) or 'none here'}")
    return tier


def _recode(engine: CacheEngine, keys: list[ChunkKey], codec: Codec, tiers: Sequence[Tier]) -> int:
    storage = engine.storage
    storage._gate.enter()  # (KvtierError once closing: close waits for this call)
    try:
        keys = keys[: storage.contains_prefix(keys)]
        done = 0
        for tier in tiers:
            held = [key for key, found in zip(keys, tier.has(keys)) if found]
            for start in range(0, len(held), BATCH_CHUNKS):
                done += _batch(engine, tier, held[start:start + BATCH_CHUNKS], codec)
        return done
    finally:
        storage._gate.leave()


def _batch(engine: CacheEngine, tier: Tier, keys: list[ChunkKey], codec: Codec) -> int:
    keys = [key for key in keys if key not in engine.storage.pins]  # pinned or leased: skipped
    if not keys:
        return 0
    store = _innermost(tier)
    size = engine.layout.chunk_bytes(engine.db.chunk_size)  # any chunk's raw bytes fit
    bufs = [np.empty(size, dtype=np.uint8) for _ in keys]
    recoded = []
    clears = engine.storage._writes.clears  # (a clear from here on must not be undone by the put)
    for buf, header in zip(bufs, store.get(keys, bufs), strict=True):
        if header is not None and _is_chunk(engine, header) and _codec_name(header, buf) != codec.name:
            one = _recode_one(engine, tier, header, buf, codec)
            recoded += [one] if one is not None else []
    return _replace(engine, tier, store, recoded, clears)


def _innermost(tier: Tier) -> Tier:
    while isinstance(tier, WrappedTier):
        tier = tier.inner
    return tier


def _is_chunk(engine: CacheEngine, header: RecordHeader) -> bool:
    """A record of one chunk of this engine's layout (what a retrieve would accept once decoded)."""
    layout, tokens = engine.layout, header.num_tokens
    return (0 < tokens <= engine.db.chunk_size and header.dtype == layout.dtype
            and header.shape == layout.chunk_shape(tokens)
            and (header.codec != RAW_ID or header.payload_len == layout.chunk_bytes(tokens)))


def _codec_name(header: RecordHeader, buf: np.ndarray) -> str | None:
    """The CODEC_NAMES name of what wrote the record (None when its payload does not say)."""
    if header.codec == RAW_ID:
        return records.RAW
    if header.codec != CACHEGEN_ID:
        return None
    try:
        level = cachegen_format.read_header(memoryview(buf)[: header.payload_len])[0]
    except CorruptRecord:
        return None  # decoding it fails below, which drops it
    return f"cachegen-{'lossless' if level == cachegen_format.LOSSLESS else level}"


def _recode_one(engine: CacheEngine, tier: Tier, header: RecordHeader, buf: np.ndarray,
                codec: Codec) -> _Recoded | None:
    """The chunk in `buf` (its record as read) coded with `codec`; None when it fails to decode
    (dropped, as a retrieve drops it) or stays raw as it was."""
    if decode_or_drop(tier, header, buf, engine.metrics, _log) is None:
        return None
    nbytes = math.prod(header.shape) * header.dtype.itemsize
    chunk = torch.from_numpy(buf[:nbytes]).view(header.dtype).view(header.shape)
    head, payload = records.encode_chunk(header.key, chunk, codec)
    new_codec = decode_header(head).codec
    if new_codec == header.codec == RAW_ID:
        return None  # the codec kept it raw (refused it, or would not shrink it): nothing changes
    return _Recoded(PutItem(header.key, head, np.frombuffer(payload, dtype=np.uint8)), new_codec, nbytes)


def _replace(engine: CacheEngine, tier: Tier, store: Tier, recoded: list[_Recoded], clears: int) -> int:
    """Remove the old records of `recoded` and put the new ones; how many the tier took. A clear
    begun since the records were read (`clears` changed) removes what was put: it stays cleared."""
    storage = engine.storage
    recoded = [r for r in recoded if r.item.key not in storage.pins]  # pinned while it was recoded
    if not recoded:
        return 0
    stored = dict.fromkeys((r.item.key for r in recoded), False)
    with storage._lock:
        storage._writes.begin_removal_locked()
    try:
        tier.remove(list(stored))
        for target, group in ((tier, [r for r in recoded if r.codec != RAW_ID]),
                              (store, [r for r in recoded if r.codec == RAW_ID])):
            if group:
                stored.update(zip((r.item.key for r in group), target.put([r.item for r in group])))
        if storage._writes.clears != clears:
            tier.remove([key for key, ok in stored.items() if ok])
            return 0
    finally:
        with storage._lock:
            for key, ok in stored.items():
                if not ok and (entry := storage.cpu.peek(key)) is not None:
                    entry.persisted = False  # its copy below is gone: written down again on eviction
            storage._writes.end_removal_locked()
            storage.cpu.room_below()
    _count(engine, tier, recoded, stored)
    return sum(stored.values())


def _count(engine: CacheEngine, tier: Tier, recoded: list[_Recoded], stored: dict[ChunkKey, bool]) -> None:
    count_coded(engine.metrics, [(r.raw_bytes, r.item.payload.size) for r in recoded
                                 if r.codec != RAW_ID and stored[r.item.key]])
    if lost := len(stored) - sum(stored.values()):
        _log.warning("lost", "%s refused %d recoded chunks after their old records were removed: "
                     "they are gone from %s (host memory or another tier may still hold them)",
                     tier.name, lost, tier.name)
