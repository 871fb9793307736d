"""CachegenCodec: CacheGen's quantise-then-entropy-code KV codec (issue 13).

Encode: per (kv, layer, token) fp16 max-abs scales (`quantize`), symbols with the level's bins per
(kv, layer), one static rANS table per stream built from the record's own counts (`rans_tables`),
the streams coded in lockstep (`rans`), all written as a `cachegen_format` record. Decode reverses
it into the caller's tensor. `lossless` codes the raw 16-bit values instead, as two byte planes
(high, low) with one 256-symbol table per (kv, layer, plane): exact for fp16 and bf16 (float32 KV
is refused there, and quantised as its fp16 rounding by the lossy levels). The heavy
steps run in `native` (the C++ coder where built, else the numpy reference, the same bytes).

Presets (benchmarks/README.md, "cachegen_study.py", measured on SmolLM2-135M KV):
    level 1   K 32 bins in the first third of the layers then 16; V 16 in the first 1/15 (at least
              one layer) then 8                       (study: 7.97x vs fp16, top-1 0.901, KL 0.065)
    level 2   K 32 in every layer; V as level 1      (6.79x, top-1 0.929, KL 0.039)
    level 3   K 32 and V 32 in every layer           (4.62x, top-1 0.972, KL 0.011)

Tables: one per (kv, layer, channel) when the record has CHANNEL_TABLE_MIN_TOKENS tokens or more
(per-channel tables are 9-20% smaller in entropy, which pays once a table covers enough tokens),
else one per (kv, layer). Per-channel tables are stored with 8-bit frequencies (scaled to the
coder's 12 bits), per-layer ones with 12 (`cachegen_format.table_bits`).

Thread-safe: a codec holds only its level. Memory: the symbols and coded bytes (a few copies of the
chunk as numpy arrays on the reference backend).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from kvtier.codecs import cachegen_format as fmt
from kvtier.codecs import native
from kvtier.codecs import quantize as q
from kvtier.codecs.base import CACHEGEN_ID, RecordMismatch, check_chunk
from kvtier.codecs.rans_tables import PROB_BITS, normalize
from kvtier.dtypes import dtype_code

CHANNEL_TABLE_MIN_TOKENS = 512
LEVELS = (1, 2, 3)
_DTYPES = (torch.float16, torch.bfloat16)


def preset_bins(level: int, layers: int) -> np.ndarray:
    """Bins [2, layers] (K row, V row) of a quantised level."""
    if level not in LEVELS:
        raise ValueError(f"cachegen level must be one of {LEVELS} or 'lossless', got {level!r}")
    bins = np.empty((2, layers), dtype=np.int64)
    shallow = np.arange(layers)
    bins[0] = 32 if level > 1 else np.where(shallow < max(1, layers // 3), 32, 16)
    bins[1] = 32 if level == 3 else np.where(shallow < max(1, layers // 15), 16, 8)
    return bins


def stream_tables(streams: np.ndarray, symbols: int, bits: int) -> np.ndarray:
    """The coder's tables [S, symbols] from each stream's symbol counts, at `bits` of precision."""
    return normalize(native.symbol_counts(streams, symbols), bits) << np.uint32(PROB_BITS - bits)


class CachegenCodec:
    codec_id = CACHEGEN_ID

    def __init__(self, level: int | str) -> None:
        if level != "lossless" and level not in LEVELS:
            raise ValueError(f"cachegen level must be one of {LEVELS} or 'lossless', got {level!r}")
        self.level = fmt.LOSSLESS if level == "lossless" else int(level)
        self.name = f"cachegen-{level}"

    def encode(self, chunk: torch.Tensor) -> bytes:
        shape = check_chunk(chunk, "chunk")
        if self.level == fmt.LOSSLESS:
            if chunk.dtype not in _DTYPES:
                raise ValueError(f"lossless cachegen codes float16 or bfloat16 KV, not {chunk.dtype}")
            return fmt.to_bytes(_encode_lossless(chunk, shape))
        if chunk.dtype == torch.float32:
            # float32 KV (the bundled engine's CPU default) is quantised as its fp16 rounding: a
            # 2**-11 relative change, far inside the coarsest bin (half a bin is scale / 30 at most);
            # a value beyond fp16's range becomes inf and the chunk is refused (stored raw).
            rec = _encode_quantised(chunk.to(torch.float16), shape, self.level)
            return fmt.to_bytes(dataclasses.replace(rec, dtype_code=fmt.FLOAT32))
        if chunk.dtype not in _DTYPES:
            raise ValueError(f"cachegen codes float16, bfloat16 or float32 KV, not {chunk.dtype}")
        return fmt.to_bytes(_encode_quantised(chunk, shape, self.level))

    def decode(self, data: bytes | memoryview, out: torch.Tensor) -> None:
        shape = check_chunk(out, "out")
        if out.dtype not in (*_DTYPES, torch.float32):
            raise ValueError(f"cachegen decodes into float16, bfloat16 or float32, not {out.dtype}")
        # Any level decodes with any cachegen codec: the record names its own.
        _, code, _, record_shape = fmt.read_header(data)
        if record_shape != shape or code != dtype_code(out.dtype):
            raise RecordMismatch(f"record {record_shape} of dtype code {code} does not fit out")
        rec = fmt.parse(data, shape)
        if rec.level == fmt.LOSSLESS:
            _decode_lossless(rec, out)
        elif out.dtype == torch.float32:
            half = torch.empty(out.shape, dtype=torch.float16)
            _decode_quantised(rec, half)
            out.copy_(half)
        else:
            _decode_quantised(rec, out)


def _encode_lossless(chunk: torch.Tensor, shape: tuple[int, int, int]) -> fmt.CodedRecord:
    layers = shape[0]
    u = chunk.view(torch.int16).numpy().view(np.uint16).reshape(2, layers, 1, -1)
    planes = np.concatenate([u >> 8, u & 0xFF], axis=2).astype(np.uint8).reshape(4 * layers, -1)
    tables = stream_tables(planes, 256, fmt.table_bits(fmt.BY_LAYER))
    coded = native.encode_streams(planes, tables)
    none = np.zeros((2, layers), dtype=np.int64)
    return fmt.CodedRecord(fmt.LOSSLESS, dtype_code(chunk.dtype), fmt.BY_LAYER, shape, none,
                           np.zeros(0, np.float16), tables, coded.lengths, coded.data)


def _decode_lossless(rec: fmt.CodedRecord, out: torch.Tensor) -> None:
    _, count = fmt.stream_layout(rec.level, rec.grouping, rec.shape)
    planes = native.decode_streams(rec.streams, rec.lengths, rec.tables, count, max_count=count)
    native.join_planes_into(planes, out)


def _encode_quantised(chunk: torch.Tensor, shape: tuple[int, int, int], level: int) -> fmt.CodedRecord:
    layers, tokens, channels = shape
    bins = preset_bins(level, layers)
    grouping = fmt.BY_CHANNEL if tokens >= CHANNEL_TABLE_MIN_TOKENS else fmt.BY_LAYER
    scale, streams = native.quantise(chunk, q.levels(bins), grouping == fmt.BY_CHANNEL)
    tables = stream_tables(streams, fmt.table_symbols(level, bins), fmt.table_bits(grouping))
    coded = native.encode_streams(streams, tables)
    return fmt.CodedRecord(level, dtype_code(chunk.dtype), grouping, shape, bins, scale, tables,
                           coded.lengths, coded.data)


def _decode_quantised(rec: fmt.CodedRecord, out: torch.Tensor) -> None:
    layers, tokens, channels = rec.shape
    _, count = fmt.stream_layout(rec.level, rec.grouping, rec.shape)
    # per-channel streams (kv, layer, channel) decode straight into token-major order
    group = channels if rec.grouping == fmt.BY_CHANNEL else 1
    symbols = native.decode_streams(rec.streams, rec.lengths, rec.tables, count, max_count=count, group=group)
    sym = symbols.reshape(2, layers, tokens, channels)
    native.dequantise_into(sym, rec.scales, q.levels(rec.bins), out)
