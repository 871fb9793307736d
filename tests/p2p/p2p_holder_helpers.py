"""Helpers for the holder-side P2P tests (holding, leases, peer server): chunks stored into a real
StorageManager (tests/conftest.py `make_manager`), the payload bytes each chunk must have, and
"the accounting is back to zero" as a condition to wait for (a GET's chunks are let go by the
server after its reply is sent, so a client can see the reply a moment before that)."""

from __future__ import annotations

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens

from kvtier.keys import ChunkSpan, TokenDatabase
from kvtier.layout import KVLayout
from kvtier.storage import StorageManager
from kvtier.tiers.remote_client import Client

TOKEN = "peer-secret"  # the P2P endpoint's shared secret in the holder tests


@pytest.fixture
def connect():
    """A remote_client.Client to a PeerServer (`connect(server)`, or another token); closed at
    teardown. Test modules take it as `connect = p2p_holder_helpers.connect`."""
    clients: list[Client] = []

    def make(server, token: str | None = TOKEN) -> Client:
        clients.append(Client("127.0.0.1", server.port, 5.0, token, 1))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def store(manager: StorageManager, db: TokenDatabase, layout: KVLayout, chunks: int, seed: int,
          disk_only: bool = False) -> tuple[list[ChunkSpan], torch.Tensor]:
    """Store `chunks` chunks of a seeded prompt; `disk_only`: then move them all to the disk tier
    (out of host memory). Returns the spans and the KV stored."""
    spans = db.spans(seeded_tokens(chunks * CHUNK, seed))
    kv = seeded_kv(layout, chunks * CHUNK, seed)
    assert manager.put(spans, kv) == chunks
    assert manager.flush(timeout=10)
    if disk_only:
        assert manager.move_down([s.key for s in spans], manager.lower[0]) == chunks
        assert manager.contains_prefix([s.key for s in spans]) == chunks
    return spans, kv


def payload(kv: torch.Tensor, span: ChunkSpan) -> bytes:
    """The record payload of `span`'s chunk: its `[2, L, t, H*D]` slice of `kv`, contiguous."""
    return kv[:, :, span.start:span.end].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()


def settled(manager: StorageManager) -> bool:
    """Every hold let go: no holder, no entry read, every slab in use a CPU entry's."""
    try:
        manager.check_invariants()
    except RuntimeError:
        return False
    return True
