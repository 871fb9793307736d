"""Smoke tests of benchmarks/cachegen.py's pure pieces on small synthetic KV (the benchmark itself
runs SmolLM2 for minutes): chunking as kvtier stores KV, coding a prefix through the real records,
the 8-bit baseline, answer agreement and the target verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import cachegen  # noqa: E402


@pytest.fixture
def kv() -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [layers 3, tokens 40, heads 2, head_dim 8] as the reference attention backend holds them."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(3, 40, 2, 8, generator=gen), torch.randn(3, 40, 2, 8, generator=gen)


def test_chunks_are_fp16_kv_pairs_of_the_chunk_size_with_a_short_tail(kv):
    k, v = kv
    chunks = cachegen.chunks_of(k, v, 16)
    assert [tuple(c.shape) for c in chunks] == [(2, 3, 16, 16), (2, 3, 16, 16), (2, 3, 8, 16)]
    assert all(c.dtype == torch.float16 and c.is_contiguous() for c in chunks)
    assert torch.equal(chunks[2][1, 2, 3], v[2, 35].flatten().half())


def test_lossless_prefix_is_exact_and_lossy_one_is_within_half_a_bin_and_smaller(kv):
    k, v = kv
    exact = cachegen.code_prefix(k, v, 16, "cachegen-lossless")
    assert exact["exact"] and torch.equal(exact["k"], k.half().float())
    assert torch.equal(exact["v"], v.half().float())
    lossy = cachegen.code_prefix(k, v, 16, "cachegen-3")  # 32 bins: half a bin is scale / 30
    assert not lossy["exact"] and lossy["bytes"] < lossy["fp16_bytes"] == 2 * k.numel() * 2
    scale = k.half().float().flatten(2).abs().amax(-1, keepdim=True)
    assert ((lossy["k"].flatten(2) - k.half().float().flatten(2)).abs() <= scale / 30 * 1.001 + 1e-3).all()
    assert lossy["encode_s"] > 0 and lossy["decode_s"] > 0


def test_int8_baseline_is_within_half_a_step_per_token(kv):
    k, v = kv
    kq, vq = cachegen.int8_per_token(k, v)
    step = v.flatten(2).abs().amax(-1, keepdim=True) / 127
    assert ((vq.flatten(2) - v.flatten(2)).abs() <= step / 2 * 1.01).all()
    assert not torch.equal(kq, k)
    assert cachegen.int8_bytes_per_value(192) == pytest.approx(1 + 2 / 192)


def test_agreement_counts_identical_answers_positions_and_common_prefix():
    assert cachegen.agreement([1, 2, 3, 4], [1, 2, 3, 4]) == {"identical": True, "token_agreement": 1.0,
                                                             "common_prefix": 4, "first_token": True}
    assert cachegen.agreement([1, 2, 9, 4], [1, 2, 3, 4]) == {"identical": False, "token_agreement": 0.75,
                                                             "common_prefix": 2, "first_token": True}
    assert not cachegen.agreement([5, 2], [1, 2])["first_token"]


def test_targets_pass_and_fail_on_size_quality_and_speed():
    def quality(top1, kl):
        return {"top1": top1, "kl": kl}

    sizes, speed = [], []
    for size in cachegen.CHUNKS:
        for name, x in zip(cachegen.LEVELS, (8.0, 6.0, 4.5, 1.2)):
            sizes.append({"chunk": size, "codec": name, "x_vs_fp16": x, "x_vs_int8": x / 1.98})
            speed.append({"backend": "native", "chunk": size, "codec": name,
                          "decode_gbps": 0.5 if x > 2 else 0.01})
    codec = {"sizes": sizes, "speed": speed,
             "quality_mean": {"cachegen-1": quality(0.85, 0.09), "cachegen-2": quality(0.93, 0.04),
                              "cachegen-3": quality(0.97, 0.01)}}
    verdicts = cachegen.codec_targets(codec)["256"]
    assert verdicts["level2"]["pass"]
    assert verdicts["best_vs_int8"]["codec"] == "cachegen-2" and verdicts["best_vs_int8"]["pass"]
    # lossless (0.01 GB/s here) is left out of the decode verdict
    assert verdicts["decode_gbps_slowest_lossy"] == {"native": {"gbps": 0.5, "pass": True}}

    codec["quality_mean"]["cachegen-2"] = quality(0.89, 0.04)
    verdicts = cachegen.codec_targets(codec)["1024"]
    assert not verdicts["level2"]["pass"]
    assert verdicts["best_vs_int8"] == {"codec": "cachegen-3", "x_vs_int8": 4.5 / 1.98, "pass": False}
