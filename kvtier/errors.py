"""One error tree for kvtier: what each error means, who raises it and what becomes of it.

A caller of `CacheEngine` meets three of them (besides ValueError/TypeError for bad arguments):
`ConfigError` (a bad configuration, at load or when a tier opens its directory or URL),
`UnknownTier` (a tier name this engine does not have) and a plain `KvtierError` (a call after
`close()` began). Everything that goes wrong with stored KV stays inside the tiers, by the `Tier`
contract (`kvtier/tiers/base.py`): a tier never raises for a bad record or a failing medium; it
counts the failure (`kvtier.metrics` tier counters `corrupt`, `errors`) and answers a miss, and the
engine recomputes. So:

- `CorruptRecord` is raised by `kvtier.record` (header, key, length, checksum) and by a tier's own
  read path, and caught there: the record is dropped, counted `corrupt`, returned as None. The
  server's store catches it on PUT and answers INVALID. Wrong KV is never served.
- `TierUnavailable` is raised inside the `kvtier_server` client tier (`tiers/remote.py` and its
  client) when the server answers BUSY or ERROR, statuses a retry may fix. The tier's failure guard
  (`tiers/backoff.py`) catches it with every other OSError/KvtierError of the call: a miss for each
  chunk, `errors` counted per chunk, a back-off. A refused handshake (UNAUTHORIZED, or BAD_REQUEST
  to the HELLO: a wrong token or protocol version) is a configuration problem instead: the tier logs
  what to fix once and holds off, probing once per `retry_max_s`. A BAD_REQUEST to one request (a
  frame over the server's size limit) fails that call only: its chunks count as `errors`, a warning
  is logged at most once a minute, and the tier stays up for every other call. No other tier raises
  `TierUnavailable` (Redis raises redis-py's errors, disk OSError, both caught the same way inside
  the tier), and nothing outside a tier ever sees it.
- `ProtocolError` belongs to the frame codec (`kvtier/wire/`): the server answers the frame with
  BAD_REQUEST (and closes the connection when `fatal`); the client tier treats it as a failed call.

Callers catch `KvtierError` for anything kvtier raises on purpose. A tier that raises anyway (a bug)
still costs only a miss: the read path (`kvtier/transfers.py`) logs it and counts `errors`, a
background write that raises is logged and its chunk counts as not stored, and the connector's load
path logs any exception from `retrieve` and recomputes.
"""


class KvtierError(Exception):
    """Base of every error kvtier raises deliberately; raised itself by a call after close()."""


class ConfigError(KvtierError, ValueError):
    """A configuration file or environment override is malformed, or a tier cannot use what it was
    configured with (a path that is not a directory, a URL it cannot connect with); the message
    names the key and where its value came from."""


class CorruptRecord(KvtierError):
    """A stored record failed validation (magic, version, key, length or checksum)."""


class TierUnavailable(KvtierError):
    """A network tier's server refused or failed a call; retryable (the tier backs off)."""


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
