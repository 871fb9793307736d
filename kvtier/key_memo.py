"""The chunk keys of the last few prompts, so that a prompt seen again hashes only what is new.

A scheduler asks for the same waiting request's hit every step, and a next turn of a chat is the
last turn's prompt plus a few hundred tokens: without a memo, every such lookup hashes the whole
prompt again (512 chunks for 128K tokens). An entry is found by the prompt's first chunk (its u32
bytes) and reused only up to the first token where the two prompts differ, which is found by
comparing every token (`bytes.startswith`, a memcmp; numpy where they differ): a prompt changed
anywhere, in its middle with the same length included, gets fresh keys from that chunk on, never a
stale one. The keys are the same as without the memo, bit for bit (it only skips recomputing them).

Where it runs: inside `TokenDatabase.keys`, on any thread. Thread-safe: one lock around the map,
taken twice per call (find, remember), never per chunk. Memory: at most `slots` prompts, whose u32
bytes (4 bytes a token) add up to at most `max_bytes`, and their keys (~1/16 of that again).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

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
        self._head = 4 * chunk_size  # bytes of the first chunk: the entry's name
        self._entries: OrderedDict[bytes, tuple[bytes, list[ChunkKey]]] = OrderedDict()
        self._lock = threading.Lock()

    def reusable(self, raw: bytes, count: int) -> tuple[list[ChunkKey], bool]:
        """(the leading keys of the prompt `raw` (u32 bytes, `count` chunks, only the last one
        possibly partial) known already, whether `raw` is the remembered prompt or a prefix of it).
        The keys are those of the chunks that end within the tokens a remembered prompt shares with
        it, at the same ends. When `raw` is covered so, `remember` would keep the entry as it is."""
        head = raw[:self._head]
        with self._lock:
            entry = self._entries.get(head)
            if entry is not None:
                self._entries.move_to_end(head)
        if entry is None:
            return [], False
        old_raw, old_keys = entry
        common = common_tokens(raw, old_raw)
        n, old_n, size = len(raw) // 4, len(old_raw) // 4, self.chunk_size
        # Full chunks end at the same tokens in both; a partial tail only where both prompts end
        # at the same token (then it is the same tail).
        k = min(common // size, count, len(old_keys), old_n // size)
        if k < count and k < len(old_keys) and min((k + 1) * size, n) == old_n == common:
            k += 1
        return old_keys[:k], common == n

    def remember(self, raw: bytes, keys: list[ChunkKey]) -> None:
        if not self._head <= len(raw) <= self.max_bytes:  # no full chunk, or too large to keep
            return
        head = raw[:self._head]
        with self._lock:
            entry = self._entries.get(head)
            # A prefix of the remembered prompt (a retrieve up to its hit, after a lookup of the whole
            # prompt) keeps the longer entry: replacing it would hash the rest again at the next lookup.
            if entry is None or not entry[0].startswith(raw):
                self._bytes += len(raw) - (len(entry[0]) if entry else 0)
                self._entries[head] = (raw, keys)
            self._entries.move_to_end(head)
            while len(self._entries) > self.slots or self._bytes > self.max_bytes:  # (never the newest)
                self._bytes -= len(self._entries.popitem(last=False)[1][0])
