"""The cachegen coded record: self-describing, parsed without ever reading past what it has.

    offset  size          field
    0       4             magic b"KVCG"
    4       1             version (1)
    5       1             level (0 = lossless, 1-3 = the quantised presets)
    6       1             dtype code (kvtier.dtypes: float16, bfloat16, or float32 for the quantised
                          levels, which quantise the fp16 rounding of float32 KV)
    7       1             table grouping (0 = one per (kv, layer), 1 = one per (kv, layer, channel))
    8       12            L, T, C: three u32 (the chunk is [2, L, T, C])
    20      2L            bins per (kv, layer), u8 (bins / 2: a layer has bins - 1 symbols; 0 lossless)
    .       4LT           scales per (kv, layer, token), fp16 (quantised levels only)
    .       4             table block length, u32
    .       n             tables (`kvtier.codecs.rans_tables.pack_tables`), S tables of K symbols,
                          8-bit frequencies for grouping 1 (x 16 when coding), 12-bit for 0
    .       4S            stream lengths, u32
    .       rest          the S rANS streams, back to back (their lengths must add up to the rest)

Streams: lossless, S = 4L (kv, layer, byte plane: high then low), N = T * C symbols each, K = 256;
quantised, S = 2L of N = T * C symbols (grouping 0) or S = 2LC of N = T (grouping 1, the symbols of
channel c over the tokens), K = the largest bins - 1. All integers little-endian.

Bins are stored halved so that 256 bins fit a byte. `parse` refuses L, T or C over the caller's
bounds before touching the rest, and per-channel tables of more symbols (K) than the record has
tokens (their S x K entries would outnumber the chunk's values; the encoder groups by channel only
from 512 tokens); it checks each field's length against the bytes left before it slices it (slices
are zero-copy views), so its allocations are bounded by the caller's shape and a short or corrupt
record is a CorruptRecord. Pure functions; thread-safe.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from kvtier.codecs.rans_tables import PROB_BITS, pack_tables, unpack_tables
from kvtier.dtypes import CODES_BY_NAME
from kvtier.errors import CorruptRecord

MAGIC = b"KVCG"
VERSION = 1
LOSSLESS = 0
BY_LAYER, BY_CHANNEL = 0, 1
DTYPE_CODES = (CODES_BY_NAME["float16"], CODES_BY_NAME["bfloat16"], CODES_BY_NAME["float32"])
FLOAT32 = CODES_BY_NAME["float32"]  # quantised levels only: lossless codes 16-bit values
_HEAD = struct.Struct("<4sBBBBIII")
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class CodedRecord:
    level: int
    dtype_code: int
    grouping: int
    shape: tuple[int, int, int]  # L, T, C
    bins: np.ndarray  # uint8-range ints [2, L]; zeros for lossless
    scales: np.ndarray  # float16 [2, L, T]; empty for lossless
    tables: np.ndarray  # [S, K]
    lengths: np.ndarray  # int64 [S]
    streams: bytes | memoryview


def stream_layout(level: int, grouping: int, shape: tuple[int, int, int]) -> tuple[int, int]:
    """(S streams, N symbols per stream) of a record."""
    layers, tokens, channels = shape
    if level == LOSSLESS:
        return 4 * layers, tokens * channels
    if grouping == BY_CHANNEL:
        return 2 * layers * channels, tokens
    return 2 * layers, tokens * channels


def table_bits(grouping: int) -> int:
    """Stored precision of a record's tables: per-channel tables are many and cover few symbols, so
    8-bit frequencies (scaled by 16 to the coder's 12 bits) cost a third fewer table bits for ~0.5%
    more coded bits (benchmarks/README.md, cachegen_study.py); per-layer tables keep 12 bits."""
    return 8 if grouping == BY_CHANNEL else PROB_BITS


def table_symbols(level: int, bins: np.ndarray) -> int:
    return 256 if level == LOSSLESS else int(bins.max()) - 1


def to_bytes(rec: CodedRecord) -> bytes:
    layers, tokens, channels = rec.shape
    head = _HEAD.pack(MAGIC, VERSION, rec.level, rec.dtype_code, rec.grouping, layers, tokens, channels)
    shift = PROB_BITS - table_bits(rec.grouping)
    tables = pack_tables(np.asarray(rec.tables) >> shift, table_bits(rec.grouping))
    parts = [
        head,
        (np.asarray(rec.bins) // 2).astype(np.uint8).tobytes(),
        np.ascontiguousarray(rec.scales, dtype="<f2").tobytes(),
        _U32.pack(len(tables)),
        tables,
        np.asarray(rec.lengths, dtype="<u4").tobytes(),
        bytes(rec.streams),
    ]
    return b"".join(parts)


class _Reader:
    """Slices fields off a buffer, refusing any that run past its end."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.buf = memoryview(data).cast("B")
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.buf.nbytes - self.pos:
            raise CorruptRecord(f"cachegen record too short for its {what} ({n} bytes)")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def rest(self) -> memoryview:
        return self.buf[self.pos :]


def read_header(data: bytes | memoryview) -> tuple[int, int, int, tuple[int, int, int]]:
    """(level, dtype code, grouping, (L, T, C)) from the fixed header; CorruptRecord if malformed."""
    head = _Reader(data).take(_HEAD.size, "header")
    magic, version, level, dtype_code, grouping, *dims = _HEAD.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise CorruptRecord(f"not a cachegen record (magic {magic!r}, version {version})")
    if dtype_code not in DTYPE_CODES:
        raise CorruptRecord(f"dtype code {dtype_code} is not one cachegen codes")
    if level > 3 or grouping > BY_CHANNEL or (level == LOSSLESS and grouping != BY_LAYER):
        raise CorruptRecord(f"bad level {level} or table grouping {grouping}")
    if level == LOSSLESS and dtype_code == FLOAT32:
        raise CorruptRecord("a lossless record codes 16-bit values, not float32")
    return level, dtype_code, grouping, (int(dims[0]), int(dims[1]), int(dims[2]))


def parse(data: bytes | memoryview, max_shape: tuple[int, int, int]) -> CodedRecord:
    """The record in `data`; CorruptRecord for anything malformed or over the bounds `max_shape`
    (L, T, C). The tables are checked to give no frequency to a symbol beyond a layer's bins."""
    level, dtype_code, grouping, shape = read_header(data)
    if not all(1 <= d <= m for d, m in zip(shape, max_shape, strict=True)):
        raise CorruptRecord(f"record shape {shape} outside the bounds {max_shape}")
    r = _Reader(data)
    r.take(_HEAD.size, "header")
    layers, tokens, _ = shape
    bins = np.frombuffer(r.take(2 * layers, "bins"), dtype=np.uint8).astype(np.int64).reshape(2, layers) * 2
    _check_bins(level, bins)
    if grouping == BY_CHANNEL and table_symbols(level, bins) > tokens:
        # S x K tables would outgrow the chunk (2LC x 255 entries for a few tokens); the encoder
        # groups by channel only for hundreds of tokens, so no valid record is refused
        raise CorruptRecord(f"per-channel tables of {table_symbols(level, bins)} symbols for {tokens} tokens")
    n_scales = 0 if level == LOSSLESS else 2 * layers * tokens
    scales = np.frombuffer(r.take(2 * n_scales, "scales"), dtype="<f2").reshape(-1, layers, tokens)
    if not (np.isfinite(scales) & (scales >= 0)).all():
        raise CorruptRecord("a scale is negative or not finite")
    s, _ = stream_layout(level, grouping, shape)
    (table_len,) = _U32.unpack(r.take(_U32.size, "table length"))
    bits = table_bits(grouping)
    stored = unpack_tables(r.take(table_len, "tables"), s, table_symbols(level, bins), bits)
    tables = stored << np.uint32(PROB_BITS - bits)
    _check_table_range(level, grouping, bins, tables, shape)
    lengths = np.frombuffer(r.take(4 * s, "stream lengths"), dtype="<u4").astype(np.int64)
    return CodedRecord(level, dtype_code, grouping, shape, bins, scales, tables, lengths, r.rest())


def _check_bins(level: int, bins: np.ndarray) -> None:
    if level == LOSSLESS:
        if bins.any():
            raise CorruptRecord("a lossless record has no bins")
    elif (bins < 4).any() or (bins > 256).any():
        raise CorruptRecord("bins outside [4, 256] in a quantised record")


def _check_table_range(level: int, grouping: int, bins: np.ndarray, tables: np.ndarray, shape) -> None:
    """No table may give frequency to a symbol its layer cannot have (decoding it would put a
    value outside [-scale, scale])."""
    if level == LOSSLESS:
        return
    per_table = np.repeat(bins.reshape(-1) - 1, shape[2] if grouping == BY_CHANNEL else 1)
    beyond = np.arange(tables.shape[1])[None, :] >= per_table[:, None]
    if (tables[beyond] > 0).any():
        raise CorruptRecord("a table gives frequency to a symbol beyond its layer's bins")
