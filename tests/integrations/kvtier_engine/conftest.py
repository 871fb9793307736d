"""Engine fixtures: tiny random Hugging Face checkpoints written by transformers, and HF's own output.

Each checkpoint is written once per session into `tmp_path_factory` (a few hundred KB) by
`XxxForCausalLM(config).save_pretrained(dir)`, after its weights are redrawn large enough to matter:
HF's default init (std 0.02, unit norms, zero Qwen2 biases) leaves attention nearly uniform, so a wrong
RoPE, window or bias would move the logits by less than the 1e-4 the tests allow. With std 0.2 the
scores are peaked, norm weights are random and biases are non-zero, and each of those mistakes moves
the logits by far more than 1e-4 (models/test_llama.py's `*_changes_the_logits` tests keep the
window and RoPE cases honest).

The reference is HF itself, loaded from the same folder in fp32 with eager attention (which applies
Mistral's sliding window), so both sides read the very same files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import kvtier.engine
from kvtier_engine.layers.attention import ContiguousKVCache

from .async_engine import Gate

PROMPT_LEN = 40  # past llama3's original context (16) and Mistral's small window (8)
MAX_TOKENS = 64  # cache size: prompt + 10 generated tokens fit
WEIGHT_STD = 0.2
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

# name -> (model class, config). One checkpoint per feature the decoder must get right.
CHECKPOINTS: dict[str, Callable[[], tuple[type[PreTrainedModel], PretrainedConfig]]] = {
    "llama": lambda: (LlamaForCausalLM, LlamaConfig(**TINY)),
    "llama-llama3-rope": lambda: (LlamaForCausalLM, LlamaConfig(**TINY, rope_theta=500000.0,
                                                                 rope_scaling=LLAMA3_ROPE)),
    "llama-linear-rope": lambda: (LlamaForCausalLM, LlamaConfig(
        **TINY, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-tied": lambda: (LlamaForCausalLM, LlamaConfig(**TINY, tie_word_embeddings=True)),
    "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config(**TINY)),
    "mistral": lambda: (MistralForCausalLM, MistralConfig(**TINY, sliding_window=None)),
    "mistral-window-64": lambda: (MistralForCausalLM, MistralConfig(**TINY, sliding_window=64)),
    "mistral-window-8": lambda: (MistralForCausalLM, MistralConfig(**TINY, sliding_window=8)),
    # Regression: the window applies to the layers from max_window_layers on, not to every layer.
    "qwen2-window-8-from-layer-1": lambda: (Qwen2ForCausalLM, Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=8, max_window_layers=1)),
}


@dataclass(frozen=True)
class Reference:
    """A checkpoint folder, a prompt, and what Hugging Face computes for it (fp32, eval mode)."""

    name: str
    path: Path
    prompt: torch.Tensor  # [PROMPT_LEN] token ids
    hf_model: PreTrainedModel
    hf_logits: torch.Tensor  # [PROMPT_LEN, vocab]


def randomize(model: PreTrainedModel, seed: int) -> None:
    """Redraw every tensor: norms uniform in [0.5, 1.5], everything else (biases too) N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * WEIGHT_STD)


def write_checkpoint(path: Path, name: str, seed: int = 0, **save_kwargs: object) -> Path:
    model_class, config = CHECKPOINTS[name]()
    torch.manual_seed(seed)
    model = model_class(config)
    randomize(model, seed)
    model.save_pretrained(path, **save_kwargs)
    return path


def load_hf(path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # generate() must not stop early on a random model
    model.generation_config.pad_token_id = 0
    return model.eval()


def seeded_prompt(vocab_size: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> Callable[[str], Reference]:
    """`reference(name)` writes checkpoint `name` once per session and returns HF's logits for it."""
    made: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in made:
            path = write_checkpoint(tmp_path_factory.mktemp(name), name)
            hf_model = load_hf(path)
            prompt = seeded_prompt(hf_model.config.vocab_size)
            with torch.no_grad():
                hf_logits = hf_model(prompt[None]).logits[0].float()
            made[name] = Reference(name, path, prompt, hf_model, hf_logits)
        return made[name]

    return get


@pytest.fixture(scope="session", params=sorted(CHECKPOINTS))
def case(request, reference) -> Reference:
    """Every checkpoint in CHECKPOINTS in turn, with HF's logits."""
    return reference(request.param)


@pytest.fixture
def checkpoint_dir(tmp_path) -> Callable[..., Path]:
    """`checkpoint_dir(name, seed=0, **save_pretrained_kwargs)`: a fresh folder of one's own to alter."""

    def make(name: str, seed: int = 0, **save_kwargs: object) -> Path:
        return write_checkpoint(tmp_path / name, name, seed, **save_kwargs)

    return make


@pytest.fixture(scope="session")
def forward() -> Callable[..., torch.Tensor]:
    """`forward(model, ids, chunk=None)`: logits [T, vocab] of our model over `ids`, fed into one fresh
    ContiguousKVCache in chunks of `chunk` tokens (all at once when None) with continuing positions."""

    def run(model, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        cache = ContiguousKVCache(model.config, max_tokens=MAX_TOKENS, dtype=next(model.parameters()).dtype)
        step = chunk or len(ids)
        out = []
        with torch.no_grad():
            for start in range(0, len(ids), step):
                positions = torch.arange(start, min(start + step, len(ids)))
                out.append(model(ids[positions], positions, cache))
        return torch.cat(out)

    return run


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """The "llama" checkpoint's folder, written once per session (for engines built by path)."""
    return str(write_checkpoint(tmp_path_factory.mktemp("llama"), "llama"))


@pytest.fixture
def gates(monkeypatch) -> list[Gate]:
    """Every tier below the CPU of the engines built in the test, wrapped in a `Gate` (in order);
    opened at teardown, so that no thread is left waiting behind a failed test."""
    made: list[Gate] = []
    real = kvtier.engine.build_lower_tiers

    def build(*args, **kwargs):
        tiers = [Gate(t) for t in real(*args, **kwargs)]
        made.extend(tiers)
        return tiers

    monkeypatch.setattr(kvtier.engine, "build_lower_tiers", build)
    yield made
    for gate in made:
        gate.open()
