"""The CPU platform: host memory is the device's, copies are synchronous, nothing is page-locked, and
the paged block copies are the C++ ones (`kvtier.platforms.cpu_ops`) where they were built."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.platforms import cpu_ops
from kvtier.platforms.base import SyncStream


class CpuPlatform:
    name = "cpu"
    device_type = "cpu"

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
        return cpu_ops.gather_blocks(cache, block_ids, num_tokens)

    def scatter_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor,
                       layers: slice = slice(None)) -> None:
        cpu_ops.scatter_blocks(cache, block_ids, kv, layers)

    def capabilities(self) -> dict[str, bool]:
        return {"pinned_memory": False, "async_copies": False, "gds": False}
