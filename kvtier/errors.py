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


class UnknownTier(KvtierError, ValueError):
    """A tier name that this engine does not have (a typo in a move or clear call, or a controller
    request naming a tier this instance lacks)."""


class ProtocolError(KvtierError):
    """A kvtier_server frame is malformed (bad length, not msgpack, wrong types, unknown op, lengths
    that do not add up, over the size limit). `fatal` when the byte stream cannot be resynchronised
    (the frame's length is unknown or untrusted) and the connection must close; otherwise the decoder
    has skipped the frame and the next one decodes normally. `request_id` when it could be read."""

    def __init__(self, message: str, *, fatal: bool = False, request_id: int | None = None):
        super().__init__(message)
        self.fatal = fatal
        self.request_id = request_id
