"""Disaggregated prefill, on the prefill instance: the KV of requests that asked for a remote decode
(`kv_transfer_params: {"do_remote_decode": true}`, as vLLM's), held for the decode instance to read.

When such a request finishes, the scheduler connector hands its prompt (saved whole, the partial
last chunk too where `save_partial_chunks` is on) to `Handoffs.hold`: its chunks are leased (no tier
evicts them; a lease may be taken before a chunk is stored) under a new transfer id, and the
parameters the decode instance needs come back to travel with the request's reply, as vLLM's
`request_finished -> kv_transfer_params` do:

    {"do_remote_prefill": true, "remote_p2p_url": "kvtier://host:port", "namespace": "<hex>",
     "num_tokens": N, "transfer_id": "<hex>", "expires_in_s": TTL}

The decode instance reads the chunks over P2P (kvtier.p2p: NIXL, or TCP). The lease ends at
`release(transfer_id)` (the router calls it once the decode has its KV) or after TTL_S, whichever is
first; `sweep` runs on every hold and release and once per step, and `close` ends every lease. At
most MAX_HELD transfers are held: a new one past that ends the oldest. Thread-safe: release comes
from the HTTP server's thread, the rest from the engine's.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtier.engine import CacheEngine
    from kvtier.keys import ChunkKey

logger = logging.getLogger(__name__)

TTL_S = 60.0  # how long a prefill holds a request's KV for its decode instance at most
MAX_HELD = 4096


def wants_remote_decode(request: object) -> bool:
    """The request asked to be prefilled here and decoded elsewhere."""
    params = getattr(request, "kv_transfer_params", None)
    return isinstance(params, dict) and params.get("do_remote_decode") is True


class Handoffs:
    def __init__(self, engine: CacheEngine, ttl_s: float = TTL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.engine, self.ttl_s, self._clock = engine, ttl_s, clock
        self._lock = threading.Lock()
        self._held: OrderedDict[str, tuple[float, list[ChunkKey]]] = OrderedDict()  # id -> (expiry, lease)

    def hold(self, token_ids: Sequence[int], num_tokens: int) -> dict | None:
        """Lease the chunks of the first `num_tokens` of `token_ids` for a decode instance; the
        parameters it needs, or None where this engine has no P2P endpoint to serve them from."""
        url = self.engine.p2p_url
        if url is None:
            logger.warning("a request asked for a remote decode, but this kvtier has no p2p: section to "
                           "serve its KV from; it is answered as a colocated one")
            return None
        transfer_id = secrets.token_hex(16)
        # The prompt's own keys: a partial last chunk's key depends on every token in it, so the
        # tokens generated after the prompt must not be in the list.
        keys = self.engine.lease(list(token_ids[:num_tokens]), num_tokens)
        with self._lock:
            self._held[transfer_id] = (self._clock() + self.ttl_s, keys)
        self.sweep()
        return {"do_remote_prefill": True, "remote_p2p_url": url,
                "namespace": self.engine.db.namespace_digest.hex(), "num_tokens": num_tokens,
                "transfer_id": transfer_id, "expires_in_s": self.ttl_s}

    def release(self, transfer_id: str) -> bool:
        """End the lease of `transfer_id`; False if it is unknown (released, expired, never held)."""
        with self._lock:
            held = self._held.pop(transfer_id, None)
        if held is not None:
            self.engine.release(held[1])
        self.sweep()
        return held is not None

    def sweep(self) -> int:
        """End the leases past their time, and the oldest beyond MAX_HELD; how many ended."""
        now, ended = self._clock(), []
        with self._lock:
            while self._held and (len(self._held) > MAX_HELD or next(iter(self._held.values()))[0] <= now):
                ended.append(self._held.popitem(last=False)[1][1])
        for keys in ended:
            self.engine.release(keys)
        return len(ended)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    def close(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), OrderedDict()
        for _, keys in held:
            self.engine.release(keys)
