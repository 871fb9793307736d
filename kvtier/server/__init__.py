"""kvtier_server: the cache server behind the `remote` tier (`kvtier.tiers.remote.RemoteTier`).

`app` is the asyncio server (accepting, handshakes, timeouts), `connection` one client socket's
handshake and I/O, `outbox` its queued replies, `handlers` the answer to each op, `stats` the
counters STATS returns, `budget` the bounds on bytes being received and on replies queued, `store`
the bounded record store and `spill` where it spills; the frame codec both sides share is
`kvtier.wire`. `python -m kvtier.server` (the `kvtier_server` script) runs one.
"""

from kvtier.server.app import KvtierServer, serve
from kvtier.server.store import RecordStore

__all__ = ["KvtierServer", "RecordStore", "serve"]
