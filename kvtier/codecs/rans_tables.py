"""Frequency tables for the rANS coder (`kvtier.codecs.rans`): build, check, pack and unpack.

A table is one row of K frequencies (K <= 256 symbols) summing to exactly `PROB_SCALE`; a batch of
tables is an [S, K] array, one row per stream. Everything here is integer arithmetic so that the
C++ port (`csrc/`) rebuilds the same table from the same counts bit for bit.

Why PROB_BITS = 12 (measured on 2,000 streams of 1-2K symbols each): rounding counts to a table
costs coding efficiency only for skewed tables, where every rare symbol keeps at least 1/scale; for
a 16-bin table with p0 = 0.99 the loss against the counts' entropy is 2.6-5.4% at 10 bits, 0.8-1.6%
at 11, 0.2-0.5% at 12 and 0.02-0.04% at 14 (Gaussian/Laplacian 16-32-bin tables: under 0.1% at any
of them). Each bit of precision adds about a bit per stored frequency (32-bin Gaussian: 17.5, 19.2,
21.0, 24.6 bytes per table at 10, 11, 12, 14 bits). 12 is the smallest that keeps the skewed case
well inside the issue's 2% bound. The byte-wise coder allows up to 16.

Packed form (`pack_tables`), all tables of a record together:

    S x 3 bytes   per table: lo, hi (first and last nonzero symbol), w (bits per stored entry)
    bitstream     per table, entries lo..hi-1, w bits each, MSB first; byte-padded with zeros
                  once at the end. freq[hi] is not stored: it is PROB_SCALE minus the rest.

`unpack_tables` accepts only that canonical form (exact length, zero padding, w equal to the bit
length of the largest stored entry, freq[lo] and freq[hi] >= 1), so one table has one encoding.

`prob_bits` (default PROB_BITS) lets a caller build and store coarser tables, e.g. 8-bit ones that
it scales up by 2**(PROB_BITS - prob_bits) before coding (the cachegen codec's per-channel tables:
a third fewer table bits for 0.5% more coded bits).

Pure functions over numpy arrays and bytes; thread-safe; no I/O.
"""

from __future__ import annotations

import numpy as np

from kvtier.errors import CorruptRecord

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
MAX_SYMBOLS = 256
_HEADER = 3  # bytes per table: lo, hi, w


