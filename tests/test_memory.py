"""Tests for kvtier/memory.py: the slab pool's leases, accounting, alignment and exhaustion."""

from __future__ import annotations

import pytest
import torch

from kvtier.memory import ALIGNMENT, MemoryPool, Slab, align_up

SLAB = 10_000  # deliberately not a multiple of 4096: the stride rounds up to 12288


def pool(num_slabs: int = 4, slab_bytes: int = SLAB) -> MemoryPool:
    return MemoryPool(num_slabs * align_up(slab_bytes), slab_bytes, pin=False)


def test_align_up():
    assert [align_up(n) for n in (0, 1, 4095, 4096, 4097, 8192)] == [0, 4096, 4096, 4096, 8192, 8192]
    assert align_up(5, 8) == 8


def test_geometry():
    p = pool(4)
    assert p.slab_bytes == SLAB
    assert p.slab_stride == 12288
    assert p.num_slabs == 4
    assert p.capacity_bytes == 4 * 12288
    assert (p.used_slabs, p.used_bytes, p.free_slabs) == (0, 0, 4)


def test_capacity_rounds_down_to_whole_slabs():
    p = MemoryPool(3 * 12288 + 12287, SLAB, pin=False)
    assert p.num_slabs == 3


@pytest.mark.parametrize("capacity", [0, 100, 12287])
def test_capacity_smaller_than_one_slab_raises(capacity):
    with pytest.raises(ValueError, match="cannot hold one chunk"):
        MemoryPool(capacity, SLAB, pin=False)


@pytest.mark.parametrize("slab_bytes", [0, -1])
def test_slab_bytes_must_be_positive(slab_bytes):
    with pytest.raises(ValueError, match="slab_bytes"):
        MemoryPool(1 << 20, slab_bytes, pin=False)


def test_alloc_until_exhausted_then_none():
    p = pool(5)
    slabs = []
    while (slab := p.alloc("a")) is not None:
        slabs.append(slab)
        assert len(slabs) <= 5, "the pool handed out more slabs than it has"
    assert len(slabs) == 5
    assert sorted(s.index for s in slabs) == [0, 1, 2, 3, 4]
    assert p.alloc("a") is None  # stays exhausted, never blocks
    assert (p.used_slabs, p.free_slabs, p.used_bytes) == (5, 0, p.capacity_bytes)


def test_free_returns_capacity():
    p = pool(2)
    a, b = p.alloc("x"), p.alloc("x")
    assert p.alloc("x") is None
    p.free(a)
    assert p.free_slabs == 1 and p.used_slabs == 1
    c = p.alloc("y")
    assert c is not None and c.index == a.index and c.owner == "y"
    assert p.alloc("y") is None
    p.free(b)
    p.free(c)
    assert p.used_bytes == 0 and p.free_slabs == 2


def test_used_bytes_back_to_zero_after_freeing_everything():
    p = pool(8)
    slabs = [p.alloc(f"o{i % 3}") for i in range(8)]
    assert p.used_bytes == 8 * p.slab_stride
    for s in slabs[::2] + slabs[1::2]:  # free out of allocation order
        p.free(s)
    assert p.used_bytes == 0 and p.used_slabs == 0 and p.free_slabs == 8
    assert p.owners() == {}


def test_double_free_raises():
    p = pool(2)
    s = p.alloc("a")
    p.free(s)
    with pytest.raises(RuntimeError, match="not a live lease"):
        p.free(s)
    assert p.free_slabs == 2  # the failed free did not push the index twice
    assert {p.alloc("b").index, p.alloc("b").index} == {0, 1}
    assert p.alloc("b") is None


def test_stale_handle_raises_and_leaves_the_new_lease_alone():
    p = pool(1)
    old = p.alloc("a")
    p.free(old)
    new = p.alloc("b")
    assert new.index == old.index
    with pytest.raises(RuntimeError, match="not a live lease"):
        p.free(old)
    assert p.owners() == {"b": 1}
    p.free(new)
    assert p.used_slabs == 0


def test_forged_slab_with_a_live_index_raises():
    # Identity, not equality: a Slab with the same index and owner is not the lease.
    p = pool(1)
    live = p.alloc("a")
    with pytest.raises(RuntimeError):
        p.free(Slab(live.index, live.owner))
    assert p.used_slabs == 1


