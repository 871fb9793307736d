"""A llama-architecture GGUF file as a `ModelConfig` and a stream of Hugging Face-named tensors.

The loader (`models/loader.py`) builds the model from `gguf_config` and copies in what
`gguf_tensors` yields, one tensor at a time: each is dequantized to float32 (a few hundred MB at
most, for the embedding of a large vocabulary) and cast into its parameter, so asking for bf16 never
holds an fp32 copy of the whole model.

Two things differ from a Hugging Face checkpoint besides the names:
- Quantized blocks: `gguf.quants.dequantize` turns each supported type (`SUPPORTED_TYPES`) back
  into float32 rows; any other type is a ValueError naming the type and the tensor, raised before
  anything loads.
- Q/K row order: llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the
  rows of q_proj and k_proj within each head, from the "rotate half" layout to interleaved pairs,
  because ggml's RoPE rotates adjacent elements. Per head of `d` rows:
      HF rows    0 1 ... d/2-1 | d/2 ... d-1          (first halves, then second halves)
      GGUF rows  0 d/2 1 d/2+1 ... d/2-1 d-1          (each first-half row beside its partner)
  `_unpermute` puts them back, so our rotate-half RoPE sees the Hugging Face layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType, ReaderTensor
from gguf.quants import dequantize

from kvtier_engine.model_config import ModelConfig

ARCHITECTURE = "llama"
_ROWS_PER_SLICE = 2048  # rows dequantized at once: a few MB of intermediates for any hidden size
Q = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                             Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for an unknown name."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def gguf_config(meta: dict[str, Any], tensor_names: set[str], path: str | Path) -> ModelConfig:
    """The model's shape from the file's metadata (`llama.*` keys, llama.cpp's names)."""
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; "
                         f"only {ARCHITECTURE!r} files load")
    if "rope_freqs.weight" in tensor_names:  # Llama 3.1's per-frequency factors: not in ModelConfig
        raise ValueError(f"{path}: RoPE frequency factors (rope_freqs.weight) are not supported")

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.{name}")
        if isinstance(value, list):  # per-layer values (some architectures): not a llama shape
            raise ValueError(f"{path}: {arch}.{name} varies per layer, which is not supported")
        return value

    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count "
                         f"{key('rope.dimension_count')} of head dim {head_dim}) are not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if not vocab:
        raise ValueError(f"{path}: GGUF metadata gives no vocabulary size")
    return ModelConfig(
        model_type="llama", vocab_size=vocab, hidden_size=hidden,
        intermediate_size=key("feed_forward_length"), num_layers=key("block_count"), num_heads=heads,
        num_kv_heads=key("attention.head_count_kv", heads), head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=_rope_scaling(meta, arch, path),
        max_position_embeddings=key("context_length"),
        tie_word_embeddings="output.weight" not in tensor_names,
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


def _rope_scaling(meta: dict[str, Any], arch: str, path: str | Path) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    raise ValueError(f"{path}: RoPE scaling type {kind!r} is not supported (none, linear)")


def check_tensor_types(tensors: list[ReaderTensor], path: str | Path) -> None:
    for tensor in tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise ValueError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                             f"which cannot be dequantized; supported: {supported}")


def gguf_tensors(tensors: list[ReaderTensor], config: ModelConfig, path: str | Path
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 CPU tensor) for each tensor of the file, in file order."""
    for tensor in tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise ValueError(f"{path}: tensor {tensor.name!r} has no place in a {ARCHITECTURE} model")
        values = _dequantized(tensor)
        if name.endswith("q_proj.weight"):
            values = _unpermute(values, config.num_heads)
        elif name.endswith("k_proj.weight"):
            values = _unpermute(values, config.num_kv_heads)
        yield name, values


def _dequantized(tensor: ReaderTensor) -> torch.Tensor:
    """float32 [rows, cols] (or [n] for a vector), dequantized a slice of rows at a time: the
    library's intermediates for a whole embedding would cost twice its float32 size again."""
    data = tensor.data
    out = torch.empty(tuple(int(d) for d in reversed(tensor.shape)), dtype=torch.float32)
    flat = out.view(-1, out.shape[-1])
    rows = data.reshape(-1, data.shape[-1])
    for start in range(0, rows.shape[0], _ROWS_PER_SLICE):
        values = dequantize(rows[start:start + _ROWS_PER_SLICE], tensor.tensor_type)
        if not values.flags.writeable:  # F32 comes back as a view of the read-only memory map
            values = values.copy()
        flat[start:start + _ROWS_PER_SLICE] = torch.from_numpy(values)
    return out


def _unpermute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `reshape(heads, 2, d/2, cols).swapaxes(1, 2)` (see the module doc)."""
    pairs = weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape)
