"""The engine's paged KV memory.

    kv: [2, layers, num_blocks, block_size, kv_heads, head_dim]     (index 0 = K, 1 = V)

A block holds `block_size` consecutive tokens of one sequence, for every layer. The layout is
chosen for kvtier: indexing a request's blocks on axis 2 and flattening gives exactly kvtier's
chunk layout `[2, L, T, H*D]`, so saving or loading a request's KV is one gather or one scatter for
all layers, not one copy per block per layer.
"""

from __future__ import annotations

import torch

from kvtier.platforms import platform_for
from kvtier_engine.model_config import ModelConfig


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.config = config
        self.num_blocks = num_blocks
        self.num_layers = config.num_layers
        self.block_size = block_size
        self.kv = torch.zeros((2, config.num_layers, num_blocks, block_size, config.num_kv_heads,
                               config.head_dim), dtype=dtype, device=device)
        self._platform = platform_for(self.kv.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V of one layer at `slots` (block_id * block_size + offset)."""
        flat = self.kv[:, layer].view(2, self.num_blocks * self.block_size, *k.shape[1:])
        flat[0, slots] = k
        flat[1, slots] = v

    def layer_blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as [num_blocks, block_size, kv_heads, head_dim] views."""
        return self.kv[0, layer], self.kv[1, layer]

    def gather(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        """The first `num_tokens` tokens held by `block_ids`, as a new `[2, L, T, H*D]` tensor (one
        copy for all layers, by the device's platform: `kvtier.platforms`)."""
        return self._platform.gather_blocks(self.kv, block_ids, num_tokens)

    def scatter(self, block_ids: list[int], kv: torch.Tensor, layers: slice = slice(None)) -> None:
        """Write `kv` ([2, L', T, H*D]) into `block_ids` in token order (inverse of `gather`), for the
        `layers` it holds (all by default; one layer at a time for a layer-wise load)."""
        self._platform.scatter_blocks(self.kv, block_ids, kv, layers)
