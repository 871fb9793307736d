"""kvtier.device_checksum: XXH3-64 with the block loop's sums computed by torch where the payload is
(here the CPU: the same torch ops a GPU runs) must equal the xxhash package's XXH3-64 of the same
bytes, for every length around the block and stripe edges, for payloads at any alignment, with the
C scramble chain and with the numpy one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash
from native_paths import use_native

from kvtier import device_checksum, native_keys
from kvtier.device_checksum import BLOCK


@pytest.fixture(params=["C chain", "numpy chain"])
def chain(request, monkeypatch) -> None:
    use_native(monkeypatch, native_keys, request.param == "C chain")


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


LENGTHS = [0, 1, 63, 64, 2 * BLOCK, 2 * BLOCK + 4, 3 * BLOCK - 60, 3 * BLOCK - 59, 3 * BLOCK - 61, 4096,
           5 * BLOCK + 1, 5 * BLOCK + 63, 5 * BLOCK + 64, 5 * BLOCK + 65, 16 * 1024, 100_003]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("offset", [0, 1, 4])  # where the payload starts in its buffer
def test_equals_xxh3_64_of_the_fields_then_the_payload(chain, length, offset):
    fields, payload = random_bytes(60, length), random_bytes(length, length + 1)
    buffer = torch.frombuffer(bytearray(bytes(offset) + payload + b"\0"), dtype=torch.uint8)
    got = device_checksum.xxh3_64(fields, buffer[offset:offset + length])
    assert got == xxhash.xxh3_64_intdigest(fields + payload)


def test_slices_of_the_block_loop_add_up_as_one(monkeypatch):
    fields, payload = random_bytes(60, 1), random_bytes(40 * BLOCK + 7, 2)
    monkeypatch.setattr(device_checksum, "SLICE_BLOCKS", 3)  # 13 slices and a short last one
    got = device_checksum.xxh3_64(fields, torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    assert got == xxhash.xxh3_64_intdigest(fields + payload)


def test_one_flipped_bit_changes_it():
    fields, payload = random_bytes(60, 3), bytearray(random_bytes(8 * BLOCK, 4))
    before = device_checksum.xxh3_64(fields, torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    payload[5 * BLOCK + 17] ^= 0x10
    assert device_checksum.xxh3_64(fields, torch.frombuffer(payload, dtype=torch.uint8)) != before


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="under 1 KiB"):
        device_checksum.xxh3_64(bytes(BLOCK), torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1-D uint8"):
        device_checksum.xxh3_64(b"", torch.zeros(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="acc and key are 64 bytes"):
        native_keys.xxh3_chain(np.zeros(8, np.uint64), b"x" * 65, bytes(64))
