"""KV geometry and the chunk tensor layout.

A chunk of KV for `T` tokens is one tensor `[2, L, T, H*D]`: index 0 of the first axis is K, 1 is V;
`L` layers; heads and head dim flattened into the last axis, so one token of one layer of K is one
contiguous run of `H*D` elements. This is the layout every tier stores and every connector
gathers into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.dtypes import CODES_BY_NAME, dtype_name

# The record format's dtype codes as torch dtypes (the table itself lives in kvtier.dtypes, by
# name, so that record code can run without torch).
DTYPE_CODES: dict[torch.dtype, int] = {getattr(torch, name): code for name, code in CODES_BY_NAME.items()}
DTYPES_BY_CODE: dict[int, torch.dtype] = {code: dt for dt, code in DTYPE_CODES.items()}
__all__ = ["DTYPE_CODES", "DTYPES_BY_CODE", "KVLayout", "dtype_name"]


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The KV geometry of one model (per tensor-parallel rank)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"KVLayout.dtype {self.dtype} is not supported; use one of {list(DTYPE_CODES)}")

    @property
    def hidden(self) -> int:
        """Elements of one token of one layer of K (or V): `H * D`."""
        return self.num_kv_heads * self.head_dim

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.hidden * self.element_size

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        return (2, self.num_layers, num_tokens, self.hidden)

    def chunk_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.bytes_per_token

    def check_kv(self, kv: torch.Tensor, num_tokens: int, exact: bool = True) -> None:
        """Raise ValueError unless `kv` is `[2, L, T, H*D]` of this layout's dtype, with
        `T == num_tokens` (or `T >= num_tokens` when not `exact`)."""
        if not isinstance(kv, torch.Tensor):
            raise ValueError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        if kv.dtype != self.dtype:
            raise ValueError(f"kv dtype {kv.dtype} does not match the layout dtype {self.dtype}")
        want = self.chunk_shape(num_tokens)
        if kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[1] != want[1] or kv.shape[3] != want[3]:
            raise ValueError(
                f"kv shape {tuple(kv.shape)} does not match the layout: expected [2, {want[1]}, T, {want[3]}]"
                f" (layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim})"
            )
        if kv.shape[2] < num_tokens or (exact and kv.shape[2] != num_tokens):
            raise ValueError(f"kv holds {kv.shape[2]} tokens but {num_tokens} tokens were given")

    def describe(self) -> str:
        """Stable text form of the geometry, used in cache namespaces."""
        return f"L{self.num_layers}-H{self.num_kv_heads}-D{self.head_dim}-{dtype_name(self.dtype)}"
