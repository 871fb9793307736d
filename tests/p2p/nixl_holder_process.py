"""A NIXL holder in its own process, for tests/p2p/test_p2p_nixl.py: an arena of `slots` slots whose
bytes are known (slot i holds `pattern(i, slot_bytes)`), a NixlEndpoint over it, driven by JSON lines.

    python tests/p2p/nixl_holder_process.py NAME SLOTS SLOT_BYTES STRIDE
    -> {"metadata": hex, "geometry": {...}, "pid": n}           once the endpoint is up
    <- {"cmd": "fill", "slot": i, "seed": s}   -> {"ok": true}   slot i := pattern(s, slot_bytes)
    <- {"cmd": "exit"}                          -> {"ok": true}   closes the endpoint, exits 0

NIXL and UCX may print to stdout (nixl's logger, UCX_PROTO_INFO): the protocol gets its own copy of
fd 1 and everything else written to fd 1 goes to stderr, so a log line never breaks a reply.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def pattern(seed: int, nbytes: int) -> torch.Tensor:
    """The bytes a slot filled with `seed` holds (the tests compute the same)."""
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    from kvtier.p2p.nixl_transport import NixlEndpoint

    name, slots, slot_bytes, stride = sys.argv[1], *map(int, sys.argv[2:5])
    arena = torch.zeros(slots * stride, dtype=torch.uint8)
    for i in range(slots):
        arena[i * stride:i * stride + slot_bytes] = pattern(i, slot_bytes)
    endpoint = NixlEndpoint(name, arena, stride, slot_bytes, slots)

    def reply(**fields) -> None:
        replies.write(json.dumps(fields) + "\n")

    reply(metadata=endpoint.metadata().hex(), geometry=endpoint.geometry(), pid=os.getpid())
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "fill":
            i = command["slot"]
            arena[i * stride:i * stride + slot_bytes] = pattern(command["seed"], slot_bytes)
            reply(ok=True)
        elif command["cmd"] == "exit":
            endpoint.close()
            reply(ok=True)
            return
        else:
            reply(ok=False, error=f"unknown command {command['cmd']!r}")
    endpoint.close()  # stdin closed: the test went away


if __name__ == "__main__":
    main()
