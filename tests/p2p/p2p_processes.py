"""What the P2P end-to-end tests share (tests/p2p/test_p2p_fleet.py, test_p2p_engines.py): the `p2p:`
section of an instance, the transport parameter (NIXL skipped where it cannot load, with the reason),
a peer endpoint's STATS over the wire, and a look at the kernel's socket queues to know, without a
fixed wait, that a request reached a peer that does not answer (SIGSTOPped).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from kvtier.tiers.remote_client import Client, Request
from kvtier.wire.frames import Frame, Op

TRANSPORTS = ["nixl", "tcp"]
PEER_TOKEN = "p2p-test-token-0123456789abcdef"
PEER_TIMEOUT_S = 2.0  # a reader's deadline for one peer read (the config's default)
MARGIN_S = 1.5  # what a busy 2-core machine may add to a deadline (a retrieve's other steps)


def require(transport: str) -> None:
    """Skip a NIXL run where NIXL with UCX cannot be used here (why, from nixl_status)."""
    if transport == "nixl":
        from kvtier.p2p.nixl_transport import nixl_status

        if (why := nixl_status()) is not None:
            pytest.skip(f"NIXL unusable here: {why}")


def p2p_section(transport: str, **overrides) -> dict:
    """An instance's `p2p:` section: loopback, the shared token, quick back-off and directory answers
    (tests wait on them), the default deadline."""
    return {"transport": transport, "host": "127.0.0.1", "port": 0, "token": PEER_TOKEN,
            "timeout_s": PEER_TIMEOUT_S, "lease_s": 10.0, "directory_ttl_s": 0.1,
            "retry_after_s": 0.2, "retry_max_s": 0.4, **overrides}


def host_port(url: str) -> tuple[str, int]:
    """kvtier://host:port -> (host, port)."""
    parts = urlsplit(url)
    return parts.hostname, parts.port


def peer_stats(url: str) -> dict[str, int]:
    """A peer endpoint's STATS (connections, leases_active, leased_chunks, ...), asked over the wire."""
    host, port = host_port(url)
    client = Client(host, port, 10.0, PEER_TOKEN, 1)
    try:
        (reply,) = client.call([Request(Frame(Op.STATS, 1))])
    finally:
        client.close()
    return reply.stats


def leases(url: str) -> int:
    return peer_stats(url)["leases_active"]


def queued_bytes(port: int) -> tuple[int, int]:
    """(unsent, unread) bytes on 127.0.0.1:`port`'s connections, as the kernel counts them: unread > 0
    once a request reached a peer that is stalled (SIGSTOP), unsent > 0 while the peer's reply is on
    its way to a reader (its send buffer not yet taken), both known at once, without a fixed wait."""
    unsent = unread = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if int(local.split(":")[1], 16) == port and state == "01":  # ESTABLISHED
                tx, rx = (int(q, 16) for q in queues.split(":"))  # tx_queue:rx_queue
                unsent, unread = unsent + tx, unread + rx
    return unsent, unread


def unread_bytes(port: int) -> int:
    return queued_bytes(port)[1]
