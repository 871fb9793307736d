"""A device with no platform of its own (mps, xpu, ... without a plugin): torch does everything, and
copies are treated as synchronous, as kvtier treated every non-CUDA device before platforms existed.
The CPU and CUDA platforms build on it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.platforms.base import SyncStream, torch_gather_blocks, torch_scatter_blocks


class TorchPlatform:
    def __init__(self, device_type: str):
        self.name = self.device_type = device_type

    def available(self) -> bool:
        return True

    def pin_by_default(self) -> bool:
        return False

    def host_buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def copy_stream(self) -> SyncStream:
        return SyncStream()

    def wait(self, event: object | None) -> None:
        return None

    def synchronize(self, event: object | None) -> None:
        return None

    def gather_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
        return torch_gather_blocks(cache, block_ids, num_tokens)

    def scatter_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor,
                       layers: slice = slice(None)) -> None:
        torch_scatter_blocks(cache, block_ids, kv, layers)

    def capabilities(self) -> dict[str, bool]:
        return {"pinned_memory": False, "async_copies": False, "gds": False, "paged_copy_kernel": False}
