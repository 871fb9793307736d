"""Tests for kvtier/tiers/coded.py: per-tier codecs, end to end through real tiers.

A CacheEngine whose disk tier (or real Redis, or a real kvtier_server) is configured with a cachegen
codec stores a prompt, drops it from host memory and retrieves it from below: lossless is bit-exact,
the lossy levels stay within the quantiser's bound (half a bin of each (kv, layer, token)'s scale,
kvtier/codecs/quantize.py), the tier holds several times fewer bytes, and the coded/decoded
counters say so. Also: CodedTier's own put (already-coded records pass through, refused chunks stay
raw, counters only for what was stored), fleet key reporting through the wrapper, non-finite KV.
"""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import torch
from conftest import seeded_kv, seeded_tokens

from kvtier import storage_admin
from kvtier.codecs.base import CACHEGEN_ID, RAW_ID
from kvtier.codecs.cachegen import preset_bins
from kvtier.codecs.records import codec_named, decode_chunk, encode_chunk
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.metrics import Metrics
from kvtier.record import decode_header, encode_header, tensor_bytes
from kvtier.tiers.base import PutItem
from kvtier.tiers.coded import CodedTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.wrapped import wrap

# 4 layers x 64 channels x 64 tokens: 64 KiB raw chunks, large enough for the coder's tables and
# scales to be a small part of a record (the default test chunk, 4 KiB, would not shrink much).
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.float16)
TOKENS = 64
CHUNKS = 4
RAW_FILE = 4096 + LAYOUT.chunk_bytes(TOKENS)  # a raw chunk's disk file: header block + payload
# What a coded disk tier must save at least on Gaussian KV (measured: 3.4x, 3.4x, 2.8x, 1.13x):
# the lossy levels code ~3-5 bits a value, lossless only what the noise's low bytes leave.
MIN_RATIO = {"cachegen-1": 3.0, "cachegen-2": 3.0, "cachegen-3": 2.5, "cachegen-lossless": 1.05}


def engine_with(make_engine, config: str = "cpu_disk", **overrides):
    return make_engine(config, LAYOUT, chunk_size=TOKENS, cpu__capacity="2MiB", **overrides)


def stored_below(engine, tier: str, seed: int = 3, records: int | None = CHUNKS):
    """(tokens, kv) stored, flushed to `tier` and dropped from host memory. `records`: the tier's
    record count after it; None for a shared store (Redis, kvtier_server), whose usage counts
    every test's records: there, the prompt's keys must be held."""
    tokens, kv = seeded_tokens(CHUNKS * TOKENS, seed), seeded_kv(LAYOUT, CHUNKS * TOKENS, seed)
    engine.store(tokens, kv)
    assert engine.flush(timeout=30)
    engine.clear("cpu")
    assert engine.stats()["tiers"]["cpu"]["chunks"] == 0
    if records is None:
        assert engine.tier(tier).has(engine.db.keys(tokens)) == [True] * CHUNKS
    else:
        assert engine.stats()["tiers"][tier]["chunks"] == records
    return tokens, kv


