"""The chunk record: the one serialisation every tier reads and writes (no pickle anywhere).

    offset  size  field
    0       4     magic b"KVTR"
    4       2     version (1)
    6       2     codec id (0 = raw)
    8       2     dtype code (kvtier.layout.DTYPE_CODES)
    10      2     reserved (0)
    12      16    shape: four u32 (2, layers, tokens, kv_heads * head_dim)
    28      24    chunk key (namespace digest + prefix hash)
    52      8     payload length in bytes (u64)
    60      8     checksum: xxh3-64 over bytes 0..59 and then the payload
    68            payload

All integers are little-endian. The checksum covers the header fields as well as the payload, so
a flipped bit anywhere is caught. Writers send header and payload as two buffers (never
concatenated: a payload can be 32 MiB); tiers may put padding between them (the disk tier aligns
the payload to 4 KiB for O_DIRECT) as long as they know where the payload starts.

Pure functions over bytes and buffers; no I/O. Nothing here imports torch unless a caller asks for
a torch dtype or hands in a tensor: `kvtier_server` moves records without loading torch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import xxhash

from kvtier.checksum_copy import Deferred, PieceCopy
from kvtier.dtypes import NAMES_BY_CODE, dtype_code, is_tensor, torch_dtype
from kvtier.errors import CorruptRecord
from kvtier.keys import KEY_BYTES, ChunkKey

if TYPE_CHECKING:
    import numpy as np
    import torch

MAGIC = b"KVTR"
VERSION = 1
CODEC_RAW = 0
_FIELDS = struct.Struct("<4sHHHH4I24sQ")  # everything the checksum covers before the payload
_CHECKSUM = struct.Struct("<Q")
FIELDS_SIZE = _FIELDS.size  # 60: the header bytes the checksum covers, before the payload
HEADER_SIZE = FIELDS_SIZE + _CHECKSUM.size  # 68


@dataclass(frozen=True, slots=True)
class RecordHeader:
    key: ChunkKey
    codec: int
    dtype_code: int
    shape: tuple[int, int, int, int]
    payload_len: int
    checksum: int

    @property
    def num_tokens(self) -> int:
        return self.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_code)

    def to_bytes(self) -> bytes:
        """The header as `encode_header` wrote it, without hashing the payload again (this header
        was decoded, and its payload verified, where it came from)."""
        fields = _FIELDS.pack(MAGIC, VERSION, self.codec, self.dtype_code, 0, *self.shape,
                              self.key.to_bytes(), self.payload_len)
        return fields + _CHECKSUM.pack(self.checksum)


def tensor_bytes(t: torch.Tensor | np.ndarray) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (works for bf16/fp8, which numpy lacks) or
    of a C-contiguous numpy array: the two kinds of buffer the Tier contract lets a record travel in."""
    if not is_tensor(t):
        view = memoryview(t)
        if not view.c_contiguous:
            raise ValueError("tensor_bytes needs a contiguous buffer")
        return view.cast("B")
    import torch

    if not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous tensor")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _checksum(fields: bytes, payload) -> int:
    h = xxhash.xxh3_64()
    h.update(fields)
    h.update(payload)
    return h.intdigest()


def encode_header(key: ChunkKey, shape: tuple[int, ...], dtype: torch.dtype | int, payload: Any,
                  codec: int = CODEC_RAW) -> bytes:
    """The header for `payload` (any buffer). `dtype` is a torch dtype or a record dtype code.
    Costs one pass of xxh3 over the payload."""
    if len(shape) != 4 or not all(0 <= d < 2**32 for d in shape):
        raise ValueError(f"a record shape is 4 dims of u32, got {shape}")
    code = dtype_code(dtype)
    payload_len = memoryview(payload).nbytes
    fields = _FIELDS.pack(MAGIC, VERSION, codec, code, 0, *shape, key.to_bytes(), payload_len)
    return fields + _CHECKSUM.pack(_checksum(fields, payload))


def decode_header(buf) -> RecordHeader:
    """Parse and sanity-check a header (not the payload). Raises CorruptRecord."""
    view = memoryview(buf)
    if view.nbytes < HEADER_SIZE:
        raise CorruptRecord(f"record header truncated: {view.nbytes} < {HEADER_SIZE} bytes")
    magic, version, codec, dtype_code, _reserved, s0, s1, s2, s3, key, payload_len = _FIELDS.unpack_from(view)
    if magic != MAGIC:
        raise CorruptRecord(f"bad record magic {bytes(magic)!r}")
    if version != VERSION:
        raise CorruptRecord(f"unsupported record version {version}")
    if dtype_code not in NAMES_BY_CODE:
        raise CorruptRecord(f"unknown dtype code {dtype_code}")
    (checksum,) = _CHECKSUM.unpack_from(view, _FIELDS.size)
    return RecordHeader(ChunkKey.from_bytes(key[:KEY_BYTES]), codec, dtype_code, (s0, s1, s2, s3),
                        payload_len, checksum)


def verify(header_buf, payload, expected_key: ChunkKey, header: RecordHeader | None = None,
           defer_to: PieceCopy | None = None) -> RecordHeader:
    """Decode the header (unless the caller already did: `header`) and check key, payload length
    and checksum. Raises CorruptRecord. `defer_to`: for a raw record of its size, the checksum is
    not computed here but left to `defer_to.pending`, which its copier checks as it copies the
    payload (kvtier.checksum_copy.finish); the record is not verified until then."""
    header = decode_header(header_buf) if header is None else header
    if header.key != expected_key:
        raise CorruptRecord(f"record holds key {header.key} where {expected_key} was expected")
    got = memoryview(payload).nbytes
    if got != header.payload_len:
        raise CorruptRecord(f"payload is {got} bytes, header says {header.payload_len}")
    fields = bytes(memoryview(header_buf)[:_FIELDS.size])
    if defer_to is not None and header.codec == CODEC_RAW and defer_to.nbytes == got:
        defer_to.pending = Deferred(fields, header.checksum)
    elif _checksum(fields, payload) != header.checksum:
        raise CorruptRecord(f"checksum mismatch for {expected_key}")
    return header
