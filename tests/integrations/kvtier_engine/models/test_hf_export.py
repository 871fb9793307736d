"""Tests for kvtier_engine/models/hf_export.py: an exported model is a Hugging Face folder that the
engine's own loader reads back bit for bit and that transformers (what vLLM's config and weight
loading follow) runs to the same logits; SmolLM2's dequantized GGUF included."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvtier_engine.model_config import SUPPORTED_MODEL_TYPES, ModelConfig
from kvtier_engine.models.hf_export import ARCHITECTURES, export, hf_config, main
from kvtier_engine.models.loader import load_model
from kvtier_engine.models.presets import PRESETS
from kvtier_engine.tokenizer import load_tokenizer


def test_a_random_preset_round_trips_bit_for_bit(tmp_path):
    folder = export("random:llama-tiny", tmp_path / "tiny")
    again = export(folder, tmp_path / "again")  # a folder exports to the same files

    assert ModelConfig.from_folder(folder) == PRESETS["llama-tiny"]
    want, back = load_model("random:llama-tiny").state_dict(), load_model(again).state_dict()
    assert want.keys() == back.keys() and all(torch.equal(want[k], back[k]) for k in want)
    assert (folder / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_a_tied_model_stores_no_lm_head_and_dtypes_are_kept(tmp_path):
    folder = export("smollm2-135m-instruct", tmp_path / "smol", torch.bfloat16)
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())

    assert "lm_head.weight" not in tensors and config["tie_word_embeddings"] is True
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and config["torch_dtype"] == "bfloat16"
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 3


def test_smollm2_exported_runs_in_transformers_to_the_engines_logits(tmp_path, forward):
    """What makes the export worth having: another implementation reading only the folder computes
    what the bundled engine computes from the GGUF (float32, a 48-token prompt)."""
    ours = load_model("smollm2-135m-instruct")
    folder = export("smollm2-135m-instruct", tmp_path / "smol")
    ids = torch.arange(1, 49) * 97 % 49152
    theirs = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()

    with torch.no_grad():
        hf_logits = theirs(ids[None]).logits[0]
    our_logits = forward(ours, ids)

    assert (our_logits - hf_logits).abs().max().item() < 1e-3
    assert torch.equal(our_logits.argmax(-1), hf_logits.argmax(-1))


def test_a_gguf_vocabulary_is_exported_as_the_tokenizer_transformers_loads(tmp_path):
    """vLLM serves text and chat from the folder: its tokenizer must encode as the engine does."""
    folder = export("smollm2-135m-instruct", tmp_path / "smol", torch.bfloat16)
    ours, theirs = load_tokenizer("smollm2-135m-instruct"), AutoTokenizer.from_pretrained(folder)
    for text in ("Hello, world!", "  two  spaces\nand a line", "<|im_start|>user\nhi<|im_end|>", "日本語 ✓"):
        assert theirs(text)["input_ids"] == ours.encode(text)
    specials = ("<|im_end|>", "<|im_start|>")
    assert (theirs.eos_token, theirs.bos_token) == (ours.eos_token, ours.bos_token) == specials
    assert theirs.chat_template == ours.chat_template and "im_start" in ours.chat_template
    assert not (export("random:llama-tiny", tmp_path / "tiny") / "tokenizer.json").exists()  # byte-level ids


def test_config_keeps_windows_rope_scaling_and_bias(tmp_path):
    config = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True,
                         sliding_window=16,
                         window_layers=(1, 2), eos_token_id=[5, 6],
                         rope_scaling={"rope_type": "linear", "factor": 2.0})
    hf = hf_config(config, torch.float32)
    assert ModelConfig.from_hf(hf) == config
    assert hf["max_window_layers"] == 1  # (what v4 readers, vLLM's among them, go by)
    assert ModelConfig.from_hf({k: v for k, v in hf.items() if k != "layer_types"}) == config
    with pytest.raises(ValueError, match="not the last ones"):
        hf_config(dataclasses.replace(config, window_layers=(0, 2)), torch.float32)


def test_every_supported_model_type_has_an_architecture():
    assert set(ARCHITECTURES) == set(SUPPORTED_MODEL_TYPES)


def test_the_command_line_writes_the_folder_and_refuses_an_unknown_model(tmp_path, capsys):
    main(["random:llama-tiny", str(tmp_path / "cli"), "--dtype", "float16"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert {t.dtype for t in load_file(tmp_path / "cli" / "model.safetensors").values()} == {torch.float16}
    with pytest.raises(ValueError, match="neither a local folder"):
        main(["no-such-model", str(tmp_path / "nothing")])
    assert not (tmp_path / "nothing").exists()