def assert_within_half_a_bin(got: torch.Tensor, kv: torch.Tensor, level: int) -> None:
    """|x_hat - x| <= scale / (2M) per value (scale: max |x| of its (kv, layer, token); M per
    (kv, layer) from the level's bins), plus the rounding of x_hat to fp16 (half an ulp)."""
    x, y = kv.float(), got.float()
    scale = x.abs().amax(dim=-1, keepdim=True)
    m = torch.from_numpy(preset_bins(level, LAYOUT.num_layers) // 2 - 1).float()[:, :, None, None]
    bound = scale / (2 * m) * (1 + 1e-5) + y.abs() * 2.0**-11 + 2.0**-24
    assert ((y - x).abs() <= bound).all()
    assert not torch.equal(got, kv)  # it did go through the quantiser
    # ...and not far: the error is a real fraction of the bound, not of the values.
    assert (y - x).abs().max() <= (scale / (2 * m)).max() * 1.01


def check_served_from(engine, tier: str, tokens, kv, codec: str) -> dict:
    got, n = engine.retrieve(tokens)
    assert n == CHUNKS * TOKENS
    if codec == "cachegen-lossless":
        assert torch.equal(got, kv)
    else:
        assert_within_half_a_bin(got, kv, int(codec.removeprefix("cachegen-")))
    stats = engine.stats()
    assert stats["tiers"][tier]["hits"] == CHUNKS and stats["tiers"][tier]["corrupt"] == 0
    assert (stats["coded_chunks"], stats["decoded_chunks"], stats["decode_failures"]) == (CHUNKS, CHUNKS, 0)
    assert stats["coded_raw_bytes"] == CHUNKS * LAYOUT.chunk_bytes(TOKENS)
    assert stats["coded_raw_bytes"] >= MIN_RATIO[codec] * stats["coded_bytes"]
    assert stats["tiers"][tier]["bytes_written"] == stats["coded_bytes"]  # the tier got the coded bytes
    # Promoted raw: a second retrieve is served from host memory, decoded no more.
    again, _ = engine.retrieve(tokens)
    assert torch.equal(again, got) and engine.stats()["decoded_chunks"] == CHUNKS
    return stats


# -- through the disk tier -----------------------------------------------------------------------


@pytest.mark.parametrize("codec", sorted(MIN_RATIO))
def test_disk_tier_stores_coded_records_and_serves_them_decoded(make_engine, codec):
    engine = engine_with(make_engine, disk__codec=codec)
    disk = engine.tier("disk")
    assert isinstance(disk, CodedTier) and isinstance(disk.inner, DiskTier)

    tokens, kv = stored_below(engine, "disk")
    used = disk.usage().bytes

    assert used * MIN_RATIO[codec] <= CHUNKS * RAW_FILE
    check_served_from(engine, "disk", tokens, kv, codec)


def test_a_raw_disk_tier_is_not_wrapped_and_stores_raw_records(make_engine):
    engine = engine_with(make_engine)
    assert isinstance(engine.tier("disk"), DiskTier)
    tokens, kv = stored_below(engine, "disk")
    assert engine.tier("disk").usage().bytes == CHUNKS * RAW_FILE
    got, _ = engine.retrieve(tokens)
    assert torch.equal(got, kv) and engine.stats()["coded_chunks"] == engine.stats()["decoded_chunks"] == 0


def test_non_finite_kv_under_a_lossy_codec_is_stored_raw_and_read_back_exactly(make_engine):
    engine = engine_with(make_engine, disk__codec="cachegen-2")
    tokens, kv = seeded_tokens(CHUNKS * TOKENS, 5), seeded_kv(LAYOUT, CHUNKS * TOKENS, 5)
    kv[0, 1, 3, 7] = float("inf")  # chunk 0
    kv[1, 2, TOKENS + 5, 0] = float("nan")  # chunk 1
    engine.store(tokens, kv)
    assert engine.flush(timeout=30)
    engine.clear("cpu")

    got, n = engine.retrieve(tokens)

    assert n == CHUNKS * TOKENS
    assert torch.equal(got[:, :, : 2 * TOKENS].view(torch.int16), kv[:, :, : 2 * TOKENS].view(torch.int16))
    assert_within_half_a_bin(got[:, :, 2 * TOKENS :], kv[:, :, 2 * TOKENS :], 2)
    stats = engine.stats()
    assert (stats["coded_chunks"], stats["decoded_chunks"]) == (2, 2)


def test_a_wrapped_disk_tier_still_reports_its_keys_to_the_fleet(make_engine):
    engine = engine_with(make_engine, disk__codec="cachegen-2")
    events: list[tuple[str, str, ChunkKey]] = []
    lock = threading.Lock()

    def listener(op, tier, key):
        with lock:
            events.append((op, tier, key))

    storage_admin.add_key_listener(engine.storage, listener)
    tokens, _ = stored_below(engine, "disk")
    keys = engine.db.keys(tokens)

    assert sorted(storage_admin.key_snapshot(engine.storage)["disk"]) == sorted(keys)
    with lock:
        on_disk = {key for op, tier, key in events if tier == "disk"}
    assert on_disk == set(keys)
    storage_admin.remove_key_listener(engine.storage, listener)


def test_an_adaptive_disk_tier_is_wired_in_and_read_through_the_decoder(make_engine):
    # (kvtier.tiers.adaptive's own tests cover its planning; here: the engine builds it from the
    # config, its headers come back decoded by the reader, and the fleet sees base keys only.)
    engine = engine_with(make_engine, disk__codec="cachegen-adaptive", disk__load_slo_s="60")
    tokens, kv = stored_below(engine, "disk", records=3 * CHUNKS)  # each chunk at levels 1, 2 and 3
    assert sorted(storage_admin.key_snapshot(engine.storage)["disk"]) == sorted(engine.db.keys(tokens))

    got, n = engine.retrieve(tokens)

    assert n == CHUNKS * TOKENS
    assert_within_half_a_bin(got, kv, 3)  # a minute's SLO: every chunk at the top level
    stats = engine.stats()
    assert stats["decoded_chunks"] == stats["adaptive_level3_chunks"] == CHUNKS
    assert stats["decode_failures"] == 0


# -- through a real Redis and a real kvtier_server -------------------------------------------------


def test_redis_tier_stores_coded_records_and_serves_them_decoded(make_engine, redis_server):
    engine = engine_with(make_engine, "redis", model_id=f"coded-{uuid.uuid4().hex}", disk="null",
                         redis__url=redis_server.url, redis__codec="cachegen-2")
    try:
        tokens, kv = stored_below(engine, "redis", records=None)
        check_served_from(engine, "redis", tokens, kv, "cachegen-2")
    finally:
        engine.clear("redis")


@pytest.mark.parametrize("codec", ["cachegen-1", "cachegen-lossless"])
def test_kvtier_server_tier_stores_coded_records_and_serves_them_decoded(make_engine, kvtier_server, codec):
    engine = engine_with(make_engine, "remote", model_id=f"coded-{uuid.uuid4().hex}", disk="null",
                         remote__url=kvtier_server.url, remote__codec=codec)
    try:
        tokens, kv = stored_below(engine, "remote", records=None)
        check_served_from(engine, "remote", tokens, kv, codec)
    finally:
        engine.clear("remote")


# -- CodedTier.put ---------------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path) -> DiskTier:
    metrics = Metrics(["cpu", "disk"])
    tier = DiskTier(tmp_path / "disk", b"coded-ns", 1 << 24, lambda key: False, metrics)
    yield tier
    tier.close()


def raw_item(i: int, kv: torch.Tensor) -> PutItem:
    key = ChunkKey(b"coded-ns", i.to_bytes(16, "little"))
    payload = tensor_bytes(kv)
    return PutItem(key, encode_header(key, tuple(kv.shape), kv.dtype, payload),
                   torch.frombuffer(bytearray(payload), dtype=torch.uint8))


def test_put_codes_raw_items_passes_coded_ones_through_and_keeps_refused_ones_raw(disk):
    metrics = Metrics(["cpu", "disk"])
    tier = wrap(CodedTier, disk, codec_named("cachegen-2"), metrics)
    kv = seeded_kv(LAYOUT, TOKENS, 1)
    coded_key = ChunkKey(b"coded-ns", (9).to_bytes(16, "little"))
    header, payload = encode_chunk(coded_key, kv, codec_named("cachegen-3"))  # compress chose level 3
    bf16 = seeded_kv(KVLayout(4, 2, 32, torch.bfloat16), TOKENS, 2)
    fp32 = seeded_kv(KVLayout(4, 2, 32, torch.float32), TOKENS, 3)
    fp32[0, 0, 0, 0] = float("inf")  # a lossy level refuses non-finite KV: stored raw
    items = [raw_item(0, kv), PutItem(coded_key, header, np.frombuffer(payload, dtype=np.uint8)),
             raw_item(1, bf16), raw_item(2, fp32)]
    items.append(PutItem(items[0].key, items[0].header, items[0].payload.numpy()))  # numpy payload

    assert tier.put(items) == [True] * 5

    codecs = {}
    for item in items:
        dest = np.zeros(fp32.nbytes + 4096, dtype=np.uint8)
        got = disk.get([item.key], [dest])[0]
        codecs[int.from_bytes(item.key.digest, "little")] = (got.codec, got.payload_len)
    coded_len = codecs[0][1]
    assert codecs[9] == (CACHEGEN_ID, len(payload))  # stored as it came, not recoded at level 2
    assert codecs[0][0] == codecs[1][0] == CACHEGEN_ID and coded_len * 3 < kv.nbytes
    assert codecs[2] == (RAW_ID, fp32.nbytes)
    assert decode_header(items[1].header).codec == CACHEGEN_ID
    # Counted: the three raw items that were coded (chunk 0 twice: both puts were stored).
    assert metrics.value("kvtier_coded_chunks_total") == 3
    assert metrics.value("kvtier_coded_raw_bytes_total") == 2 * kv.nbytes + bf16.nbytes
    assert metrics.value("kvtier_coded_bytes_total") == 2 * coded_len + codecs[1][1]


def test_put_counts_only_what_the_inner_tier_stored(tmp_path):
    metrics = Metrics(["cpu", "disk"])
    kv = seeded_kv(LAYOUT, TOKENS, 1)
    small = DiskTier(tmp_path / "small", b"coded-ns", 4096, lambda key: False, metrics)  # no room
    try:
        tier = wrap(CodedTier, small, codec_named("cachegen-1"), metrics)
        assert tier.put([raw_item(0, kv)]) == [False]
        assert metrics.value("kvtier_coded_chunks_total") == 0
        assert metrics.value("kvtier_coded_bytes_total") == 0
    finally:
        small.close()


def test_put_from_several_threads_at_once(disk):
    metrics = Metrics(["cpu", "disk"])
    tier = wrap(CodedTier, disk, codec_named("cachegen-2"), metrics)
    kvs = [seeded_kv(LAYOUT, TOKENS, 10 + i) for i in range(8)]
    results: list[list[bool]] = []
    threads = [threading.Thread(target=lambda i=i: results.append(tier.put([raw_item(i, kvs[i])])))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == [[True]] * 8 and metrics.value("kvtier_coded_chunks_total") == 8
    for i, kv in enumerate(kvs):
        dest = np.zeros(kv.nbytes, dtype=np.uint8)
        header = disk.get([raw_item(i, kv).key], [dest])[0]
        out = torch.empty_like(kv)
        decode_chunk(header, dest[: header.payload_len].tobytes(), out)
        assert_within_half_a_bin(out, kv, 2)