def normalize(counts: np.ndarray, prob_bits: int = PROB_BITS) -> np.ndarray:
    """Frequencies summing to 2**prob_bits (PROB_SCALE by default) from symbol counts [..., K].

    Each present symbol first gets 1 (it must stay codable); the remaining scale - n units are
    shared in proportion to the counts by largest remainder, ties to the lower symbol index. Zero
    counts get 0. Raises ValueError for negative counts, an all-zero row or K > MAX_SYMBOLS.
    """
    c = np.asarray(counts)
    if c.ndim < 1 or not 1 <= c.shape[-1] <= MAX_SYMBOLS or c.dtype.kind not in "iu":
        raise ValueError(f"counts must be integers [..., K] with 1 <= K <= {MAX_SYMBOLS}")
    c = c.astype(np.int64)
    if (c < 0).any():
        raise ValueError("counts must be non-negative")
    total = c.sum(axis=-1, keepdims=True)
    if (total == 0).any():
        raise ValueError("a table with no counts cannot code anything")
    if (total >= 1 << (62 - prob_bits)).any():
        raise ValueError("counts too large")
    present = c > 0
    spare = (1 << prob_bits) - present.sum(axis=-1, keepdims=True)
    share = c * spare
    freqs = present + share // total
    remainder = share % total
    missing = spare - (share // total).sum(axis=-1, keepdims=True)
    # Rank by remainder descending, lower index first on ties (a stable sort); the `missing`
    # best-ranked symbols get one more unit. Zero counts have remainder 0 and rank after every
    # positive remainder, and fewer than `missing` remainders can never be positive.
    order = np.argsort(-remainder, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(c.shape[-1]), axis=-1)
    freqs = freqs + (rank < missing)
    return freqs.astype(np.uint32)


def check_tables(
    tables: np.ndarray, error: type[Exception] = ValueError, prob_bits: int = PROB_BITS
) -> np.ndarray:
    """`tables` as int64 [S, K] after checking shape and sums (2**prob_bits); raises `error` if not valid."""
    t = np.asarray(tables)
    if t.ndim != 2 or not 1 <= t.shape[1] <= MAX_SYMBOLS or t.dtype.kind not in "iu":
        raise error(f"tables must be integers [S, K] with 1 <= K <= {MAX_SYMBOLS}, got {t.dtype} {t.shape}")
    t = t.astype(np.int64)
    scale = 1 << prob_bits
    if (t < 0).any() or (t > scale).any():
        raise error("table frequency out of range")
    bad = np.flatnonzero(t.sum(axis=1) != scale)
    if bad.size:
        raise error(f"table {bad[0]} does not sum to {scale}")
    return t


def _bits(values: np.ndarray, width: np.ndarray) -> np.ndarray:
    """MSB-first bits of values[i] in width[i] bits each, concatenated (uint8 0/1)."""
    width = width.astype(np.int64)
    ends = np.cumsum(width)
    pos = np.arange(int(ends[-1]) if width.size else 0) - np.repeat(ends - width, width)
    shift = np.repeat(width, width) - 1 - pos
    return ((np.repeat(values, width) >> shift) & 1).astype(np.uint8)


def pack_tables(tables: np.ndarray, prob_bits: int = PROB_BITS) -> bytes:
    """The packed form (module docstring) of valid tables [S, K] summing to 2**prob_bits; ValueError
    if not valid."""
    t = check_tables(tables, prob_bits=prob_bits)
    s, k = t.shape
    nonzero = t > 0
    lo = np.argmax(nonzero, axis=1)
    hi = k - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    stored = (np.arange(k) >= lo[:, None]) & (np.arange(k) < hi[:, None])
    peak = np.where(stored, t, 0).max(axis=1)
    width = np.zeros(s, dtype=np.int64)
    nz = peak > 0
    width[nz] = np.floor(np.log2(peak[nz])).astype(np.int64) + 1  # exact for integers < 2**53
    header = np.stack([lo, hi, width], axis=1).astype(np.uint8)
    bits = _bits(t[stored], np.broadcast_to(width[:, None], t.shape)[stored])
    return header.tobytes() + np.packbits(bits).tobytes()


def unpack_tables(
    data: bytes | memoryview, count: int, symbols: int, prob_bits: int = PROB_BITS
) -> np.ndarray:
    """Tables [count, symbols] (uint32) from `pack_tables` bytes of the same prob_bits; CorruptRecord
    unless canonical."""
    if not 1 <= symbols <= MAX_SYMBOLS or count < 0:
        raise ValueError(f"bad table shape {count} x {symbols}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size < _HEADER * count:
        raise CorruptRecord(f"table block of {buf.size} bytes is shorter than {count} headers")
    header = buf[: _HEADER * count].reshape(count, _HEADER).astype(np.int64)
    lo, hi, width = header[:, 0], header[:, 1], header[:, 2]
    if (hi >= symbols).any() or (lo > hi).any() or (width > prob_bits).any():
        raise CorruptRecord("table header out of range")
    entries = hi - lo
    nbits = int((entries * width).sum())
    body = buf[_HEADER * count :]
    if body.size != (nbits + 7) // 8:
        raise CorruptRecord(f"table body is {body.size} bytes, headers say {(nbits + 7) // 8}")
    if body.size and body[-1] & ((1 << (8 * body.size - nbits)) - 1):
        raise CorruptRecord("nonzero padding after the tables")
    return _rebuild(body, lo, hi, width, symbols, 1 << prob_bits)


def _fields(body: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The MSB-first bit fields (int32) of widths `width` (each <= 16) packed back to back in
    `body`, each read through a 24-bit window: scratch is a few words per field, not per bit (a
    hostile table block would otherwise cost ~250 bytes of memory per byte it has)."""
    start = np.cumsum(width) - width
    at = start >> 3
    shift = (24 - (start & 7) - width).astype(np.int32)
    del start
    padded = np.concatenate([body, np.zeros(3, dtype=np.uint8)])
    window = padded[at].astype(np.int32) << 16
    window |= padded[at + 1].astype(np.int32) << 8
    window |= padded[at + 2]
    del at
    window >>= shift
    window &= (1 << width.astype(np.int32)) - 1
    return window


def _rebuild(body, lo, hi, width, symbols: int, scale: int) -> np.ndarray:
    """Tables from the packed entries and headers; checks the canonical-form rules."""
    count = lo.size
    cols = np.arange(symbols)
    stored = (cols >= lo[:, None]) & (cols < hi[:, None])
    values = _fields(body, np.repeat(width, hi - lo))
    tables = np.zeros((count, symbols), dtype=np.int32)
    tables[stored] = values
    rest = scale - tables.sum(axis=1)
    if (rest < 1).any():
        raise CorruptRecord("stored frequencies leave nothing for the last symbol")
    tables[np.arange(count), hi] = rest
    if (tables[np.arange(count), lo] < 1).any():
        raise CorruptRecord("first symbol of a table has frequency 0")
    peak = np.where(stored, tables, 0).max(axis=1, initial=0)
    if (peak >= 1 << width).any() or ((peak > 0) & (peak < 1 << np.maximum(width - 1, 0))).any():
        raise CorruptRecord("table entry width is not the canonical one")
    if ((peak == 0) & (width != 0)).any():
        raise CorruptRecord("table entry width is not the canonical one")
    return tables.astype(np.uint32)
