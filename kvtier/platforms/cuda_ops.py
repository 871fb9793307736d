"""The CUDA platform's paged block copies: the kernel in csrc/paged_copy_cuda.cu where it was built
(setup.py builds it only with a CUDA torch and nvcc), else torch (`kvtier.platforms.base`).

The kernel moves every row of a request (one token of one layer of K or V) between the engine's
block cache and a chunk in one launch, on the current stream. The chunk may be in GPU memory or in
page-locked host memory (a staging buffer, a CPU tier slab): there the kernel reads or writes it
across PCIe itself, so a load needs no device staging copy and no second kernel. Torch's path is an
`index_select`/`index_copy_` on the device plus one DMA of the whole chunk. Which is faster is the
GPU's to say (`benchmarks/gpu.py` runs both); `KVTIER_CUDA_PAGED_COPY=torch` forces torch.

The kernel is checked against torch on the first copy to each device (a few blocks of random KV,
both directions, device and host chunks). If they differ, or the launch fails, the kernel is
switched off for the process with an error in the log: kvtier never hands out KV a new build
copied wrong.

`row_copy` turns tensors into the kernel's arguments (addresses and byte strides); tests run the
same arguments through a Python model of the kernel on the CPU (CUDA itself cannot run there).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import torch

from kvtier.platforms.base import check_blocks, torch_gather_blocks, torch_scatter_blocks

logger = logging.getLogger(__name__)

try:
    from kvtier.platforms import _paged_copy_cuda as native
except ImportError:  # a CPU machine, or built without nvcc: torch does the copies
    native = None

MODE_ENV = "KVTIER_CUDA_PAGED_COPY"
MODES = ("auto", "torch")


@dataclass(frozen=True, slots=True)
class RowCopy:
    """The kernel's arguments: addresses, and strides in bytes (see csrc/paged_copy_cuda.cu)."""

    to_cache: bool
    cache_ptr: int
    cache_strides: tuple[int, int, int, int]  # K/V, layer, block, slot
    chunk_ptr: int
    chunk_strides: tuple[int, int, int]  # K/V, layer, token
    ids_ptr: int
    layers: int
    tokens: int
    block_size: int
    row_bytes: int

    def args(self, stream: int) -> tuple[int, ...]:
        flat: list[int] = []
        for field in astuple(self):
            flat.extend(field if isinstance(field, tuple) else (int(field),))
        return (*flat, stream)


def row_copy(cache: torch.Tensor, ids: torch.Tensor, chunk: torch.Tensor, layers: slice,
             to_cache: bool) -> RowCopy | None:
    """The kernel's arguments for moving `chunk` ([2, L', T, H*D]) to or from `layers` of `cache`
    ([2, L, num_blocks, block_size, H, D]) through `ids` (int64, one per block of T); None where the
    tensors' layout rules the kernel out (rows not contiguous, dtypes differ): torch does it then."""
    start, stop, step = layers.indices(cache.shape[1])
    if cache.dim() != 6 or chunk.dim() != 4 or step != 1 or chunk.dtype != cache.dtype:
        return None
    _, _, _, block_size, heads, head_dim = cache.shape
    if cache.stride(5) != 1 or cache.stride(4) != head_dim or chunk.stride(3) != 1:
        return None
    if tuple(chunk.shape[::3]) != (2, heads * head_dim) or chunk.shape[1] != stop - start:
        raise ValueError(f"a chunk of shape {tuple(chunk.shape)} does not fit layers {start}:{stop} of a "
                         f"cache of {tuple(cache.shape)}")
    size = cache.element_size()
    return RowCopy(to_cache, cache.data_ptr() + start * cache.stride(1) * size,
                   tuple(s * size for s in cache.stride()[:4]), chunk.data_ptr(),
                   tuple(s * size for s in chunk.stride()[:3]), ids.data_ptr(), stop - start,
                   chunk.shape[2], block_size, heads * head_dim * size)