def test_owners_accounting():
    p = pool(6)
    a1, a2, b1 = p.alloc("a"), p.alloc("a"), p.alloc("b")
    c1 = p.alloc("c")
    assert p.owners() == {"a": 2, "b": 1, "c": 1}
    p.free(a1)
    p.free(c1)
    assert p.owners() == {"a": 1, "b": 1}
    p.free(a2)
    p.free(b1)
    assert p.owners() == {}


def test_slab_tensors_are_aligned_and_sized():
    p = pool(4)
    slabs = [p.alloc("a") for _ in range(4)]
    for s in slabs:
        t = p.tensor(s)
        assert t.dtype == torch.uint8
        assert t.numel() == SLAB
        assert t.data_ptr() % ALIGNMENT == 0
        assert p.tensor(s, 100).numel() == 100
        assert p.tensor(s, 100).data_ptr() == t.data_ptr()
        assert p.tensor(s, p.slab_stride).numel() == p.slab_stride  # O_DIRECT reads round up


def test_slabs_do_not_overlap():
    p = pool(4)
    slabs = [p.alloc("a") for _ in range(4)]
    # Fill each slab's whole stride (padding included) so any overlap would show up.
    for i, s in enumerate(slabs):
        p.tensor(s, p.slab_stride).fill_(i + 1)
    for i, s in enumerate(slabs):
        assert p.tensor(s, p.slab_stride).eq(i + 1).all(), f"slab {s.index} was overwritten"
    ptrs = sorted(p.tensor(s).data_ptr() for s in slabs)
    assert all(b - a >= p.slab_stride for a, b in zip(ptrs, ptrs[1:]))


def test_slab_tensor_is_a_view_into_the_arena():
    p = pool(2)
    s = p.alloc("a")
    p.tensor(s)[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    assert p.tensor(s)[:4].tolist() == [1, 2, 3, 4]


def test_pin_false_is_not_pinned():
    p = pool(1)
    assert p.pinned is False
    assert not p.tensor(p.alloc("a")).is_pinned()


def test_pin_default_follows_cuda_availability():
    p = MemoryPool(align_up(SLAB), SLAB)
    assert p.pinned == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert p.pinned is False


def test_llama_chunk_sized_pool():
    # 32 MiB chunks (Llama-8B, bf16, 256 tokens) are already 4 KiB multiples: no padding.
    chunk = 32 * 2**20
    p = MemoryPool(3 * chunk, chunk, pin=False)
    assert p.slab_stride == chunk and p.num_slabs == 3


def test_copy_chunks_round_trips_runs_of_consecutive_slabs_and_scattered_ones():
    # Chunks 0-1 in consecutive slabs (one copy), chunk 2 in a slab before them, chunk 3 a short
    # tail: every chunk must land in its own slab and come back bit for bit.
    from conftest import CHUNK, seeded_kv, small_layout

    from kvtier.keys import ChunkKey, ChunkSpan

    layout = small_layout()
    p = MemoryPool(6 * layout.chunk_bytes(CHUNK), layout.chunk_bytes(CHUNK), pin=False)
    slabs = [p.alloc("cpu") for _ in range(6)]
    for slab in slabs:
        p.tensor(slab).zero_()  # the arena starts uninitialised
    spans = [ChunkSpan(ChunkKey(b"n" * 8, bytes([i]) * 16), i * CHUNK, min((i + 1) * CHUNK, 3 * CHUNK + 5))
             for i in range(4)]
    placed = list(zip(spans, [slabs[2], slabs[3], slabs[0], slabs[5]]))
    kv = seeded_kv(layout, 3 * CHUNK + 5, 1)

    p.copy_chunks(placed, kv, layout, into_slabs=True)
    for span, slab in placed:
        stored = p.tensor(slab, layout.chunk_bytes(span.num_tokens)).view(layout.dtype)
        assert torch.equal(stored.view(layout.chunk_shape(span.num_tokens)), kv[:, :, span.start:span.end])
    out = torch.zeros_like(kv)
    p.copy_chunks(placed, out, layout, into_slabs=False)
    assert torch.equal(out, kv)
    assert not p.tensor(slabs[1]).any() and not p.tensor(slabs[4]).any()  # no other slab touched
