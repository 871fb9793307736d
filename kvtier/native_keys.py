"""The chunk keys' C backend: `kvtier._native_keys` (csrc/native_keys.cpp, built by `pip install -e .`)
where it is built and agrees with Python, else nothing: kvtier.keys then computes every key in Python.
Either way the keys are the same bytes; kvtier.keys defines them, and its functions call these first.

    u32(tokens)           the u32 bytes of a list, tuple, numpy array or CPU tensor of token ids, or
                          None where the Python path must decide (a bad id, a bool, a strided or
                          big-endian array, any other type): errors are raised by kvtier.keys alone.
    digests(...)          kvtier.keys.chained_digests, or None for ends it does not take.
    chunk_keys(...)       a prompt's keys from a chunk boundary on, built as `key_type` objects in C.
    packed_keys(...)      a prompt's keys as one bytes (24 per key), converted and hashed in one pass
                          (kvtier.packed_keys, the lookup's keys); keys_of(...) makes objects of some.
    key_table()           a KeyTable: a set of 24-byte keys whose `prefix` / `present` probe a
                          prompt's keys with their cache misses overlapped (the CPU tier's mirror),
                          or a NoKeyTable whose probes answer None (then the caller's dict answers).

XXH3 is xxhash's own: at import, the extension is handed the path of the `xxhash` package's shared
object, which exports the xxhash C API, and takes XXH3-128 from it (no copy of xxhash's code here).
A self-test then compares a few vectors with `xxhash.xxh3_128_digest`; a missing extension, a load
error or any mismatch is logged once at INFO, `AVAILABLE` is False and `WHY_NOT` says why.

Where it runs: the lookup hot path (scheduler side) and anywhere keys are made, on any thread.
Thread-safe: no state after import. The extension holds the GIL while converting token ids and
releases it while hashing 64 KiB or more. A KeyTable is its owner's state: each call holds the GIL
(atomic), and the owner's lock orders calls that must go together (the CPU tier: the storage lock).
"""

from __future__ import annotations

import logging
import sys
from typing import Protocol

import numpy as np
import xxhash

from kvtier.dtypes import is_tensor

logger = logging.getLogger(__name__)

try:
    from kvtier import _native_keys as _ext
except ImportError as exc:
    _ext = None
    _import_error = f"the C++ extension is not built ({exc}); reinstall with a C++ compiler on PATH"


class _ProbeKey(bytes):
    """The self-test's key type: laid out as kvtier.keys.ChunkKey (a bytes subclass, no slots)."""

    __slots__ = ()


def _python_chain(raw: bytes, seed: bytes, ends: list[int]) -> list[bytes]:
    prev, start, out = seed, 0, []
    for end in ends:
        prev = xxhash.xxh3_128_digest(prev + raw[start * 4:end * 4])
        out.append(prev)
        start = end
    return out


def self_test(ext) -> str:
    """Why `ext` disagrees with Python on a few vectors ("" if it does not): digests of an empty
    chunk, of 1 KiB after a 16-byte parent, of odd lengths after an 8-byte seed; the u32 forms; and
    keys that are of the type asked for, equal to and hashing like the Python path's bytes."""
    ns = bytes(range(8))
    ids = np.arange(1000, 1000 + 700, dtype=np.int64) * 6007
    ids[::97] = 2**32 - 1  # past a small int's one digit
    raw = ids.astype("<u4").tobytes()
    for seed, ends in ((ns, []), (b"", [0]), (ns, [256, 512]), (bytes(16), [1, 257, 300]), (b"", [699, 700])):
        if ext.digests(raw, seed, ends, 0) != _python_chain(raw, seed, ends):
            return f"XXH3-128 digests differ from xxhash's (seed {len(seed)} bytes, ends {ends})"
    if ext.u32(ids) != raw or ext.u32(ids.tolist()) != raw or ext.u32(ids.astype(np.uint32)) != raw:
        return "token ids converted to u32 differ from numpy's"
    if ext.u32([1, -1]) is not None or ext.u32([True]) is not None or ext.u32(ids[::2]) is not None:
        return "u32 took an input that the Python path must judge"
    keys = ext.chunk_keys(raw, 256, ns, ns, 256, True, _ProbeKey)
    want = [ns + d for d in _python_chain(raw[1024:], ns, [256, 444])]
    hashes_agree = list(map(hash, keys)) == list(map(hash, want))
    if [type(k) for k in keys] != [_ProbeKey] * 2 or keys != want or not hashes_agree:
        return "chunk keys differ from bytes built in Python"
    names = ("KeyTable", "packed_keys", "checksum_copy", "read_record")
    missing = [name for name in names if not hasattr(ext, name)]
    if missing:
        return f"the extension has no {', '.join(missing)} (built from an older source); reinstall"
    every = ext.chunk_keys(raw, 0, ns, ns, 256, True, _ProbeKey)
    packed = ext.packed_keys(ids, ns, 256, True)
    if packed != b"".join(every) or ext.packed_keys(ids.tolist(), ns, 256, False) != packed[:48]:
        return "packed keys differ from the chunk keys"
    if ext.keys_of(packed, 1, 3, _ProbeKey) != every[1:] or ext.packed_keys([-1], ns, 256, True) is not None:
        return "keys made of packed keys differ, or packed_keys took a bad id"
    return _table_test(ext, keys)


