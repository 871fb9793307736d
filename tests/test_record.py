"""Tests for kvtier/record.py: the chunk record header, its validation, and zero-copy tensor bytes."""

from __future__ import annotations

import struct

import pytest
import torch

from kvtier.errors import CorruptRecord, KvtierError
from kvtier.keys import ChunkKey, Namespace, TokenDatabase
from kvtier.layout import DTYPE_CODES, KVLayout
from kvtier.record import (
    CODEC_RAW,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    RecordHeader,
    decode_header,
    encode_header,
    tensor_bytes,
    verify,
)

SHAPE = (2, 3, 16, 8)


def make_key(seed: int = 0) -> ChunkKey:
    db = TokenDatabase(Namespace("m", "l"), chunk_size=16)
    return db.keys(list(range(seed, seed + 16)))[0]


KEY = make_key(0)
OTHER_KEY = make_key(1)


def make_kv(dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.Tensor:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return x.to(dtype)


def make_record(dtype: torch.dtype = torch.bfloat16) -> tuple[bytes, bytearray]:
    payload = bytearray(tensor_bytes(make_kv(dtype)))
    return encode_header(KEY, SHAPE, dtype, payload), payload


def test_header_is_68_bytes():
    header, _ = make_record()
    assert HEADER_SIZE == 68
    assert len(header) == HEADER_SIZE
    assert header[:4] == MAGIC == b"KVTR"


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_encode_verify_round_trip(dtype):
    kv = make_kv(dtype)
    payload = tensor_bytes(kv)
    header = encode_header(KEY, SHAPE, dtype, payload)
    got = verify(header, payload, KEY)
    assert isinstance(got, RecordHeader)
    assert got.key == KEY
    assert got.dtype == dtype
    assert got.shape == SHAPE
    assert got.num_tokens == 16
    assert got.codec == CODEC_RAW
    assert got.payload_len == kv.numel() * kv.element_size() == len(payload)
    # The payload read back as the header describes is the tensor that went in.
    back = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(got.dtype).view(got.shape)
    assert torch.equal(back.view(torch.uint8), kv.view(torch.uint8))


def test_verify_accepts_padded_header_buffer_and_memoryviews():
    # A tier may read the header as part of a larger aligned block.
    header, payload = make_record()
    padded = bytearray(header) + b"\0" * (4096 - HEADER_SIZE)
    assert verify(memoryview(padded), memoryview(payload), KEY).shape == SHAPE


def test_codec_id_round_trips():
    header, payload = make_record()
    header = encode_header(KEY, SHAPE, torch.bfloat16, payload, codec=3)
    assert decode_header(header).codec == 3
    assert verify(header, payload, KEY).codec == 3


def test_encode_rejects_shapes_that_are_not_4d():
    with pytest.raises(ValueError, match="4 dims"):
        encode_header(KEY, (2, 3, 16), torch.float16, b"\0" * 8)


# --- decode_header --------------------------------------------------------------------------------


def patched(header: bytes, offset: int, fmt: str, value) -> bytes:
    buf = bytearray(header)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def test_decode_catches_bad_magic():
    header, _ = make_record()
    with pytest.raises(CorruptRecord, match="magic"):
        decode_header(b"XXXX" + header[4:])


def test_decode_catches_bad_version():
    header, _ = make_record()
    with pytest.raises(CorruptRecord, match="version 2"):
        decode_header(patched(header, 4, "<H", VERSION + 1))


@pytest.mark.parametrize("code", [0, 8, 999, 0xFFFF])
def test_decode_catches_unknown_dtype_code(code):
    header, _ = make_record()
    with pytest.raises(CorruptRecord, match=f"dtype code {code}"):
        decode_header(patched(header, 8, "<H", code))


@pytest.mark.parametrize("n", [0, 4, 60, HEADER_SIZE - 1])
def test_decode_catches_truncated_header(n):
    header, _ = make_record()
    with pytest.raises(CorruptRecord, match="truncated"):
        decode_header(header[:n])


def test_corrupt_record_is_a_kvtier_error():
    with pytest.raises(KvtierError):
        decode_header(b"")


# --- verify ---------------------------------------------------------------------------------------


def test_verify_catches_wrong_key():
    header, payload = make_record()
    with pytest.raises(CorruptRecord, match="where .* was expected"):
        verify(header, payload, OTHER_KEY)


@pytest.mark.parametrize("delta", [-1, 1, -2])
def test_verify_catches_wrong_payload_length(delta):
    header, payload = make_record()
    wrong = payload[:delta] if delta < 0 else payload + b"\0" * delta
    with pytest.raises(CorruptRecord, match="payload is"):
        verify(header, wrong, KEY)


@pytest.mark.parametrize("position", [0, 1, 777, -1])
def test_verify_catches_a_flipped_payload_bit(position):
    header, payload = make_record()
    payload[position] ^= 0x10
    with pytest.raises(CorruptRecord, match="checksum"):
        verify(header, payload, KEY)


@pytest.mark.parametrize(
    ("field", "offset"),
    [("codec", 6), ("dtype", 8), ("reserved", 10), ("shape[0]", 12), ("shape[2]", 20), ("shape[3]", 24),
     ("checksum", 60), ("checksum top byte", 67)],
)
def test_verify_catches_a_flipped_header_bit(field, offset):
    header, payload = make_record()
    buf = bytearray(header)
    # Bit 0 of each field: every flipped value still decodes (codec 1, dtype code 2 -> 3 = float32,
    # shape off by one), so only the checksum stands between it and served data.
    buf[offset] ^= 0x01
    with pytest.raises(CorruptRecord, match="checksum"):
        verify(bytes(buf), payload, KEY)


def test_verify_catches_a_flipped_bit_in_the_stored_key():
    header, payload = make_record()
    buf = bytearray(header)
    buf[28 + 10] ^= 0x01
    with pytest.raises(CorruptRecord):
        verify(bytes(buf), payload, KEY)


def test_verify_catches_a_flipped_bit_in_payload_length():
    header, payload = make_record()
    buf = bytearray(header)
    buf[52] ^= 0x01
    with pytest.raises(CorruptRecord):
        verify(bytes(buf), payload, KEY)


def test_verify_catches_a_header_from_another_record():
    header_a, payload_a = make_record(torch.bfloat16)
    other = bytearray(tensor_bytes(make_kv(torch.bfloat16, seed=9)))
    assert other != payload_a
    with pytest.raises(CorruptRecord, match="checksum"):
        verify(header_a, other, KEY)


# --- tensor_bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32])
def test_tensor_bytes_is_zero_copy(dtype):
    kv = torch.zeros(SHAPE, dtype=dtype)
    view = tensor_bytes(kv)
    assert view.nbytes == kv.numel() * kv.element_size()
    assert view.format == "B" and view.ndim == 1 and not view.readonly
    view[: kv.element_size()] = b"\xff" * kv.element_size()
    assert kv.view(torch.uint8).reshape(-1)[: kv.element_size()].tolist() == [0xFF] * kv.element_size()
    assert kv.reshape(-1)[1:].view(torch.uint8).eq(0).all()
    # And the other way round: a write to the tensor shows through the view.
    kv.view(torch.uint8).reshape(-1)[-1] = 0x42
    assert view[-1] == 0x42


def test_tensor_bytes_of_a_contiguous_slice_starts_at_the_slice():
    base = torch.arange(64, dtype=torch.uint8)
    view = tensor_bytes(base[10:20])
    assert bytes(view) == bytes(range(10, 20))
    view[0] = 200
    assert base[10].item() == 200


def test_tensor_bytes_rejects_non_contiguous():
    kv = make_kv(torch.float16)
    with pytest.raises(ValueError, match="contiguous"):
        tensor_bytes(kv.transpose(1, 2))
    with pytest.raises(ValueError, match="contiguous"):
        tensor_bytes(kv[:, :, ::2])


def test_layout_chunk_bytes_matches_encoded_payload_length():
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=torch.bfloat16)
    kv = torch.zeros(layout.chunk_shape(16), dtype=layout.dtype)
    payload = tensor_bytes(kv)
    header = decode_header(encode_header(KEY, layout.chunk_shape(16), layout.dtype, payload))
    assert header.payload_len == layout.chunk_bytes(16)


def test_a_decoded_header_encodes_back_to_the_same_bytes_without_the_payload():
    header, payload = make_record()
    decoded = verify(header, payload, KEY)
    assert decoded.to_bytes() == header
    payload[0] ^= 1  # to_bytes never reads the payload: it writes the checksum it was given
    assert decode_header(decoded.to_bytes()).checksum == decoded.checksum
