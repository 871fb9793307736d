"""The CUDA platform's paged copies (kvtier.platforms.cuda_ops).

CUDA cannot run on the CI machine, so the kernel's arguments are checked on the CPU instead: the
arguments `row_copy` builds are run through a Python model of the kernel (the same row arithmetic
on raw addresses, with ctypes, reading the 16 integers in the order csrc/paged_copy_cuda.cu's
`copy` takes them) and must move exactly the bytes torch's fallback moves. The kernel itself is
compared with torch by the GPU-only test at the end (skipped here) and by the platform's first-use
check on every GPU machine.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from kvtier.platforms import cuda_ops
from kvtier.platforms.base import torch_gather_blocks, torch_scatter_blocks


def model_kernel(args: tuple[int, ...]) -> None:
    """csrc/paged_copy_cuda.cu's copy_rows, one row at a time, on CPU addresses."""
    to_cache, cache, *cache_strides = args[:6]
    chunk, *chunk_strides = args[6:10]
    ids_ptr, layers, tokens, block_size, row_bytes, _stream = args[10:]
    ids = (ctypes.c_int64 * -(-tokens // block_size)).from_address(ids_ptr)
    for k in range(2):
        for layer in range(layers):
            for t in range(tokens):
                cache_row = (cache + k * cache_strides[0] + layer * cache_strides[1]
                             + ids[t // block_size] * cache_strides[2] + (t % block_size) * cache_strides[3])
                chunk_row = chunk + k * chunk_strides[0] + layer * chunk_strides[1] + t * chunk_strides[2]
                dst, src = (cache_row, chunk_row) if to_cache else (chunk_row, cache_row)
                ctypes.memmove(dst, src, row_bytes)


def cache_of(dtype: torch.dtype, layers: int = 3, blocks: int = 9, block_size: int = 4) -> torch.Tensor:
    values = torch.randn((2, layers, blocks, block_size, 2, 8), generator=torch.Generator().manual_seed(3))
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8])
@pytest.mark.parametrize("tokens", [1, 4, 10, 12])
def test_the_kernels_arguments_gather_what_torch_gathers(dtype, tokens):
    cache = cache_of(dtype)
    block_ids = [7, 0, 5]
    want = torch_gather_blocks(cache, block_ids, tokens)
    out = torch.full(want.shape, 99).to(dtype)
    ids = cuda_ops._ids(cache, block_ids, tokens)
    model_kernel(cuda_ops.row_copy(cache, ids, out, slice(None), False).args(0))
    assert torch.equal(out, want)


@pytest.mark.parametrize("layers", [slice(None), slice(1, 2), slice(1, 3)])
def test_the_kernels_arguments_scatter_a_strided_chunk_into_a_layer_range_as_torch_does(layers):
    cache = cache_of(torch.bfloat16)
    n = len(range(*layers.indices(3)))
    # a load's chunk is a narrow of the staging buffer: its layer and K/V strides span more tokens
    staging = torch.randn((2, n, 20, 16), generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    chunk = staging.narrow(2, 3, 10)
    block_ids = [8, 2, 6]
    want = cache.clone()
    torch_scatter_blocks(want, block_ids, chunk, layers)
    got = cache.clone()
    ids = cuda_ops._ids(got, block_ids, 10)
    model_kernel(cuda_ops.row_copy(got, ids, chunk, layers, True).args(0))
    assert torch.equal(got, want)
    assert not torch.equal(got, cache)


def test_layouts_the_kernel_cannot_take_go_to_torch_and_a_wrong_shape_is_an_error():
    cache = cache_of(torch.float16)
    ids = cuda_ops._ids(cache, [0, 1, 2], 10)
    heads_split = cache.transpose(4, 5)  # a row is no longer contiguous
    assert cuda_ops.row_copy(heads_split, ids, torch.empty((2, 3, 10, 16), dtype=torch.float16),
                             slice(None), False) is None
    assert cuda_ops.row_copy(cache, ids, torch.empty((2, 3, 10, 16)), slice(None), False) is None  # dtype
    with pytest.raises(ValueError, match="does not fit layers 0:2"):
        cuda_ops.row_copy(cache, ids, torch.empty((2, 3, 10, 16), dtype=torch.float16), slice(0, 2), True)


def test_without_a_gpu_the_kernel_is_never_ready_and_torch_does_the_copies():
    cache = cache_of(torch.float32)
    assert not cuda_ops.kernel_ready(cache.device)
    got = cuda_ops.gather_blocks(cache, [4, 3], 6)
    assert torch.equal(got, torch_gather_blocks(cache, [4, 3], 6))
    into = cache.clone()
    cuda_ops.scatter_blocks(into, [1, 2], got)
    assert torch.equal(cuda_ops.gather_blocks(into, [1, 2], 6), got)
    with pytest.raises(ValueError, match="out must be"):
        cuda_ops.gather_blocks(cache, [4, 3], 6, out=torch.empty((2, 3, 5, 16)))


def test_the_mode_variable_forces_torch_and_a_bad_value_names_it(monkeypatch):
    monkeypatch.setattr(cuda_ops, "native", object())  # "built": only the variable says no
    monkeypatch.setenv(cuda_ops.MODE_ENV, "torch")
    assert cuda_ops.mode() == "torch" and not cuda_ops.kernel_ready(torch.device("cuda", 0))
    monkeypatch.setenv(cuda_ops.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="KVTIER_CUDA_PAGED_COPY='fast'"):
        cuda_ops.mode()


def test_a_kernel_that_fails_its_first_use_check_is_switched_off_and_logged(monkeypatch, caplog):
    monkeypatch.setattr(cuda_ops, "native", object())  # "built", but nothing here can run it
    monkeypatch.setattr(cuda_ops, "_checked", {})
    device = torch.device("cuda", 0)
    assert not cuda_ops.kernel_ready(device)
    assert "failed its check" in caplog.text and cuda_ops._checked == {device: False}


@pytest.mark.skipif(not torch.cuda.is_available() or cuda_ops.native is None,
                    reason="needs a GPU and the built CUDA kernel (CI has neither)")
@pytest.mark.parametrize("host", [False, True])
@pytest.mark.parametrize("tokens", [1, 16, 37, 256])
def test_on_a_gpu_the_kernel_moves_what_torch_moves(host, tokens):
    assert cuda_ops.kernel_ready(torch.device("cuda"))
    cache = cache_of(torch.bfloat16, layers=4, blocks=40, block_size=16).cuda()
    block_ids = list(range(39, 39 - 17, -1))
    want = torch_gather_blocks(cache, block_ids, tokens).contiguous()
    out = torch.empty(want.shape, dtype=want.dtype, pin_memory=True) if host else None
    got = cuda_ops.gather_blocks(cache, block_ids, tokens, out=out)
    torch.cuda.synchronize()
    assert torch.equal(got.cuda(), want)
    src = (want * 3).cpu().pin_memory() if host else want * 3
    back, expected = cache.clone(), cache.clone()
    cuda_ops.scatter_blocks(back, block_ids, src[:, 1:3], slice(1, 3))
    torch_scatter_blocks(expected, block_ids, (want * 3)[:, 1:3], slice(1, 3))
    torch.cuda.synchronize()
    assert torch.equal(back, expected)