def _table_test(ext, keys: list[bytes]) -> str:
    table, other = ext.KeyTable(), bytes(24)
    added = [table.add(k) for k in keys + keys[:1]]
    if added != [True, True, False] or table.prefix(keys + [other]) != 2 or table.prefix([other]) != 0:
        return "the key table's prefix disagrees with a set"
    if table.prefix_packed(b"".join(keys) + other) != 2 or table.prefix_packed(other + keys[0]) != 0:
        return "the key table's prefix of packed keys disagrees with a set"
    if table.present([other, *keys]) != [False, True, True] or not table.discard(keys[0]) or len(table) != 1:
        return "the key table's present or discard disagrees with a set"
    return ""


def _load() -> str:
    """Why the extension is not used ("" when it is)."""
    if _ext is None:
        return _import_error
    if sys.byteorder != "little":
        return "the extension writes host-order u32 and this machine is big-endian"
    try:
        _ext.load(xxhash._xxhash.__file__)
    except (OSError, AttributeError) as exc:  # no shared object, no exported XXH3_128bits
        return f"cannot take XXH3-128 from the xxhash package: {exc}"
    return self_test(_ext)


WHY_NOT = _load()
AVAILABLE = not WHY_NOT
if WHY_NOT:
    logger.info("chunk keys computed in Python (the same keys, slower): %s", WHY_NOT)


class KeyProbe(Protocol):
    """What key_table() returns: the C KeyTable, or a NoKeyTable. `prefix` / `present` answer None
    where the table cannot (a key it could not hold was added, or a key asked about is not 24 bytes)."""

    def add(self, key: bytes) -> bool: ...
    def discard(self, key: bytes) -> bool: ...
    def prefix(self, keys: list) -> int | None: ...
    def prefix_packed(self, packed: bytes) -> int | None: ...
    def present(self, keys: list) -> list[bool] | None: ...
    def clear(self) -> None: ...


class NoKeyTable:
    """key_table() without the extension: holds nothing, and every probe answers None."""

    def add(self, key: bytes) -> bool:
        return False

    def discard(self, key: bytes) -> bool:
        return False

    def prefix(self, keys: list) -> None:
        return None

    def prefix_packed(self, packed: bytes) -> None:
        return None

    def present(self, keys: list) -> None:
        return None

    def clear(self) -> None:
        pass


def key_table() -> KeyProbe:
    """A new KeyTable (see the C source), or a NoKeyTable where the extension is not used: the same
    methods (add, discard, prefix, prefix_packed, present, clear), whose probes then answer None."""
    return _ext.KeyTable() if AVAILABLE else NoKeyTable()


def _id_source(tokens: object) -> object | None:
    """`tokens` as the extension reads them (a list, tuple or numpy array as they are, a CPU tensor's
    own memory), or None for anything else: then kvtier.keys decides."""
    kind = type(tokens)
    if kind is list or kind is tuple or kind is np.ndarray:
        return tokens
    return _tensor_ids(tokens) if is_tensor(tokens) else None


# torch's signed integer dtypes -> (struct code, bytes) of an id; filled at the first tensor (torch
# is not imported by this module).
_TENSOR_FORMATS: dict = {}


def _tensor_formats(torch) -> dict:
    names = {"int64": "q", "int32": "i", "int16": "h", "int8": "b"}  # (signed: see _tensor_ids)
    _TENSOR_FORMATS.update({getattr(torch, name): (code, np.dtype(code).itemsize)
                            for name, code in names.items()})
    return _TENSOR_FORMATS


