"""Tests for kvtier/platforms/cpu_ops.py and its C++ extension (csrc/paged_copy.cpp): the same bytes
as the torch fallback for every dtype, partial block, layer range and thread count, and a wrong call
refused before a byte moves."""

from __future__ import annotations

import pytest
import torch

from kvtier.platforms import cpu_ops
from kvtier.platforms.base import torch_gather_blocks, torch_scatter_blocks

pytestmark = pytest.mark.skipif(cpu_ops.native is None, reason="the C++ paged copies were not built")

L, NB, BS, H, D = 4, 9, 8, 2, 6
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]


def cache(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    raw = torch.randint(0, 255, (2, L, NB, BS, H, D), generator=torch.Generator().manual_seed(seed))
    return raw.to(dtype)


@pytest.fixture(params=[1, 3])
def threads(request, monkeypatch):
    """torch's intra-op threads, which the extension splits its copies over."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [0, 1, 8, 13, 40])
def test_gather_gives_the_fallback_s_bytes(dtype, num_tokens, threads):
    kv_cache, ids = cache(dtype), [7, 2, 0, 5, 8]
    got = cpu_ops.gather_blocks(kv_cache, ids, num_tokens)
    assert got.dtype == dtype and torch.equal(got, torch_gather_blocks(kv_cache, ids, num_tokens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_tokens", "layers"), [(13, slice(None)), (40, slice(1, 3)), (8, slice(3, 4))])
def test_scatter_gives_the_fallback_s_bytes(dtype, num_tokens, layers, threads):
    ids = [7, 2, 0, 5, 8]
    kv = torch_gather_blocks(cache(dtype, seed=1), [1, 3, 4, 6, 8], num_tokens)[:, layers]
    want, got = cache(dtype), cache(dtype)
    torch_scatter_blocks(want, ids, kv, layers)
    cpu_ops.scatter_blocks(got, ids, kv, layers)
    assert torch.equal(got, want)


def test_a_chunk_in_another_dtype_or_layout_is_converted_like_the_fallback():
    kv = torch_gather_blocks(cache(torch.float32, seed=2), [0, 1], 12)
    kv = kv.transpose(0, 1).contiguous().transpose(0, 1)
    want, got = cache(torch.bfloat16), cache(torch.bfloat16)
    torch_scatter_blocks(want, [4, 5], kv)
    cpu_ops.scatter_blocks(got, [4, 5], kv)  # float32, not contiguous: converted first
    assert torch.equal(got, want)


def test_gather_into_a_buffer_fills_it_and_refuses_one_of_another_shape():
    kv_cache = cache(torch.float16)
    out = torch.empty(2, L, 13, H * D, dtype=torch.float16)
    assert cpu_ops.gather_blocks(kv_cache, [3, 1], 13, out) is out
    assert torch.equal(out, torch_gather_blocks(kv_cache, [3, 1], 13))
    with pytest.raises(ValueError, match="out must be a contiguous CPU torch.float16 tensor of shape"):
        cpu_ops.gather_blocks(kv_cache, [3, 1], 12, out)


def test_a_cache_the_extension_cannot_take_goes_to_the_fallback():
    strided = cache(torch.float32).transpose(2, 3)  # not contiguous
    assert torch.equal(cpu_ops.gather_blocks(strided, [1, 2], 5), torch_gather_blocks(strided, [1, 2], 5))


def test_bad_ids_and_shapes_are_refused_before_anything_moves():
    kv_cache = cache(torch.float32)
    before = kv_cache.clone()
    with pytest.raises(ValueError, match="block ids must be in"):
        cpu_ops.scatter_blocks(kv_cache, [0, NB], torch.ones(2, L, 12, H * D))
    with pytest.raises(ValueError, match="does not fit layers 0:4"):
        cpu_ops.scatter_blocks(kv_cache, [0, 1], torch.ones(2, L - 1, 12, H * D))
    with pytest.raises(ValueError, match="tokens do not fit"):
        cpu_ops.gather_blocks(kv_cache, [0], BS + 1)
    assert torch.equal(kv_cache, before)


def test_the_extension_checks_its_buffers_itself():
    native, out = cpu_ops.native, torch.empty(2 * L * 4 * H * D * 4, dtype=torch.uint8)
    source = cache(torch.float32).view(-1).view(torch.uint8).numpy()
    ids = torch.tensor([0], dtype=torch.int64).numpy()
    with pytest.raises(ValueError, match="out is smaller than its geometry says"):
        native.gather(source, ids, out.numpy(), L, NB, BS, H * D * 4, BS, 1)  # 8 rows into room for 4
    with pytest.raises(ValueError, match="a block id is out of range"):
        bad = torch.tensor([NB], dtype=torch.int64).numpy()
        native.gather(source, bad, out.numpy(), L, NB, BS, H * D * 4, 4, 1)
    with pytest.raises(ValueError, match="ids must be a contiguous int64 buffer"):
        native.gather(source, ids.astype("int32"), out.numpy(), L, NB, BS, H * D * 4, 4, 1)
    with pytest.raises(ValueError, match="the layers are not the cache's"):
        native.scatter(source.copy(), ids, out.numpy(), 2, 3, L, NB, BS, H * D * 4, 4, 1)
