"""Tests for kvtier/checksum_copy.py (csrc/checksum_copy.cpp): the fused pass gives xxhash's XXH3-64
of the header fields and payload and numpy's placement of the pieces, for any layout that fits;
anything that does not fit is refused before a byte is written; `finish` tells a good record from
a damaged one; and a record verified with `defer_to` leaves exactly its checksum to the copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier import checksum_copy
from kvtier.checksum_copy import PieceCopy, checksum_into, finish
from kvtier.errors import CorruptRecord
from kvtier.keys import ChunkKey
from kvtier.record import decode_header, encode_header, verify

pytestmark = pytest.mark.skipif(not checksum_copy.AVAILABLE, reason=f"no fused pass: {checksum_copy.WHY_NOT}")
KEY = ChunkKey.from_bytes(bytes(range(24)))


def placed(payload: np.ndarray, copy: PieceCopy, size: int) -> np.ndarray:
    """What the pieces of a zeroed `size`-byte destination hold after the copy, done by numpy."""
    want, k = np.zeros(size, dtype=np.uint8), 0
    for o in range(copy.n_outer):
        for i in range(copy.n_inner):
            at = copy.offset + o * copy.s_outer + i * copy.s_inner
            want[at:at + copy.piece] = payload[k:k + copy.piece]
            k += copy.piece
    return want


@st.composite
def layouts(draw):
    piece = draw(st.integers(1, 70_000))
    n_outer, n_inner = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    s_inner = piece + draw(st.integers(0, 5000))
    s_outer = (n_inner - 1) * s_inner + piece + draw(st.integers(0, 5000))
    offset = draw(st.integers(0, 5000))
    size = offset + (n_outer - 1) * s_outer + (n_inner - 1) * s_inner + piece + draw(st.integers(0, 100))
    return piece, n_outer, n_inner, s_inner, s_outer, offset, size


@settings(max_examples=60, deadline=None)
@given(layout=layouts(), fields=st.binary(max_size=80), seed=st.integers(0, 2**32 - 1))
def test_the_fused_pass_is_xxh3_of_fields_and_payload_and_numpys_copy(layout, fields, seed):
    piece, n_outer, n_inner, s_inner, s_outer, offset, size = layout
    payload = np.random.default_rng(seed).integers(0, 256, piece * n_outer * n_inner, dtype=np.uint8)
    dest = np.zeros(size, dtype=np.uint8)
    copy = PieceCopy(dest, offset, piece, n_outer, s_outer, n_inner, s_inner)

    assert checksum_into(fields, payload, copy) == xxhash.xxh3_64_intdigest(fields + payload.tobytes())
    assert np.array_equal(dest, placed(payload, copy, size))


@pytest.mark.parametrize("offset, piece, n_outer, s_outer, n_inner, s_inner, payload_len, why", [
    (-1, 100, 1, 0, 2, 100, 200, "must be >= 0"),
    (0, 0, 1, 0, 2, 100, 0, "must be >= 0"),
    (0, 100, 1, 0, 2, 99, 200, "pieces overlap"),
    (0, 100, 2, 150, 2, 100, 400, "pieces overlap"),
    (0, 100, 1, 0, 2, 100, 199, "src must hold"),
    (0, 100, 1, 0, 11, 100, 1100, "reach past dst"),
    (950, 100, 1, 0, 1, 100, 100, "reach past dst"),
    (0, 2**40, 2**40, 0, 2**40, 2**40, 100, "src must hold"),  # products that overflow
])
def test_a_layout_that_does_not_fit_is_refused_and_writes_nothing(offset, piece, n_outer, s_outer, n_inner,
                                                                  s_inner, payload_len, why):
    dest, payload = np.zeros(1000, dtype=np.uint8), np.ones(payload_len, dtype=np.uint8)
    with pytest.raises(ValueError, match=why):
        checksum_into(b"f", payload, PieceCopy(dest, offset, piece, n_outer, s_outer, n_inner, s_inner))
    assert not dest.any()


def test_a_payload_inside_its_destination_or_a_read_only_destination_is_refused():
    dest = np.zeros(1 << 16, dtype=np.uint8)
    with pytest.raises(ValueError, match="overlaps"):
        checksum_into(b"f", dest[4096:8192], PieceCopy(dest, 0, 4096, 1, 0, 1, 4096))
    read_only = np.zeros(8192, dtype=np.uint8)
    read_only.flags.writeable = False
    with pytest.raises((BufferError, TypeError, ValueError)):
        checksum_into(b"f", np.ones(4096, dtype=np.uint8), PieceCopy(read_only, 0, 4096, 1, 0, 1, 4096))
    assert not read_only.any()


def raw_record(n: int) -> tuple[bytes, np.ndarray]:
    """A raw fp16 record of `n` payload bytes (shape 2 x 1 x n/8 x 2 halves)."""
    payload = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    return encode_header(KEY, (2, 1, n // 8, 2), torch.float16, payload), payload


def test_verify_leaves_only_the_checksum_to_the_copy_and_finish_checks_it():
    header_bytes, payload = raw_record(64 * 1024)
    dest = np.zeros(payload.size, dtype=np.uint8)
    copy = PieceCopy(dest, 0, payload.size // 2, 1, 0, 2, payload.size // 2)
    damaged = payload.copy()
    damaged[100] ^= 1

    header = verify(header_bytes, damaged, KEY, defer_to=copy)  # the checksum is not computed here

    assert header.checksum == decode_header(header_bytes).checksum and copy.pending is not None
    assert finish(copy, damaged) is False
    assert np.array_equal(dest, damaged)  # copied all the same: the caller must not serve it
    assert finish(copy, payload) is True and np.array_equal(dest, payload)
    with pytest.raises(CorruptRecord, match="key"):  # the key and length are still checked at once
        verify(header_bytes, payload, ChunkKey.from_bytes(bytes(24)), defer_to=copy)


def test_verify_checks_the_checksum_itself_where_the_copy_does_not_fit_the_record():
    header_bytes, payload = raw_record(64 * 1024)
    damaged = payload.copy()
    damaged[7] ^= 1
    other_size = PieceCopy(np.zeros(payload.size, dtype=np.uint8), 0, 1024, 1, 0, 1, 1024)
    with pytest.raises(CorruptRecord, match="checksum"):
        verify(header_bytes, damaged, KEY, defer_to=other_size)
    assert other_size.pending is None
