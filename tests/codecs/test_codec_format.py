"""kvtier/codecs/cachegen_format.py and raw.py: the coded record round-trips its fields, and a
corrupt, truncated or oversized record is a CorruptRecord (or, for a flip inside a stream, a
decode that completes) -- never another exception, an over-read or a large allocation."""

import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.codecs import cachegen_format as fmt
from kvtier.codecs.base import RecordMismatch
from kvtier.codecs.cachegen import CachegenCodec
from kvtier.codecs.raw import RawCodec
from kvtier.errors import CorruptRecord

SHAPE = (2, 2, 64, 16)


def _chunk(tokens: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(2, 2, tokens, 16, generator=g) * torch.rand(1, 2, 1, 16, generator=g)).half()


RECORDS = {level: CachegenCodec(level).encode(_chunk()) for level in ("lossless", 1, 2, 3)}
RECORDS["channel"] = CachegenCodec(2).encode(_chunk(600))


def _decode(data: bytes, like: str) -> None:
    out = torch.empty(2, 2, 600 if like == "channel" else 64, 16, dtype=torch.float16)
    CachegenCodec(2).decode(data, out)


def test_fields_round_trip():
    x = _chunk()
    rec = fmt.parse(RECORDS[1], (2, 64, 16))
    assert (rec.level, rec.dtype_code, rec.grouping, rec.shape) == (1, 1, fmt.BY_LAYER, (2, 64, 16))
    assert rec.bins.tolist() == [[32, 16], [16, 8]]
    assert rec.scales.shape == (2, 2, 64) and (rec.scales == x.abs().amax(-1).numpy()).all()
    assert int(rec.lengths.sum()) == len(rec.streams)
    assert fmt.to_bytes(rec) == RECORDS[1]


@pytest.mark.parametrize("like", list(RECORDS))
def test_every_truncation_is_refused(like):
    data = RECORDS[like]
    for n in list(range(0, 200)) + list(range(200, len(data), max(1, len(data) // 300))):
        with pytest.raises(CorruptRecord):
            _decode(data[:n], like)
    with pytest.raises(CorruptRecord):
        _decode(data + b"\0", like)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(like=st.sampled_from(list(RECORDS)), where=st.floats(0, 1, exclude_max=True),
       flip=st.integers(1, 255), head=st.booleans())
def test_byte_flips_are_refused_or_decode(like, where, flip, head):
    data = bytearray(RECORDS[like])
    pos = int(where * (200 if head else len(data)))  # half the tries aim at the fields before the streams
    data[pos] ^= flip
    start = time.perf_counter()
    try:
        _decode(bytes(data), like)
    except CorruptRecord:
        pass
    assert time.perf_counter() - start < 5


def _header(layers: int, tokens: int, channels: int, level: int = 2) -> bytes:
    return struct.pack("<4sBBBBIII", b"KVCG", 1, level, 1, 0, layers, tokens, channels)


def test_shape_over_the_bounds_is_refused():
    with pytest.raises(CorruptRecord, match="bounds"):
        fmt.parse(_header(2**31, 64, 16) + bytes(100), (2, 64, 16))
    with pytest.raises(RecordMismatch):
        _decode(_header(3, 64, 16) + bytes(100), "1")


def test_huge_claim_within_bounds_allocates_nothing_big():
    data = _header(2**20, 2**20, 2**20) + bytes(4096)
    tracemalloc.start()
    with pytest.raises(CorruptRecord, match="too short"):
        fmt.parse(data, (2**20, 2**20, 2**20))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


def test_tables_giving_frequency_beyond_a_layers_bins_are_refused():
    rec = fmt.parse(RECORDS[1], (2, 64, 16))
    tables = rec.tables.copy()
    v_deep = 3  # (kv 1, layer 1): 8 bins, 7 symbols, in a 31-symbol table
    tables[v_deep, 0] -= 1
    tables[v_deep, 20] += 1
    bad = fmt.CodedRecord(rec.level, rec.dtype_code, rec.grouping, rec.shape, rec.bins, rec.scales,
                          tables, rec.lengths, rec.streams)
    with pytest.raises(CorruptRecord, match="beyond"):
        fmt.parse(fmt.to_bytes(bad), (2, 64, 16))


def test_raw_round_trips_and_refuses_a_wrong_length():
    x = _chunk()
    data = RawCodec().encode(x)
    assert data == x.numpy().tobytes()
    out = torch.empty_like(x)
    RawCodec().decode(data, out)
    assert torch.equal(out, x)
    with pytest.raises(CorruptRecord):
        RawCodec().decode(data[:-2], out)
    with pytest.raises(ValueError):
        RawCodec().decode(data, torch.empty(4, 64, 16, dtype=torch.float16))
    assert np.frombuffer(data, np.float16).shape == (x.numel(),)
