"""Tests for kvtier_engine/models/loader.py, models/presets.py and model_config.py: folders (single
file, sharded, bf16), seeded random presets, config.json in transformers v4 and v5 form, and the
errors for specs that cannot load.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kvtier_engine.model_config import ModelConfig
from kvtier_engine.models.loader import load_model
from kvtier_engine.models.presets import PRESETS

ATOL = 1e-4

# The published config.json files (transformers v4 style) of the models the big presets imitate.
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}


def max_error(ours: torch.Tensor, hf: torch.Tensor) -> float:
    assert ours.shape == hf.shape
    return (ours - hf).abs().max().item()


def as_v4(v5: dict) -> dict:
    """The same config.json as transformers v4 wrote it: `rope_theta` and `rope_scaling` at the top."""
    v4 = dict(v5)
    rope = dict(v4.pop("rope_parameters"))
    v4["rope_theta"] = rope.pop("rope_theta")
    v4["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    return v4


def edit_config(folder, **changes: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# -- folders ----------------------------------------------------------------------------------------


def test_loads_every_tensor_of_the_checkpoint_unchanged(case):
    model = load_model(str(case.path))
    ours = dict(model.named_parameters())
    hf = dict(case.hf_model.named_parameters())  # a tied lm_head is listed once, as embed_tokens
    assert set(ours) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(ours[name], tensor), name
    assert not model.training


def test_tied_lm_head_is_the_embedding(reference):
    model = load_model(reference("llama-tied").path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_checkpoint_loads_and_matches_hf(checkpoint_dir, reference, forward):
    folder = checkpoint_dir("llama", max_shard_size="20KB")  # same seed, same weights as reference("llama")
    shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    ref = reference("llama")
    assert max_error(forward(load_model(folder), ref.prompt), ref.hf_logits) < ATOL


def test_bf16_load_is_close_to_hf_fp32(reference, forward):
    ref = reference("llama")
    model = load_model(ref.path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = forward(model, ref.prompt)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # bf16 keeps ~3 significant digits: a few percent of the logit range, most argmaxes unchanged.
    assert max_error(logits, ref.hf_logits) < 0.1 * ref.hf_logits.abs().max().item()
    assert (logits.argmax(-1) == ref.hf_logits.argmax(-1)).float().mean() >= 0.8


def test_qwen2_window_is_ignored_unless_use_sliding_window(checkpoint_dir, forward):
    """Qwen2.5 config.json files carry `sliding_window` with `use_sliding_window: false`; HF then
    attends to everything, and so must we."""
    folder = checkpoint_dir("qwen2")
    edit_config(folder, sliding_window=8, use_sliding_window=False)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    prompt = torch.randint(0, hf.config.vocab_size, (32,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hf_logits = hf.eval()(prompt[None]).logits[0]
    model = load_model(folder)
    assert model.config.sliding_window is None
    assert max_error(forward(model, prompt), hf_logits) < ATOL


# -- config.json --------------------------------------------------------------------------------------


def test_from_hf_reads_v4_and_v5_config_alike(case):
    v5 = json.loads((case.path / "config.json").read_text())
    assert "rope_parameters" in v5  # transformers 5 wrote it
    config = ModelConfig.from_hf(v5)
    assert ModelConfig.from_hf(as_v4(v5)) == config
    assert ModelConfig.from_folder(case.path) == config
    hf = case.hf_model.config
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads,
            config.num_kv_heads, config.head_dim) == (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers,
                                                      hf.num_attention_heads, hf.num_key_value_heads,
                                                      hf.hidden_size // hf.num_attention_heads)
    assert config.rope_theta == hf.rope_parameters["rope_theta"]
    assert config.tie_word_embeddings == hf.tie_word_embeddings
    assert config.attention_bias == case.name.startswith("qwen2")


def test_from_hf_llama3_rope_v4_and_v5():
    v5 = {key: value for key, value in LLAMA_3_2_1B.items() if key not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA_3_2_1B["rope_scaling"], "rope_theta": 500000.0}
    config = ModelConfig.from_hf(LLAMA_3_2_1B)
    assert ModelConfig.from_hf(v5) == config
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_from_hf_old_type_key_in_rope_scaling():
    base = {key: value for key, value in LLAMA_3_2_1B.items() if key != "rope_scaling"}
    old = ModelConfig.from_hf({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    new = ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert old == new and new.rope_scaling["rope_type"] == "linear"


def test_from_hf_no_rope_keys_means_default_rope():
    base = {key: value for key, value in LLAMA_3_2_1B.items() if key not in ("rope_theta", "rope_scaling")}
    config = ModelConfig.from_hf(base)
    assert config.rope_scaling is None and config.rope_theta == 10000.0


# -- presets --------------------------------------------------------------------------------------


def test_presets_are_the_four_names():
    assert set(PRESETS) == {"llama-tiny", "llama-small", "llama-1b", "llama-8b"}


@pytest.mark.parametrize("name, published", [("llama-1b", LLAMA_3_2_1B), ("llama-8b", LLAMA_3_1_8B)])
def test_big_presets_have_the_published_shapes(name, published):
    """Shapes only: the 1b and 8b models are never built here (GBs of weights)."""
    preset = PRESETS[name]
    expected = ModelConfig.from_hf(published)
    assert dataclasses.asdict(preset) == dataclasses.asdict(dataclasses.replace(expected,
                                                                                eos_token_id=preset.eos_token_id))


def test_llama_1b_and_8b_preset_fields():
    one, eight = PRESETS["llama-1b"], PRESETS["llama-8b"]
    assert (one.num_layers, one.hidden_size, one.num_heads, one.num_kv_heads, one.head_dim,
            one.intermediate_size, one.vocab_size, one.tie_word_embeddings) == (16, 2048, 32, 8, 64, 8192,
                                                                                 128256, True)
    assert one.rope_scaling["rope_type"] == "llama3" and one.rope_scaling["factor"] == 32.0
    assert (eight.num_layers, eight.hidden_size, eight.num_heads, eight.num_kv_heads, eight.head_dim,
            eight.intermediate_size, eight.vocab_size, eight.tie_word_embeddings) == (32, 4096, 32, 8, 128,
                                                                                       14336, 128256, False)
    assert eight.rope_scaling["rope_type"] == "llama3" and eight.rope_scaling["factor"] == 8.0


def test_random_preset_is_seeded(forward):
    a, b = load_model("random:llama-tiny", seed=0), load_model("random:llama-tiny", seed=0)
    c = load_model("random:llama-tiny", seed=1)
    assert a.config == PRESETS["llama-tiny"]
    a_params, b_params, c_params = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(a_params[name], b_params[name]) for name in a_params)
    assert not torch.equal(a_params["model.embed_tokens.weight"], c_params["model.embed_tokens.weight"])
    assert not torch.equal(a_params["model.layers.1.mlp.down_proj.weight"],
                           c_params["model.layers.1.mlp.down_proj.weight"])
    ids = torch.randint(0, a.config.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    logits = forward(a, ids)
    assert logits.shape == (20, a.config.vocab_size) and torch.isfinite(logits).all()
    assert torch.equal(logits, forward(b, ids))
    assert max_error(forward(a, ids, chunk=7), logits) < ATOL


# -- specs that cannot load -----------------------------------------------------------------------


def test_missing_folder_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="no-such-model"):
        load_model(tmp_path / "no-such-model")


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="llama-huge"):
        load_model("random:llama-huge")


def test_unsupported_model_type_is_a_value_error(checkpoint_dir):
    folder = checkpoint_dir("llama")
    edit_config(folder, model_type="gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        load_model(folder)


def test_missing_tensor_is_a_value_error_naming_it(checkpoint_dir):
    folder = checkpoint_dir("llama")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("model.layers.1.mlp.down_proj.weight")):
        load_model(folder)


def test_missing_tensor_in_a_sharded_checkpoint_is_a_value_error(checkpoint_dir):
    folder = checkpoint_dir("llama", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.norm.weight"]
    weights = load_file(shard)
    del weights["model.norm.weight"]
    save_file(weights, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape("model.norm.weight")):
        load_model(folder)


def test_folder_without_config_json_is_a_value_error(checkpoint_dir):
    folder = checkpoint_dir("llama")
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        load_model(folder)


def test_unreadable_config_json_is_a_value_error_naming_the_file(checkpoint_dir):
    folder = checkpoint_dir("llama")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        ModelConfig.from_folder(folder)
