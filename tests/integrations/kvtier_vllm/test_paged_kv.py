"""Tests for integrations/vllm/kvtier_vllm/paged_kv.py: vLLM's per-layer KV caches in each backend's
layout read and written as kvtier's `[2, L, T, H*D]` chunks. The reference is how each backend reads
its own cache (the CPU backend's view and split, FlashAttention's `kv[0]` / `kv[1]`); the CUDA layouts
are tested on CPU tensors of their shape (no GPU here), the same indexing."""

from __future__ import annotations

import pytest
import torch

from kvtier_vllm.paged_kv import UnsupportedKVLayout, VllmPagedKV, layer_index

L, NB, BS, H, D = 3, 6, 4, 2, 8


def cpu_attn_caches(dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.self_attn.attn": torch.randn(NB, H, BS, 2 * D).to(dtype) for i in range(L)}


def keys_values(name: str, layer: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """([blocks, block, H, D] keys, values) as the backend itself reads `layer`."""
    if layout == "cpu":  # vllm/v1/attention/backends/cpu_attn.py: view, then chunk(2, dim=2)
        k, v = layer.view(NB, H, BS * 2, -1).chunk(2, dim=2)  # [nb, H, bs, D] each
        return k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    if layout == "flash":
        return layer[0], layer[1]
    return layer[:, 0], layer[:, 1]  # flashinfer


def make(layout: str) -> dict[str, torch.Tensor]:
    if layout == "cpu":
        return cpu_attn_caches()
    shape = (2, NB, BS, H, D) if layout == "flash" else (NB, 2, BS, H, D)
    return {f"model.layers.{i}.self_attn.attn": torch.randn(shape) for i in range(L)}


def reference_gather(caches, layout, block_ids, num_tokens) -> torch.Tensor:
    out = torch.empty(2, L, num_tokens, H * D)
    for name, layer in caches.items():
        k, v = keys_values(name, layer, layout)
        for t in range(num_tokens):
            block, slot = block_ids[t // BS], t % BS
            out[0, layer_index(name), t] = k[block, slot].reshape(-1)
            out[1, layer_index(name), t] = v[block, slot].reshape(-1)
    return out


@pytest.mark.parametrize("layout", ["cpu", "flash", "flashinfer"])
@pytest.mark.parametrize("num_tokens", [0, 1, BS, 2 * BS + 3, 3 * BS])
def test_gather_reads_what_the_backend_reads(layout, num_tokens):
    caches = make(layout)
    paged = VllmPagedKV(dict(reversed(caches.items())), H, D)  # (any order of names)
    block_ids = [5, 0, 3][: -(-num_tokens // BS) or 1]
    got = paged.gather(block_ids, num_tokens)
    assert got.shape == (2, L, num_tokens, H * D)
    assert torch.equal(got, reference_gather(caches, layout, block_ids, num_tokens))


@pytest.mark.parametrize("layout", ["cpu", "flash", "flashinfer"])
def test_scatter_writes_only_its_blocks_and_slots_and_gather_reads_them_back(layout):
    caches = make(layout)
    before = {n: t.clone() for n, t in caches.items()}
    paged = VllmPagedKV(caches, H, D)
    kv = torch.randn(2, L, 2 * BS + 1, H * D)
    paged.scatter([4, 1, 2], kv)
    assert torch.equal(paged.gather([4, 1, 2], 2 * BS + 1), kv)
    for name, layer in caches.items():  # blocks 0, 3, 5 and block 2's slots past the first: untouched
        k, v = keys_values(name, layer, layout)
        k0, v0 = keys_values(name, before[name], layout)
        for block in (0, 3, 5):
            assert torch.equal(k[block], k0[block]) and torch.equal(v[block], v0[block])
        assert torch.equal(k[2, 1:], k0[2, 1:]) and torch.equal(v[2, 1:], v0[2, 1:])


def test_a_layer_at_a_time_and_bf16():
    caches = cpu_attn_caches(torch.bfloat16)
    paged = VllmPagedKV(caches, H, D)
    kv = torch.randn(2, L, BS, H * D).to(torch.bfloat16)
    for layer in range(L):
        paged.scatter([3], kv[:, layer:layer + 1], layers=slice(layer, layer + 1))
    assert torch.equal(paged.gather([3], BS), kv) and paged.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [
    {"model.layers.0.attn": torch.zeros(NB, H + 1, BS, 2 * D)},  # another head count
    {"model.layers.0.attn": torch.zeros(NB, H, BS, D)},  # K only
    {"model.layers.0.attn": torch.zeros(2, 2, BS, H, D)},  # FlashAttention or FlashInfer: cannot tell
    {"model.layers.1.attn": torch.zeros(NB, H, BS, 2 * D)},  # no layer 0
    {"lm_head": torch.zeros(NB, H, BS, 2 * D)},  # no layer number
    {},
])
def test_caches_it_cannot_read_are_refused_with_the_layer_and_shape(bad):
    with pytest.raises(UnsupportedKVLayout, match="kvtier"):
        VllmPagedKV(bad, H, D)


def test_layers_of_different_shapes_are_refused():
    caches = cpu_attn_caches()
    caches["model.layers.2.self_attn.attn"] = torch.zeros(NB + 1, H, BS, 2 * D)
    with pytest.raises(UnsupportedKVLayout, match="layers.2"):
        VllmPagedKV(caches, H, D)


def test_tokens_past_the_blocks_or_blocks_past_the_cache_are_refused():
    paged = VllmPagedKV(cpu_attn_caches(), H, D)
    with pytest.raises(ValueError, match="do not fit"):
        paged.gather([1], BS + 1)
    with pytest.raises(ValueError, match="block id"):
        paged.gather([NB], 1)
    with pytest.raises(ValueError, match="block id"):
        paged.scatter([-1], torch.zeros(2, L, 1, H * D))
