"""The chunk keys of the last few prompts, so that a prompt seen again hashes only what is new.

A load follows the lookup of its prompt, its store follows the load, and a next turn of a chat is
the last turn's prompt plus a few hundred tokens: without a memo, each of these hashes the whole
prompt again (512 chunks for 128K tokens) and makes a key object per chunk. (The lookup itself
does not use it where the extension is built: it only counts, and packed keys made in one pass
cost less than the memo's comparison; kvtier.packed_keys.) An entry is found by its name, a 64-bit XXH3 of the
prompt's first chunk (its u32 bytes) computed once per call (`reusable` hands it to `remember`),
and reused only up to the first token where the two prompts differ, which is found by comparing
every token (`bytes.startswith`, a memcmp; numpy where they differ): a prompt changed anywhere, in
its middle with the same length included, gets fresh keys from that chunk on, never a stale one;
two first chunks whose names collide share nothing either. The keys are the same as without the
memo, bit for bit (it only skips recomputing them).

Where it runs: inside `TokenDatabase.keys`, on any thread. Thread-safe: one lock around the map,
taken twice per call (find, remember), never per chunk. Memory: at most `slots` prompts, whose u32
bytes (4 bytes a token) add up to at most `max_bytes`, and their keys (~1/16 of that again).

The keys stay objects on purpose. Freeing an evicted prompt's keys (cold by then) is most of what
the memo adds to a never-seen prompt's lookup, but a packed form (one bytes of digests) would make
every hit build its keys in Python (28 us for 128, more than hashing them again in C), and freeing
later instead only moves that cost to another lookup. What is done: a miss evicts before its keys
are made, so the new keys reuse the memory just freed while it is in the cache (measured, issue 15).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import xxhash

if TYPE_CHECKING:
    from kvtier.keys import ChunkKey


def common_tokens(raw: bytes, old: bytes) -> int:
    """How many leading u32 tokens the two little-endian token byte strings share."""
    m = min(len(raw), len(old))
    if (raw.startswith(old) if len(old) <= len(raw) else old.startswith(raw)):
        return m // 4
    a, b = np.frombuffer(raw, "<u4", m // 4), np.frombuffer(old, "<u4", m // 4)
    return int(np.argmax(a != b))  # the first token that differs (there is one)


class KeyMemo:
    def __init__(self, chunk_size: int, slots: int, max_bytes: int = 64 << 20):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.chunk_size = chunk_size
        self.slots = slots
        self.max_bytes = max_bytes  # of remembered token bytes: a huge prompt is hashed, not kept
        self._bytes = 0
        self._head = 4 * chunk_size  # bytes of the first chunk, whose XXH3 names the entry
        self._entries: OrderedDict[int, tuple[bytes, list[ChunkKey]]] = OrderedDict()
        self._lock = threading.Lock()

    def reusable(self, raw: bytes, count: int) -> tuple[list[ChunkKey], bool, int | None]:
        """(the leading keys of the prompt `raw` (u32 bytes, `count` chunks, only the last one
        possibly partial) known already, whether `raw` is the remembered prompt or a prefix of it,
        the name to `remember` it by: None for a prompt shorter than a chunk, never remembered).
        The keys are those of the chunks that end within the tokens a remembered prompt shares with
        it, at the same ends. When `raw` is covered so, `remember` would keep the entry as it is."""
        if len(raw) < self._head:
            return [], False, None
        # Of a view: no copy of the chunk; an int hashes and compares at once in the map.
        name = xxhash.xxh3_64_intdigest(memoryview(raw)[:self._head])
        victim = None
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                self._entries.move_to_end(name)
            elif len(self._entries) >= self.slots and len(raw) <= self.max_bytes:
                # `remember` will add an entry: let the oldest go now, before this prompt's keys are
                # made, so that they take the memory its keys free while it is still in the cache.
                victim = self._entries.popitem(last=False)[1]
                self._bytes -= len(victim[0])
        if entry is None:
            del victim  # (outside the lock: 128 key objects for a 32K-token prompt)
            return [], False, name
        old_raw, old_keys = entry
        common = common_tokens(raw, old_raw)  # (under a chunk where names collide: nothing reused)
        n, old_n, size = len(raw) // 4, len(old_raw) // 4, self.chunk_size
        # Full chunks end at the same tokens in both; a partial tail only where both prompts end
        # at the same token (then it is the same tail).
        k = min(common // size, count, len(old_keys), old_n // size)
        if k < count and k < len(old_keys) and min((k + 1) * size, n) == old_n == common:
            k += 1
        return old_keys[:k], common == n, name

    def remember(self, name: int | None, raw: bytes, keys: list[ChunkKey]) -> None:
        """Keep `keys`, those of `raw`, under `name`: what `reusable(raw, ...)` answered."""
        if name is None or len(raw) > self.max_bytes:  # no full chunk, or too large to keep
            return
        with self._lock:
            entry = self._entries.get(name)
            # A prefix of the remembered prompt (a retrieve up to its hit, after a lookup of the whole
            # prompt) keeps the longer entry: replacing it would hash the rest again at the next lookup.
            if entry is None or not entry[0].startswith(raw):
                self._bytes += len(raw) - (len(entry[0]) if entry else 0)
                self._entries[name] = (raw, keys)
            self._entries.move_to_end(name)
            while len(self._entries) > self.slots or self._bytes > self.max_bytes:  # (never the newest)
                self._bytes -= len(self._entries.popitem(last=False)[1][0])
