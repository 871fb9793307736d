"""One error tree for kvtier.

Callers catch `KvtierError` for anything the library raises on purpose. `TierUnavailable` is the
retryable branch (a network or device hiccup): the storage manager turns it into a miss and a
counter. `CorruptRecord` never escapes a tier's read path as served data: it is a miss too.
"""


class KvtierError(Exception):
    """Base of every error kvtier raises deliberately."""


class ConfigError(KvtierError, ValueError):
    """A configuration file or environment override is malformed; the message names key and source."""


class CorruptRecord(KvtierError):
    """A stored record failed validation (magic, version, key, length or checksum)."""


class TierUnavailable(KvtierError):
    """A tier cannot serve right now (I/O error, connection lost); retryable."""


class PoolExhausted(KvtierError):
    """The host memory pool has no free slab and nothing could be evicted to make one."""
