"""kvtier_server's counters: `ServerStats` (connections, traffic, failures) and `stats_map`, the one
flat map of every counter (the server's, its budgets' and its store's) that STATS returns.

Where it runs: the server's event-loop thread only (plain integers, no locks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.server.budget import ByteBudget
from kvtier.server.store import RecordStore
from kvtier.wire.frames import Op


@dataclass(slots=True)
class ServerStats:
    requests: dict[str, int] = field(default_factory=lambda: {op.name.lower(): 0 for op in Op})
    bytes_in: int = 0
    bytes_out: int = 0
    connections: int = 0  # authenticated, open now
    handshakes: int = 0  # accepted, HELLO not yet answered, open now
    connections_total: int = 0  # accepted
    refused: int = 0  # HELLOs answered BUSY at max_connections
    handshake_timeouts: int = 0  # closed without a HELLO within handshake_timeout_s
    handshakes_dropped: int = 0  # closed in handshake to make room at max_handshakes
    accept_errors: int = 0  # accept() failures (EMFILE, ENFILE, ENOBUFS...), each pausing accepting
    idle_timeouts: int = 0  # authenticated connections closed after idle_timeout_s
    receive_timeouts: int = 0  # ... closed holding receive budget while under MIN_RECEIVE_RATE
    send_timeouts: int = 0  # ... closed with replies queued and none sent for send_timeout_s
    bad_frames: int = 0
    unauthorized: int = 0
    errors: int = 0  # requests the server failed to serve
    reply_cuts: int = 0  # GET keys answered as misses because their reply was full (HIGH_WATER)


def stats_map(s: ServerStats, store: RecordStore, receiving: ByteBudget,
             sending: ByteBudget) -> dict[str, int]:
    """Every counter as one flat map: what STATS returns."""
    c, spill = store.counters, store.spill
    return {**{f"requests_{op}": n for op, n in s.requests.items()},
            "bytes_in": s.bytes_in, "bytes_out": s.bytes_out, "connections": s.connections,
            "handshakes": s.handshakes, "connections_total": s.connections_total, "refused": s.refused,
            "handshake_timeouts": s.handshake_timeouts, "handshakes_dropped": s.handshakes_dropped,
            "accept_errors": s.accept_errors,
            "idle_timeouts": s.idle_timeouts, "receive_timeouts": s.receive_timeouts,
            "receiving_bytes": receiving.used,
            "receive_waits": receiving.waits, "send_timeouts": s.send_timeouts,
            "sending_bytes": sending.used, "reply_waits": sending.waits,
            "bad_frames": s.bad_frames,
            "unauthorized": s.unauthorized, "errors": s.errors, "reply_cuts": s.reply_cuts,
            "hits": c.hits, "misses": c.misses,
            "evictions": c.evictions, "spills": c.spills, "spill_hits": c.spill_hits,
            "dropped": c.dropped, "invalid": c.invalid, "spill_errors": c.spill_errors,
            "records": store.records, "bytes": store.bytes,
            "capacity": store.capacity, "spill_records": spill.records if spill else 0,
            "spill_bytes": spill.bytes if spill else 0, "spill_capacity": spill.capacity if spill else 0}
