"""Record dtype codes, by name, without importing torch.

The numeric codes are part of the record format (append only, never renumber). They are keyed by
the dtype's stable name rather than by `torch.dtype` so that processes that only move records
(`kvtier_server`) never import torch: a torch import alone costs ~250 MiB of RSS.
"""

from __future__ import annotations

import sys
from typing import Any

CODES_BY_NAME: dict[str, int] = {
    "float16": 1,
    "bfloat16": 2,
    "float32": 3,
    "float8_e4m3fn": 4,
    "float8_e5m2": 5,
    "uint8": 6,
    "int8": 7,
}
NAMES_BY_CODE: dict[int, str] = {code: name for name, code in CODES_BY_NAME.items()}


def dtype_name(dtype: Any) -> str:
    """The stable name of a `torch.dtype` ("bfloat16"); never depends on torch's repr changing."""
    return str(dtype).removeprefix("torch.")


def dtype_code(dtype: Any) -> int:
    """The record code of a `torch.dtype` or of a code already (an int). Raises ValueError."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype not in NAMES_BY_CODE:
            raise ValueError(f"dtype code {dtype} is not a record dtype")
        return dtype
    code = CODES_BY_NAME.get(dtype_name(dtype))
    if code is None:
        raise ValueError(f"dtype {dtype} has no record code")
    return code


def torch_dtype(code: int):
    """The `torch.dtype` of a record code (imports torch: only callers that hold tensors use it)."""
    import torch

    return getattr(torch, NAMES_BY_CODE[code])


def is_tensor(obj: object) -> bool:
    """True for a `torch.Tensor`, without importing torch (if torch is not loaded, nothing is one)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)
