"""The identity codec: the payload is the chunk's bytes in memory order, as kvtier stores them
without a codec (`kvtier.record.tensor_bytes`). Thread-safe; holds no state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.codecs.base import RAW_ID, check_chunk
from kvtier.errors import CorruptRecord
from kvtier.record import tensor_bytes

if TYPE_CHECKING:
    import torch


class RawCodec:
    codec_id = RAW_ID
    name = "raw"

    def encode(self, chunk: torch.Tensor) -> bytes:
        check_chunk(chunk, "chunk")
        return bytes(tensor_bytes(chunk))

    def decode(self, data: bytes | memoryview, out: torch.Tensor) -> None:
        check_chunk(out, "out")
        dest = tensor_bytes(out)
        src = memoryview(data).cast("B")
        if src.nbytes != dest.nbytes:
            raise CorruptRecord(f"raw payload is {src.nbytes} bytes, out needs {dest.nbytes}")
        dest[:] = src
