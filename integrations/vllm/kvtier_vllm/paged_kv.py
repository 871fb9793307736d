"""vLLM's paged KV cache as kvtier's connector sees it (`kvtier.connector.PagedKV`: `[2, L, T, H*D]`
chunks in and out), over the per-layer tensors vLLM hands to `register_kv_caches`.

Each layer's tensor is viewed, without a copy, as `[2, num_blocks, block_size, H, D]` (K then V), from
the layouts vLLM's attention backends allocate:

- CPU backend (CPU_ATTN): `[num_blocks, H, block_size, 2 * D]`, whose every (block, head) run holds
  the block's keys `[block_size, D]` and then its values (the backend views it as
  `[num_blocks, H, 2 * block_size, D]` and splits dim 2 in halves);
- FlashAttention and the Triton backend: `[2, num_blocks, block_size, H, D]`;
- FlashInfer: `[num_blocks, 2, block_size, H, D]`.

The layout is told apart by shape, given the model's H and D; a tensor that fits none (or fits two)
is refused at registration with the layer's name and shape. A layer tensor may itself be a strided
view of a larger buffer (vLLM's cross-layer layouts): every copy here goes through index_select /
index_copy_ on the view. Layers are ordered by the index in their names (`model.layers.7.self_attn.attn`).

Where it runs: the worker process, on the forward pass's thread (and the connector's loader threads:
scatters of different requests never touch the same blocks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


class UnsupportedKVLayout(ValueError):
    """vLLM registered KV caches kvtier cannot read (a layout, dtype or geometry it does not know)."""


def layer_index(name: str) -> int:
    """The layer number in a vLLM attention layer's name (the first `.N.` in it)."""
    found = _LAYER_INDEX.search(name)
    if found is None:
        raise UnsupportedKVLayout(f"kvtier: no layer number in the KV cache layer name {name!r}")
    return int(found.group(1))


def as_kv_blocks(name: str, tensor: torch.Tensor, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """`tensor` (one layer's cache) viewed as `[2, num_blocks, block_size, H, D]`."""
    shape, h, d = tuple(tensor.shape), num_kv_heads, head_dim
    fits = []
    if len(shape) == 4 and shape[1] == h and shape[3] == 2 * d:  # CPU_ATTN
        nb, _, bs, _ = shape
        fits.append(lambda: tensor.view(nb, h, 2, bs, d).permute(2, 0, 3, 1, 4))
    if len(shape) == 5 and shape[0] == 2 and shape[3:] == (h, d):  # FlashAttention, Triton
        fits.append(lambda: tensor)
    if len(shape) == 5 and shape[1] == 2 and shape[3:] == (h, d):  # FlashInfer
        fits.append(lambda: tensor.transpose(0, 1))
    if len(fits) != 1:
        why = "fits no layout kvtier knows" if not fits else "fits more than one layout"
        raise UnsupportedKVLayout(
            f"kvtier: the KV cache of layer {name!r}, shape {list(shape)}, {why} (expected {h} KV heads "
            f"of dim {d}: CPU_ATTN [blocks, {h}, block, {2 * d}], FlashAttention [2, blocks, block, {h}, "
            f"{d}] or FlashInfer [blocks, 2, block, {h}, {d}])")
    try:
        return fits[0]()
    except RuntimeError as exc:  # (a CPU layer whose last two dims are not contiguous: no view)
        raise UnsupportedKVLayout(f"kvtier: cannot view the KV cache of layer {name!r}: {exc}") from None


class VllmPagedKV:
    """The connector's `PagedKV` over vLLM's registered per-layer caches (see the module docstring)."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_kv_heads: int, head_dim: int):
        if not kv_caches:
            raise UnsupportedKVLayout("kvtier: vLLM registered no KV cache layers")
        names = sorted(kv_caches, key=layer_index)
        if [layer_index(n) for n in names] != list(range(len(names))):
            raise UnsupportedKVLayout(f"kvtier: KV cache layers are not numbered 0..{len(names) - 1}: "
                                      f"{names}")
        self.layer_names = names
        self.layers = [as_kv_blocks(n, kv_caches[n], num_kv_heads, head_dim) for n in names]
        first = self.layers[0]
        for name, layer in zip(names, self.layers):
            if layer.shape != first.shape or layer.dtype != first.dtype or layer.device != first.device:
                raise UnsupportedKVLayout(
                    f"kvtier: layer {name!r} has KV {list(layer.shape)} {layer.dtype} on {layer.device}, "
                    f"layer {names[0]!r} {list(first.shape)} {first.dtype}")
        _, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim = first.shape
        self.num_layers = len(self.layers)
        self.dtype, self.device = first.dtype, first.device

    def gather(self, block_ids: list[int], num_tokens: int) -> torch.Tensor:
        """The first `num_tokens` tokens held by `block_ids`, as a new `[2, L, T, H*D]` host tensor."""
        self._check(block_ids, num_tokens)
        n = -(-num_tokens // self.block_size)  # (only the blocks the tokens are in)
        index = torch.tensor(block_ids[:n], dtype=torch.long, device=self.device)
        out = torch.empty((2, self.num_layers, n * self.block_size, self.num_kv_heads * self.head_dim),
                          dtype=self.dtype, device=self.device)
        shape = (2, n, self.block_size, self.num_kv_heads, self.head_dim)
        for layer, blocks in enumerate(self.layers):
            # Selected straight into the output, one copy of the bytes: selecting into a new tensor
            # and assigning that took 7x as long (350 against 48 ms for 30 layers of 32 CPU blocks).
            torch.index_select(blocks, 1, index, out=out[:, layer].view(shape))
        return out[:, :, :num_tokens].cpu()

    def scatter(self, block_ids: list[int], kv: torch.Tensor, layers: slice = slice(None)) -> None:
        """Write `kv` ([2, L', T, H*D], L' the layers of `layers`) into `block_ids` in token order
        (the inverse of `gather`)."""
        num_tokens = kv.shape[2]
        self._check(block_ids, num_tokens)
        targets = self.layers[layers]
        if kv.shape[1] != len(targets):
            raise ValueError(f"kv holds {kv.shape[1]} layers, {len(targets)} asked for")
        full, tail = divmod(num_tokens, self.block_size)
        shape = (2, -1, self.block_size, self.num_kv_heads, self.head_dim)
        index = torch.tensor(block_ids[:full], dtype=torch.long, device=self.device)
        for i, blocks in enumerate(targets):
            layer = kv[:, i].to(self.device, self.dtype, non_blocking=True)
            if full:
                blocks.index_copy_(1, index, layer[:, :full * self.block_size].reshape(shape))
            if tail:
                blocks[:, block_ids[full], :tail] = layer[:, full * self.block_size:].reshape(
                    2, tail, self.num_kv_heads, self.head_dim)

    def _check(self, block_ids: list[int], num_tokens: int) -> None:
        if num_tokens > len(block_ids) * self.block_size or num_tokens < 0:
            raise ValueError(f"{num_tokens} tokens do not fit {len(block_ids)} blocks of {self.block_size}")
        if any(not 0 <= b < self.num_blocks for b in block_ids):
            raise ValueError(f"a block id outside [0, {self.num_blocks}): {block_ids}")
