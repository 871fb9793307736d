"""Token database: chunking tokens and naming each chunk with a stable 128-bit key.

    prefix_hash[-1] = namespace digest
    prefix_hash[i]  = xxh3_128(prefix_hash[i-1] || little-endian u32 bytes of chunk i)

Chaining makes a key name the whole prefix up to and including its chunk, so two prompts share a key
only if they share every token before it. Seeding the chain with the namespace digest (model id, KV
geometry, dtype, TP rank and size, salt) keeps models, dtypes and TP layouts apart. Nothing here uses
Python's `hash()`, so keys are identical across processes, `PYTHONHASHSEED`s and machines.

Pure functions, and a class whose only state is a memo of recent prompts' keys (kvtier.key_memo);
side-effect free; safe from any thread. Where the C extension is built (kvtier.native_keys), the
token conversion, the hashing and the key objects of a prompt are made in C, the same bytes: this
module defines every key and error, and computes them itself where the extension is not there.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from kvtier import native_keys
from kvtier.dtypes import is_tensor
from kvtier.key_memo import KeyMemo

if TYPE_CHECKING:
    import torch

    from kvtier.layout import KVLayout

NAMESPACE_BYTES = 8
DIGEST_BYTES = 16
KEY_BYTES = NAMESPACE_BYTES + DIGEST_BYTES
_U32_MAX = 2**32 - 1
# A Python list becomes u32 through `array`: 4x faster than numpy's per-element conversion, and
# it raises on a negative, too large or non-integer id by itself. Only where its 'I' is 4 bytes.
_ARRAY_U32 = "I" if array("I").itemsize == 4 else None
# Prompts whose keys a TokenDatabase remembers (kvtier.key_memo): more than the requests a scheduler
# re-asks about every step (an LRU smaller than that cycle would miss every time), and at most
# MEMO_BYTES of their tokens (4 bytes each: 16M tokens).
MEMO_PROMPTS = 64
MEMO_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that makes two caches' KV incompatible for the same tokens."""

    model_id: str
    layout: str  # KVLayout.describe(): geometry and dtype
    tp_rank: int = 0
    tp_size: int = 1
    salt: str = ""  # e.g. a LoRA adapter id, or a tenant

    @classmethod
    def for_layout(cls, model_id: str, layout: KVLayout, tp_rank: int = 0, tp_size: int = 1,
                   salt: str = "") -> Namespace:
        return cls(model_id, layout.describe(), tp_rank, tp_size, salt)

    def digest(self) -> bytes:
        # Unit separators keep "ab"+"c" apart from "a"+"bc".
        text = "\x1f".join(
            [self.model_id, self.layout, str(self.tp_rank), str(self.tp_size), self.salt])
        return xxhash.xxh3_64_digest(text.encode())


_new_key = bytes.__new__


