"""Tests for kvtier/blend/selection.py: which rows a blended prefill recomputes: every uncached row,
plus the exact top ceil(ratio * n_cached) cached rows by K deviation (ties: lower index first), or as
many at random (the baseline)."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier.blend.selection import joint_kv, random_rows, select_by_score, select_rows

HEADS, DIM = 2, 4


def loaded_and_new(deviations: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """K pairs whose row i deviates by exactly deviations[i] (squared, summed over heads and dims)."""
    k_loaded = torch.randn(len(deviations), HEADS, DIM, generator=torch.Generator().manual_seed(0))
    k_new = k_loaded.clone()
    for row, d in enumerate(deviations):
        k_new[row, 1, 2] += math.sqrt(d)  # one element: the whole deviation, wherever it sits
    return k_new, k_loaded


def rows(t: torch.Tensor) -> list[int]:
    assert t.dtype == torch.int64
    return t.tolist()


def test_uncached_rows_are_always_kept():
    k_new, k_loaded = loaded_and_new([9.0, 0.0, 5.0, 0.0, 1.0])
    cached = torch.tensor([False, True, True, False, True])
    assert rows(select_rows(k_new, k_loaded, cached, 0.0)) == [0, 3]
    assert rows(select_rows(k_new, k_loaded, cached, 0.3)) == [0, 2, 3]  # ceil(0.9) = 1: row 2 deviates most
    assert rows(select_rows(k_new, k_loaded, cached, 0.5)) == [0, 2, 3, 4]  # then row 4


def test_the_top_ratio_of_cached_rows_by_deviation_is_selected_exactly():
    g = torch.Generator().manual_seed(3)
    deviations = torch.rand(40, generator=g).tolist()
    k_new, k_loaded = loaded_and_new(deviations)
    cached = torch.rand(40, generator=g) < 0.8
    n_cached = int(cached.sum())
    for ratio in (0.0, 0.05, 0.15, 0.3, 0.5, 1.0):
        count = math.ceil(round(ratio * n_cached, 9))
        reused = [i for i in range(40) if cached[i]]
        top = sorted(reused, key=lambda i: (-deviations[i], i))[:count]
        expected = sorted(top + [i for i in range(40) if not cached[i]])
        assert rows(select_rows(k_new, k_loaded, cached, ratio)) == expected


def test_ratio_0_keeps_the_uncached_rows_only_and_ratio_1_every_row():
    k_new, k_loaded = loaded_and_new([3.0, 1.0, 2.0, 0.0])
    cached = torch.tensor([True, False, True, True])
    assert rows(select_rows(k_new, k_loaded, cached, 0)) == [1]
    assert rows(select_rows(k_new, k_loaded, cached, 1)) == [0, 1, 2, 3]
    assert rows(select_rows(k_new, k_loaded, torch.zeros(4, dtype=torch.bool), 0.5)) == [0, 1, 2, 3]
    assert rows(select_rows(k_new, k_loaded, torch.ones(4, dtype=torch.bool), 0.5)) == [0, 2]


@pytest.mark.parametrize(("n_cached", "ratio", "count"), [(20, 0.15, 3), (10, 0.1, 1), (7, 0.15, 2),
                                                          (100, 0.05, 5), (3, 0.3, 1), (1, 0.01, 1)])
def test_the_count_is_the_ceiling_of_ratio_times_cached_rows_without_float_noise(n_cached, ratio, count):
    """0.15 * 20 is 3.0000000000000004 in binary floating point: still 3 rows, not 4."""
    k_new, k_loaded = loaded_and_new([float(i) for i in range(n_cached)])
    cached = torch.ones(n_cached, dtype=torch.bool)
    assert len(select_rows(k_new, k_loaded, cached, ratio)) == count
    assert len(random_rows(cached, ratio, torch.Generator().manual_seed(0))) == count


def test_ties_go_to_the_lower_index_on_every_call():
    k_loaded = torch.zeros(12, HEADS, DIM)
    k_new = torch.ones(12, HEADS, DIM)  # every row deviates by exactly 8
    cached = torch.ones(12, dtype=torch.bool)
    cached[2] = False
    for _ in range(3):
        assert rows(select_rows(k_new, k_loaded, cached, 0.25)) == [0, 1, 2, 3]  # 3 of 11 cached: 0, 1, 3
    k_new[1:4] = 2.0  # rows 1-3 deviate by 32 each, the rest by 8: two of the three tied rows win
    assert rows(select_rows(k_new, k_loaded, torch.ones(12, dtype=torch.bool), 2 / 12)) == [1, 2]


def test_deviation_is_summed_over_heads_and_dims_in_fp32():
    """fp16 K whose squared differences overflow fp16 (65504): computed in fp16 both rows would score
    inf and tie (row 0 would win); in fp32 row 1 deviates more and is chosen."""
    k_loaded = torch.zeros(2, HEADS, DIM, dtype=torch.float16)
    k_new = k_loaded.clone()
    k_new[0] = 250.0  # 16 * 62500 = 1.0e6
    k_new[1] = 300.0  # 16 * 90000 = 1.44e6
    cached = torch.ones(2, dtype=torch.bool)
    assert rows(select_rows(k_new, k_loaded, cached, 0.5)) == [1]
    # Spread over heads: one large element loses to many medium ones whose sum is larger.
    k_new = torch.zeros(2, HEADS, DIM)
    k_new[0, 0, 0] = 3.0  # 9
    k_new[1] = 1.2  # 8 * 1.44 = 11.5
    assert rows(select_rows(k_new, torch.zeros(2, HEADS, DIM), cached, 0.5)) == [1]


@pytest.mark.parametrize("ratio", [-0.01, 1.01, float("nan"), float("inf"), True, "0.5", None])
def test_a_ratio_outside_0_1_is_refused(ratio):
    k_new, k_loaded = loaded_and_new([1.0, 2.0])
    cached = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="ratio"):
        select_rows(k_new, k_loaded, cached, ratio)
    with pytest.raises(ValueError, match="ratio"):
        random_rows(cached, ratio, torch.Generator())


def test_shape_mismatches_are_refused():
    k_new, k_loaded = loaded_and_new([1.0, 2.0, 3.0])
    cached = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        select_rows(k_new, k_loaded[:, :1], cached, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        select_rows(k_new, k_loaded, torch.ones(4, dtype=torch.bool), 0.5)
    for bad in (torch.ones(3), torch.ones(3, 1, dtype=torch.bool), [True, True, True]):
        with pytest.raises(ValueError, match="cached"):
            select_rows(k_new, k_loaded, bad, 0.5)
        with pytest.raises(ValueError, match="cached"):
            random_rows(bad, 0.5, torch.Generator())


def test_random_rows_keeps_the_uncached_rows_and_draws_the_count_among_cached_rows():
    cached = torch.tensor([True, False, True, True, False, True, True, True, True, True, True, True])
    for seed in range(20):
        chosen = rows(random_rows(cached, 0.3, torch.Generator().manual_seed(seed)))
        assert chosen == sorted(set(chosen))
        assert {1, 4} <= set(chosen)
        assert len(chosen) == 2 + math.ceil(0.3 * 10)
    assert rows(random_rows(cached, 0.0, torch.Generator())) == [1, 4]
    assert rows(random_rows(cached, 1.0, torch.Generator())) == list(range(12))


def test_random_rows_is_deterministic_under_a_seeded_generator_and_covers_every_cached_row():
    cached = torch.ones(30, dtype=torch.bool)
    first = random_rows(cached, 0.2, torch.Generator().manual_seed(7))
    assert torch.equal(first, random_rows(cached, 0.2, torch.Generator().manual_seed(7)))
    draws = [rows(random_rows(cached, 0.2, torch.Generator().manual_seed(s))) for s in range(60)]
    assert len({tuple(d) for d in draws}) > 50  # different seeds, different rows
    assert set().union(*draws) == set(range(30))  # no row is never drawn
    # One generator advances: two draws from it differ.
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(random_rows(cached, 0.2, g), random_rows(cached, 0.2, g))


def test_select_by_score_keeps_the_uncached_rows_and_the_top_cached_scores():
    score = torch.tensor([9.0, 1.0, 5.0, 7.0, 3.0, 7.0])
    cached = torch.tensor([False, True, True, True, True, True])  # row 0's 9 is ignored: uncached
    assert rows(select_by_score(score, cached, 0.0)) == [0]
    assert rows(select_by_score(score, cached, 0.2)) == [0, 3]  # ceil(1.0): the tie 3/5 goes to row 3
    assert rows(select_by_score(score, cached, 0.4)) == [0, 3, 5]
    assert rows(select_by_score(score, cached, 1.0)) == [0, 1, 2, 3, 4, 5]


def test_select_by_score_on_k_deviations_is_select_rows():
    g = torch.Generator().manual_seed(5)
    k_new, k_loaded = torch.randn(30, HEADS, DIM, generator=g), torch.randn(30, HEADS, DIM, generator=g)
    cached = torch.rand(30, generator=g) < 0.7
    score = (k_new - k_loaded).square().flatten(1).sum(1)
    for ratio in (0.1, 0.3, 0.5):
        assert torch.equal(select_by_score(score, cached, ratio), select_rows(k_new, k_loaded, cached, ratio))
    with pytest.raises(ValueError, match="score"):
        select_by_score(score[:29], cached, 0.3)
    with pytest.raises(ValueError, match="ratio"):
        select_by_score(score, cached, 1.5)


def test_joint_kv_scores_each_deviation_relative_to_its_own_scale():
    """V 100x smaller than K: a raw sum would rank by K alone; joint_kv ranks by relative deviation, so
    a row whose V is off by half its norm beats a row whose K is off by a tenth of its norm."""
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(10, HEADS, DIM, generator=g) * 10, torch.randn(10, HEADS, DIM, generator=g) * 0.1
    k_new, v_new = k.clone(), v.clone()
    k_new[2] *= 1.1  # 1% of K's squared norm
    v_new[6] *= 1.5  # 25% of V's
    cached = torch.ones(10, dtype=torch.bool)
    new, loaded = joint_kv(k_new, k, v_new, v, cached)
    assert new.shape == loaded.shape == (10, HEADS, 2 * DIM)
    assert rows(select_rows(new, loaded, cached, 0.1)) == [6]
    assert rows(select_rows(torch.cat((k_new, v_new), -1), torch.cat((k, v), -1), cached, 0.1)) == [2]
    # The deviation is exactly dK / mean |K|^2 + dV / mean |V|^2 over the cached rows.
    dev = (new - loaded).square().flatten(1).sum(1)
    expected = ((k_new - k).square().flatten(1).sum(1) / k.square().flatten(1).sum(1).mean()
                + (v_new - v).square().flatten(1).sum(1) / v.square().flatten(1).sum(1).mean())
    torch.testing.assert_close(dev, expected)
    with pytest.raises(ValueError, match="one shape"):
        joint_kv(k_new, k, v_new[:, :1], v, cached)
