"""CacheGen's quantiser (LMCache's `torch_quant`, as measured in benchmarks/cachegen_study.py).

Per (kv, layer, token) the scale is max |x| over the channels, stored as fp16 rounded *up* so that
|x| <= scale always holds after storage. With B bins a layer has M = B / 2 - 1 and 2M + 1 = B - 1
symbols centred on zero:

    symbol s = round(x / scale * M) + M          in [0, 2M]
    x_hat    = (s - M) * scale / M               = -scale + s * 2 scale / (2M)

so the bin width is scale / M and |x - x_hat| <= scale / (2M), half a bin (plus float32 rounding
of the division, ~1e-7 relative). The odd symbol count keeps an exact zero, which most channels of
post-RoPE K sit at (the study's sizes and quality are for this quantiser).

Pure numpy functions; thread-safe.
"""

from __future__ import annotations

import numpy as np

FP16_MAX = float(np.finfo(np.float16).max)


def levels(bins: np.ndarray) -> np.ndarray:
    """M = bins / 2 - 1 per (kv, layer); ValueError unless every bin count is even in [4, 256]."""
    b = np.asarray(bins, dtype=np.int64)
    if (b < 4).any() or (b > 256).any() or (b % 2).any():
        raise ValueError(f"bins must be even numbers in [4, 256], got {np.unique(b)}")
    return b // 2 - 1


def scales(x: np.ndarray) -> np.ndarray:
    """fp16 max |x| over the last axis, rounded up; ValueError for non-finite values or a scale
    beyond fp16's range (possible for bf16 KV)."""
    peak = np.abs(x).max(axis=-1)
    if not np.isfinite(peak).all() or (peak > FP16_MAX).any():
        raise ValueError("KV values must be finite and within fp16's range to quantise")
    s = peak.astype(np.float16)
    low = s.astype(np.float32) < peak
    s[low] = np.nextafter(s[low], np.float16(np.inf))
    return s


def quantize(x: np.ndarray, scale: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Symbols (uint8) of float32 x [2, L, T, C] under fp16 scales [2, L, T] and levels M [2, L]."""
    ml = m[:, :, None, None].astype(np.float32)
    s = scale.astype(np.float32)[..., None]
    safe = np.where(s > 0, s, np.float32(1))  # an all-zero token codes as symbol M (zero)
    q = np.rint(x / safe * ml)
    return (np.clip(q, -ml, ml) + ml).astype(np.uint8)


def dequantize(symbols: np.ndarray, scale: np.ndarray, m: np.ndarray) -> np.ndarray:
    """float32 x_hat [2, L, T, C] from symbols, fp16 scales [2, L, T] and levels M [2, L]."""
    ml = m[:, :, None, None].astype(np.float32)
    step = scale.astype(np.float32)[..., None] / ml
    return (symbols.astype(np.float32) - ml) * step
