"""The cachegen coder's backend: the C++ extension (`csrc/`, built by `pip install -e .`) where it is
built, else the numpy reference (`rans`, `quantize`), which defines every result: each function here
gives exactly the reference's bytes, symbols and values (tests/codecs/test_native.py).

    KVTIER_CACHEGEN_BACKEND   auto (default): the extension if built, else the reference with one
                              warning logged at first use; reference: always numpy; native: the
                              extension, a ConfigError naming the variable if it is not built.
                              Read at each call (cheap), so a process can switch in tests.

`AVAILABLE` says whether the extension imported, `WHY_NOT` why not. The functions check shapes,
dtypes and tables here, then call the extension on contiguous numpy buffers; a corrupt stream is a
`CorruptRecord` from either backend.

Where it runs: on tier read and write threads, concurrently; the extension releases the GIL while it
codes. Thread-safe: no state besides the once-only log flag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import numpy as np
import torch

from kvtier.codecs import quantize as q
from kvtier.codecs import rans
from kvtier.codecs.base import BACKEND_ENV
from kvtier.codecs.rans_tables import check_tables
from kvtier.errors import ConfigError, CorruptRecord

try:  # after torch: the extension links against libtorch's c10
    from kvtier.codecs import _cachegen_native as _ext
except ImportError as exc:
    _ext = None
    WHY_NOT = f"the C++ extension is not built ({exc}); reinstall with a C++ compiler on PATH"
else:
    WHY_NOT = ""
AVAILABLE = _ext is not None

ENV = BACKEND_ENV
BACKENDS = ("auto", "reference", "native")
logger = logging.getLogger(__name__)
_logged = threading.Event()


@contextlib.contextmanager
def using(name: str) -> Iterator[None]:
    """`ENV` set to `name` inside the block, as it was after (a benchmark or a test comparing the
    backends). Process-wide: every thread coding meanwhile uses `name` too."""
    old = os.environ.get(ENV)
    os.environ[ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def backend() -> str:
    """"native" or "reference": what the functions below use now (module docstring)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ConfigError(f"environment {ENV}={value!r}: must be one of {', '.join(BACKENDS)}")
    if value == "native" and not AVAILABLE:
        raise ConfigError(f"environment {ENV}=native, but {WHY_NOT}")
    chosen = "native" if value != "reference" and AVAILABLE else "reference"
    if chosen == "reference" and not _logged.is_set():
        _logged.set()
        if value == "auto":
            logger.warning("cachegen: coding with the numpy reference (several times slower): %s", WHY_NOT)
        else:
            logger.info("cachegen: coding with the numpy reference (%s=reference)", ENV)
    return chosen


def encode_streams(symbols: np.ndarray, tables: np.ndarray) -> rans.EncodedStreams:
    """`rans.encode_streams`: same arguments, errors and bytes."""
    if backend() == "reference":
        return rans.encode_streams(symbols, tables)
    freqs = check_tables(tables)
    sym = np.asarray(symbols)
    if sym.ndim != 2 or sym.shape[0] != freqs.shape[0] or sym.dtype.kind not in "iu":
        raise ValueError(f"symbols must be integers [S, N] with S = {freqs.shape[0]}, got {sym.shape}")
    if sym.dtype != np.uint8 and sym.size and (sym.min() < 0 or sym.max() >= freqs.shape[1]):
        raise ValueError(f"symbol out of range [0, {freqs.shape[1]})")
    sym = np.ascontiguousarray(sym, dtype=np.uint8)
    data, lengths = _ext.rans_encode(sym, sym.shape[0], sym.shape[1], _u32(freqs), freqs.shape[1])
    return rans.EncodedStreams(data, lengths)


