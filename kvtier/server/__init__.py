"""kvtier_server: the cache server behind the `remote` tier (`kvtier.tiers.remote.RemoteTier`).

`protocol` is the sans-IO frame codec both sides share, `store` the bounded record store, `app`
the asyncio server; `python -m kvtier.server` (the `kvtier_server` script) runs one.
"""

from kvtier.server.app import KvtierServer, serve
from kvtier.server.store import RecordStore

__all__ = ["KvtierServer", "RecordStore", "serve"]
