"""Tests for the decoding step of kvtier/transfers.py (TierReader): a coded record read from any tier
is decoded in place on the thread that ran the tier's `get`, whatever codec the tier is configured
with; one that fails to decode is a miss, counted (tier `corrupt`, `decode_failures`) and removed,
never wrong KV; one whose header's shape or dtype is not the request's is rejected as before.

Real disk tiers in tmp_path; coded records are put into a raw-configured tier directly (as a
`compress`, or a codec changed in the config, leaves them), corrupted ones re-checksummed so that
only the decoder sees the damage.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import seeded_kv, seeded_tokens

from kvtier.codecs.base import CACHEGEN_ID
from kvtier.codecs.records import codec_named, encode_chunk
from kvtier.job_queue import TransferQueue
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.record import decode_header, encode_header
from kvtier.tiers.base import PutItem
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.wrapped import WrappedTier
from kvtier.transfers import ReadRequest, TierReader

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.float16)
TOKENS = 64
SHAPE = LAYOUT.chunk_shape(TOKENS)


def chunk_of(kv: torch.Tensor, i: int) -> torch.Tensor:
    return kv[:, :, i * TOKENS : (i + 1) * TOKENS].contiguous()


def coded_item(key: ChunkKey, chunk: torch.Tensor, codec: str = "cachegen-lossless") -> PutItem:
    header, payload = encode_chunk(key, chunk, codec_named(codec))
    assert decode_header(header).codec == CACHEGEN_ID  # it did shrink: a coded record
    return PutItem(key, header, np.frombuffer(payload, dtype=np.uint8))


def recoded(item: PutItem, payload: bytes) -> PutItem:
    """`item` with another payload under a valid checksum: only the decoder can see the damage."""
    h = decode_header(item.header)
    header = encode_header(item.key, h.shape, h.dtype, payload, codec=h.codec)
    return PutItem(item.key, header, np.frombuffer(payload, dtype=np.uint8))


def flipped(data: bytes, at: int, value: int | None = None) -> bytes:
    bad = bytearray(data)
    bad[at] = value if value is not None else bad[at] ^ 0xFF
    return bytes(bad)


DAMAGE = {
    "magic": lambda p: flipped(p, 0),  # not a cachegen record
    "level": lambda p: flipped(p, 5, 9),  # no such level
    "shape": lambda p: flipped(p, 8, p[8] + 1),  # L disagrees with the record's header
    "truncated": lambda p: p[: len(p) // 2],
    "one byte short": lambda p: p[:-1],  # the streams' lengths no longer add up
}


@pytest.fixture
def engine_and_prompt(make_engine):
    """A raw-disk engine and a two-chunk prompt whose KV is not stored anywhere yet."""
    engine = make_engine("cpu_disk", LAYOUT, chunk_size=TOKENS, cpu__capacity="2MiB")
    tokens, kv = seeded_tokens(2 * TOKENS, 11), seeded_kv(LAYOUT, 2 * TOKENS, 11)
    return engine, tokens, kv


def counts(engine) -> tuple[int, int, int]:
    stats = engine.stats()
    return stats["tiers"]["disk"]["corrupt"], stats["decode_failures"], stats["decoded_chunks"]


@pytest.mark.parametrize("codec", ["cachegen-lossless", "cachegen-3"])
def test_a_raw_configured_tier_serves_coded_records_decoded(engine_and_prompt, codec):
    engine, tokens, kv = engine_and_prompt
    disk = engine.tier("disk")
    assert isinstance(disk, DiskTier)  # codec: raw, not wrapped
    keys = engine.db.keys(tokens)
    assert disk.put([coded_item(k, chunk_of(kv, i), codec) for i, k in enumerate(keys)]) == [True, True]

    got, n = engine.retrieve(tokens)

    assert n == 2 * TOKENS and counts(engine) == (0, 0, 2)
    if codec == "cachegen-lossless":
        assert torch.equal(got, kv)
    else:
        assert not torch.equal(got, kv) and (got.float() - kv.float()).abs().max() < 0.2
    assert engine.stats()["tiers"]["cpu"]["chunks"] == 2  # promoted raw


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_coded_record_that_fails_to_decode_is_a_counted_removed_miss(engine_and_prompt, damage):
    engine, tokens, kv = engine_and_prompt
    disk = engine.tier("disk")
    keys = engine.db.keys(tokens)
    good = coded_item(keys[0], chunk_of(kv, 0))
    second = coded_item(keys[1], chunk_of(kv, 1))
    bad = recoded(second, DAMAGE[damage](bytes(second.payload)))
    assert disk.put([good, bad]) == [True, True]

    got, n = engine.retrieve(tokens)

    assert n == TOKENS and torch.equal(got[:, :, :TOKENS], kv[:, :, :TOKENS])  # never wrong KV
    assert counts(engine) == (1, 1, 1)
    assert disk.has(keys) == [True, False]  # removed
    assert engine.lookup(tokens) == TOKENS


@pytest.mark.parametrize("mismatch", ["dtype", "shape"])
def test_a_coded_record_of_another_dtype_or_shape_is_rejected_not_decoded(engine_and_prompt, mismatch):
    engine, tokens, kv = engine_and_prompt
    disk = engine.tier("disk")
    key = engine.db.keys(tokens)[0]
    chunk = chunk_of(kv, 0)
    other = chunk.to(torch.bfloat16) if mismatch == "dtype" else chunk[:, :, : TOKENS // 2].contiguous()
    assert disk.put([coded_item(key, other)]) == [True]

    got, n = engine.retrieve(tokens)

    assert n == 0 and counts(engine) == (1, 0, 0)  # corrupt, but no decode was tried
    assert disk.has([key]) == [False]


# -- TierReader directly: pooled jobs and a tier that fans out, tensor and numpy buffers --------------


class FansOut(WrappedTier):
    """A disk tier that says it fans out (as P2P does), recording the threads its reads run on."""

    def __init__(self, inner):
        super().__init__(inner)
        self.fans_out = True
        self.threads: set[int] = set()

    def get(self, keys, dests):
        self.threads.add(threading.get_ident())
        return self.inner.get(keys, dests)


@pytest.mark.parametrize("fans_out", [False, True])
@pytest.mark.parametrize("buffers", ["pool", "numpy"])
def test_the_reader_decodes_on_the_thread_that_read(tmp_path, fans_out, buffers):
    metrics = Metrics(["cpu", "disk"])
    disk = DiskTier(tmp_path / "disk", b"decoders", 1 << 24, lambda key: False, metrics)
    tier = FansOut(disk) if fans_out else disk
    queue = TransferQueue(2)
    pool = MemoryPool(8 * LAYOUT.chunk_bytes(TOKENS), LAYOUT.chunk_bytes(TOKENS), pin=False)
    try:
        kv = seeded_kv(LAYOUT, 4 * TOKENS, 4)
        keys = [ChunkKey(b"decoders", bytes([i]) * 16) for i in range(4)]
        assert disk.put([coded_item(k, chunk_of(kv, i)) for i, k in enumerate(keys)]) == [True] * 4
        if buffers == "pool":
            dests = [pool.tensor(pool.alloc("test"), pool.slab_stride) for _ in keys]
        else:
            dests = [np.zeros(LAYOUT.chunk_bytes(TOKENS), dtype=np.uint8) for _ in keys]
        reader = TierReader([tier], LAYOUT.dtype, metrics, queue)

        found = reader.finish(reader.start([ReadRequest(k, d, SHAPE) for k, d in zip(keys, dests)]))

        assert found == [True] * 4
        for i, dest in enumerate(dests):
            raw = torch.as_tensor(dest[: LAYOUT.chunk_bytes(TOKENS)])
            assert torch.equal(raw.view(LAYOUT.dtype).view(SHAPE), chunk_of(kv, i))
        assert metrics.value("kvtier_decoded_chunks_total") == 4
        if fans_out:
            assert tier.threads == {threading.get_ident()}  # read and decoded here, not on the pool
    finally:
        queue.close()
        disk.close()
