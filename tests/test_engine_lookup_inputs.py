"""Tests for CacheEngine.lookup (kvtier/engine.py) on its hot path: every input form gives the same
hit, and the key memo behind it never answers for a prompt that changed (same length included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens


@pytest.fixture
def stored(make_engine, layout):
    engine = make_engine("cpu_disk")
    tokens = seeded_tokens(8 * CHUNK + 5, 21)
    assert engine.store(tokens, seeded_kv(layout, len(tokens), 21)) == 8
    return engine, tokens


FORMS = {
    "int64 tensor": lambda t: t,
    "int32 tensor": lambda t: t.to(torch.int32),
    "list": torch.Tensor.tolist,
    "numpy int64": lambda t: t.numpy(),
    "numpy uint32": lambda t: t.numpy().astype(np.uint32),
    "tuple": lambda t: tuple(t.tolist()),
}


@pytest.mark.parametrize("form", FORMS)
def test_every_input_form_gives_the_same_hit(stored, form):
    engine, tokens = stored
    assert engine.lookup(FORMS[form](tokens)) == 8 * CHUNK
    assert engine.lookup(FORMS[form](tokens[:5 * CHUNK + 3])) == 5 * CHUNK


@pytest.mark.parametrize("form", ["int64 tensor", "list"])
def test_a_prompt_changed_in_its_middle_is_never_a_stale_hit(stored, form):
    engine, tokens = stored
    assert engine.lookup(FORMS[form](tokens)) == 8 * CHUNK  # remembered now
    changed = tokens.clone()
    changed[3 * CHUNK + 2] += 1  # same length, one token in chunk 3
    assert engine.lookup(FORMS[form](changed)) == 3 * CHUNK
    changed = tokens.clone()
    changed[-6] += 1  # the last full chunk
    assert engine.lookup(FORMS[form](changed)) == 7 * CHUNK
    assert engine.lookup(FORMS[form](tokens)) == 8 * CHUNK


@pytest.mark.parametrize("bad", [[1, -2, 3], [2**32], [1.5], [[1, 2]], ["7"]])
def test_bad_lists_still_raise_value_error(stored, bad):
    engine, _ = stored
    with pytest.raises(ValueError):
        engine.lookup(bad)
