"""Tests for kvtier/blend/rope_shift.py: K rotated at position a then shifted by (b - a) equals K
rotated at b (1e-5, fp32), for default, linear and llama3 RoPE, with the engine's own rotary code;
other scalings are refused with a clear message."""

from __future__ import annotations

import pytest
import torch

from kvtier.blend.rope_shift import UnshiftableRope, check_shiftable, shift_keys
from kvtier.errors import KvtierError
from kvtier_engine.layers.rotary import RotaryEmbedding, apply_rotary
from kvtier_engine.model_config import ModelConfig

HEADS, HEAD_DIM, TOKENS = 4, 64, 24
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
SCALINGS = {"default": None, "linear": {"rope_type": "linear", "factor": 4.0}, "llama3": LLAMA3}


def model_config(scaling: dict | None, theta: float = 500000.0) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=128, hidden_size=HEADS * HEAD_DIM, intermediate_size=64,
                       num_layers=1, num_heads=HEADS, num_kv_heads=HEADS, head_dim=HEAD_DIM, rope_theta=theta,
                       rope_scaling=scaling)


def raw_keys(tokens: int = TOKENS, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


def rotate_exact(k: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    """The engine's apply_rotary with cos/sin of the engine's frequencies at exact (float64) angles.
    RotaryEmbedding.forward rounds `position * inv_freq` to fp32 (as Hugging Face does): at 32K that
    angle is off by up to ~1e-3 rad, an error of the model's own RoPE that no shift can undo."""
    angles = positions.double()[:, None] * rope.inv_freq.double()[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return apply_rotary(k, emb.cos().float(), emb.sin().float())


def rotate_engine(k: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
    cos, sin = rope(positions)
    return apply_rotary(k, cos, sin)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("scaling", SCALINGS.values(), ids=SCALINGS.keys())
@pytest.mark.parametrize(("a", "b"), [(0, 1), (5, 3000), (3000, 5), (0, 32767), (32000, 17), (1234, 1234)])
def test_shifting_by_b_minus_a_equals_rotating_at_b(scaling, a, b):
    rope = RotaryEmbedding(model_config(scaling))
    k = raw_keys()
    at_a = rotate_exact(k, torch.arange(a, a + TOKENS), rope)
    at_b = rotate_exact(k, torch.arange(b, b + TOKENS), rope)
    assert max_diff(at_a, at_b) > 0.1 or a == b  # the positions matter
    shifted = shift_keys(at_a, b - a, rope.inv_freq)
    assert shifted.dtype == torch.float32
    assert max_diff(shifted, at_b) < 1e-5


@pytest.mark.parametrize("scaling", SCALINGS.values(), ids=SCALINGS.keys())
def test_per_token_deltas_move_each_token_to_its_own_position(scaling):
    rope = RotaryEmbedding(model_config(scaling))
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 32768, (TOKENS,), generator=g)
    b = torch.randint(0, 32768, (TOKENS,), generator=g)
    k = raw_keys()
    shifted = shift_keys(rotate_exact(k, a, rope), b - a, rope.inv_freq)
    assert max_diff(shifted, rotate_exact(k, b, rope)) < 1e-5


@pytest.mark.parametrize("scaling", SCALINGS.values(), ids=SCALINGS.keys())
def test_the_engines_own_rotary_output_shifts_within_1e_5_at_short_positions(scaling):
    """RotaryEmbedding's cos/sin straight from the engine: below position 64 its fp32 angles round by
    less than 4e-6 rad, and the shift agrees within 1e-5."""
    rope = RotaryEmbedding(model_config(scaling))
    k = raw_keys(8)
    for a, b in [(0, 48), (48, 0), (3, 21)]:
        at_a = rotate_engine(k, torch.arange(a, a + 8), rope)
        shifted = shift_keys(at_a, b - a, rope.inv_freq)
        assert max_diff(shifted, rotate_engine(k, torch.arange(b, b + 8), rope)) < 1e-5


@pytest.mark.parametrize("scaling", SCALINGS.values(), ids=SCALINGS.keys())
@pytest.mark.parametrize(("a", "b"), [(0, 32767 - TOKENS), (32000, 17)])
def test_at_32k_the_engines_own_fp32_angles_bound_the_agreement(scaling, a, b):
    """The engine (like Hugging Face) rounds `position * inv_freq` to fp32: up to 2**-24 of the angle,
    about 1e-3 rad at 32K, in K at a and again in K at b. The shift adds nothing to that bound."""
    rope = RotaryEmbedding(model_config(scaling))
    k = raw_keys()
    at_a = rotate_engine(k, torch.arange(a, a + TOKENS), rope)
    at_b = rotate_engine(k, torch.arange(b, b + TOKENS), rope)
    half = HEAD_DIM // 2
    pair_norm = (k[..., :half].square() + k[..., half:].square()).sqrt().max().item()
    angle_error = 2**-24 * (a + b + 2 * TOKENS) * rope.inv_freq.max().item()
    assert max_diff(shift_keys(at_a, b - a, rope.inv_freq), at_b) <= angle_error * pair_norm


def test_a_shift_and_its_inverse_give_back_the_keys():
    rope = RotaryEmbedding(model_config(LLAMA3))
    k = raw_keys()
    there = shift_keys(k, 30000, rope.inv_freq)
    assert max_diff(there, k) > 0.1
    assert max_diff(shift_keys(there, -30000, rope.inv_freq), k) < 1e-5
    assert max_diff(shift_keys(k, 0, rope.inv_freq), k) < 1e-6


def test_leading_dimensions_are_carried():
    """K of several layers at once, [L, T, H, D]: every layer moved the same way."""
    rope = RotaryEmbedding(model_config(None))
    k = torch.stack([raw_keys(seed=s) for s in range(3)])
    shifted = shift_keys(k, 700, rope.inv_freq)
    for layer in range(3):
        assert torch.equal(shifted[layer], shift_keys(k[layer], 700, rope.inv_freq))


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_precision_keys_keep_their_dtype(dtype, tolerance):
    rope = RotaryEmbedding(model_config(None))
    k = raw_keys()
    positions = torch.arange(100, 100 + TOKENS)
    at_a = rotate_exact(k, positions, rope).to(dtype)
    shifted = shift_keys(at_a, 20000, rope.inv_freq)
    assert shifted.dtype == dtype
    # Within the dtype's own rounding of values of about unit size (the rotation itself is in fp32).
    assert max_diff(shifted, rotate_exact(k, positions + 20000, rope)) < tolerance


def test_bad_arguments_are_refused():
    inv = RotaryEmbedding(model_config(None)).inv_freq
    k = raw_keys()
    with pytest.raises(ValueError, match="inv_freq"):
        shift_keys(k, 1, inv[:-1])
    with pytest.raises(ValueError, match="integer"):
        shift_keys(k, torch.ones(TOKENS), inv)
    with pytest.raises(ValueError, match="one per token"):
        shift_keys(k, torch.ones(TOKENS + 1, dtype=torch.int64), inv)
    with pytest.raises(ValueError, match="int"):
        shift_keys(k, 1.5, inv)
    with pytest.raises(ValueError):
        shift_keys(k, True, inv)
    with pytest.raises(ValueError, match=r"\[\.\.\., T, H, D\]"):
        shift_keys(k[0], 1, inv)
    with pytest.raises(ValueError):
        shift_keys(k.long(), 1, inv)


PURE = [None, {}, {"rope_type": "default"}, LLAMA3, {"rope_type": "linear", "factor": 2.0},
        {"type": "linear", "factor": 2.0}]


@pytest.mark.parametrize("scaling", PURE)
def test_pure_rotations_are_shiftable(scaling):
    check_shiftable(scaling)


@pytest.mark.parametrize(("scaling", "why"), [
    ({"rope_type": "yarn", "factor": 4.0}, "attention factor"),
    ({"type": "yarn", "factor": 4.0}, "attention factor"),
    ({"rope_type": "dynamic", "factor": 2.0}, "sequence length"),
    ({"rope_type": "longrope"}, "sequence length"),
    ({"rope_type": "mystery"}, "not known to be a pure rotation"),
])
def test_scalings_that_are_not_pure_rotations_are_refused_with_the_type_and_why(scaling, why):
    kind = scaling.get("rope_type", scaling.get("type"))
    with pytest.raises(UnshiftableRope, match=f"'{kind}'.*{why}.*default, linear, llama3"):
        check_shiftable(scaling)
    assert issubclass(UnshiftableRope, ValueError) and issubclass(UnshiftableRope, KvtierError)
