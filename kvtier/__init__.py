"""kvtier: KV-cache offload and sharing for LLM serving.

Public API: `CacheEngine`, `KVLayout`, `load_config`, and the error tree.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kvtier.config import KvtierConfig, load_config
from kvtier.errors import ConfigError, CorruptRecord, KvtierError, TierUnavailable, UnknownTier

if TYPE_CHECKING:
    from kvtier.engine import CacheEngine
    from kvtier.layout import KVLayout

# CacheEngine and KVLayout pull in torch (~250 MiB of RSS). They load on first use, so a process
# that imports only a submodule of kvtier (kvtier_server moves records, never tensors) stays small.
_LAZY = {"CacheEngine": "kvtier.engine", "KVLayout": "kvtier.layout"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "CacheEngine", "KVLayout", "KvtierConfig", "load_config",
    "KvtierError", "ConfigError", "CorruptRecord", "TierUnavailable", "UnknownTier",
]
__version__ = "0.1.0"
