"""Tests for kvtier/layout.py: KV geometry, chunk sizes, the [2, L, T, H*D] shape check, dtype codes."""

from __future__ import annotations

import pytest
import torch

from kvtier.layout import DTYPE_CODES, DTYPES_BY_CODE, KVLayout, dtype_name

MiB = 2**20
LLAMA_8B = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
SMALL = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.float16)


def test_llama_8b_geometry():
    assert LLAMA_8B.hidden == 1024
    assert LLAMA_8B.element_size == 2
    assert LLAMA_8B.bytes_per_token == 2 * 32 * 1024 * 2 == 128 * 1024
    assert LLAMA_8B.chunk_bytes(256) == 32 * MiB
    assert LLAMA_8B.chunk_shape(256) == (2, 32, 256, 1024)


@pytest.mark.parametrize(
    ("dtype", "size"),
    [(torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4), (torch.float8_e4m3fn, 1),
     (torch.float8_e5m2, 1), (torch.uint8, 1), (torch.int8, 1)],
)
def test_element_size_and_chunk_bytes_per_dtype(dtype, size):
    layout = KVLayout(3, 2, 4, dtype)
    assert layout.element_size == size
    assert layout.chunk_bytes(10) == 10 * 2 * 3 * 8 * size
    assert layout.chunk_bytes(10) == torch.empty(layout.chunk_shape(10), dtype=dtype).nbytes


def test_defaults():
    layout = KVLayout(1, 1, 1)
    assert layout.dtype == torch.float16 and layout.block_size == 16


def test_check_kv_accepts_the_exact_shape():
    SMALL.check_kv(torch.zeros(2, 3, 16, 8, dtype=torch.float16), 16)
    SMALL.check_kv(torch.zeros(2, 3, 0, 8, dtype=torch.float16), 0)


def test_check_kv_not_exact_allows_more_tokens_than_given():
    kv = torch.zeros(2, 3, 20, 8, dtype=torch.float16)
    SMALL.check_kv(kv, 16, exact=False)
    with pytest.raises(ValueError, match="holds 20 tokens but 16"):
        SMALL.check_kv(kv, 16)
    with pytest.raises(ValueError, match="holds 20 tokens but 21"):
        SMALL.check_kv(kv, 21, exact=False)


def test_check_kv_wrong_dtype():
    message = "kv dtype torch.bfloat16 does not match the layout dtype torch.float16"
    with pytest.raises(ValueError, match=message):
        SMALL.check_kv(torch.zeros(2, 3, 16, 8, dtype=torch.bfloat16), 16)


@pytest.mark.parametrize(
    ("shape", "what"),
    [
        ((2, 4, 16, 8), "wrong layer count"),
        ((2, 3, 16, 16), "wrong hidden"),
        ((2, 3, 16, 2, 4), "heads not flattened"),
        ((1, 3, 16, 8), "K without V"),
        ((3, 16, 8), "missing K/V axis"),
    ],
)
def test_check_kv_wrong_shape_names_expected_layout(shape, what):
    with pytest.raises(ValueError) as info:
        SMALL.check_kv(torch.zeros(shape, dtype=torch.float16), 16)
    message = str(info.value)
    assert f"kv shape {shape}" in message, what
    assert "expected [2, 3, T, 8]" in message
    assert "layers=3, kv_heads=2, head_dim=4" in message


def test_check_kv_wrong_token_count():
    with pytest.raises(ValueError, match="holds 15 tokens but 16 tokens were given"):
        SMALL.check_kv(torch.zeros(2, 3, 15, 8, dtype=torch.float16), 16)


def test_check_kv_rejects_non_tensors():
    with pytest.raises(ValueError, match="torch.Tensor"):
        SMALL.check_kv([[0.0]], 1)


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "block_size"])
@pytest.mark.parametrize("value", [0, -1, 2.0, "8", None, True])
def test_invalid_geometry_raises(field, value):
    args = {"num_layers": 3, "num_kv_heads": 2, "head_dim": 4, "block_size": 16, field: value}
    with pytest.raises(ValueError, match=f"KVLayout.{field} must be a positive int"):
        KVLayout(**args)


def test_bool_is_not_a_layer_count():
    # Regression: bool is an int subclass, so KVLayout(True, ...) was accepted and described as
    # "LTrue-...", a namespace apart from the identical KVLayout(1, ...).
    with pytest.raises(ValueError, match="num_layers"):
        KVLayout(True, 1, 1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.int64, "float16"])
def test_unsupported_dtype_raises(dtype):
    with pytest.raises(ValueError, match="not supported"):
        KVLayout(3, 2, 4, dtype)


def test_describe_is_stable_text():
    assert LLAMA_8B.describe() == "L32-H8-D128-bfloat16"
    assert KVLayout(3, 2, 4, torch.float8_e4m3fn).describe() == "L3-H2-D4-float8_e4m3fn"
    assert KVLayout(3, 2, 4, block_size=32).describe() == SMALL.describe()


def test_layouts_are_frozen_values():
    assert KVLayout(32, 8, 128, torch.bfloat16) == LLAMA_8B
    assert hash(KVLayout(32, 8, 128, torch.bfloat16)) == hash(LLAMA_8B)
    with pytest.raises(AttributeError):
        LLAMA_8B.num_layers = 4  # type: ignore[misc]


def test_dtype_codes_are_pinned():
    # Part of the record format: append only, never renumber.
    assert DTYPE_CODES == {
        torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float8_e4m3fn: 4,
        torch.float8_e5m2: 5, torch.uint8: 6, torch.int8: 7,
    }
    assert all(DTYPES_BY_CODE[code] is dt for dt, code in DTYPE_CODES.items())


def test_dtype_name():
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name(torch.float8_e5m2) == "float8_e5m2"
