"""Tests for kvtier_engine/models/llama.py: the Llama-family decoder against Hugging Face transformers.

Every checkpoint of conftest.CHECKPOINTS (Llama with default, llama3 and linear RoPE, tied embeddings;
Qwen2 with q/k/v biases; Mistral without, with a large and with a small sliding window) is loaded by
`load_model` and run over the reference attention backend. Logits must match HF's in fp32 to 1e-4
whether the prompt goes in at once, in chunks of 7 or token by token, and greedy decoding must pick
the very tokens `generate()` picks.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvtier_engine.layers.attention import ContiguousKVCache
from kvtier_engine.models.loader import load_model

ATOL = 1e-4
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model(case):
    return load_model(case.path)


def max_error(ours: torch.Tensor, hf: torch.Tensor) -> float:
    assert ours.shape == hf.shape
    return (ours - hf).abs().max().item()


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """Prefill, then feed back the argmax one token at a time through the same cache."""
    cache = ContiguousKVCache(model.config, max_tokens=len(prompt) + new_tokens)
    tokens: list[int] = []
    ids, positions = prompt, torch.arange(len(prompt))
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(ids, positions, cache)
            tokens.append(int(logits[-1].argmax()))
            next_position = int(positions[-1]) + 1
            ids, positions = torch.tensor([tokens[-1]]), torch.tensor([next_position])
    return tokens


def test_full_prompt_logits_match_hf(case, model, forward):
    logits = forward(model, case.prompt)
    assert logits.dtype == torch.float32
    assert max_error(logits, case.hf_logits) < ATOL


def test_chunked_prefill_matches_hf(case, model, forward):
    assert max_error(forward(model, case.prompt, chunk=7), case.hf_logits) < ATOL


def test_token_by_token_decode_matches_hf(case, model, forward):
    assert max_error(forward(model, case.prompt, chunk=1), case.hf_logits) < ATOL


def test_greedy_tokens_match_hf_generate(case, model):
    with torch.no_grad():
        out = case.hf_model.generate(case.prompt[None], max_new_tokens=NEW_TOKENS, do_sample=False)
    hf_tokens = out[0, len(case.prompt):].tolist()
    assert len(hf_tokens) == NEW_TOKENS  # generate() did not stop early
    assert greedy(model, case.prompt, NEW_TOKENS) == hf_tokens


def test_small_sliding_window_changes_the_logits(reference):
    """Guards the window cases above: a model that ignored the window would fail them, not pass."""
    windowed, full = reference("mistral-window-8"), reference("mistral")
    assert torch.equal(windowed.prompt, full.prompt)
    assert max_error(windowed.hf_logits[8:], full.hf_logits[8:]) > 100 * ATOL
    assert max_error(windowed.hf_logits[:8], full.hf_logits[:8]) < ATOL  # same weights: a real A/B


def test_rope_scaling_changes_the_logits(reference):
    """Guards the RoPE cases above: each scaled checkpoint differs from the same weights under default
    RoPE (same theta) by far more than ATOL, so an ignored scaling could not pass them."""
    linear, default = reference("llama-linear-rope"), reference("llama")
    assert max_error(linear.hf_logits[:1], default.hf_logits[:1]) < ATOL  # position 0: same weights
    assert max_error(linear.hf_logits, default.hf_logits) > 100 * ATOL
    llama3 = reference("llama-llama3-rope")
    unscaled = AutoModelForCausalLM.from_pretrained(
        llama3.path, dtype=torch.float32, attn_implementation="eager",
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.no_grad():
        unscaled_logits = unscaled(llama3.prompt[None]).logits[0]
    assert max_error(unscaled_logits, llama3.hf_logits) > 100 * ATOL
