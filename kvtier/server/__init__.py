"""kvtier_server: the cache server behind the `remote` tier (`kvtier.tiers.remote.RemoteTier`).

`protocol` (frame format, encoder, validation) and `decoder` are the sans-IO codec both sides
share, `store` the bounded record store, `app` the asyncio server, `connection` one client socket's
handshake and I/O, `budget` the bounds on bytes being received and on replies queued;
`python -m kvtier.server` (the `kvtier_server` script) runs one.
"""

from kvtier.server.app import KvtierServer, serve
from kvtier.server.store import RecordStore

__all__ = ["KvtierServer", "RecordStore", "serve"]
