"""A record's checksum (kvtier.record: XXH3-64 over its 60 header field bytes, then its payload)
computed where the payload is: for a record read straight into GPU memory (GPUDirect Storage,
kvtier.tiers.gds), whose bytes must be checked before they are served, without copying them back.

XXH3-64 of a long input runs 8 accumulators over 1 KiB blocks. Inside a block it only adds into
them (each 64-byte stripe adds its words, and the products of their 32-bit halves xor-ed with the
secret); between blocks it scrambles them. Additions commute, so the blocks' sums are computed at
once with torch on the payload's device (`block_sums`: integer ops that wrap modulo 2^64), and only
the 8 sums per block (1/16 of the bytes) go to the host, where the scrambles run in order
(`csrc/checksum_copy.cpp: xxh3_chain`, numpy without the extension). The first block (the header
fields and the payload's first 964 bytes) and the last partial one (and the final stripe) are
small: they are done on the host. The result equals `xxhash.xxh3_64` of the same bytes (tested
across lengths); payloads too short for the block loop are hashed on the host outright.
"""

from __future__ import annotations

import struct

import numpy as np
import torch
import xxhash

from kvtier import native_keys

BLOCK = 1024  # bytes per XXH3 block with the default 192-byte secret (16 stripes of 64)
SLICE_BLOCKS = 8192  # blocks summed per torch pass: bounds the int64 temporaries (~8 MiB of payload)
_M = (1 << 64) - 1
_P32 = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D)
_P64 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
_INIT = (_P32[2], _P64[0], _P64[1], _P64[2], _P64[3], _P32[1], _P64[4], _P32[0])
SECRET = bytes.fromhex(  # XXH3's default secret (xxhash.h: XXH3_kSecret)
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"
    "eac5ac8334d3ebc3c581a0fffa1363eb170ddd51b7f0da49d316552629d4689e"
    "2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e")
_SCRAMBLE_KEY = np.frombuffer(SECRET[128:192], dtype="<u8").copy()
_SWAP = [1, 0, 3, 2, 5, 4, 7, 6]  # a stripe's word i is added into accumulator i ^ 1
_keys: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _r64(buf: bytes, offset: int) -> int:
    return struct.unpack_from("<Q", buf, offset)[0]


def _stripe_keys(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The secret word each (stripe s, lane i) xors with (word s + i), as 32-bit halves [16, 8]."""
    if device not in _keys:
        words = np.frombuffer(SECRET, dtype="<u8").astype(np.uint64)
        table = np.stack([words[s:s + 8] for s in range(16)])
        lo = torch.from_numpy((table & 0xFFFFFFFF).astype(np.int64)).to(device)
        hi = torch.from_numpy((table >> np.uint64(32)).astype(np.int64)).to(device)
        _keys[device] = (lo, hi)
    return _keys[device]


def block_sums(blocks: torch.Tensor) -> torch.Tensor:
    """Per-block accumulator additions of whole 1 KiB blocks: int64 `[n, 8]` (mod 2^64) on
    `blocks`' device; `blocks` is int32 words, `n * 256` of them, in little-endian byte order."""
    key_lo, key_hi = _stripe_keys(blocks.device)
    out = []
    words = blocks.view(-1, 16, 8, 2)
    for start in range(0, words.shape[0], SLICE_BLOCKS):
        w = words[start:start + SLICE_BLOCKS].to(torch.int64) & 0xFFFFFFFF
        lo, hi = w[..., 0], w[..., 1]
        products = ((lo ^ key_lo) * (hi ^ key_hi)).sum(1)  # < 2^64 each, summed modulo 2^64
        data = lo.sum(1) + torch.bitwise_left_shift(hi.sum(1), 32)
        out.append(products + data[:, _SWAP])
    return torch.cat(out) if out else torch.empty((0, 8), dtype=torch.int64, device=blocks.device)


def _chain(acc: np.ndarray, sums: np.ndarray) -> None:
    if native_keys.AVAILABLE:
        native_keys.xxh3_chain(acc, sums, _SCRAMBLE_KEY)
        return
    with np.errstate(over="ignore"):  # numpy's uint64 wraps, as XXH3 means it to
        for row in sums:
            acc += row
            acc ^= acc >> np.uint64(47)
            acc ^= _SCRAMBLE_KEY
            acc *= np.uint64(_P32[0])


def _stripe(acc: list[int], data: bytes, offset: int, secret_offset: int) -> None:
    for i in range(8):
        value = _r64(data, offset + 8 * i)
        keyed = value ^ _r64(SECRET, secret_offset + 8 * i)
        acc[i ^ 1] = (acc[i ^ 1] + value) & _M
        acc[i] = (acc[i] + (keyed & 0xFFFFFFFF) * (keyed >> 32)) & _M


def _finish(acc: list[int], tail: bytes, last_block_len: int, length: int) -> int:
    """The last partial block's stripes, the final stripe, and the merge; `tail` ends the input and
    holds at least the last partial block (`last_block_len` bytes) and 64 bytes."""
    start = len(tail) - last_block_len
    for s in range((last_block_len - 1) // 64):
        _stripe(acc, tail, start + 64 * s, 8 * s)
    _stripe(acc, tail, len(tail) - 64, len(SECRET) - 64 - 7)
    result = length * _P64[0] & _M
    for i in range(4):
        product = (acc[2 * i] ^ _r64(SECRET, 11 + 16 * i)) * (acc[2 * i + 1] ^ _r64(SECRET, 19 + 16 * i))
        result = (result + ((product ^ (product >> 64)) & _M)) & _M
    result ^= result >> 37
    result = result * 0x165667919E3779F9 & _M
    return result ^ (result >> 32)


def xxh3_64(fields: bytes, payload: torch.Tensor) -> int:
    """XXH3-64 (seed 0) of `fields || payload`, `payload` a 1-D uint8 tensor on any device, its
    whole blocks summed there. `len(fields)` must be under 1 KiB (a record's are 60)."""
    head = len(fields)
    if head >= BLOCK or payload.dim() != 1 or payload.dtype != torch.uint8:
        raise ValueError("xxh3_64 takes fields under 1 KiB and a 1-D uint8 payload")
    length = head + payload.numel()
    if length < 2 * BLOCK + 64:  # too short for the block loop to pay: the host does it
        return xxhash.xxh3_64_intdigest(fields + payload.cpu().numpy().tobytes())
    blocks = (length - 1) // BLOCK
    first = fields + payload[:BLOCK - head].cpu().numpy().tobytes()
    body = payload[BLOCK - head: BLOCK - head + BLOCK * (blocks - 1)]
    if (body.storage_offset() * body.element_size()) % 4:
        body = body.clone()  # int32 words need 4-byte alignment
    first_sums = block_sums(torch.frombuffer(bytearray(first), dtype=torch.int32))
    sums = torch.cat([first_sums, block_sums(body.view(torch.int32)).cpu()])
    acc = np.array(_INIT, dtype=np.uint64)
    _chain(acc, np.ascontiguousarray(sums.numpy().view(np.uint64)))
    last_block_len = length - BLOCK * blocks  # 1..1024
    tail = payload[payload.numel() - max(last_block_len, 64):].cpu().numpy().tobytes()
    return _finish([int(a) for a in acc], tail, last_block_len, length)
