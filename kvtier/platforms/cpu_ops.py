"""The CPU platform's paged block copies: the C++ extension (csrc/paged_copy.cpp: every layer of a
request's blocks in one call, the block copies spread over torch's intra-op threads) where it was
built and the tensors allow it, else the torch fallback (`kvtier.platforms.base`), which gives the
same bytes on one thread.

The extension takes byte views: a cache or chunk of any dtype goes through as long as it is on the
CPU and contiguous (the engine's cache always is); anything else takes the fallback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from kvtier.platforms.base import check_blocks, torch_gather_blocks, torch_scatter_blocks

logger = logging.getLogger(__name__)

try:
    from kvtier.platforms import _paged_copy as native
except ImportError:  # built without a compiler (setup.py says so): torch does the copies
    native = None


def _native_ok(cache: torch.Tensor) -> bool:
    return native is not None and cache.device.type == "cpu" and cache.is_contiguous() and cache.dim() == 6


def _bytes(tensor: torch.Tensor):
    return tensor.view(-1).view(torch.uint8).numpy()


def _ids(block_ids: Sequence[int], count: int):
    return torch.tensor(list(block_ids[:count]), dtype=torch.int64).numpy()


def gather_blocks(cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """`Platform.gather_blocks` for CPU tensors; into `out` (contiguous, of the chunk's shape and the
    cache's dtype) when given: a buffer already touched costs no page faults."""
    _, layers, num_blocks, block_size, heads, head_dim = cache.shape
    shape = (2, layers, num_tokens, heads * head_dim)
    if out is not None and (tuple(out.shape) != shape or out.dtype != cache.dtype or not out.is_contiguous()
                            or out.device.type != "cpu"):
        raise ValueError(f"out must be a contiguous CPU {cache.dtype} tensor of shape {shape}")
    if not _native_ok(cache):
        got = torch_gather_blocks(cache, block_ids, num_tokens)
        return got if out is None else out.copy_(got)
    check_blocks(cache, block_ids, num_tokens)
    out = torch.empty(shape, dtype=cache.dtype) if out is None else out
    if num_tokens:
        native.gather(_bytes(cache), _ids(block_ids, -(-num_tokens // block_size)), _bytes(out), layers,
                      num_blocks, block_size, heads * head_dim * cache.element_size(), num_tokens,
                      torch.get_num_threads())
    return out


def scatter_blocks(cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor,
                   layers: slice = slice(None)) -> None:
    """`Platform.scatter_blocks` for CPU tensors."""
    start, stop, step = layers.indices(cache.shape[1])
    if not _native_ok(cache) or step != 1:
        torch_scatter_blocks(cache, block_ids, kv, layers)
        return
    num_tokens = kv.shape[2]
    check_blocks(cache, block_ids, num_tokens)
    _, cache_layers, num_blocks, block_size, heads, head_dim = cache.shape
    if kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[1] != stop - start or kv.shape[3] != heads * head_dim:
        raise ValueError(f"a chunk of shape {tuple(kv.shape)} does not fit layers {start}:{stop} of a "
                         f"cache of {tuple(cache.shape)}")
    kv = kv.to("cpu", cache.dtype).contiguous()
    if num_tokens:
        native.scatter(_bytes(cache), _ids(block_ids, -(-num_tokens // block_size)), _bytes(kv), stop - start,
                       start, cache_layers, num_blocks, block_size, heads * head_dim * cache.element_size(),
                       num_tokens, torch.get_num_threads())