def _ids(cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
    needed = -(-num_tokens // cache.shape[3])
    return torch.tensor(list(block_ids[:needed]), dtype=torch.int64).to(cache.device)


def _launch(cache: torch.Tensor, ids: torch.Tensor, chunk: torch.Tensor, layers: slice,
            to_cache: bool) -> bool:
    """Run the kernel; False where it cannot take these tensors (the caller uses torch)."""
    if chunk.device.type == "cpu" and not chunk.is_pinned():
        return False  # pageable: the GPU cannot address it
    if chunk.device.type != "cpu" and chunk.device != cache.device:
        return False
    if (copy := row_copy(cache, ids, chunk, layers, to_cache)) is None:
        return False
    with torch.cuda.device(cache.device):
        native.copy(*copy.args(torch.cuda.current_stream().cuda_stream))
    return True


def gather_blocks(cache: torch.Tensor, block_ids: Sequence[int], num_tokens: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """`Platform.gather_blocks` for a CUDA cache; into `out` when given (GPU memory, or page-locked
    host memory the kernel writes across PCIe). Asynchronous on the current stream, like any copy."""
    check_blocks(cache, block_ids, num_tokens)
    shape = (2, cache.shape[1], num_tokens, cache.shape[4] * cache.shape[5])
    if out is not None and (tuple(out.shape) != shape or out.dtype != cache.dtype):
        raise ValueError(f"out must be a {cache.dtype} tensor of shape {shape}")
    if not (kernel_ready(cache.device) and num_tokens):
        got = torch_gather_blocks(cache, block_ids, num_tokens)
        return got if out is None else out.copy_(got, non_blocking=True)
    out = torch.empty(shape, dtype=cache.dtype, device=cache.device) if out is None else out
    if not _launch(cache, _ids(cache, block_ids, num_tokens), out, slice(None), False):
        out.copy_(torch_gather_blocks(cache, block_ids, num_tokens), non_blocking=True)
    return out


def scatter_blocks(cache: torch.Tensor, block_ids: Sequence[int], kv: torch.Tensor,
                   layers: slice = slice(None)) -> None:
    """`Platform.scatter_blocks` for a CUDA cache; `kv` in GPU memory or page-locked host memory is read
    by the kernel where it was built, anything else goes through torch."""
    num_tokens = kv.shape[2]
    check_blocks(cache, block_ids, num_tokens)
    if not (kernel_ready(cache.device) and num_tokens and
            _launch(cache, _ids(cache, block_ids, num_tokens), kv, layers, True)):
        torch_scatter_blocks(cache, block_ids, kv, layers)


# -- the first-use check -----------------------------------------------------------------------------

_checked: dict[torch.device, bool] = {}
_check_lock = threading.Lock()


def mode() -> str:
    value = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def kernel_ready(device: torch.device) -> bool:
    """The kernel is built, allowed, and copies like torch on `device` (checked once per device)."""
    if native is None or device.type != "cuda" or mode() == "torch":
        return False
    with _check_lock:
        if device not in _checked:
            _checked[device] = _self_check(device)
        return _checked[device]


def _self_check(device: torch.device) -> bool:
    ids, tokens = [5, 1, 7], 10  # a partial last block
    try:
        gen = torch.Generator().manual_seed(0)
        cache = torch.randn((2, 3, 8, 4, 2, 8), generator=gen).to(device, torch.bfloat16)
        want = torch_gather_blocks(cache, ids, tokens).contiguous()
        written = (want[:, 1:] * 2).contiguous()  # layers 1 and 2
        expected = cache.clone()
        torch_scatter_blocks(expected, ids, written, slice(1, 3))
        for host in (False, True):
            out = torch.empty(want.shape, dtype=want.dtype, pin_memory=host, device=None if host else device)
            src = written.cpu().pin_memory() if host else written
            back = cache.clone()
            ran = (_launch(cache, _ids(cache, ids, tokens), out, slice(None), False)
                   and _launch(back, _ids(cache, ids, tokens), src, slice(1, 3), True))
            torch.cuda.synchronize(device)
            if not (ran and torch.equal(out.to(device), want) and torch.equal(back, expected)):
                raise RuntimeError(f"the kernel's bytes differ from torch's (host chunk: {host})")
    except Exception:
        logger.error("kvtier's CUDA paged copy kernel failed its check on %s; torch does the copies",
                     device, exc_info=True)
        return False
    logger.info("kvtier's CUDA paged copy kernel is in use on %s", device)
    return True
