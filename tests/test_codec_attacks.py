"""Attack review of the codec plumbing (issue 13): hostile records in the tiers below, recodes racing
the engine's own traffic, a hostile adaptive tier's clock and sizes. Real parts throughout (disk
tiers in tmp_path, real engines; Redis where named); no sleeps: tests/waiting.py.

Properties: never wrong KV; a record that cannot be decoded is a counted miss of that chunk only
(removed, never a job failure costing its neighbours); accounting back to zero
(StorageManager.check_invariants).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Throttled, seeded_kv, seeded_tokens
from waiting import wait_until

from kvtier import recode
from kvtier.codecs.base import CACHEGEN_ID
from kvtier.codecs.records import codec_named, encode_chunk
from kvtier.ewma import RateEwma
from kvtier.keys import ChunkKey, Namespace, TokenDatabase
from kvtier.layout import KVLayout
from kvtier.metrics import Metrics
from kvtier.record import encode_header, tensor_bytes
from kvtier.tiers.adaptive import AdaptiveTier
from kvtier.tiers.base import PutItem
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.wrapped import WrappedTier

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.float16)
TOKENS = 64
DB = TokenDatabase(Namespace.for_layout("codec-attacks", LAYOUT), TOKENS)
NS = DB.namespace_digest


def engine_with(make_engine, layout: KVLayout = LAYOUT, config: str = "cpu_disk", **overrides):
    return make_engine(config, layout, chunk_size=TOKENS, **{"cpu__capacity": "2MiB", **overrides})


def chunk_of(kv: torch.Tensor, i: int) -> torch.Tensor:
    return kv[:, :, i * TOKENS:(i + 1) * TOKENS].contiguous()


def coded_item(key: ChunkKey, chunk: torch.Tensor, codec: str = "cachegen-lossless") -> PutItem:
    header, payload = encode_chunk(key, chunk, codec_named(codec))
    return PutItem(key, header, np.frombuffer(payload, dtype=np.uint8))


def planted(key: ChunkKey, shape, dtype, payload: bytes, codec: int = CACHEGEN_ID) -> PutItem:
    """A record with a valid checksum over whatever `payload` says: only a decoder can object."""
    header = encode_header(key, shape, dtype, payload, codec=codec)
    return PutItem(key, header, np.frombuffer(payload, dtype=np.uint8))


# -- hostile records ---------------------------------------------------------------------------------

FP8 = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.float8_e4m3fn)


def test_a_coded_record_of_a_dtype_no_codec_decodes_is_a_miss_of_that_chunk_only(make_engine):
    """An fp8 engine: a cachegen record (codec 1) of fp8 KV (no cachegen codes fp8) planted below.
    The decoder refuses it with a ValueError; that must be this chunk's counted, removed miss, not a
    read job that fails and takes the other chunks of its share with it, again on every retrieve."""
    engine = engine_with(make_engine, FP8, disk__capacity="64MiB", disk__io_threads=2)
    chunks = 4
    tokens = seeded_tokens(chunks * TOKENS, 5)
    kv = seeded_kv(LAYOUT, chunks * TOKENS, 5).to(FP8.dtype)
    assert engine.store(tokens, kv) == chunks and engine.flush(timeout=30)
    keys = engine.db.keys(tokens)
    disk = engine.tier("disk")
    shape = FP8.chunk_shape(TOKENS)
    bogus = coded_item(keys[0], chunk_of(seeded_kv(LAYOUT, TOKENS, 6), 0), "cachegen-2").payload.tobytes()
    assert disk.remove([keys[3]]) == 1
    assert disk.put([planted(keys[3], shape, FP8.dtype, bogus)]) == [True]
    engine.clear("cpu")

    got, n = engine.retrieve(tokens)

    assert n == 3 * TOKENS  # the three good chunks (chunk 1 shares a read thread with the bad one)
    assert torch.equal(got.view(torch.uint8), kv[:, :, :n].view(torch.uint8))
    stats = engine.stats()
    assert stats["tiers"]["disk"]["corrupt"] == 1 and stats["decode_failures"] == 1
    assert disk.has(keys) == [True, True, True, False]  # removed: the next retrieve does not trip on it
    engine.storage.check_invariants()


# -- the adaptive tier's estimates under a hostile clock -------------------------------------------

class Stalling(WrappedTier):
    """A tier whose reads take `seconds` on a fake clock (a stall, a suspend, a GC pause)."""

    def __init__(self, inner, clock, seconds: float):
        super().__init__(inner)
        self.clock, self.seconds = clock, seconds

    def get(self, keys, dests):
        headers = self.inner.get(keys, dests)
        self.clock.now += self.seconds
        return headers


def adaptive_over(tmp_path, clock, seconds: float, slo: float = 0.1):
    metrics = Metrics(["cpu", "disk"])
    disk = DiskTier(tmp_path / "disk", NS, 1 << 26, lambda key: False, metrics)
    stall = Stalling(disk, clock, seconds)
    return AdaptiveTier(stall, metrics=metrics, load_slo_s=slo, namespace=NS, clock=clock), stall, disk


def raw_record(key: ChunkKey, kv: torch.Tensor) -> PutItem:
    return PutItem(key, encode_header(key, tuple(kv.shape), kv.dtype, tensor_bytes(kv)),
                   kv.reshape(-1).view(torch.uint8))


def adaptive_load(tier, keys) -> list:
    bufs = [np.zeros(LAYOUT.chunk_bytes(TOKENS), np.uint8) for _ in keys]
    return tier.get(keys, bufs)


@pytest.mark.parametrize("stall_s", [1e4, 1e9])
def test_one_stalled_read_does_not_lock_the_adaptive_tier_out_for_good(tmp_path, clock, stall_s):
    """One read that stalled (a suspend, a stuck link) makes the bandwidth estimate tiny; if every later
    chunk is then planned late, nothing is ever read again and the estimate can never recover: the
    tier must keep probing (a chunk at the lowest level) now and then so that it learns the link is back."""
    tier, stall, disk = adaptive_over(tmp_path, clock, stall_s)
    kv = seeded_kv(LAYOUT, TOKENS, 7)
    keys = DB.keys(seeded_tokens(4 * TOKENS, 7))
    for key in keys:
        assert tier.put([raw_record(key, kv)]) == [True]
    assert all(h is not None for h in adaptive_load(tier, keys))  # untrained: the top level, slowly
    stall.seconds = 1e-4  # the link is back: 4 chunks at level 1 take well under the SLO
    gets = 0

    def recovered() -> bool:
        nonlocal gets
        gets += 1
        clock.now += 1.0  # time passes between loads
        return all(h is not None for h in adaptive_load(tier, keys))

    wait_until(recovered, "the adaptive tier to read again once its link recovered", timeout_s=20)
    print(f"\nrecovered after {gets} loads")
    assert gets <= 150  # the stalled sample's weight decays by 1 - EWMA_WEIGHT per read
    disk.close()


# -- recodes racing the engine's own traffic ----------------------------------------------------

def run_threads(*loops, rounds: int) -> None:
    """Run each `loop(i)` for i in range(rounds) on its own thread; re-raise the first failure."""
    errors: list[BaseException] = []

    def body(loop) -> None:
        try:
            for i in range(rounds):
                loop(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(loop,)) for loop in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck"
    assert not errors, errors[0]


@pytest.mark.parametrize("disk_codec", ["raw", "cachegen-lossless"])
def test_recodes_racing_stores_evictions_pins_clears_and_retrieves(make_engine, disk_codec):
    """Two recoders (lossless and raw, so every value must come back exact), a reader, and a churner
    storing other prompts through a small host memory (evictions, demotions), pinning, unpinning and
    clearing host memory. Never wrong KV; afterwards every slab, pin, lease and byte is accounted for."""
    engine = engine_with(make_engine, disk__codec=disk_codec, cpu__capacity="1MiB")
    chunks = 6
    tokens, kv = seeded_tokens(chunks * TOKENS, 21), seeded_kv(LAYOUT, chunks * TOKENS, 21)
    assert engine.store(tokens, kv) == chunks and engine.flush(timeout=30)
    others = [(seeded_tokens(8 * TOKENS, 30 + s), seeded_kv(LAYOUT, 8 * TOKENS, 30 + s)) for s in range(3)]
    served: list[int] = []
    recoded: list[int] = []

    def compressor(i: int) -> None:
        recoded.append(engine.compress(tokens, "cachegen-lossless", "disk"))

    def decompressor(i: int) -> None:
        recoded.append(engine.decompress(tokens, "disk" if i % 2 else None))

    def reader(i: int) -> None:
        got, n = engine.retrieve(tokens)
        assert torch.equal(got, kv[:, :, :n]), "wrong KV"
        served.append(n)
        o_tokens, o_kv = others[i % len(others)]
        got, n = engine.retrieve(o_tokens)
        assert torch.equal(got, o_kv[:, :, :n]), "wrong KV of another prompt"

    def churner(i: int) -> None:
        o_tokens, o_kv = others[i % len(others)]
        engine.store(o_tokens, o_kv)
        if i % 3 == 0:
            engine.pin(tokens[:2 * TOKENS])
        elif i % 3 == 1:
            engine.unpin(tokens)
        if i % 4 == 3:
            engine.clear("cpu")

    run_threads(compressor, decompressor, reader, churner, rounds=25)
    engine.unpin(tokens)
    assert engine.flush(timeout=30)
    engine.storage.check_invariants()
    assert served and sum(recoded) > 0 and engine.stats()["tiers"]["disk"]["corrupt"] == 0
    got, n = engine.retrieve(tokens)
    assert torch.equal(got, kv[:, :, :n])
    engine.clear()
    engine.storage.check_invariants(empty=True)


def test_redis_killed_mid_recode_costs_the_chunks_there_never_the_caller(make_engine, redis_server,
                                                                          monkeypatch):
    """redis-server killed between a recode's read and its write-back: compress returns (no chunk
    counted as recoded that Redis did not take), host memory still serves exact KV and will write the
    chunks down again, and the engine's accounting is whole."""
    engine = engine_with(make_engine, LAYOUT, "redis", model_id=f"attack-{uuid.uuid4().hex}", disk="null",
                         redis__url=redis_server.url)
    chunks = 3
    tokens, kv = seeded_tokens(chunks * TOKENS, 41), seeded_kv(LAYOUT, chunks * TOKENS, 41)
    assert engine.store(tokens, kv) == chunks and engine.flush(timeout=30)
    store = recode._innermost(engine.tier("redis"))
    real_get = store.get

    def get_then_die(keys, dests, *copies):
        headers = real_get(keys, dests, *copies)
        redis_server.stop()  # kill -9: the records read are about to be recoded
        return headers

    monkeypatch.setattr(store, "get", get_then_die)
    try:
        assert engine.compress(tokens, "cachegen-2", "redis") == 0
    finally:
        monkeypatch.undo()
        redis_server.ensure_running()
    entries = [engine.storage.cpu.peek(key) for key in engine.db.keys(tokens)]
    assert [entry.persisted for entry in entries] == [False] * chunks  # written down again on eviction
    got, n = engine.retrieve(tokens)
    assert n == chunks * TOKENS and torch.equal(got, kv)
    assert engine.flush(timeout=30)
    engine.storage.check_invariants()


