"""KV cache events: what kvtier's local tiers gain and lose, for vLLM's event publisher (the one a
KV-aware router subscribes to), beside vLLM's own events.

Where the changes come from: the storage's key listener (`storage_admin.add_key_listener`), beside a
fleet agent's if there is one: host memory ("cpu") and local disk tiers. Shared stores (Redis,
kvtier_server) and peers report nothing: they are not this instance's, and every instance would
claim them.

A stored chunk is named by its 16-byte prefix-chained digest (the same on every machine and rank),
with the chunk's before it and its tokens: what vLLM's `BlockStored` carries (the connector builds
those, `KvtierConnector.get_kv_connector_kv_cache_events`). The listener only hears keys, so the
recorder remembers the tokens of the chunks each step's saves and loads may put in a tier (`expect`),
a bounded number of the latest; a key stored without them (a record another process wrote, adopted by
the disk tier) is counted, not reported. A removal needs the digest only.

The listener runs under a tier's lock: O(1) work, and past `MAX_PENDING` changes not yet taken by a
step the oldest are dropped (counted). No vLLM import here: the recorder is tested without vLLM.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier import storage_admin
from kvtier.connector import ConnectorMetadata
from kvtier.engine import CacheEngine
from kvtier.keys import ChunkKey

# Chunks whose tokens the worker side remembers for the listener (1M tokens of 256-token chunks): ~2 KB
# a chunk where the prompt is a list of ints (the slices share its int objects), ~9 KB from a tensor.
MAX_EXPECTED = 4096
MAX_PENDING = 16384  # events heard and not yet taken by a step


@dataclass(frozen=True, slots=True)
class TierChange:
    """A chunk a local tier gained ("stored", with its parent and tokens) or lost ("evicted")."""

    op: str
    tier: str
    digest: bytes
    parent: bytes | None = None
    tokens: list[int] | None = None


class EventRecorder:
    """Worker side: hears the storage's key changes, for vLLM's events, taken each step."""

    def __init__(self, engine: CacheEngine, max_expected: int = MAX_EXPECTED, max_pending: int = MAX_PENDING):
        self.engine, self.chunk_size = engine, engine.db.chunk_size
        self._max_expected = max_expected
        self._expected: OrderedDict[bytes, tuple[bytes | None, list[int]]] = OrderedDict()
        self._pending: deque[TierChange] = deque(maxlen=max_pending)
        self._lock = threading.Lock()
        self.dropped = 0  # events pushed out of `_pending` before a step took them
        self.unknown = 0  # keys stored whose tokens were not expected (not reported)
        storage_admin.add_key_listener(engine.storage, self._heard)

    def expect(self, meta: ConnectorMetadata) -> None:
        """Remember the tokens of the chunks this step's saves and loads may put in a tier."""
        for spec in (*meta.saves, *meta.loads):
            self._expect_range(spec.token_ids, spec.start, spec.end)

    def _expect_range(self, token_ids: Sequence[int], start: int, end: int) -> None:
        size = self.chunk_size
        keys = self.engine.db.keys(token_ids[:end])
        first = start // size
        with self._lock:
            for i in range(first, len(keys)):
                digest = keys[i].digest
                parent = keys[i - 1].digest if i else None
                self._expected[digest] = (parent, list(map(int, token_ids[i * size:(i + 1) * size])))
                self._expected.move_to_end(digest)
            while len(self._expected) > self._max_expected:
                self._expected.popitem(last=False)

    def _heard(self, op: str, tier: str, key: ChunkKey) -> None:
        digest = key.digest
        with self._lock:
            if op == "evicted":
                change = TierChange(op, tier, digest)
            elif (known := self._expected.get(digest)) is not None:
                change = TierChange(op, tier, digest, *known)
            else:
                self.unknown += 1
                return
            if len(self._pending) == self._pending.maxlen:
                self.dropped += 1
            self._pending.append(change)

    def take(self) -> list[TierChange]:
        """The changes heard since the last call, oldest first."""
        with self._lock:
            changes = list(self._pending)
            self._pending.clear()
        return changes

    def close(self) -> None:
        storage_admin.remove_key_listener(self.engine.storage, self._heard)
