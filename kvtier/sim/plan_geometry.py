"""What a block of a trace weighs for the capacity planner: a model's KV geometry (a named model or
a layout given field by field) and capacities written the way people size tiers (`5%` of the
trace's distinct blocks, `64GiB`), turned into numbers of blocks.

All plain functions; ValueError says what is wrong with the text given. torch (for KVLayout) is
imported when a layout is built, not with the module: the `kvtier` command line imports this module
for its help text and stays light for the commands that never build one.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.config_values import parse_size
from kvtier.dtypes import CODES_BY_NAME
from kvtier.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.layout import KVLayout

logger = logging.getLogger(__name__)

# (layers, KV heads, head dim) of each model's config.json, KV in bfloat16 as served. Per model, not
# per tensor-parallel rank: the planner sizes the whole fleet's copy of a prefix.
MODELS: dict[str, tuple[int, int, int]] = {
    "llama-3.1-8b": (32, 8, 128),  # 128 KiB a token
    "llama-3.2-1b": (16, 8, 64),  # 32 KiB
    "llama-3.1-70b": (80, 8, 128),  # 320 KiB
    "qwen2.5-7b": (28, 4, 128),  # 56 KiB
}
DEFAULT_MODEL = "llama-3.1-8b"
_LAYOUT_KEYS = {"layers": "num_layers", "kv_heads": "num_kv_heads", "head_dim": "head_dim"}
_WITH_UNIT = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*[a-z]+")  # unsigned, a unit required


def model_layout(name: str) -> KVLayout:
    """The KV layout of a model in MODELS."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)} (or give --layout)")
    layers, heads, head_dim = MODELS[name]
    return _layout(layers, heads, head_dim, "bfloat16")


def parse_layout(text: str) -> KVLayout:
    """`layers=32,kv_heads=8,head_dim=128[,dtype=bfloat16]` as a KVLayout (dtype: bfloat16 unless
    given; any dtype kvtier's records carry)."""
    fields, dtype = {}, "bfloat16"
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or (key not in _LAYOUT_KEYS and key != "dtype"):
            raise ValueError(f"layout {text!r}: expected key=value, keys {', '.join(_LAYOUT_KEYS)}, dtype")
        if key == "dtype":
            if value not in CODES_BY_NAME:
                raise ValueError(f"layout {text!r}: dtype {value!r}; known: {', '.join(CODES_BY_NAME)}")
            dtype = value
        elif not value.isdigit() or int(value) <= 0:
            raise ValueError(f"layout {text!r}: {key} must be a positive integer, got {value!r}")
        else:
            fields[_LAYOUT_KEYS[key]] = int(value)
    missing = [k for k, field in _LAYOUT_KEYS.items() if field not in fields]
    if missing:
        raise ValueError(f"layout {text!r}: missing {', '.join(missing)}")
    return _layout(fields["num_layers"], fields["num_kv_heads"], fields["head_dim"], dtype)


def _layout(layers: int, kv_heads: int, head_dim: int, dtype: str) -> KVLayout:
    import torch

    from kvtier.layout import KVLayout

    return KVLayout(layers, kv_heads, head_dim, getattr(torch, dtype))


@dataclass(frozen=True, slots=True)
class Capacity:
    """A tier size as written: a share of the trace's distinct blocks, or bytes of the model's KV."""

    text: str
    fraction: float | None = None
    nbytes: int | None = None

    def blocks(self, distinct_blocks: int, block_bytes: int) -> int:
        """Whole blocks (rounded down, as a tier of that many bytes holds); ValueError under one."""
        if self.fraction is not None:
            blocks = int(self.fraction * distinct_blocks)
        else:
            blocks = self.nbytes // block_bytes
        if blocks < 1:
            raise ValueError(f"capacity {self.text} is less than one block ({block_bytes / 2**20:g} MiB) "
                             f"of this trace ({distinct_blocks} distinct blocks)")
        return blocks


def parse_capacity(text: str) -> Capacity:
    """`5%` (of the distinct blocks) or a size with a unit (`64GiB`, `500 GB`: the config's sizes,
    `kvtier.config_values.parse_size`); > 0."""
    clean = text.strip().lower()
    if clean.endswith("%"):
        value = _number(clean[:-1].strip(), text)
        return Capacity(text, fraction=value / 100)
    unit_required = ValueError(f"capacity {text!r}: give a share of the distinct blocks (5%) or a size "
                               f"with a unit (64GiB, 500GB)")
    if not _WITH_UNIT.fullmatch(clean):
        raise unit_required
    try:
        return Capacity(text, nbytes=parse_size(clean, "capacity"))
    except ConfigError as error:
        if "positive" in str(error):
            raise ValueError(f"capacity {text!r}: must be a positive number") from None
        raise unit_required from None


def _number(text: str, whole: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"capacity {whole!r}: must be a positive number")
    return value

