"""kvtier: KV-cache offload and sharing for LLM serving.

Public API: `CacheEngine`, `KVLayout`, `load_config`, and the error tree.
"""

from kvtier.config import KvtierConfig, load_config
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError, CorruptRecord, KvtierError, PoolExhausted, TierUnavailable
from kvtier.layout import KVLayout

__all__ = [
    "CacheEngine", "KVLayout", "KvtierConfig", "load_config",
    "KvtierError", "ConfigError", "CorruptRecord", "TierUnavailable", "PoolExhausted",
]
__version__ = "0.1.0"
