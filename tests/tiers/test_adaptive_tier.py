"""Tests for kvtier/tiers/adaptive.py: bandwidth-adaptive cachegen levels over a real DiskTier.

Load times are simulated, not slept: `Throttled` (below) moves the fake clock that the AdaptiveTier
reads by the payload bytes each `get` returned over a set bandwidth, so "meets the load SLO" is an
exact comparison. Most stories store the same KV under every key on purpose: equal coded sizes make
the ratios the puts learn exact, so the tests pin the planner, not the estimator's noise.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from conftest import CHUNK, Throttled, seeded_kv, seeded_tokens

from kvtier import storage_admin
from kvtier.codecs import cachegen_format as fmt
from kvtier.codecs.cachegen import preset_bins
from kvtier.codecs.records import codec_named, decode_in_place, encode_chunk
from kvtier.keys import Namespace, TokenDatabase
from kvtier.metrics import Metrics
from kvtier.record import encode_header, tensor_bytes
from kvtier.storage import StorageManager
from kvtier.tiers.adaptive import AdaptiveTier, is_level_key, level_key, plan_levels
from kvtier.tiers.base import PutItem
from kvtier.tiers.coded import CodedTier
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.wrapped import wrap

DB = TokenDatabase(Namespace("adaptive-test", "small"), CHUNK)
NS = DB.namespace_digest
N = 8
BANDWIDTH = 1e6  # simulated bytes per second


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(["cpu", "disk"])


@pytest.fixture
def disk(tmp_path, metrics):
    tier = DiskTier(tmp_path / "disk", NS, 1 << 24, lambda key: False, metrics)
    yield tier
    tier.close()


def chunk_keys(n: int, seed: int = 0):
    return DB.keys(seeded_tokens(n * CHUNK, seed))


def record(key, kv: torch.Tensor) -> PutItem:
    return PutItem(key, encode_header(key, tuple(kv.shape), kv.dtype, tensor_bytes(kv)),
                   kv.reshape(-1).view(torch.uint8))


def coded_size(kv: torch.Tensor, level: int) -> int:
    return len(encode_chunk(chunk_keys(1)[0], kv, codec_named(f"cachegen-{level}"))[1])


def load(clock, tier, keys, layout):
    """(simulated seconds, headers, buffers) of one `get` of `keys` into raw-sized buffers."""
    bufs = [np.zeros(layout.chunk_bytes(CHUNK), np.uint8) for _ in keys]
    start = clock.now
    headers = tier.get(keys, bufs)
    return clock.now - start, headers, bufs


def level_of(header, buf) -> int:
    return fmt.read_header(buf[: header.payload_len])[0]  # the cachegen record names its level


def mix(metrics: Metrics) -> tuple[int, int, int, int]:
    """Chunks loaded at levels 1, 2, 3, and late ones, so far."""
    names = ["adaptive_level1_chunks", "adaptive_level2_chunks", "adaptive_level3_chunks",
             "adaptive_late_chunks"]
    return tuple(int(metrics.value(f"kvtier_{name}_total")) for name in names)


def assert_within_the_bin_width(got: torch.Tensor, kv: torch.Tensor, level: int) -> None:
    """|x_hat - x| <= half a bin of its (kv, layer, token) scale, plus fp16 rounding of x_hat."""
    x, y = kv.float(), got.float()
    scale = x.abs().amax(dim=-1, keepdim=True)
    m = torch.from_numpy(preset_bins(level, kv.shape[1]) // 2 - 1).float()[:, :, None, None]
    assert ((y - x).abs() <= scale / (2 * m) * (1 + 1e-5) + y.abs() * 2.0**-11 + 2.0**-24).all()
    assert not torch.equal(got, kv)


def decoded(header, buf, layout) -> torch.Tensor:
    decode_in_place(header, buf)  # as TierReader does, after `get`
    return torch.from_numpy(buf).view(layout.dtype).view(layout.chunk_shape(CHUNK))


def stored(tier, keys, kv) -> None:
    for key in keys:  # one chunk per put, as the StorageManager writes
        assert tier.put([record(key, kv)]) == [True]


# -- the load SLO --------------------------------------------------------------------------------


def test_throttled_load_meets_an_slo_that_a_fixed_top_level_misses(disk, metrics, clock, layout):
    kv, keys = seeded_kv(layout, CHUNK, 1), chunk_keys(N)
    s = {level: coded_size(kv, level) for level in (1, 2, 3)}
    d2, d3 = s[2] - s[1], s[3] - s[1]
    assert 0 < 1.5 * d2 < d3  # the budget below then raises 4 chunks to level 3 and one to 2
    budget = N * s[1] + 4 * d3 + 1.5 * d2
    slo = budget / BANDWIDTH
    throttled = Throttled(disk, clock, BANDWIDTH)
    tier = AdaptiveTier(throttled, metrics=metrics, load_slo_s=slo, namespace=NS, clock=clock)
    stored(tier, keys, kv)

    fixed, got, _ = load(clock, CodedTier(throttled, codec_named("cachegen-3"), metrics), keys, layout)
    assert all(got) and fixed == pytest.approx(N * s[3] / BANDWIDTH) and fixed > slo
    first, got, _ = load(clock, tier, keys, layout)  # nothing measured yet: every chunk at the top
    assert all(got) and first == pytest.approx(fixed) and mix(metrics) == (0, 0, N, 0)
    assert tier.estimates().bandwidth == pytest.approx(BANDWIDTH)

    took, headers, bufs = load(clock, tier, keys, layout)

    assert took <= slo < fixed
    assert all(header is not None for header in headers)  # every chunk served
    levels = [level_of(h, b) for h, b in zip(headers, bufs)]
    assert levels == [3, 3, 3, 3, 2, 1, 1, 1]  # the earliest chunks raised first, as the budget allows
    assert mix(metrics) == (3, 1, N + 4, 0)
    assert [h.key for h in headers] == keys
    for header, buf, level in zip(headers, bufs, levels):
        assert_within_the_bin_width(decoded(header, buf, layout), kv, level)
    print(f"\nsimulated load: fixed level 3 {fixed * 1e3:.3f} ms, adaptive untrained {first * 1e3:.3f} ms, "
          f"adaptive trained {took * 1e3:.3f} ms, SLO {slo * 1e3:.3f} ms; levels {levels}")


def test_a_bandwidth_below_level_1_serves_a_prefix_and_leaves_the_rest_late(disk, metrics, clock, layout):
    kv, keys = seeded_kv(layout, CHUNK, 2), chunk_keys(N)
    s1, s2 = coded_size(kv, 1), coded_size(kv, 2)
    slo = (3 * s1 + 0.5 * (s2 - s1)) / BANDWIDTH  # 3 chunks at level 1, no room to raise one
    tier = AdaptiveTier(Throttled(disk, clock, BANDWIDTH), metrics=metrics, load_slo_s=slo, namespace=NS,
                        clock=clock)
    stored(tier, keys, kv)
    load(clock, tier, keys, layout)

    took, headers, bufs = load(clock, tier, keys, layout)

    assert took <= slo
    assert [h is not None for h in headers] == [True] * 3 + [False] * (N - 3)
    assert [level_of(h, b) for h, b in zip(headers[:3], bufs)] == [1, 1, 1]
    assert mix(metrics) == (3, 0, N, N - 3)


def test_plan_levels_keeps_late_chunks_a_suffix_and_raises_in_key_order():
    # the third chunk would fit after the second is late, but a hole would waste it
    assert plan_levels([100, 1000, 100], [1.0], 500) == [0, None, None]
    # ratios for levels 1-3: costs 10/20/40 per chunk; 3 x 10 = 30, +30 raises chunk 0 to 3, +10
    # chunk 1 to 2, then nothing fits
    assert plan_levels([40, 40, 40], [4.0, 2.0, 1.0], 75) == [2, 1, 0]
    assert plan_levels([40, 40], [4.0, 2.0, 1.0], 5) == [None, None]
    assert plan_levels([], [4.0], 0) == []


def test_a_missing_lower_level_falls_back_to_the_base_while_it_fits(disk, metrics, clock, layout):
    kv, keys = seeded_kv(layout, CHUNK, 3), chunk_keys(4)
    s1, s2, s3 = (coded_size(kv, level) for level in (1, 2, 3))
    budget = 4 * s1 + 0.5 * (s2 - s1)  # every chunk planned at level 1
    tier = AdaptiveTier(Throttled(disk, clock, BANDWIDTH), metrics=metrics, load_slo_s=budget / BANDWIDTH,
                        namespace=NS, clock=clock)
    stored(tier, keys, kv)
    load(clock, tier, keys, layout)
    assert disk.remove([level_key(key, 1) for key in keys]) == 4
    fits = math.floor(budget / s3)  # the level-1 reads found nothing, so the whole budget is left
    assert 1 <= fits < 4

    took, headers, bufs = load(clock, tier, keys, layout)

    assert took <= budget / BANDWIDTH
    assert [h is not None for h in headers] == [True] * fits + [False] * (4 - fits)
    assert [h.key for h in headers[:fits]] == keys[:fits]
    assert [level_of(h, b) for h, b in zip(headers[:fits], bufs)] == [3] * fits
    assert mix(metrics) == (0, 0, 4 + fits, 4 - fits)


def test_a_fallback_that_does_not_fit_makes_every_later_chunk_late(disk, metrics, clock, layout):
    kv, keys = seeded_kv(layout, CHUNK, 3), chunk_keys(4)
    s1, s2, s3 = (coded_size(kv, level) for level in (1, 2, 3))
    budget = 4 * s1 + 0.5 * (s2 - s1)  # every chunk planned at level 1
    assert budget - 3 * s1 < s3  # after chunks 1-3 arrive, chunk 0's base no longer fits
    tier = AdaptiveTier(Throttled(disk, clock, BANDWIDTH), metrics=metrics, load_slo_s=budget / BANDWIDTH,
                        namespace=NS, clock=clock)
    stored(tier, keys, kv)
    load(clock, tier, keys, layout)
    disk.remove([level_key(keys[0], 1)])

    took, headers, _ = load(clock, tier, keys, layout)

    assert took <= budget / BANDWIDTH
    assert headers == [None] * 4  # chunks 1-3 arrived, but after a hole the engine could not use them
    assert mix(metrics) == (0, 0, 4, 4)


# -- estimates -----------------------------------------------------------------------------------


def test_misses_and_instant_reads_do_not_poison_the_bandwidth(disk, metrics, clock, layout):
    kv, keys = seeded_kv(layout, CHUNK, 4), chunk_keys(2)
    throttled = Throttled(disk, clock, BANDWIDTH)
    tier = AdaptiveTier(throttled, metrics=metrics, load_slo_s=1.0, namespace=NS, clock=clock)
    assert tier.estimates().bandwidth is None
    stored(tier, keys, kv)
    load(clock, tier, keys, layout)
    assert tier.estimates().bandwidth == pytest.approx(BANDWIDTH)

    _, got, _ = load(clock, tier, chunk_keys(2, seed=99), layout)  # misses: no bytes arrived
    assert got == [None, None] and tier.estimates().bandwidth == pytest.approx(BANDWIDTH)

    throttled.bandwidth = math.inf  # a read that took no time on the clock
    load(clock, tier, keys, layout)
    assert BANDWIDTH < tier.estimates().bandwidth < 1.5 * BANDWIDTH  # nudged, not thrown off

    first = AdaptiveTier(throttled, metrics=metrics, load_slo_s=1.0, namespace=NS, clock=clock)
    load(clock, first, keys, layout)  # an instant first read: clamped, a finite number
    assert 0 < first.estimates().bandwidth < math.inf


def test_ratios_start_from_the_study_and_learn_from_puts(disk, metrics, layout):
    tier = AdaptiveTier(disk, metrics=metrics, load_slo_s=1.0, namespace=NS)
    assert tier.estimates().ratios == {1: 7.97, 2: 6.79, 3: 4.62}
    kv = seeded_kv(layout, CHUNK, 5)
    stored(tier, chunk_keys(1), kv)
    raw = layout.chunk_bytes(CHUNK)
    assert tier.estimates().ratios == pytest.approx({lv: raw / coded_size(kv, lv) for lv in (1, 2, 3)})
    assert metrics.value("kvtier_coded_chunks_total") == 1
    assert metrics.value("kvtier_coded_bytes_total") == coded_size(kv, 3)


# -- records and keys ----------------------------------------------------------------------------


def test_derived_keys_stay_in_the_namespace_and_out_of_keys_and_the_listener(disk, metrics, layout):
    tier = wrap(AdaptiveTier, disk, metrics=metrics, load_slo_s=1.0, namespace=NS)
    seen = []
    tier.set_key_listener(lambda op, name, key: seen.append((op, key)))
    keys = chunk_keys(2)
    derived = {level_key(key, level) for key in keys for level in (1, 2)}
    assert len(derived) == 4 and all(k.namespace == NS and is_level_key(k) for k in derived)
    assert not any(is_level_key(key) for key in keys)

    stored(tier, keys, seeded_kv(layout, CHUNK, 6))

    assert set(disk.keys()) == set(keys) | derived  # the disk holds every level ...
    assert sorted(tier.keys()) == sorted(keys)  # ... the fleet hears of the chunks only
    assert sorted(key for _, key in seen) == sorted(keys)
    assert tier.has(keys) == [True, True]

    again = DiskTier(disk.root.parent, NS, 1 << 24, lambda key: False, metrics)  # a restart's walk
    try:
        assert len(again.keys()) == 6
        assert sorted(wrap(AdaptiveTier, again, metrics=metrics, load_slo_s=1.0, namespace=NS).keys()) \
            == sorted(keys)
    finally:
        again.close()


def test_remove_and_clear_remove_the_derived_records(disk, metrics, layout):
    tier = wrap(AdaptiveTier, disk, metrics=metrics, load_slo_s=1.0, namespace=NS)
    keys = chunk_keys(3)
    stored(tier, keys, seeded_kv(layout, CHUNK, 7))
    assert disk.usage().chunks == 9

    assert tier.remove(keys[:1]) == 1
    assert disk.usage().chunks == 6
    assert disk.has([keys[0]] + [level_key(keys[0], level) for level in (1, 2)]) == [False] * 3

    tier.clear()
    assert (disk.usage().chunks, disk.usage().bytes) == (0, 0)


def test_already_coded_items_pass_through_under_the_base_key_only(disk, metrics, clock, layout):
    tier = AdaptiveTier(disk, metrics=metrics, load_slo_s=1.0, namespace=NS, clock=clock)
    key, kv = chunk_keys(1)[0], seeded_kv(layout, CHUNK, 8)
    header, payload = encode_chunk(key, kv, codec_named("cachegen-2"))

    assert tier.put([PutItem(key, header, np.frombuffer(payload, np.uint8))]) == [True]

    assert disk.keys() == [key]
    _, (got,), (buf,) = load(clock, tier, [key], layout)
    assert level_of(got, buf) == 2 and bytes(buf[: got.payload_len]) == payload
    assert metrics.value("kvtier_coded_chunks_total") == 0  # coded by whoever compressed it


def test_headers_carry_the_base_key_and_decode_within_the_bin_width(disk, metrics, clock, layout):
    tier = AdaptiveTier(disk, metrics=metrics, load_slo_s=1.0, namespace=NS, clock=clock, levels=(1, 2))
    keys = chunk_keys(3)
    kvs = [seeded_kv(layout, CHUNK, 10 + i) for i in range(3)]
    for key, kv in zip(keys, kvs):
        assert tier.put([record(key, kv)]) == [True]
    assert len(disk.keys()) == 6  # levels 1 and 2: the base holds the top one, 2

    _, headers, bufs = load(clock, tier, keys, layout)

    assert [h.key for h in headers] == keys
    for header, buf, kv in zip(headers, bufs, kvs):
        assert level_of(header, buf) == 2
        assert_within_the_bin_width(decoded(header, buf, layout), kv, 2)


@pytest.mark.parametrize("kwargs", [{"levels": (4,)}, {"levels": ()}, {"load_slo_s": 0},
                                    {"load_slo_s": -1.0}, {"load_slo_s": math.nan}])
def test_bad_settings_are_refused(disk, metrics, kwargs):
    with pytest.raises(ValueError):
        AdaptiveTier(disk, metrics=metrics, namespace=NS, **{"load_slo_s": 1.0, **kwargs})


# -- threads -------------------------------------------------------------------------------------


def test_many_threads_get_and_put_at_once(disk, metrics, layout):
    # A real clock and an SLO of ~the time a few chunks take: plans differ run to run, but every
    # chunk asked for is counted once, served at some level or late (none is missing).
    tier = AdaptiveTier(disk, metrics=metrics, load_slo_s=2e-4, namespace=NS)
    kv, keys = seeded_kv(layout, CHUNK, 20), chunk_keys(4)
    stored(tier, keys, kv)
    threads, rounds, errors = 4, 5, []

    def work(t: int) -> None:
        try:
            for key in chunk_keys(rounds, seed=100 + t):
                assert tier.put([record(key, kv)]) == [True]
                bufs = [np.zeros(layout.chunk_bytes(CHUNK), np.uint8) for _ in keys]
                headers = tier.get(keys, bufs)
                served = [h for h in headers if h is not None]
                assert [h.key for h in served] == keys[: len(served)]
        except Exception as exc:  # reported on the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    assert errors == []
    assert sum(mix(metrics)) == threads * rounds * len(keys)
    assert metrics.value("kvtier_coded_chunks_total") == len(keys) + threads * rounds
    assert disk.usage().chunks == 3 * (len(keys) + threads * rounds)
    assert tier.estimates().bandwidth > 0


# -- end to end (runs last: it needs TierReader's decoding, kvtier/transfers.py) -------------------


def test_zz_a_storage_manager_retrieves_kv_within_the_bin_width_through_the_adaptive_tier(
        make_manager, db, layout):
    def adaptive_disk(path, namespace, capacity, is_pinned, metrics):
        inner = DiskTier(path, namespace, capacity, is_pinned, metrics)
        return wrap(AdaptiveTier, inner, metrics=metrics, load_slo_s=10.0, namespace=namespace)

    manager: StorageManager = make_manager(tier_class=adaptive_disk)
    spans = db.spans(seeded_tokens(4 * CHUNK, 21))
    kv = seeded_kv(layout, 4 * CHUNK, 21)
    assert manager.put(spans, kv) == 4
    assert manager.flush(timeout=30)
    storage_admin.clear(manager, manager.cpu)

    out = torch.zeros_like(kv)
    assert manager.get(spans, out) == 4

    assert_within_the_bin_width(out, kv, 3)  # an SLO of 10 s: every chunk at the top level
    assert manager.metrics.value("kvtier_adaptive_level3_chunks_total") == 4
    assert manager.metrics.value("kvtier_decoded_chunks_total") == 4
    assert manager.lower[0].keys() and all(not is_level_key(k) for k in manager.lower[0].keys())


def test_zz_an_engine_configured_cachegen_adaptive_retrieves_from_its_disk(make_engine, layout):
    engine = make_engine("cpu_disk", layout, disk__codec="cachegen-adaptive", disk__load_slo_s="5")
    tokens, kv = seeded_tokens(3 * CHUNK, 22), seeded_kv(layout, 3 * CHUNK, 22)
    engine.store(tokens, kv)
    assert engine.flush(timeout=30)
    engine.clear("cpu")

    got, n = engine.retrieve(tokens)

    assert n == 3 * CHUNK
    assert_within_the_bin_width(got, kv, 3)
    stats = engine.stats()
    assert stats["adaptive_level3_chunks"] == 3 and stats["decoded_chunks"] == 3
    assert stats["tiers"]["disk"]["chunks"] == 9  # every chunk at three levels
