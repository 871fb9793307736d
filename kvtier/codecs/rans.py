"""Static-model rANS, byte-wise renormalisation, 32-bit state: the numpy reference.

The cachegen codec codes one stream per (layer, channel), each with its own frequency table
(`kvtier.codecs.rans_tables`), so the batched forms are the primary API: S independent streams of
N symbols each are coded in lockstep, one numpy step per symbol position. The C++ port in `csrc/`
must produce the same bytes.

Stream format (what the C++ port matches byte for byte):

    state    L = 2**23; the coder state stays in [L, 256 L) between symbols.
    encode   from the last symbol to the first, starting at x = L: for symbol s with frequency f
             and cumulative start c, emit x & 0xff and shift x right 8 while
             x >= (L >> PROB_BITS << 8) * f; then x = (x // f << PROB_BITS) + x % f + c.
             Finally emit the 4 bytes of x, low first. The stream is the emitted bytes reversed
             (so it opens with the final state, big-endian).
    decode   x = first 4 bytes (big-endian); per symbol: slot = x & (PROB_SCALE - 1), s = the
             symbol whose [c, c + f) holds slot, x = f * (x >> PROB_BITS) + slot - c, then while
             x < L: x = x << 8 | next byte.
    checks   a valid stream ends with x == L and every byte consumed; the decoder raises
             CorruptRecord otherwise, and for a start state outside [L, 256 L), a read past the
             stream's end, bad tables, or lengths that do not add up to the data. Each symbol reads
             at most 2 bytes, so a decode costs O(S * count) whatever the bytes say, and `count` is
             bounded by the caller's `max_count`. A corrupt stream may still decode without an
             error: callers checksum the record.

Pure functions; thread-safe; memory: the symbols, the coded bytes and O(S * 2N) bytes of scratch on
encode.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvtier.codecs.rans_tables import PROB_BITS, PROB_SCALE, check_tables
from kvtier.errors import CorruptRecord

RANS_L = 1 << 23
STATE_BYTES = 4
MAX_COUNT = 1 << 20  # default bound on symbols per stream for decode
_RENORM = (PROB_BITS + 7) // 8  # bytes a symbol can move at most (2 for PROB_BITS <= 16)
_LUT_CELLS = 1 << 24  # slot -> symbol lookup entries built at once while decoding (16 MiB)


@dataclass(frozen=True, slots=True)
class EncodedStreams:
    """S coded streams concatenated in `data`; stream i is lengths[i] bytes, in order."""

    data: bytes
    lengths: np.ndarray  # int64 [S]


def _cumulative(tables: np.ndarray) -> np.ndarray:
    return np.cumsum(tables, axis=1) - tables


def encode_streams(symbols: np.ndarray, tables: np.ndarray) -> EncodedStreams:
    """Code symbols [S, N] (stream i with tables[i]); ValueError for a symbol out of range or of
    frequency 0, or invalid tables."""
    freqs = check_tables(tables)
    sym = np.asarray(symbols)
    if sym.ndim != 2 or sym.shape[0] != freqs.shape[0] or sym.dtype.kind not in "iu":
        raise ValueError(f"symbols must be integers [S, N] with S = {freqs.shape[0]}, got {sym.shape}")
    sym = sym.astype(np.intp, copy=False)
    if sym.size and (sym.min() < 0 or sym.max() >= freqs.shape[1]):
        raise ValueError(f"symbol out of range [0, {freqs.shape[1]})")
    if not np.take_along_axis(freqs > 0, sym, axis=1).all():
        raise ValueError("a symbol with frequency 0 cannot be coded")
    emitted, used = _encode_lockstep(sym, freqs.astype(np.uint64), _cumulative(freqs).astype(np.uint64))
    return EncodedStreams(_gather_reversed(emitted, used), used)


def _encode_lockstep(sym: np.ndarray, freqs: np.ndarray, cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Emitted bytes [S, cap] in emission order and their counts [S], coding S streams at once.
    Frequencies are looked up per position, so scratch stays O(S) besides the output."""
    s, n = sym.shape
    rows = np.arange(s)
    out = np.zeros((s, _RENORM * n + STATE_BYTES + 1), dtype=np.uint8)
    used = np.zeros(s, dtype=np.int64)
    x = np.full(s, RANS_L, dtype=np.uint64)
    bound = np.uint64((RANS_L >> PROB_BITS) << 8)
    shift, eight, mask = np.uint64(PROB_BITS), np.uint64(8), np.uint64(0xFF)
    for i in range(n - 1, -1, -1):
        col = sym[:, i]
        fi = freqs[rows, col]
        x_max = bound * fi
        for _ in range(_RENORM):
            # Write every row's low byte, advance only the rows that emit: branch-free, and the
            # stray writes land past `used`, where the next real byte overwrites them.
            out[rows, used] = x & mask
            move = x >= x_max
            used += move
            x = np.where(move, x >> eight, x)
        x = ((x // fi) << shift) + x % fi + cum[rows, col]
    for _ in range(STATE_BYTES):
        out[rows, used] = x & mask
        used += 1
        x >>= eight
    return out, used


def _gather_reversed(emitted: np.ndarray, used: np.ndarray) -> bytes:
    """Each row's first used[i] bytes, reversed, rows concatenated."""
    starts = np.cumsum(used) - used
    row = np.repeat(np.arange(used.size), used)
    k = np.arange(int(used.sum())) - starts[row]
    return emitted[row, used[row] - 1 - k].tobytes()


def decode_streams(
    data: bytes | memoryview, lengths: np.ndarray, tables: np.ndarray, count: int, max_count: int = MAX_COUNT
) -> np.ndarray:
    """Symbols [S, count] (uint8) from `encode_streams` output; CorruptRecord for anything that is
    not a valid coding (module docstring), including count > max_count."""
    freqs = check_tables(tables, CorruptRecord)
    if not 0 <= count <= max_count:
        raise CorruptRecord(f"symbol count {count} outside [0, {max_count}]")
    buf = np.frombuffer(data, dtype=np.uint8)
    lens = np.asarray(lengths)
    if lens.shape != (freqs.shape[0],) or lens.dtype.kind not in "iu":
        raise CorruptRecord(f"need {freqs.shape[0]} integer stream lengths, got {lens.shape}")
    lens = lens.astype(np.int64)
    # each length within the data first: a sum of int64 lengths could wrap around to the size
    if (lens < STATE_BYTES).any() or (lens > buf.size).any() or int(lens.sum()) != buf.size:
        raise CorruptRecord(f"stream lengths do not add up to the {buf.size} data bytes")
    starts = np.cumsum(lens) - lens
    out = np.empty((freqs.shape[0], count), dtype=np.uint8)  # symbols < MAX_SYMBOLS = 256
    block = max(1, _LUT_CELLS // PROB_SCALE)
    for lo in range(0, freqs.shape[0], block):
        part = slice(lo, lo + block)
        out[part] = _decode_block(buf, starts[part], lens[part], freqs[part], count, lo)
    return out


def _decode_block(buf, starts, lens, freqs, count: int, first: int) -> np.ndarray:
    """Decode one block of streams in lockstep; `first` numbers the streams in error messages."""
    s, k = freqs.shape
    rows = np.arange(s)
    lut = np.repeat(np.tile(np.arange(k, dtype=np.uint8), s), freqs.ravel()).reshape(s, PROB_SCALE)
    f64, c64 = freqs.astype(np.uint64), _cumulative(freqs).astype(np.uint64)
    head = buf[starts[:, None] + np.arange(STATE_BYTES)].astype(np.uint64)
    x = (head << np.arange(24, -1, -8, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)  # big-endian
    _require(rows, (x < RANS_L) | (x >= RANS_L << 8), first, "start state out of range")
    pos = starts + STATE_BYTES
    ends = starts + lens
    last = max(buf.size - 1, 0)
    shift, eight, slot_mask = np.uint64(PROB_BITS), np.uint64(8), np.uint64(PROB_SCALE - 1)
    out = np.empty((s, count), dtype=np.uint8)
    for i in range(count):
        slot = x & slot_mask
        sym = lut[rows, slot.astype(np.intp)]
        out[:, i] = sym
        x = f64[rows, sym] * (x >> shift) + slot - c64[rows, sym]
        for _ in range(_RENORM):
            need = x < RANS_L
            _require(rows, need & (pos >= ends), first, "stream ends before its symbols do")
            byte = buf[np.minimum(pos, last)].astype(np.uint64)
            x = np.where(need, (x << eight) | byte, x)
            pos += need
    _require(rows, x != RANS_L, first, "final state is not the initial one")
    _require(rows, pos != ends, first, "bytes left over after the last symbol")
    return out


def _require(rows: np.ndarray, bad: np.ndarray, first: int, what: str) -> None:
    if bad.any():
        raise CorruptRecord(f"rANS stream {first + int(rows[bad][0])}: {what}")


def encode(symbols: np.ndarray, freqs: np.ndarray) -> bytes:
    """One stream: `encode_streams` with S = 1."""
    return encode_streams(np.asarray(symbols).reshape(1, -1), np.asarray(freqs).reshape(1, -1)).data


def decode(data: bytes | memoryview, freqs: np.ndarray, count: int, max_count: int = MAX_COUNT) -> np.ndarray:
    """One stream of `count` symbols: `decode_streams` with S = 1."""
    lengths = np.array([len(memoryview(data))], dtype=np.int64)
    return decode_streams(data, lengths, np.asarray(freqs).reshape(1, -1), count, max_count)[0]

