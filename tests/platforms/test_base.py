"""Tests for kvtier/platforms/base.py: the torch paged gather/scatter every platform can fall back to
(checked against a per-token copy written out), the synchronous copy stream, and the CPU platform."""

from __future__ import annotations

import pytest
import torch

from kvtier.platforms.base import CopyStream, Platform, SyncStream, torch_gather_blocks, torch_scatter_blocks
from kvtier.platforms.cpu import CpuPlatform
from kvtier.platforms.cuda import CudaPlatform

L, NB, BS, H, D = 3, 6, 4, 2, 5


def cache() -> torch.Tensor:
    return torch.randn(2, L, NB, BS, H, D, generator=torch.Generator().manual_seed(0))


def token_by_token(kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    rows = [kv_cache[:, :, block_ids[t // BS], t % BS].reshape(2, L, 1, H * D) for t in range(num_tokens)]
    return torch.cat(rows, dim=2) if rows else torch.empty(2, L, 0, H * D)


@pytest.mark.parametrize("num_tokens", [0, 1, 4, 7, 12])
def test_gather_is_a_token_by_token_copy_of_the_blocks_in_order(num_tokens):
    kv_cache = cache()
    got = torch_gather_blocks(kv_cache, [5, 0, 3], num_tokens)
    assert got.shape == (2, L, num_tokens, H * D)
    assert torch.equal(got, token_by_token(kv_cache, [5, 0, 3], num_tokens))


@pytest.mark.parametrize("num_tokens", [1, 4, 7, 12])
def test_scatter_is_gathers_inverse_and_touches_nothing_else(num_tokens):
    kv_cache, source = torch.zeros(2, L, NB, BS, H, D), cache()
    kv = token_by_token(source, [1, 2, 4], num_tokens)
    torch_scatter_blocks(kv_cache, [5, 0, 3], kv)
    assert torch.equal(torch_gather_blocks(kv_cache, [5, 0, 3], num_tokens), kv)
    written = torch.zeros(NB, BS, dtype=torch.bool)
    for t in range(num_tokens):
        written[[5, 0, 3][t // BS], t % BS] = True
    assert not kv_cache[:, :, ~written].any()


def test_scatter_of_some_layers_writes_only_those():
    kv_cache = torch.zeros(2, L, NB, BS, H, D)
    kv = token_by_token(cache(), [1, 2], 6)[:, 1:2]
    torch_scatter_blocks(kv_cache, [0, 1], kv, layers=slice(1, 2))
    assert torch.equal(torch_gather_blocks(kv_cache, [0, 1], 6)[:, 1:2], kv)
    assert not kv_cache[:, 0].any() and not kv_cache[:, 2].any()


def test_blocks_that_cannot_hold_the_tokens_or_do_not_exist_are_a_value_error():
    with pytest.raises(ValueError, match="9 tokens do not fit 2 blocks of 4"):
        torch_gather_blocks(cache(), [0, 1], 9)
    with pytest.raises(ValueError, match=r"block ids must be in \[0, 6\)"):
        torch_gather_blocks(cache(), [0, 6], 5)
    with pytest.raises(ValueError, match=r"block ids must be in \[0, 6\)"):
        torch_scatter_blocks(cache(), [-1], torch.zeros(2, L, 2, H * D))


def test_the_cpu_platform_copies_synchronously_into_plain_host_memory():
    cpu = CpuPlatform()
    assert isinstance(cpu, Platform) and isinstance(cpu.copy_stream(), CopyStream)
    stream = cpu.copy_stream()
    with stream.active():
        assert stream.record() is None
    cpu.wait(None)
    buffer = cpu.host_buffer(4096, pinned=False)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 4096 and not buffer.is_pinned()
    assert not cpu.pin_by_default() and cpu.capabilities()["async_copies"] is False


def test_the_sync_stream_and_cuda_platform_satisfy_the_protocols():
    assert isinstance(SyncStream(), CopyStream) and isinstance(CudaPlatform(), Platform)
    assert CudaPlatform().pin_by_default() == torch.cuda.is_available()
