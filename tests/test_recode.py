"""CacheEngine.compress / decompress (kvtier/recode.py): the records a tier below holds, recoded in
place. What a tier holds is read back from the tier itself (its `get` and the record header's codec
id); what a retrieve returns is checked against the stored KV (bit-exact for raw and lossless, within
the quantiser's half bin for the lossy levels: kvtier/codecs/quantize.py)."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest
import torch
from conftest import seeded_kv, seeded_tokens

from kvtier import recode
from kvtier.codecs.base import CACHEGEN_ID, RAW_ID
from kvtier.codecs.cachegen import preset_bins
from kvtier.codecs.records import CODEC_NAMES
from kvtier.errors import UnknownTier
from kvtier.layout import KVLayout
from kvtier.record_files import file_bytes

# 64 KiB raw chunks: large enough for a coded record's tables and scales to be a small part of it
# (the default test chunk, 4 KiB, would hardly shrink in a disk file of 4 KiB blocks).
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.float16)
TOKENS = 64
CHUNKS = 6  # more than recode.BATCH_CHUNKS: several batches


def engine_with(make_engine, config: str = "cpu_disk", **overrides):
    return make_engine(config, LAYOUT, chunk_size=TOKENS, cpu__capacity="2MiB", **overrides)


def stored(engine, seed: int = 3, chunks: int = CHUNKS):
    """(tokens, kv) stored and flushed to the tiers below (host memory still holds them)."""
    tokens, kv = seeded_tokens(chunks * TOKENS, seed), seeded_kv(LAYOUT, chunks * TOKENS, seed)
    assert engine.store(tokens, kv) == chunks
    assert engine.flush(timeout=30)
    return tokens, kv


def codecs_in(engine, tier: str, tokens) -> list[int | None]:
    """The codec id of each chunk's record in `tier` (None: not there), read from the tier itself."""
    inner = recode._innermost(engine.tier(tier))
    keys = engine.db.keys(tokens)
    bufs = [np.empty(LAYOUT.chunk_bytes(TOKENS), dtype=np.uint8) for _ in keys]
    return [None if h is None else h.codec for h in inner.get(keys, bufs)]


def retrieved_from_below(engine, tokens) -> torch.Tensor:
    engine.clear("cpu")
    got, n = engine.retrieve(tokens)
    assert n == len(tokens)
    return got