class ChunkKey(bytes):
    """Names one chunk: namespace digest (8 bytes) + prefix-chained chunk hash (16 bytes).

    A `bytes` subclass, immutable, on purpose: keys are hashed on every index probe, and bytes hash
    and compare in C (the hash is cached on the object), four times faster than a dataclass whose
    `__hash__` runs in Python. `hex()` is the 48-character text form used in file names.
    """

    __slots__ = ()

    def __new__(cls, namespace: bytes, digest: bytes) -> ChunkKey:
        if len(namespace) != NAMESPACE_BYTES or len(digest) != DIGEST_BYTES:
            raise ValueError(f"a chunk key is {NAMESPACE_BYTES} + {DIGEST_BYTES} bytes, "
                             f"got {len(namespace)} + {len(digest)}")
        return super().__new__(cls, namespace + digest)

    @property
    def namespace(self) -> bytes:
        return bytes(self[:NAMESPACE_BYTES])

    @property
    def digest(self) -> bytes:
        return bytes(self[NAMESPACE_BYTES:])

    def __getnewargs__(self) -> tuple[bytes, bytes]:  # copy and pickle call __new__ with these
        return self.namespace, self.digest

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, raw: bytes) -> ChunkKey:
        if len(raw) != KEY_BYTES:
            raise ValueError(f"a chunk key is {KEY_BYTES} bytes, got {len(raw)}")
        return cls(bytes(raw[:NAMESPACE_BYTES]), bytes(raw[NAMESPACE_BYTES:]))

    @classmethod
    def from_hex(cls, text: str) -> ChunkKey:
        return cls.from_bytes(bytes.fromhex(text))

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"ChunkKey({self.hex()})"


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Chunk `index` covers tokens `[start, end)` of the prompt."""

    key: ChunkKey
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def tokens_to_u32(tokens: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    """Token ids as a little-endian u32 array (the bytes that are hashed; read-only for a list or
    tuple, else possibly a view of `tokens`). Raises ValueError on bad ids, bools included."""
    if type(tokens) in (list, tuple) and native_keys.AVAILABLE:
        raw = native_keys.u32(tokens)  # 2-3x faster than array('I') below; None: bad ids, bools ...
        if raw is not None:
            return np.frombuffer(raw, dtype="<u4")
    if isinstance(tokens, list) and _ARRAY_U32:
        return _list_to_u32(tokens)
    if is_tensor(tokens):
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or str(tokens.dtype) == "torch.bool":
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        arr = tokens.detach().cpu().resolve_neg().numpy()  # zero-copy for a CPU tensor (not negated)
    else:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError("tokens must be a 1-D sequence of integer token ids")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _U32_MAX):
        raise ValueError("token ids must lie in [0, 2**32)")
    # Contiguous as well: a strided u32 view (tokens[::2]) would not be copied by astype, and the
    # hasher reads the raw bytes.
    return np.ascontiguousarray(arr, dtype="<u4")


def _list_to_u32(tokens: list) -> np.ndarray:
    try:
        packed = array(_ARRAY_U32, tokens)
    except (OverflowError, TypeError) as exc:  # negative, >= 2**32, a float, a nested list, a str
        raise ValueError(f"tokens must be a 1-D sequence of integer token ids in [0, 2**32): {exc}") from None
    # `array` takes a bool as 0 or 1. A list of bools is refused as numpy's bool arrays are (a mix of
    # ints and bools is ints, as np.asarray makes it); only a list opening with a bool is walked.
    if type(tokens[0] if tokens else None) is bool and all(type(t) is bool for t in tokens):
        raise ValueError("tokens must be a 1-D sequence of integer token ids, not bools")
    if sys.byteorder == "big":
        packed.byteswap()
    return np.frombuffer(packed, dtype="<u4") if packed else np.empty(0, dtype="<u4")


class TokenDatabase:
    """Splits token sequences into fixed-size chunks and keys them. Its only state after
    construction is a memo of recent prompts' keys (kvtier.key_memo: thread-safe, never stale)."""

    def __init__(self, namespace: Namespace, chunk_size: int = 256, save_partial: bool = False):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.namespace = namespace
        self.chunk_size = chunk_size
        self.save_partial = save_partial
        self._ns_digest = namespace.digest()
        self._memo = KeyMemo(chunk_size, MEMO_PROMPTS, MEMO_BYTES)

    @property
    def namespace_digest(self) -> bytes:
        return self._ns_digest

    def keys(self, tokens: Sequence[int] | torch.Tensor | np.ndarray) -> list[ChunkKey]:
        """The keys of every chunk of `tokens`: full chunks, plus the partial tail if configured.
        The lookup hot path: no span objects."""
        raw = u32_bytes(tokens)
        n, size = len(raw) // 4, self.chunk_size
        count = n // size + (self.save_partial and n % size > 0)
        keys, covered, name = self._memo.reusable(raw, count)
        if (k := len(keys)) < count:
            seed = keys[-1].digest if k else self._ns_digest
            keys += chunk_keys(raw, k * size, seed, self._ns_digest, size, self.save_partial)
        if covered:  # remembered already (saves a second comparison: 128 KiB for 32K tokens)
            return keys  # (a new list: reusable's slice)
        self._memo.remember(name, raw, keys)
        return list(keys)  # the caller's to change, not the memo's

    def chunk_end(self, index: int, num_tokens: int) -> int:
        """Where chunk `index` of a `num_tokens` prompt ends (only the last one can be partial)."""
        return min((index + 1) * self.chunk_size, num_tokens)

    def spans(self, tokens: Sequence[int] | torch.Tensor | np.ndarray,
              limit: int | None = None) -> list[ChunkSpan]:
        """The chunk spans of `tokens[:limit]`: full chunks, plus the partial tail if configured."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if limit is not None:
            tokens = tokens[:limit]
        n = token_count(tokens)
        return [ChunkSpan(key, i * self.chunk_size, self.chunk_end(i, n))
                for i, key in enumerate(self.keys(tokens))]


def u32_bytes(tokens: Sequence[int] | torch.Tensor | np.ndarray) -> bytes:
    """`tokens_to_u32(tokens).tobytes()`, in one native pass where the extension takes the input."""
    if native_keys.AVAILABLE and (raw := native_keys.u32(tokens)) is not None:
        return raw
    return tokens_to_u32(tokens).tobytes()


def chunk_keys(raw: bytes, start: int, seed: bytes, ns: bytes, chunk_size: int,
               partial: bool) -> list[ChunkKey]:
    """The keys of the prompt `raw` (u32 bytes) from token `start` (a chunk boundary) on: its full
    chunks and, if `partial`, its partial tail; chained from `seed` (the digest of the chunk before
    `start`, or `ns` at 0). Built in C where the extension is, else here."""
    if native_keys.AVAILABLE:
        return native_keys.chunk_keys(raw, start, seed, ns, chunk_size, partial, ChunkKey)
    n = len(raw) // 4
    ends = list(range(start + chunk_size, n + 1, chunk_size))
    if partial and n % chunk_size and n > start:
        ends.append(n)
    # bytes.__new__ directly: the digests are 16 bytes by construction, and ChunkKey's checks in
    # Python cost as much as the hashing (25 us per 128 keys).
    return [_new_key(ChunkKey, ns + digest)
            for digest in chained_digests(memoryview(raw)[start * 4:], seed, ends, start)]


def chained_digests(raw: bytes | memoryview, seed: bytes, ends: Sequence[int], start: int = 0) -> list[bytes]:
    """Prefix-chained 128-bit digests: for each end (in tokens), xxh3_128(previous digest || the u32
    token bytes since the previous end), the first chained to `seed`. `raw` holds the little-endian
    u32 token ids from token `start` on. Shared by kvtier's chunk keys and the engine's block hashes.
    In C where the extension is and takes `ends` (a list or tuple, in order, within `raw`)."""
    if native_keys.AVAILABLE and (got := native_keys.digests(raw, seed, ends, start)) is not None:
        return got
    digests, prev, base, digest = [], seed, start, xxhash.xxh3_128_digest
    for end in ends:
        # One-shot digest of parent || tokens: 2.5x cheaper than a streaming hasher per chunk, and a
        # lookup of a 128K-token prompt hashes 512 chunks.
        prev = digest(prev + raw[(start - base) * 4:(end - base) * 4])
        digests.append(prev)
        start = end
    return digests


def token_count(tokens: Sequence[int] | torch.Tensor | np.ndarray) -> int:
    return int(tokens.shape[0]) if isinstance(tokens, np.ndarray) or is_tensor(tokens) else len(tokens)