def decode_streams(data: bytes | memoryview, lengths: np.ndarray, tables: np.ndarray, count: int,
                   max_count: int = rans.MAX_COUNT, *, group: int = 1) -> np.ndarray:
    """`rans.decode_streams`: symbols [S, count]; with `group` > 1 (dividing S), laid out
    [S / group, count, group] instead (stream s's symbols at [s // group, :, s % group]: per-channel
    streams straight into the chunk's token-major order)."""
    s = np.asarray(tables).shape[0] if np.ndim(tables) == 2 else -1
    if group < 1 or s % group:
        raise ValueError(f"group {group} does not divide the {s} streams")
    if backend() == "reference":
        out = rans.decode_streams(data, lengths, tables, count, max_count)
        return out.reshape(s // group, group, count).transpose(0, 2, 1) if group > 1 else out
    freqs = check_tables(tables, CorruptRecord)
    if not 0 <= count <= max_count:
        raise CorruptRecord(f"symbol count {count} outside [0, {max_count}]")
    lens = np.asarray(lengths)
    if lens.shape != (s,) or lens.dtype.kind not in "iu":
        raise CorruptRecord(f"need {s} integer stream lengths, got {lens.shape}")
    out = np.empty((s // group, count, group), dtype=np.uint8)
    buf = memoryview(data).cast("B")
    try:
        _ext.rans_decode(buf, np.ascontiguousarray(lens, dtype=np.int64), s, _u32(freqs), freqs.shape[1],
                         count, out, group)
    except _ext.CorruptStream as exc:
        raise CorruptRecord(str(exc)) from None
    return out.reshape(s, count) if group == 1 else out


def quantise(chunk: torch.Tensor, levels: np.ndarray, by_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 scales [2, L, T], symbols as streams) of a contiguous fp16/bf16 chunk [2, L, T, C] under
    levels M [2, L] (`quantize.scales` and `quantize.quantize`); streams [2L, T * C], or [2LC, T]
    (channel-major) when `by_channel`. ValueError for non-finite values or values beyond fp16."""
    two, layers, tokens, channels = chunk.shape
    if backend() == "reference":
        x = chunk.float().numpy()
        scale = q.scales(x)
        sym = q.quantize(x, scale, levels)
        if by_channel:
            return scale, sym.transpose(0, 1, 3, 2).reshape(2 * layers * channels, tokens)
        return scale, sym.reshape(2 * layers, tokens * channels)
    scale = np.empty((2, layers, tokens), dtype=np.float16)
    rows = 2 * layers * channels if by_channel else 2 * layers
    sym = np.empty((rows, chunk.numel() // rows), dtype=np.uint8)
    _ext.quantise(_bits(chunk), chunk.dtype == torch.bfloat16, layers, tokens, channels, _i64(levels),
                  scale.view(np.uint16), sym, by_channel)
    return scale, sym


def symbol_counts(streams: np.ndarray, symbols: int) -> np.ndarray:
    """Counts [S, symbols] (int64) of each stream's symbols; ValueError for one >= symbols."""
    s = streams.shape[0]
    if backend() == "reference":
        if streams.size and streams.max() >= symbols:
            raise ValueError(f"symbol out of range [0, {symbols})")
        flat = (np.arange(s)[:, None] * symbols + streams).ravel()
        return np.bincount(flat, minlength=s * symbols).reshape(s, symbols)
    counts = np.empty((s, symbols), dtype=np.int64)
    src = np.ascontiguousarray(streams, dtype=np.uint8)
    _ext.symbol_counts(src, s, src.shape[1] if src.ndim == 2 else 0, symbols, counts)
    return counts


def dequantise_into(symbols: np.ndarray, scales: np.ndarray, levels: np.ndarray, out: torch.Tensor) -> None:
    """`out` (contiguous fp16/bf16 [2, L, T, C]) = `quantize.dequantize` of symbols [2, L, T, C]
    (each <= 2M of its layer, as in every valid record) rounded to out's dtype."""
    if backend() == "reference":
        out.copy_(torch.from_numpy(q.dequantize(symbols, scales, levels)))
        return
    _, layers, tokens, channels = out.shape
    scale_bits = np.ascontiguousarray(scales, "<f2").view(np.uint16)
    _ext.dequantise(np.ascontiguousarray(symbols, dtype=np.uint8), scale_bits, _i64(levels), layers, tokens,
                    channels, out.dtype == torch.bfloat16, _bits(out))


def join_planes_into(planes: np.ndarray, out: torch.Tensor) -> None:
    """`out` (contiguous 16-bit [2, L, T, C]) from the lossless planes [4L, T * C] (per (kv, layer)
    the high bytes, then the low bytes)."""
    rows, n = 2 * out.shape[1], out[0, 0].numel()
    if backend() == "reference":
        p = planes.reshape(rows, 2, n).astype(np.uint16)
        values = (p[:, 0] << 8) | p[:, 1]
        out.view(torch.int16).copy_(torch.from_numpy(values.view(np.int16).reshape(out.shape)))
        return
    _ext.join_planes(np.ascontiguousarray(planes, dtype=np.uint8), rows, n, _bits(out))


def _bits(t: torch.Tensor) -> np.ndarray:
    """A 16-bit tensor's memory as uint16 numpy (shared, not copied)."""
    return t.view(torch.int16).numpy().view(np.uint16)


def _u32(freqs: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(freqs, dtype=np.uint32)


def _i64(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.int64)
