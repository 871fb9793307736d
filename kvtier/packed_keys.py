"""A prompt's chunk keys as one bytes: the lookup's keys, with no object per key.

A lookup only counts how many leading chunks some tier holds, yet for a new prompt most of its cost
was around the hashing: the prompt's u32 bytes written out and read back, a `ChunkKey` object per
chunk, the key memo's copy of the prompt and the prompt it evicts. Here the extension converts,
hashes and lays out the keys in one pass over the token ids (`native_keys.packed_keys`), the CPU
tier's KeyTable probes them where they lie (`KeyTable.prefix_packed`), and key objects are made
only for the keys sliced out (those asked of a tier below). The bytes are `TokenDatabase.keys`'s,
joined, bit for bit; a prompt seen again is hashed again (one pass, cheaper than the memo's
comparison), and nothing is remembered.

Where it runs: `CacheEngine.lookup`, on any thread; no state. Without the extension (or for ids
that kvtier.keys must judge) there are none: `packed_keys` answers None and the caller uses
`TokenDatabase.keys`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from kvtier import native_keys
from kvtier.keys import KEY_BYTES, ChunkKey


class PackedKeys(Sequence[ChunkKey]):
    """Chunk keys laid end to end in `packed` (24 bytes each); indexing and slicing make ChunkKeys."""

    __slots__ = ("packed",)

    def __init__(self, packed: bytes):
        if len(packed) % KEY_BYTES:
            raise ValueError(f"packed keys are {KEY_BYTES} bytes each, got {len(packed)} bytes")
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed) // KEY_BYTES

    @overload
    def __getitem__(self, index: int) -> ChunkKey: ...
    @overload
    def __getitem__(self, index: slice) -> list[ChunkKey]: ...

    def __getitem__(self, index: int | slice) -> ChunkKey | list[ChunkKey]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return native_keys.keys_of(self.packed, start, max(start, stop), ChunkKey)
            return [self[i] for i in range(start, stop, step)]
        i = index + len(self) if index < 0 else index
        if not 0 <= i < len(self):
            raise IndexError("packed key index out of range")
        return native_keys.keys_of(self.packed, i, i + 1, ChunkKey)[0]


def packed_keys(tokens: object, namespace_digest: bytes, chunk_size: int, partial: bool) -> PackedKeys | None:
    """`TokenDatabase.keys(tokens)` as PackedKeys, or None without the extension or for ids that
    kvtier.keys must judge (a bad id, a bool, a strided array, another type)."""
    if not native_keys.AVAILABLE:
        return None
    packed = native_keys.packed_keys(tokens, namespace_digest, chunk_size, partial)
    return None if packed is None else PackedKeys(packed)