def _tensor_ids(tokens) -> object | None:
    """A 1-D contiguous CPU integer tensor's ids as a read-only view of its memory, read while the
    caller holds it. Not `tokens.numpy()` (the fallback, for any other tensor): that detaches and
    wraps the tensor, 0.6 us when warm but ~50 us in a lookup's cold state (measured in the
    lookup benchmark), more than converting and hashing 32K ids; so does `is_neg()` (~30 us).
    Signed dtypes only, and no `is_neg()`: a negated view (torch._neg_view; torch negates no
    unsigned tensor) holds its ids negated in memory, so valid ids (>= 0) read as 0 (the same) or
    as negative ids, which the extension refuses (kvtier.keys then resolves the view). One
    difference is left: a negated view of negative (invalid) ids is keyed where kvtier.keys raises."""
    torch = sys.modules["torch"]  # (loaded: `tokens` is one)
    fmt = (_TENSOR_FORMATS or _tensor_formats(torch)).get(tokens.dtype)
    if (fmt and type(tokens) is torch.Tensor and tokens.is_cpu and tokens.layout is torch.strided
            and len(shape := tokens.shape) == 1 and (shape[0] < 2 or tokens.stride(0) == 1)):
        if not shape[0]:
            return ()
        if address := tokens.data_ptr():  # (0: storage resized away under it; numpy's path judges)
            return _ext.bytes_at(address, shape[0] * fmt[1]).cast(fmt[0])
    try:
        return tokens.numpy()  # a CPU tensor's own memory; integer tensors never require grad
    except (TypeError, RuntimeError):  # on a GPU, bf16, a conjugate view ...: Python's path
        return None


def u32(tokens: object) -> bytes | None:
    """Little-endian u32 bytes of `tokens`, or None where kvtier.keys.tokens_to_u32 must decide."""
    ids = _id_source(tokens)
    return None if ids is None else _ext.u32(ids)


def packed_keys(tokens: object, ns: bytes, chunk_size: int, partial: bool) -> bytes | None:
    """The bytes of `chunk_keys(u32(tokens), 0, ns, ns, chunk_size, partial, ...)` joined, made in one
    pass over the ids without a key object each; None where kvtier.keys must decide."""
    ids = _id_source(tokens)
    return None if ids is None else _ext.packed_keys(ids, ns, chunk_size, partial)


def keys_of(packed: bytes, start: int, stop: int, key_type: type) -> list:
    """`key_type` objects of the packed keys `start:stop` (0 <= start <= stop <= len(packed) // 24)."""
    return _ext.keys_of(packed, start, stop, key_type)


def digests(raw: bytes | memoryview, seed: bytes, ends: list[int], start: int) -> list[bytes] | None:
    """kvtier.keys.chained_digests(raw, seed, ends, start), or None for ends it does not take (a
    range, out of order, past `raw`): then the Python loop answers."""
    return _ext.digests(raw, seed, ends, start)


def chunk_keys(raw: bytes, start: int, seed: bytes, ns: bytes, chunk_size: int, partial: bool,
               key_type: type) -> list:
    """The keys of the chunks of the prompt `raw` (u32 bytes) from token `start` (a chunk boundary)
    on, chained from `seed` (the namespace digest at 0, else the digest of the chunk before):
    `key_type(ns + digest)` for each full chunk, and the partial tail when `partial`."""
    return _ext.chunk_keys(raw, start, seed, ns, chunk_size, partial, key_type)


def checksum_copy(fields, src, dst, offset: int, piece: int, n_outer: int, s_outer: int, n_inner: int,
                  s_inner: int) -> int:
    """XXH3-64 of `fields || src`, with `src` copied into pieces of `dst` in one pass: see
    kvtier.checksum_copy, its only caller, and csrc/checksum_copy.cpp."""
    return _ext.checksum_copy(fields, src, dst, offset, piece, n_outer, s_outer, n_inner, s_inner)


def xxh3_chain(acc, sums, key) -> None:
    """XXH3-64's block scrambles over block sums computed elsewhere: kvtier.device_checksum, its only
    caller, and csrc/checksum_copy.cpp."""
    _ext.xxh3_chain(acc, sums, key)


def read_record(dir_fd: int, shard: bytes, name: bytes, dir_flags: int, file_flags: int, head,
                payload) -> int:
    """Open `shard/name` below `dir_fd` (with these flags), preadv it into `head` then `payload` from
    offset 0, close it: the bytes read, with the GIL released once (csrc/record_read.cpp). OSError
    as os.open / os.preadv raise it. kvtier.record_files' reads of padded buffers call it."""
    return _ext.read_record(dir_fd, shard, name, dir_flags, file_flags, head, payload)
