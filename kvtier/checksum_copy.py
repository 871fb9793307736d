"""A record's checksum computed while its payload is copied into a KV tensor: one pass over the
payload instead of two (csrc/checksum_copy.cpp, in the `kvtier._native_keys` extension).

Why: the disk tier verifies every record it reads (kvtier.record.verify), and a retrieve then copies
the verified chunk from its slab into the caller's `out`. A record read with O_DIRECT lands by DMA,
so both passes read it from RAM: per 512 KiB chunk on the 2-vCPU VM, ~35 us to checksum and ~70 us
to copy. The fused pass copies a 16 KiB block with streaming stores and hashes it while it is in the
L1 cache: ~63 us for both, and 40 % less memory traffic.

Who runs it: the retrieve's copier, not the read thread. A retrieve makes a `PieceCopy` per lower-tier
read (kvtier.slab_io: where the chunk goes in `out`, [2, L, T, H*D]); a tier that `copies_out` (the
disk tier) checks the record's header, key and length as always, and for a raw record of the right
size leaves the checksum to the copy (`pending`) instead of computing it: the read thread goes back
to the disk at once (on 2 vCPUs, four read threads checksumming in step left the disk idle between
their reads), and whoever copies the chunk out runs `finish`, which checks the checksum as it
copies. A chunk whose `finish` fails (or never ran) is not found there: the reader drops the
record and asks the next tier (kvtier.transfers); its bytes in `out` are overwritten by that tier's
or are in tokens the caller is not told it has. Where the extension is not built, `AVAILABLE`
is False, no PieceCopy is made, and the tier verifies and the retrieve copies as two passes.

numpy only (no torch): record reading is shared with processes that never import torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import xxhash

from kvtier import native_keys

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deferred:
    """A record's checksum left to its copier: the header fields it covers, and its expected value."""

    fields: bytes
    checksum: int


@dataclass(slots=True)
class PieceCopy:
    """A chunk's place in a KV tensor: `n_outer` x `n_inner` pieces of `piece` bytes each, piece
    (o, i) at byte `offset + o * s_outer + i * s_inner` of `dest`, filled in payload order."""

    dest: np.ndarray  # 1-D uint8, writable: the whole tensor's bytes
    offset: int
    piece: int
    n_outer: int
    s_outer: int
    n_inner: int
    s_inner: int
    pending: Deferred | None = None  # set by the tier that read it: the checksum is `finish`'s to check
    passed: bool | None = None  # set by `finish`: whether it matched (None: not checked, not good)

    @property
    def nbytes(self) -> int:
        return self.piece * self.n_outer * self.n_inner


def checksum_into(fields: bytes, payload: np.ndarray | memoryview, copy: PieceCopy) -> int:
    """XXH3-64 of `fields || payload` (the record checksum), with `payload` copied into `copy`'s
    pieces on the way. ValueError where the pieces do not fit `dest` or `payload`."""
    return native_keys.checksum_copy(fields, payload, copy.dest, copy.offset, copy.piece, copy.n_outer,
                                     copy.s_outer, copy.n_inner, copy.s_inner)


def finish(copy: PieceCopy, payload: np.ndarray) -> bool:
    """Copy `payload` (the record read for `copy`, whose checksum is `pending`) into its pieces,
    checking the checksum in the same pass: True when it matches."""
    assert copy.pending is not None, "finish() of a copy whose tier verified it already"
    copy.passed = checksum_into(copy.pending.fields, payload, copy) == copy.pending.checksum
    return copy.passed


def _self_test() -> str:
    """Why the fused pass disagrees with xxhash and numpy ("" if it does not)."""
    rng = np.random.default_rng(7)
    payload = rng.integers(0, 256, 3 * 2 * 40_000, dtype=np.uint8)  # pieces past 16 KiB, odd sizes
    dest = np.zeros(500_000, dtype=np.uint8)
    copy = PieceCopy(dest, 13, 40_000, 3, 120_001, 2, 50_000)
    try:
        digest = checksum_into(b"fields", payload, copy)
    except (RuntimeError, ValueError) as exc:
        return f"the extension's checksum_copy failed: {exc}"
    if digest != xxhash.xxh3_64_intdigest(b"fields" + payload.tobytes()):
        return "its checksum differs from xxhash's XXH3-64"
    want = np.zeros_like(dest)
    for o in range(3):
        for i in range(2):
            at, k = 13 + o * 120_001 + i * 50_000, (o * 2 + i) * 40_000
            want[at:at + 40_000] = payload[k:k + 40_000]
    return "" if np.array_equal(dest, want) else "its copy differs from numpy's"


WHY_NOT = native_keys.WHY_NOT or _self_test()
AVAILABLE = not WHY_NOT
if WHY_NOT:
    logger.info("record checksums and copies out in two passes (the same bytes, slower): %s", WHY_NOT)
