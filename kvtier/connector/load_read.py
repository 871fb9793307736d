"""Reading a load's chunks into host staging memory, for the paged cache (`PagedKV`): shared by
synchronous loads (the worker connector, within a step) and asynchronous ones (`async_load`).

Where it runs: on the caller's thread. A `StagingBuffer` belongs to one reader (the forward pass's
thread, or the asynchronous loader's): never shared between threads.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kvtier.connector.metadata import LoadSpec
from kvtier.engine import CacheEngine
from kvtier.log_limit import LogLimiter


class PagedKV(Protocol):
    """The engine's paged KV cache as the connector sees it (`[2, L, T, H*D]` chunks in and out)."""

    block_size: int
    num_layers: int

    def gather(self, block_ids: list[int], num_tokens: int) -> torch.Tensor: ...
    def scatter(self, block_ids: list[int], kv: torch.Tensor, layers: slice = slice(None)) -> None: ...


class StagingBuffer:
    """A `[2, L, >= num_tokens, H*D]` host buffer that loads are read into, kept across loads: fresh
    memory for every load would cost its page faults each time (about 0.3 s a GiB). Pinned on a GPU
    machine, so the copies into the paged cache are true asynchronous DMA."""

    def __init__(self, engine: CacheEngine, pin: bool, device: torch.device | None = None):
        self.engine, self.pin, self.device = engine, pin, device  # device: on it instead of the host
        self.tensor: torch.Tensor | None = None

    def get(self, num_tokens: int) -> torch.Tensor:
        if self.tensor is None or self.tensor.shape[2] < num_tokens:
            layout = self.engine.layout
            self.tensor = None  # the old buffer goes first: never two at once
            shape = layout.chunk_shape(max(num_tokens, 2 * self.engine.db.chunk_size))
            self.tensor = (torch.empty(shape, dtype=layout.dtype, pin_memory=self.pin) if self.device is None
                           else torch.empty(shape, dtype=layout.dtype, device=self.device))
        return self.tensor


def first_token(spec: LoadSpec, chunk_size: int) -> int:
    """kvtier reads whole chunks: a load stages tokens from the chunk holding its start on."""
    return spec.start - spec.start % chunk_size


def read_load(engine: CacheEngine, spec: LoadSpec, first: int, out: torch.Tensor, log: LogLimiter,
              upto: int | None = None) -> tuple[torch.Tensor | None, int]:
    """Read `spec`'s chunks from token `first` (`first_token`) on into `out`, up to token `upto` (all
    of `spec.token_ids` by default): `(kv, reached)`, `kv` holding tokens `first:` and `reached` the
    token the load's KV now reaches (`spec.start` when nothing was read). Releases the lease whatever
    happens; a tier failing in an unexpected way is a miss, never an exception."""
    tokens = spec.token_ids if upto is None else spec.token_ids[:upto]
    try:
        # `token_ids` end at the scheduler side's lookup hit: read them without a second lookup.
        kv, n = engine.retrieve(tokens, out, start=first, known_hit=len(tokens))
    except Exception:
        log.error("load", "kvtier load for request %s failed; recomputing", spec.request_id, exc_info=True)
        kv, n = None, 0
    finally:
        engine.release(spec.lease)
    return kv, min(max(n, spec.start), spec.end)
