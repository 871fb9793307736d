"""The CPU platform: host memory is the device's, copies are synchronous, nothing is page-locked, and
the paged block copies are the C++ ones (`kvtier.platforms.cpu_ops`) where they were built."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtier.platforms import cpu_ops
from kvtier.platforms.generic import TorchPlatform


class CpuPlatform(TorchPlatform):
    def __init__(self) -> None:
        super().__init__("cpu")

    def gather_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
        return cpu_ops.gather_blocks(cache, block_ids, num_tokens)

    def scatter_blocks(self, cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor,
                       layers: slice = slice(None)) -> None:
        cpu_ops.scatter_blocks(cache, block_ids, kv, layers)

    def capabilities(self) -> dict[str, bool]:
        return {**super().capabilities(), "paged_copy_kernel": cpu_ops.native is not None}