def half_bin(kv: torch.Tensor, got: torch.Tensor, level: int) -> torch.Tensor:
    """The quantiser's bound per value: scale / (2M) (scale: max |x| of its (kv, layer, token); M
    per (kv, layer) from the level's bins), plus the rounding of x_hat to fp16 (half an ulp)."""
    scale = kv.float().abs().amax(dim=-1, keepdim=True)
    m = torch.from_numpy(preset_bins(level, LAYOUT.num_layers) // 2 - 1).float()[:, :, None, None]
    return scale / (2 * m) * (1 + 1e-5) + got.float().abs() * 2.0**-11 + 2.0**-24


def assert_within_half_a_bin(got: torch.Tensor, kv: torch.Tensor, level: int) -> None:
    assert ((got.float() - kv.float()).abs() <= half_bin(kv, got, level)).all()
    assert not torch.equal(got, kv)  # it did go through the quantiser


# -- disk ------------------------------------------------------------------------------------------

def test_compress_on_disk_shrinks_the_records_and_a_retrieve_is_within_the_quantisers_bound(make_engine):
    engine = engine_with(make_engine)
    tokens, kv = stored(engine)
    disk = engine.tier("disk")
    raw_usage = disk.usage().bytes
    assert raw_usage == CHUNKS * file_bytes(LAYOUT.chunk_bytes(TOKENS))
    assert codecs_in(engine, "disk", tokens) == [RAW_ID] * CHUNKS

    assert engine.compress(tokens, "cachegen-2", "disk") == CHUNKS

    assert codecs_in(engine, "disk", tokens) == [CACHEGEN_ID] * CHUNKS
    assert disk.usage().chunks == CHUNKS and raw_usage >= 2.5 * disk.usage().bytes
    stats = engine.stats()
    assert stats["coded_chunks"] == CHUNKS and stats["coded_raw_bytes"] == CHUNKS * LAYOUT.chunk_bytes(TOKENS)
    assert stats["coded_raw_bytes"] >= 3 * stats["coded_bytes"]
    assert_within_half_a_bin(retrieved_from_below(engine, tokens), kv, 2)
    # Again at the same level: nothing to do (a second quantisation would only add error).
    assert engine.compress(tokens, "cachegen-2", "disk") == 0


def test_lossless_compress_is_bit_exact_and_decompress_brings_raw_records_back(make_engine):
    engine = engine_with(make_engine)
    tokens, kv = stored(engine, seed=4)
    assert engine.compress(tokens, "cachegen-lossless", "disk") == CHUNKS
    assert codecs_in(engine, "disk", tokens) == [CACHEGEN_ID] * CHUNKS
    assert torch.equal(retrieved_from_below(engine, tokens), kv)

    assert engine.decompress(tokens, "disk") == CHUNKS
    assert codecs_in(engine, "disk", tokens) == [RAW_ID] * CHUNKS
    assert engine.tier("disk").usage().bytes == CHUNKS * file_bytes(LAYOUT.chunk_bytes(TOKENS))
    assert torch.equal(retrieved_from_below(engine, tokens), kv)
    assert engine.stats()["decoded_chunks"] >= 2 * CHUNKS  # the retrieve's, then the decompress's
    assert engine.decompress(tokens) == 0  # raw already, in every tier below


def test_decompress_of_a_lossy_level_stores_the_decoded_values_raw(make_engine):
    engine = engine_with(make_engine)
    tokens, kv = stored(engine, seed=5)
    assert engine.compress(tokens, "cachegen-1", "disk") == CHUNKS
    decoded = retrieved_from_below(engine, tokens)
    assert_within_half_a_bin(decoded, kv, 1)

    assert engine.decompress(tokens) == CHUNKS  # every writable tier below: the disk
    assert codecs_in(engine, "disk", tokens) == [RAW_ID] * CHUNKS
    assert torch.equal(retrieved_from_below(engine, tokens), decoded)


def test_the_key_forms_and_a_prefix_some_tier_holds(make_engine):
    engine = engine_with(make_engine)
    tokens, _ = stored(engine, seed=6, chunks=2)
    longer = torch.cat([tokens, seeded_tokens(2 * TOKENS, 60)])  # 2 chunks cached, 2 not
    keys = engine.db.keys(longer)
    assert engine.compress_keys(keys, "cachegen-3", "disk") == 2
    assert codecs_in(engine, "disk", longer) == [CACHEGEN_ID, CACHEGEN_ID, None, None]
    assert engine.decompress_keys(keys, "disk") == 2
    # Only the cached prefix: a chunk after a gap is not the prompt's cached KV.
    assert engine.compress_keys([keys[3], keys[0]], "cachegen-3", "disk") == 0


def test_compress_of_chunks_the_tier_does_not_hold_is_zero(make_engine):
    engine = engine_with(make_engine)
    assert engine.compress(seeded_tokens(2 * TOKENS, 7), "cachegen-2", "disk") == 0  # never stored
    tokens, _ = stored(engine, seed=8, chunks=2)
    engine.clear("disk")  # in host memory only
    assert engine.compress(tokens, "cachegen-2", "disk") == 0
    assert engine.decompress(tokens) == 0
    assert engine.stats()["tiers"]["cpu"]["chunks"] == 2


def test_bad_codec_and_tier_names_raise_before_anything_changes(make_engine, monkeypatch):
    engine = engine_with(make_engine)
    tokens, _ = stored(engine, seed=9, chunks=2)
    with pytest.raises(ValueError, match="unknown codec 'zstd'") as err:
        engine.compress(tokens, "zstd", "disk")
    assert all(name in str(err.value) for name in CODEC_NAMES)
    with pytest.raises(UnknownTier, match="nvme"):
        engine.compress(tokens, "cachegen-2", "nvme")
    with pytest.raises(UnknownTier, match="nvme"):
        engine.decompress(tokens, "nvme")
    with pytest.raises(ValueError, match="host memory, which holds raw KV.*disk"):
        engine.compress(tokens, "cachegen-2", "cpu")
    with pytest.raises(ValueError, match="host memory"):
        engine.decompress(tokens, "cpu")
    # A read-only tier (the P2P tier: peers' memory) is recoded by nobody.
    monkeypatch.setattr(engine.tier("disk"), "writable", False)
    with pytest.raises(ValueError, match="serves reads only"):
        engine.compress(tokens, "cachegen-2", "disk")
    monkeypatch.undo()
    assert codecs_in(engine, "disk", tokens) == [RAW_ID, RAW_ID]


def test_pinned_and_leased_chunks_are_left_as_they_are(make_engine):
    engine = engine_with(make_engine)
    tokens, _ = stored(engine, seed=10, chunks=3)
    keys = engine.db.keys(tokens)
    engine.pin(tokens[:TOKENS])  # the first chunk
    engine.storage.lease([keys[2]])  # the third, as a request about to load it holds it
    assert engine.compress(tokens, "cachegen-2", "disk") == 1
    assert codecs_in(engine, "disk", tokens) == [RAW_ID, CACHEGEN_ID, RAW_ID]
    engine.unpin(tokens)
    assert engine.compress(tokens, "cachegen-2", "disk") == 1
    engine.release([keys[2]])
    assert engine.compress(tokens, "cachegen-2", "disk") == 1
    assert codecs_in(engine, "disk", tokens) == [CACHEGEN_ID] * 3


def test_a_put_the_tier_refuses_loses_the_chunk_there_and_host_memory_writes_it_down_again(make_engine,
                                                                                          monkeypatch):
    engine = engine_with(make_engine)
    tokens, kv = stored(engine, seed=11, chunks=2)
    disk = engine.tier("disk")
    monkeypatch.setattr(disk, "put", lambda items: [False] * len(items))
    assert engine.compress(tokens, "cachegen-2", "disk") == 0
    assert disk.has(engine.db.keys(tokens)) == [False, False]
    entries = [engine.storage.cpu.peek(key) for key in engine.db.keys(tokens)]
    assert [entry.persisted for entry in entries] == [False, False]  # no longer written below
    got, n = engine.retrieve(tokens)  # host memory still holds them
    assert n == 2 * TOKENS and torch.equal(got, kv)


def test_memory_stays_a_few_chunks_whatever_the_prompt(make_engine, monkeypatch):
    engine = engine_with(make_engine)
    tokens, _ = stored(engine, seed=12)
    disk = engine.tier("disk")
    real_get, batches = disk.get, []

    def get(keys, dests, *copies):
        batches.append(len(keys))
        return real_get(keys, dests, *copies)

    monkeypatch.setattr(disk, "get", get)
    assert engine.compress(tokens, "cachegen-2", "disk") == CHUNKS
    assert max(batches) <= recode.BATCH_CHUNKS and sum(batches) == CHUNKS


# -- a codec-configured tier, and Redis ----------------------------------------------------------

def test_a_coded_tier_keeps_what_compress_and_decompress_chose(make_engine):
    engine = engine_with(make_engine, disk__codec="cachegen-2")
    tokens, kv = stored(engine, seed=13, chunks=2)
    assert codecs_in(engine, "disk", tokens) == [CACHEGEN_ID] * 2  # coded by the tier on the way down
    assert engine.decompress(tokens, "disk") == 2
    assert codecs_in(engine, "disk", tokens) == [RAW_ID] * 2  # not coded again by the wrapper
    assert engine.compress(tokens, "cachegen-lossless", "disk") == 2
    assert engine.compress(tokens, "cachegen-lossless", "disk") == 0
    got = retrieved_from_below(engine, tokens)
    assert_within_half_a_bin(got, kv, 2)  # the level-2 values the tier first stored, kept exactly


def test_compress_and_decompress_in_a_redis_tier(make_engine, redis_server):
    engine = engine_with(make_engine, "redis", model_id=f"recode-{uuid.uuid4().hex}", disk="null",
                         redis__url=redis_server.url)
    try:
        tokens, kv = stored(engine, seed=14, chunks=3)
        assert codecs_in(engine, "redis", tokens) == [RAW_ID] * 3
        assert engine.compress(tokens, "cachegen-2", "redis") == 3
        assert codecs_in(engine, "redis", tokens) == [CACHEGEN_ID] * 3
        assert_within_half_a_bin(retrieved_from_below(engine, tokens), kv, 2)
        assert engine.compress(tokens, "cachegen-lossless", "redis") == 3  # from the level-2 values
        assert engine.decompress(tokens) == 3
        assert codecs_in(engine, "redis", tokens) == [RAW_ID] * 3
    finally:
        engine.clear("redis")


# -- readers during a recode -----------------------------------------------------------------------

@pytest.mark.parametrize("codec", ["cachegen-lossless", "cachegen-2"])
def test_retrieves_during_recodes_miss_or_return_the_right_kv_never_wrong_values(make_engine, codec):
    engine = engine_with(make_engine, promote_on_hit="false")  # every retrieve reads the disk
    tokens, kv = stored(engine, seed=15)
    engine.clear("cpu")
    level = 0 if codec == "cachegen-lossless" else 2
    stop, served, errors = threading.Event(), [], []

    def reader() -> None:
        try:
            while not stop.is_set():
                got, n = engine.retrieve(tokens)
                want = kv[:, :, :n]
                if level == 0:
                    assert torch.equal(got, want), "wrong KV"
                else:  # raw (the original) or coded (within half a bin of it)
                    error = (got.float() - want.float()).abs()
                    assert (error <= half_bin(want, got, level)).all(), "wrong KV"
                served.append(n)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            assert engine.compress(tokens, codec, "disk") == CHUNKS
            assert engine.decompress(tokens, "disk") == CHUNKS
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]
    assert served  # the readers did run
    assert engine.stats()["tiers"]["disk"]["corrupt"] == 0
