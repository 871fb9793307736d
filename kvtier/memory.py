"""Host memory pool: one arena cut into equal slabs, one slab per KV chunk.

Where it runs: in the process that owns the CPU tier. Not thread-safe by itself: the
StorageManager serialises every call under its lock (alloc and free are a list pop and append, so
holding the lock costs nothing worth a second lock).

Lifecycle: `alloc(owner)` hands out a `Slab` lease or returns None when the pool is exhausted (the
caller decides: evict and retry, or reject the store; the pool never waits and never drops
silently); `tensor(slab)` views its bytes, `copy_chunks` moves chunks between a KV tensor and
slabs; `free(slab)` returns it; freeing twice raises. The arena is pinned by default only where the
platform says it helps (`kvtier.platforms`: with CUDA available; pinning needs the driver, and
pinned pages speed up host<->device copies only). Slabs are aligned to 4 KiB so the disk tier can
O_DIRECT into them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvtier.platforms import current_platform
from kvtier.record_files import BLOCK, align_up

if TYPE_CHECKING:
    from kvtier.keys import ChunkSpan
    from kvtier.layout import KVLayout

logger = logging.getLogger(__name__)

# Slabs are aligned and sized to the record files' O_DIRECT block, so a disk read lands in one.
ALIGNMENT = BLOCK


@dataclass(slots=True, eq=False)
class Slab:
    """A lease on one slab. Identity matters: the pool checks it is the live lease on free."""

    index: int
    owner: str


class MemoryPool:
    def __init__(self, capacity_bytes: int, slab_bytes: int, pin: bool | None = None):
        if slab_bytes <= 0:
            raise ValueError(f"slab_bytes must be positive, got {slab_bytes}")
        self.slab_bytes = slab_bytes
        self.slab_stride = align_up(slab_bytes)
        self.num_slabs = capacity_bytes // self.slab_stride
        if self.num_slabs < 1:
            raise ValueError(
                f"memory pool of {capacity_bytes} bytes cannot hold one chunk of {self.slab_stride} bytes")
        self.platform = platform = current_platform()
        self.pinned = platform.pin_by_default() if pin is None else pin
        raw = platform.host_buffer(self.num_slabs * self.slab_stride + ALIGNMENT, self.pinned)
        skew = (-raw.data_ptr()) % ALIGNMENT
        self._arena = raw[skew: skew + self.num_slabs * self.slab_stride]
        self._free = list(range(self.num_slabs - 1, -1, -1))  # pop() takes slab 0 first
        self._leases: list[Slab | None] = [None] * self.num_slabs
        logger.debug("memory pool: %d slabs of %d bytes (pinned=%s)", self.num_slabs, self.slab_stride,
                     self.pinned)

    @property
    def arena(self) -> torch.Tensor:
        """The whole arena, slab i at byte `i * slab_stride`: for a transport that registers it once
        (kvtier.p2p.nixl_transport). Read it only; a slab's bytes are its lease holder's."""
        return self._arena

    @property
    def capacity_bytes(self) -> int:
        return self.num_slabs * self.slab_stride

    @property
    def used_slabs(self) -> int:
        return self.num_slabs - len(self._free)

    @property
    def used_bytes(self) -> int:
        return self.used_slabs * self.slab_stride

    @property
    def free_slabs(self) -> int:
        return len(self._free)

    def alloc(self, owner: str) -> Slab | None:
        """A free slab leased to `owner`, or None when exhausted. O(1)."""
        if not self._free:
            return None
        slab = Slab(self._free.pop(), owner)
        self._leases[slab.index] = slab
        return slab

    def free(self, slab: Slab) -> None:
        """Return a slab. O(1). Raises if `slab` is not the live lease (double free, stale handle)."""
        if self._leases[slab.index] is not slab:
            raise RuntimeError(f"slab {slab.index} freed by {slab.owner!r} is not a live lease")
        self._leases[slab.index] = None
        self._free.append(slab.index)

    def tensor(self, slab: Slab, nbytes: int | None = None) -> torch.Tensor:
        """The slab's bytes as a uint8 tensor view (the first `nbytes`, default the chunk size; at
        most the 4 KiB-aligned stride, which O_DIRECT reads fill)."""
        nbytes = self.slab_bytes if nbytes is None else nbytes
        if not 0 <= nbytes <= self.slab_stride:
            raise ValueError(f"{nbytes} bytes do not fit a slab of {self.slab_stride}")
        start = slab.index * self.slab_stride
        return self._arena[start: start + nbytes]

    def chunk_run(self, first: Slab, count: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """`count` consecutive slabs from `first` on, each viewed as a `shape` tensor of `dtype`:
        `[count, *shape]`. One strided view over the arena, so a caller can move a whole prompt
        stored in consecutive slabs with one copy (a copy costs ~10 us beyond its bytes)."""
        per_slab = self.slab_stride // dtype.itemsize
        elems = 1
        for dim in shape:
            elems *= dim
        if elems > per_slab or first.index + count > self.num_slabs:
            raise ValueError(f"{count} x {shape} {dtype} does not fit the slabs from {first.index} on")
        typed = self._arena.view(dtype)
        strides, inner = [], 1
        for dim in reversed(shape):
            strides.insert(0, inner)
            inner *= dim
        return typed.as_strided((count, *shape), (per_slab, *strides),
                                typed.storage_offset() + first.index * per_slab)

    def copy_chunks(self, chunks: Sequence[tuple[ChunkSpan, Slab]], kv: torch.Tensor, layout: KVLayout,
                    into_slabs: bool) -> None:
        """Copy chunks between `kv` ([2, L, T, H*D], `layout`) and their slabs, one copy per run of
        equal-size chunks that follow each other in `kv` and in the arena (a prompt stored in one
        call does): a copy costs ~10 us beyond its bytes, a fifth of copying a 512 KiB chunk."""
        i = 0
        while i < len(chunks):
            span, slab = chunks[i]
            t, k = span.num_tokens, 1
            while (i + k < len(chunks) and chunks[i + k][1].index == slab.index + k
                   and chunks[i + k][0].start == span.start + k * t and chunks[i + k][0].num_tokens == t):
                k += 1
            tokens = kv.narrow(2, span.start, k * t).unflatten(2, (k, t)).movedim(2, 0)
            slabs = self.chunk_run(slab, k, layout.dtype, layout.chunk_shape(t))
            (slabs if into_slabs else tokens).copy_(tokens if into_slabs else slabs)
            i += k

    def is_live(self, slab: Slab) -> bool:
        """`slab` is the pool's current lease on its index (not freed, not a stale handle)."""
        return 0 <= slab.index < self.num_slabs and self._leases[slab.index] is slab

    def owners(self) -> dict[str, int]:
        """Live leases per owner, for accounting and leak hunting."""
        return dict(Counter(s.owner for s in self._leases if s is not None))
