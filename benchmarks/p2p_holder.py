"""The P2P holder of benchmarks/remote_throughput.py, in a process of its own: what another engine's
peer endpoint is, without the engine. A MemoryPool and a StorageManager whose CPU tier holds the
benchmark's records, served by a real `kvtier.p2p.peer_server.PeerServer`, with a
`kvtier.p2p.nixl_transport.NixlEndpoint` over the pool's arena when NIXL can be used here (so one
holder serves NIXL readers, with LEASE / READ / RELEASE, and TCP readers, with GET).

    python benchmarks/p2p_holder.py RECORD_BYTES COUNT SEED TRANSPORT TOKEN    (TRANSPORT: nixl | tcp)
    -> one JSON line once serving: {"url", "nixl": bool, "why": str | None, "pid"}
       (why: what kept NIXL from starting, when nixl was asked for)
    stdin closed -> stops the server (every lease ended), closes the storage and the endpoint, exits 0

The records are the ones `seeded_records` makes in the benchmark: the same keys and payload bytes
as the other stores get. Each is stored as one chunk of a layout whose chunk is exactly that many
bytes (llama-8b's geometry, 128 KiB a token: 4 MiB = 32 tokens, 32 MiB = 256), so the holder's
slab holds the record's payload byte for byte. NIXL and UCX may print to stdout: the JSON line gets
its own copy of fd 1 and everything else written to fd 1 goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import torch

from kvtier.keys import ChunkKey, ChunkSpan
from kvtier.layout import KVLayout

NAMESPACE = b"rbench00"
LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128)  # llama-8b: 128 KiB of KV a token
LEASE_ROOM = 16  # spare slabs: leases hold at most half the pool's slabs, and 8 readers lease at once


def record_key(seed: int, i: int) -> ChunkKey:
    return ChunkKey(NAMESPACE, seed.to_bytes(8, "little") + i.to_bytes(8, "little"))


def seeded_records(count: int, nbytes: int, seed: int) -> Iterator[tuple[ChunkKey, torch.Tensor]]:
    """(key, uint8 payload of `nbytes`) for record 0..count-1: the same in every process."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(count):
        yield record_key(seed, i), torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def tokens_for(nbytes: int) -> int:
    if nbytes % LAYOUT.bytes_per_token:
        raise ValueError(f"a record of {nbytes} bytes is not a whole number of "
                         f"{LAYOUT.bytes_per_token}-byte tokens")
    return nbytes // LAYOUT.bytes_per_token


def _endpoint(transport: str, pool) -> tuple[object | None, str | None]:
    """The NIXL endpoint over the pool's arena (None, and why not, when it cannot start)."""
    if transport != "nixl":
        return None, "the holder was started for TCP"
    from kvtier.p2p.nixl_transport import NixlEndpoint, TransportError, nixl_status

    why = nixl_status()
    if why is not None:
        return None, why
    try:
        return NixlEndpoint(f"bench-holder-{os.getpid()}", pool.arena, pool.slab_stride, pool.slab_bytes,
                            pool.num_slabs), None
    except TransportError as exc:
        return None, str(exc)


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from kvtier.config import P2PConfig
    from kvtier.memory import MemoryPool
    from kvtier.metrics import Metrics
    from kvtier.p2p.peer_server import PeerServer
    from kvtier.storage import StorageManager

    nbytes, count, seed = map(int, sys.argv[1:4])
    transport, token = sys.argv[4], sys.argv[5]
    tokens = tokens_for(nbytes)
    pool = MemoryPool((count + LEASE_ROOM) * nbytes, nbytes, pin=False)
    metrics = Metrics(["cpu"])
    storage = StorageManager(LAYOUT, pool, [], metrics, io_threads=1)
    for key, payload in seeded_records(count, nbytes, seed):
        kv = payload.view(LAYOUT.dtype).view(LAYOUT.chunk_shape(tokens))  # the record's bytes, as a chunk
        if storage.put([ChunkSpan(key, 0, tokens)], kv) != 1:
            raise RuntimeError("the holder's CPU tier refused a record")
    endpoint, why = _endpoint(transport, pool)
    # The benchmark's deadline (as its other clients' 30 s), and leases that outlive it.
    server = PeerServer(P2PConfig(token=token, timeout_s=30.0, lease_s=60.0), NAMESPACE, metrics, endpoint)
    server.start(storage)
    replies.write(json.dumps({"url": server.url, "nixl": endpoint is not None, "why": why,
                              "pid": os.getpid()}) + "\n")
    sys.stdin.read()  # until the benchmark closes our stdin
    server.stop()
    storage.close()
    if endpoint is not None:
        endpoint.close()


if __name__ == "__main__":
    main()
