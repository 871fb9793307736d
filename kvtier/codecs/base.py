"""The codec protocol: how a chunk's KV tensor becomes a record payload and back.

Where it runs: on whichever thread writes or promotes a record (a tier's I/O worker); a codec holds
only its settings, so one instance may be shared by threads. Lifecycle: construct once from the
config, then `encode` per chunk on write and `decode` per chunk on promotion, in any order.

    encode(chunk)     chunk: a contiguous CPU tensor [2, layers, tokens, channels] (K and V). Returns
                      the payload as bytes; side-effect free. ValueError for a chunk the codec cannot
                      code (a dtype it does not support, non-finite values for a lossy level).
    decode(data, out) writes the chunk into `out`, a preallocated contiguous CPU tensor that the
                      caller owns; the record header outside the codec says its shape and dtype.
                      ValueError if `out` itself is unusable; CorruptRecord for any payload that is
                      not a valid encoding (and `RecordMismatch`, a CorruptRecord that is also a
                      ValueError, where a valid payload disagrees with `out`'s shape or dtype).
                      A corrupt payload may also decode without an error (a flipped bit inside an
                      entropy-coded stream): the record checksum (`kvtier.record`) catches that.

Codec ids are part of the record format (`kvtier.record`'s codec id field): append only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from kvtier.errors import CorruptRecord

if TYPE_CHECKING:
    import torch

RAW_ID = 0
CACHEGEN_ID = 1
# The names a config, a fleet command or the CLI gives a codec (`kvtier.codecs.records.codec_named`).
# Here, not in `records`, because this module imports no torch: kvtier_server and the controller
# validate these names without loading it.
CODEC_NAMES = ("raw", "cachegen-1", "cachegen-2", "cachegen-3", "cachegen-lossless")
# Which cachegen coder runs (kvtier.codecs.native): not a config key, so the config loader skips it.
BACKEND_ENV = "KVTIER_CACHEGEN_BACKEND"


class RecordMismatch(CorruptRecord, ValueError):
    """A payload whose own header disagrees with `out`: the decoder cannot tell a wrong `out` from
    a corrupted header, so it is both a caller error (ValueError) and a miss (CorruptRecord)."""


class Codec(Protocol):
    codec_id: int
    name: str

    def encode(self, chunk: torch.Tensor) -> bytes: ...

    def decode(self, data: bytes | memoryview, out: torch.Tensor) -> None: ...


def check_chunk(t: torch.Tensor, what: str) -> tuple[int, int, int]:
    """(layers, tokens, channels) of a contiguous CPU tensor [2, L, T, C]; ValueError if not one."""
    if t.dim() != 4 or t.shape[0] != 2 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous CPU tensor [2, L, T, C], got {tuple(t.shape)}")
    return int(t.shape[1]), int(t.shape[2]), int(t.shape[3])
