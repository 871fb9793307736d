"""What kvtier needs from a device platform (CPU, CUDA, or an out-of-tree accelerator), in one
protocol, and the torch implementation of the paged block operations every platform can fall back to.

A platform owns one torch device type (`device_type`: "cpu", "cuda", "npu", ...). kvtier asks it for:
- host memory for the CPU tier and staging buffers, page-locked where that speeds up device copies;
- a copy stream: loads into the device's KV cache run on it, and each layer's completion is an event
  the forward pass's stream waits on (on the CPU, copies are synchronous and these are no-ops);
- paged gather/scatter between a chunk (`[2, L, T, H*D]`) and an engine's block cache
  (`[2, L, num_blocks, block_size, H, D]`): one call for every layer;
- what it can do (`capabilities`), reported in stats.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class CopyStream(Protocol):
    def active(self) -> AbstractContextManager:
        """Work issued inside runs on this stream."""
        ...

    def record(self) -> object | None:
        """An event marking the work issued so far (None where copies are synchronous)."""
        ...

    def synchronize(self) -> None: ...


@runtime_checkable
class Platform(Protocol):
    name: str
    device_type: str  # the torch device type whose tensors this platform moves

    def available(self) -> bool:
        """Whether this process can use it (a driver, a device)."""
        ...

    def pin_by_default(self) -> bool:
        """Whether host buffers should be page-locked (it speeds up this device's copies)."""
        ...

    def host_buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """`nbytes` of host memory as a uint8 tensor, page-locked if `pinned`."""
        ...

    def copy_stream(self) -> CopyStream: ...

    def wait(self, event: object | None) -> None:
        """The compute stream waits for `event` (from `CopyStream.record`) before its next work."""
        ...

    def synchronize(self, event: object | None) -> None:
        """This thread waits until the work `event` marks is done."""
        ...

    def gather_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
        """The first `num_tokens` tokens `block_ids` hold, as a new `[2, L, T, H*D]` tensor."""
        ...

    def scatter_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor,
                       layers: slice = slice(None)) -> None:
        """Write `kv` (`[2, L', T, H*D]`) into `block_ids` in token order, for `layers`."""
        ...

    def capabilities(self) -> dict[str, bool]: ...


class SyncStream:
    """The copy stream of a platform whose copies complete before they return (the CPU)."""

    def active(self) -> AbstractContextManager:
        return nullcontext()

    def record(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


def check_blocks(cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> None:
    """ValueError unless `num_tokens` fit `block_ids` and every id names a block of `cache`."""
    num_blocks, block_size = cache.shape[2], cache.shape[3]
    if not 0 <= num_tokens <= len(block_ids) * block_size:
        raise ValueError(f"{num_tokens} tokens do not fit {len(block_ids)} blocks of {block_size}")
    needed = -(-num_tokens // block_size)
    if any(not 0 <= b < num_blocks for b in block_ids[:needed]):
        raise ValueError(f"block ids must be in [0, {num_blocks}): {list(block_ids[:needed])}")


def torch_gather_blocks(cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
    """`gather_blocks` in torch: one index_select over the blocks axis for every layer at once."""
    check_blocks(cache, block_ids, num_tokens)
    needed = -(-num_tokens // cache.shape[3])
    index = torch.tensor(list(block_ids[:needed]), dtype=torch.long, device=cache.device)
    picked = cache.index_select(2, index)  # [2, L, n, bs, H, D]
    return picked.flatten(2, 3).flatten(3)[:, :, :num_tokens]


def torch_scatter_blocks(cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor,
                         layers: slice = slice(None)) -> None:
    """`scatter_blocks` in torch: whole blocks with one index_copy_, the partial last one by slice."""
    num_tokens = kv.shape[2]
    check_blocks(cache, block_ids, num_tokens)
    kv = kv.to(cache.device, cache.dtype, non_blocking=True)  # host chunks onto the device
    block_size, heads, head_dim = cache.shape[3:]
    full, tail = divmod(num_tokens, block_size)
    target = cache[:, layers]
    shape = (2, kv.shape[1], -1, block_size, heads, head_dim)
    if full:
        index = torch.tensor(list(block_ids[:full]), dtype=torch.long, device=cache.device)
        target.index_copy_(2, index, kv[:, :, :full * block_size].reshape(shape))
    if tail:
        last = kv[:, :, full * block_size:].reshape(*shape[:2], tail, heads, head_dim)
        target[:, :, block_ids[full], :tail] = last
