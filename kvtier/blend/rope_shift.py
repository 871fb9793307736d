"""Moving cached post-RoPE keys to another position: a rotation by the position difference.

RoPE rotates each pair `(x[i], x[i + D/2])` of a key (the "rotate half" layout of Hugging Face
checkpoints and `kvtier_engine.layers.rotary.apply_rotary`) by `position * inv_freq[i]`. Rotations
compose, so K rotated at position `a` and then by `(b - a) * inv_freq` is K rotated at `b`: a cached
segment moves to wherever it now sits without recomputing it. That holds exactly when the scaling
only changes the frequencies (default, linear, llama3: `inv_freq` already carries them). Scalings
that also rescale or that depend on the sequence length are refused by `check_shiftable`.

Precision: the angles are computed in float64 (an fp32 `delta * inv_freq` at 32K positions is off by
up to 1e-3 rad), the rotation in float32, the result cast back to K's dtype. The engine itself
rotates with fp32 angles (as Hugging Face does), so its own K at position 32K differs from the exact
rotation by about that much; the shift adds no error of its own beyond fp32 rounding.

Pure functions; side-effect free; safe from any thread. Runs on the worker side (load and save of
segment chunks), on whatever device K is on.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch

from kvtier.errors import KvtierError

PURE_ROTATIONS = ("default", "linear", "llama3")

# Why each known scaling cannot be shifted, for the message.
_WHY_NOT = {
    "yarn": "YaRN multiplies cos and sin by an attention factor as well as rotating",
    "dynamic": "dynamic NTK scaling changes the frequencies with the sequence length, so cached K was "
               "rotated with frequencies a longer prompt no longer uses",
    "longrope": "LongRoPE picks short or long frequency factors by the sequence length and rescales "
                "cos and sin",
    "su": "su (LongRoPE) picks short or long frequency factors by the sequence length and rescales "
          "cos and sin",
}


class UnshiftableRope(KvtierError, ValueError):
    """The model's RoPE is not a pure rotation of the positions, so cached K cannot be moved."""


def check_shiftable(rope_scaling: Mapping[str, Any] | None) -> None:
    """Passes for default, linear and llama3 RoPE (pure rotations); raises UnshiftableRope naming
    the type and why otherwise. `rope_scaling` as in a config.json (`rope_type`, or the older `type`)."""
    scaling = rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in PURE_ROTATIONS:
        return
    why = _WHY_NOT.get(kind, "it is not known to be a pure rotation of the positions")
    raise UnshiftableRope(f"RoPE scaling type {kind!r} cannot be shifted: {why}; cached keys can be moved "
                          f"only for {', '.join(PURE_ROTATIONS)} RoPE (blending is off for this model)")


def shift_keys(k: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """`k` [..., T, H, D] (post-RoPE, rotate-half layout) moved by `delta` positions: an int, or an
    integer tensor [T] (one shift per token). `inv_freq` [D/2]: the model's
    `inverse_frequencies(config)`. Returns a new tensor of k's dtype and device."""
    if k.dim() < 3 or not k.dtype.is_floating_point:
        raise ValueError(f"k must be a floating tensor [..., T, H, D], got {k.dtype} {tuple(k.shape)}")
    tokens, dim = k.shape[-3], k.shape[-1]
    if dim % 2 or tuple(inv_freq.shape) != (dim // 2,):
        raise ValueError(f"inv_freq must have shape [{dim // 2}] for head_dim {dim}, "
                         f"got {tuple(inv_freq.shape)}")
    angles = _delta(delta, tokens, k.device)[:, None] * inv_freq.to(k.device, torch.float64)[None, :]
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]  # [T, 1, D]: the same for every head
    cos, sin = emb.cos().float(), emb.sin().float()
    x = k.float()
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(k.dtype)


def _delta(delta: int | torch.Tensor, tokens: int, device: torch.device) -> torch.Tensor:
    """The shift as float64 [T] on `device`; integers only (a position is a whole number)."""
    if isinstance(delta, torch.Tensor):
        if delta.dtype.is_floating_point or delta.dtype.is_complex or delta.dtype == torch.bool:
            raise ValueError(f"delta must be an integer tensor, got {delta.dtype}")
        if delta.dim() and tuple(delta.shape) != (tokens,):
            raise ValueError(f"a delta tensor must have shape [{tokens}] (one per token), "
                             f"got {tuple(delta.shape)}")
        return delta.to(device, torch.float64).expand(tokens)
    if isinstance(delta, bool) or not isinstance(delta, numbers.Integral):
        raise ValueError(f"delta must be an int or an integer tensor, got {type(delta).__name__}")
    return torch.full((tokens,), float(delta), dtype=torch.float64, device=device)
