"""The model's shape, read from a Hugging Face `config.json` (transformers v4 or v5 style).

Only the fields the Llama-family decoder needs are kept; everything else in the file is ignored.
Supported `model_type`s: llama, qwen2, mistral. RoPE scaling types: default, linear, llama3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    sliding_window: int | None = None  # attend to at most this many most recent tokens ...
    window_layers: tuple[int, ...] | None = None  # ... in these layers (None: in every layer)
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; "
                             f"use one of {SUPPORTED_MODEL_TYPES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported; "
                             f"use one of {SUPPORTED_ROPE_TYPES}")

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full attention."""
        everywhere = self.window_layers is None
        return self.sliding_window if everywhere or layer in self.window_layers else None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """From a `config.json` dict. v5 keeps RoPE in `rope_parameters`; v4 in `rope_theta` and
        `rope_scaling` (whose type key was once `type`)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not supported; "
                             f"use one of {SUPPORTED_MODEL_TYPES}")
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if not rope and hf.get("rope_scaling"):
            rope = dict(hf["rope_scaling"])
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        heads = hf["num_attention_heads"]
        window, window_layers = _sliding_window(model_type, hf)
        return cls(
            model_type=model_type, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            sliding_window=window, window_layers=window_layers, eos_token_id=hf.get("eos_token_id"))

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no config.json (is {folder} a Hugging Face model folder?)") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        try:
            return cls.from_hf(data)
        except KeyError as exc:
            raise ValueError(f"{path}: missing key {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _sliding_window(model_type: str, hf: dict[str, Any]) -> tuple[int | None, tuple[int, ...] | None]:
    """Window size and the layers it applies to. v5 configs list `layer_types`; v4 Qwen2 windows
    the layers from `max_window_layers` on, and only when `use_sliding_window` is on (it carries a
    window size regardless); Mistral windows every layer."""
    window = hf.get("sliding_window")
    if window is None or (model_type == "qwen2" and not hf.get("use_sliding_window", False)):
        return None, None
    if hf.get("layer_types"):
        return window, tuple(i for i, kind in enumerate(hf["layer_types"]) if kind == "sliding_attention")
    if model_type == "qwen2":
        return window, tuple(range(hf.get("max_window_layers", 0), hf["num_hidden_layers"]))
    return window, None