RECODER = """
import sys
sys.path.insert(0, {tests!r})
import torch
from conftest import REPO, seeded_kv, seeded_tokens
from kvtier import CacheEngine, KVLayout, load_config
layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.float16)
env = {{"KVTIER_CHUNK_SIZE": "{tokens}", "KVTIER_CPU__CAPACITY": "2MiB", "KVTIER_CPU__PIN_MEMORY": "off",
       "KVTIER_DISK__PATH": {path!r}}}
engine = CacheEngine(load_config(REPO / "configs" / "cpu_disk.yaml", env=env), layout, "shared-disk")
tokens = seeded_tokens({chunks} * {tokens}, 51)
assert engine.store(tokens, seeded_kv(layout, {chunks} * {tokens}, 51)) == {chunks}
assert engine.flush(timeout=30)
rounds = 0
while True:
    engine.compress(tokens, "cachegen-lossless", "disk")
    engine.decompress(tokens, "disk")
    rounds += 1
    print(rounds, flush=True)
"""


def test_a_process_killed_mid_recode_leaves_each_record_old_new_or_gone(make_engine, tmp_path):
    """kill -9 of a process recoding records in a disk directory another process shares: the other
    reads each chunk whole (old or new record: exact KV, lossless) or misses it, never a mixed one."""
    chunks, path = 6, tmp_path / "shared"
    script = RECODER.format(tests=str(Path(__file__).parent), tokens=TOKENS, chunks=chunks, path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        lines = iter(proc.stdout.readline, "")
        wait_until(lambda: int(next(lines) or 0) >= 3, "the recoding process to recode a few rounds", 50)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-recode, wherever it is
        proc.wait(timeout=20)
        proc.stdout.close()
    engine = engine_with(make_engine, model_id="shared-disk", disk_path=path)
    tokens, kv = seeded_tokens(chunks * TOKENS, 51), seeded_kv(LAYOUT, chunks * TOKENS, 51)
    got, n = engine.retrieve(tokens)
    assert torch.equal(got, kv[:, :, :n])
    assert engine.stats()["tiers"]["disk"]["corrupt"] == 0
    assert engine.compress(tokens, "cachegen-lossless", "disk") >= 0  # what the other left is recodable
    engine.clear("cpu")
    got, n = engine.retrieve(tokens)
    assert torch.equal(got, kv[:, :, :n])
    engine.storage.check_invariants()


def stored_prompt(engine, chunks: int, seed: int):
    tokens, kv = seeded_tokens(chunks * TOKENS, seed), seeded_kv(LAYOUT, chunks * TOKENS, seed)
    assert engine.store(tokens, kv) == chunks and engine.flush(timeout=30)
    return tokens, kv, engine.db.keys(tokens)


HOSTILE = {
    # a codec id no version wrote, over a real cachegen payload of the right shape
    "unknown codec": lambda key, chunk: planted(key, tuple(chunk.shape), chunk.dtype,
                                                coded_item(key, chunk).payload.tobytes(), codec=7),
    # a header promising twice the tokens (a raw size beyond the request and the slab)
    "larger shape": lambda key, chunk: planted(
        key, (2, LAYOUT.num_layers, 2 * TOKENS, LAYOUT.hidden), chunk.dtype,
        coded_item(key, torch.cat([chunk, chunk], dim=2).contiguous()).payload.tobytes()),
    # a cachegen payload that says fewer tokens than its record header
    "payload of another shape": lambda key, chunk: planted(
        key, tuple(chunk.shape), chunk.dtype, coded_item(key, chunk[:, :, :TOKENS // 2].contiguous())
        .payload.tobytes()),
    # raw bytes labelled cachegen
    "raw labelled coded": lambda key, chunk: planted(key, tuple(chunk.shape), chunk.dtype,
                                                     tensor_bytes(chunk).tobytes()[:1000]),
}


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
def test_hostile_records_below_are_misses_of_their_chunk_for_reads_and_recodes(make_engine, hostile):
    engine = engine_with(make_engine, disk__io_threads=2)
    tokens, kv, keys = stored_prompt(engine, 4, 61)
    disk = engine.tier("disk")
    assert disk.remove([keys[3]]) == 1
    assert disk.put([HOSTILE[hostile](keys[3], chunk_of(kv, 3))]) == [True]
    engine.clear("cpu")

    got, n = engine.retrieve(tokens)

    assert n == 3 * TOKENS and torch.equal(got, kv[:, :, :n])
    assert disk.has(keys) == [True, True, True, False] and engine.stats()["tiers"]["disk"]["corrupt"] == 1
    assert disk.put([HOSTILE[hostile](keys[3], chunk_of(kv, 3))]) == [True]  # planted again
    engine.clear("cpu")
    assert engine.compress_keys(keys, "cachegen-lossless", "disk") == 3  # the good ones only
    assert disk.has(keys)[:3] == [True, True, True]  # (the bad one: dropped, or left for a retrieve)
    got, n = engine.retrieve(tokens)
    assert n == 3 * TOKENS and torch.equal(got, kv[:, :, :n])
    engine.storage.check_invariants()


def test_an_fp8_engine_compresses_around_a_record_no_codec_decodes(make_engine):
    engine = engine_with(make_engine, FP8)
    tokens = seeded_tokens(2 * TOKENS, 62)
    kv = seeded_kv(LAYOUT, 2 * TOKENS, 62).to(FP8.dtype)
    assert engine.store(tokens, kv) == 2 and engine.flush(timeout=30)
    keys, disk = engine.db.keys(tokens), engine.tier("disk")
    bogus = coded_item(keys[1], chunk_of(seeded_kv(LAYOUT, TOKENS, 6), 0), "cachegen-2").payload.tobytes()
    assert disk.remove([keys[1]]) == 1
    assert disk.put([planted(keys[1], FP8.chunk_shape(TOKENS), FP8.dtype, bogus)]) == [True]
    assert engine.compress(tokens, "cachegen-1", "disk") == 0  # fp8 is refused (kept raw); no error
    assert disk.has(keys) == [True, False]  # the undecodable record dropped, as a retrieve drops it
    assert engine.stats()["decode_failures"] == 1


@pytest.mark.parametrize("amount,over", [(1.0, math.nan), (math.nan, 1.0), (1.0, math.inf), (math.inf, 1.0),
                                         (-1.0, 1.0), (1.0, 0.0), (1.0, -1.0)])
def test_a_rate_refuses_samples_that_would_poison_it_for_good(amount, over):
    rate = RateEwma(prior=2.0)
    rate.add(10.0, 5.0)
    with pytest.raises(ValueError):
        rate.add(amount, over)
    assert rate.rate == 2.0  # unchanged


def test_a_hot_chunk_read_at_a_lower_level_keeps_its_base_record(tmp_path, clock):
    bandwidth, metrics = 1e6, Metrics(["cpu", "disk"])
    disk = DiskTier(tmp_path / "disk", NS, 1 << 20, lambda key: False, metrics)
    kv = seeded_kv(LAYOUT, TOKENS, 71)
    keys = DB.keys(seeded_tokens(40 * TOKENS, 71))
    tier = AdaptiveTier(Throttled(disk, clock, bandwidth), metrics=metrics, load_slo_s=1.0, namespace=NS,
                        clock=clock)
    hot = keys[0]
    assert tier.put([raw_record(hot, kv)]) == [True]
    adaptive_load(tier, [hot])  # trains the bandwidth
    level1 = LAYOUT.chunk_bytes(TOKENS) / tier.estimates().ratios[1]
    tier.load_slo_s = 1.1 * level1 / bandwidth  # room for the hot chunk at level 1, not at 2
    for key in keys[1:]:  # a stream of new chunks through a disk that holds ~20 of them
        assert tier.put([raw_record(key, kv)]) == [True]
        assert adaptive_load(tier, [hot])[0] is not None  # read every time: the hottest chunk
    assert metrics.value("kvtier_adaptive_level1_chunks_total") >= 39
    assert disk.usage().bytes > 0 and tier.has([hot]) == [True]
    disk.close()


def test_a_clear_landing_mid_recode_is_not_undone_by_it(make_engine, monkeypatch):
    engine = engine_with(make_engine)
    tokens, _, keys = stored_prompt(engine, 2, 81)
    store = recode._innermost(engine.tier("disk"))
    real_get = store.get

    def get_then_clear(keys, dests, *copies):
        headers = real_get(keys, dests, *copies)
        monkeypatch.setattr(store, "get", real_get)
        engine.clear()  # another thread's clear, landing between the read and the write-back
        return headers

    monkeypatch.setattr(store, "get", get_then_clear)
    engine.compress(tokens, "cachegen-2", "disk")
    assert engine.tier("disk").has(keys) == [False, False]
