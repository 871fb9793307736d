"""Records whose payload a codec wrote: a codec by its config name, a chunk coded into a record, and
a record's payload decoded back into a chunk, whichever codec wrote it.

    codec = codec_named("cachegen-2")                    # names: CODEC_NAMES
    header, payload = encode_chunk(key, chunk, codec)    # chunk: contiguous CPU [2, L, T, C]
    decode_chunk(decode_header(header), payload, out)    # out: [2, L, T, C] of the record's dtype

`encode_chunk` stores the chunk raw instead when the codec refuses it (non-finite KV for a lossy
level) or its coding is no smaller than the raw bytes, so a coded record is never larger than the
chunk: a reader may read one into a buffer sized for the raw chunk. `decode_chunk` picks the decoder
from the header's codec id (any cachegen record decodes with any cachegen codec: the payload names
its level), so a tier holds records of several codecs at once (a codec changed in the config, a
`compress` of some chunks). Pure functions; thread-safe (codecs hold only their settings).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvtier.codecs.base import CACHEGEN_ID, CODEC_NAMES, RAW_ID, Codec
from kvtier.codecs.cachegen import CachegenCodec
from kvtier.codecs.raw import RawCodec
from kvtier.errors import CorruptRecord
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.record import RecordHeader, encode_header, tensor_bytes

if TYPE_CHECKING:
    from kvtier.tiers.base import Tier

logger = logging.getLogger(__name__)
_log = LogLimiter(logger)  # a model whose KV has infinities refuses every chunk: one line a minute

RAW = CODEC_NAMES[0]
_DECODERS: dict[int, Codec] = {RAW_ID: RawCodec(), CACHEGEN_ID: CachegenCodec(2)}


def codec_named(name: str) -> Codec:
    """The codec a config names (`CODEC_NAMES`); ValueError for any other name."""
    if name == RAW:
        return _DECODERS[RAW_ID]
    if name in CODEC_NAMES:
        level = name.removeprefix("cachegen-")
        return CachegenCodec("lossless" if level == "lossless" else int(level))
    raise ValueError(f"unknown codec {name!r}; one of {', '.join(CODEC_NAMES)}")


def encode_chunk(key: ChunkKey, chunk: torch.Tensor, codec: Codec) -> tuple[bytes, bytes | memoryview]:
    """(record header, payload) of `chunk` under `codec`, or raw (zero-copy over `chunk`) when the
    codec refuses the chunk or would not shrink it. ValueError for a chunk that is not a contiguous
    CPU tensor [2, L, T, C]."""
    raw = tensor_bytes(chunk)
    payload: bytes | memoryview = raw
    codec_id = RAW_ID
    if codec.codec_id != RAW_ID:
        try:
            coded = codec.encode(chunk)
        except ValueError as exc:
            _log.warning(("refused", codec.name), "%s refused chunk %s (%s): stored raw", codec.name, key,
                         exc)
        else:
            if len(coded) < raw.nbytes:
                payload, codec_id = coded, codec.codec_id
    return encode_header(key, tuple(chunk.shape), chunk.dtype, payload, codec=codec_id), payload


def decode_chunk(header: RecordHeader, payload: bytes | memoryview, out: torch.Tensor) -> None:
    """Decode a verified record's payload into `out` (its shape and dtype must be the header's).
    CorruptRecord for an unknown codec id or a payload that is not a valid coding; ValueError for an
    `out` that does not match the header."""
    decoder = _DECODERS.get(header.codec)
    if decoder is None:
        raise CorruptRecord(f"record {header.key} has unknown codec id {header.codec}")
    if tuple(out.shape) != header.shape or out.dtype != header.dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} does not match record {header.shape} "
                         f"{header.dtype}")
    decoder.decode(payload, out)


def decode_in_place(header: RecordHeader, buf: np.ndarray) -> bool:
    """Decode a verified coded record whose payload was read into the start of `buf` (1-D uint8),
    leaving the raw chunk at the start of `buf`. False for a raw record (nothing to do), True once
    decoded. CorruptRecord when the raw chunk would not fit `buf` or the payload is not a valid
    coding. Copies the (smaller) coded payload out first: decoding writes over it."""
    if header.codec == RAW_ID:
        return False
    nbytes = math.prod(header.shape) * header.dtype.itemsize
    if nbytes > buf.size or header.payload_len > buf.size:
        raise CorruptRecord(f"record {header.key}: {nbytes} decoded bytes do not fit {buf.size}")
    coded = buf[: header.payload_len].tobytes()
    out = torch.from_numpy(buf[:nbytes]).view(header.dtype).view(header.shape)
    decode_chunk(header, coded, out)
    return True


def drop_record(tier: Tier, key: ChunkKey, metrics: Metrics) -> None:
    """A record of `tier` found bad after it was read (it does not decode, fit or pass its checksum):
    counted as the tier's `corrupt` and removed there, so that lookups stop promising it."""
    metrics.tier_inc(tier.name, "corrupt")
    tier.remove([key])


def decode_or_drop(tier: Tier, header: RecordHeader, buf: np.ndarray, metrics: Metrics,
                   log: LogLimiter) -> bool | None:
    """Decode the record of `header`, read into `buf`, in place (`decode_in_place`): True
    once decoded, False for a raw record; None for one that does not decode, which is logged,
    counted (the tier's `corrupt`, `decode_failures`) and removed from `tier`: a miss."""
    try:
        decoded = decode_in_place(header, buf)
    except (CorruptRecord, ValueError) as exc:  # ValueError: a codec refusing the dtype (fp8 KV)
        log.warning((tier.name, "decode"), "%s: record %s failed to decode (%s); dropping", tier.name,
                    header.key, exc)
        metrics.inc("decode_failures")
        drop_record(tier, header.key, metrics)
        return None
    metrics.inc("decoded_chunks", int(decoded))
    return decoded
