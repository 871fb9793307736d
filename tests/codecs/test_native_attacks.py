"""Attack review of the cachegen decoders (kvtier/codecs and csrc/): a record's bytes come from disk,
Redis, kvtier_server and peers, so every field is hostile. Under both backends (KVTIER_CACHEGEN_BACKEND)
a mutated, truncated or crafted record is a CorruptRecord or a decode of the caller's shape -- never
another exception, a write outside the output, memory far beyond the chunk, or a result that differs
between the backends; decoding from 8 threads at once gives the single-threaded results."""

from __future__ import annotations

import random
import struct
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from kvtier.codecs import cachegen_format as fmt
from kvtier.codecs import native, rans
from kvtier.codecs.base import CACHEGEN_ID
from kvtier.codecs.cachegen import CachegenCodec
from kvtier.codecs.rans_tables import PROB_SCALE, normalize
from kvtier.codecs.records import decode_in_place
from kvtier.dtypes import CODES_BY_NAME
from kvtier.errors import CorruptRecord
from kvtier.keys import ChunkKey
from kvtier.record import decode_header, encode_header

BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(not native.AVAILABLE,
                                                                          reason=native.WHY_NOT))]
KEY = ChunkKey(b"attacker", b"\x02" * 16)
LAYERS, CHANNELS = 2, 8


def kv(tokens: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(1, LAYERS, 1, CHANNELS, generator=g) * 3 + 0.1
    return (torch.randn(2, LAYERS, tokens, CHANNELS, generator=g) * spread).to(dtype)


# Every level and table grouping (per-channel from 512 tokens), and the three dtypes.
CASES = {
    "lossless": ("lossless", 24, torch.float16),
    "lossless-bf16": ("lossless", 40, torch.bfloat16),
    "1-layer": (1, 24, torch.float16),
    "2-layer-f32": (2, 24, torch.float32),
    "3-layer-bf16": (3, 24, torch.bfloat16),
    "1-channel": (1, 512, torch.float16),
    "3-channel-f32": (3, 512, torch.float32),
}
_RECORDS = {name: CachegenCodec(level).encode(kv(tokens, dtype))
            for name, (level, tokens, dtype) in CASES.items()}


def under(monkeypatch, name: str, fn):
    """('ok', value) or ('corrupt', None) of fn under backend `name`; any other exception fails."""
    monkeypatch.setenv(native.ENV, name)
    try:
        return "ok", fn()
    except CorruptRecord:
        return "corrupt", None


def outcomes(monkeypatch, fn) -> list:
    """fn's outcome under every available backend: the same for all, and returned."""
    results = [under(monkeypatch, name, fn) for name in ("reference", "native")[: 1 + native.AVAILABLE]]
    for kind, value in results[1:]:
        assert kind == results[0][0], results
        if kind == "ok":
            np.testing.assert_array_equal(np.asarray(value), np.asarray(results[0][1]))
    return results


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3])):
        op, i = rng.randrange(6), rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            del b[rng.randrange(len(b) + 1):]
        elif op == 2:
            b += rng.randbytes(rng.randint(1, 8))
        elif op == 3 and len(b) >= 4:  # a length, count or dimension: the values that hurt
            v = rng.choice([0, 3, 4, 255, 256, 2**31, 2**32 - 1, rng.randrange(2**32)])
            b[i:i + 4] = v.to_bytes(4, "little")[: len(b) - i]
        elif op == 4:
            del b[i:i + rng.randint(1, 16)]
        else:
            b[i:i] = rng.randbytes(rng.randint(1, 16))
    return bytes(b)


def decoded_in_place(header_bytes: bytes, payload: bytes, shape, dtype) -> np.ndarray:
    """decode_in_place of `payload` in a buffer of the raw chunk's size and 64 guard bytes; the
    decoded chunk as int bytes. Asserts nothing past the raw chunk was written."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.full(max(nbytes, len(payload)) + 64, 0xA5, dtype=np.uint8)
    buf[: len(payload)] = np.frombuffer(payload, np.uint8)
    guard = buf[nbytes:].copy()
    try:
        if len(payload) > nbytes:  # a reader refuses it before decoding: too long for the buffer
            raise CorruptRecord("payload longer than the raw chunk")
        assert decode_in_place(decode_header(header_bytes), buf[:nbytes])
    finally:
        np.testing.assert_array_equal(buf[nbytes:], guard)
    return buf[:nbytes].copy()


@pytest.mark.parametrize("case", list(CASES))
def test_mutated_records_are_corrupt_or_decode_alike_in_place(monkeypatch, case):
    level, tokens, dtype = CASES[case]
    shape = (2, LAYERS, tokens, CHANNELS)
    rng = random.Random(case)
    kinds = set()
    for _ in range(60):
        payload = mutate(rng, _RECORDS[case])
        header = encode_header(KEY, shape, dtype, payload, codec=CACHEGEN_ID)
        results = outcomes(monkeypatch, lambda h=header, p=payload: decoded_in_place(h, p, shape, dtype))
        kinds.add(results[0][0])
    assert "corrupt" in kinds


@pytest.mark.parametrize("case", list(CASES))
def test_every_truncation_and_garbage_tail_is_corrupt_under_both(monkeypatch, case):
    level, tokens, dtype = CASES[case]
    record = _RECORDS[case]
    out = torch.empty(2, LAYERS, tokens, CHANNELS, dtype=dtype)
    cuts = sorted({*range(0, 64), *random.Random(1).sample(range(len(record)), 16), len(record) - 1})
    for cut in cuts:
        for data in (record[:cut], record[:cut] + bytes(len(record) - cut)):
            if data == record:
                continue
            kind, _ = outcomes(monkeypatch, lambda d=data: CachegenCodec(2).decode(d, out))[0]
            assert kind == "corrupt" or data[:cut] == record[:cut] and cut >= len(record) - 8


def _u32_fields(record: bytes, shape) -> tuple[int, np.ndarray]:
    """(offset of the stream lengths, the lengths) of a valid record."""
    rec = fmt.parse(record, shape)
    at = len(record) - rec.streams.nbytes - 4 * rec.lengths.size
    return at, rec.lengths


@pytest.mark.parametrize("case", ["lossless", "1-layer", "1-channel"])
def test_stream_lengths_summing_past_2_32_are_corrupt(monkeypatch, case):
    level, tokens, dtype = CASES[case]
    record = _RECORDS[case]
    at, lengths = _u32_fields(record, (LAYERS, tokens, CHANNELS))
    wrapped = lengths.copy()
    wrapped[0] += 2**31
    wrapped[1] += 2**31  # the u32 sum wraps to the real total
    assert (wrapped < 2**32).all() and int(wrapped.sum()) % 2**32 == int(lengths.sum())
    bad = record[:at] + wrapped.astype("<u4").tobytes() + record[at + 4 * lengths.size:]
    out = torch.empty(2, LAYERS, tokens, CHANNELS, dtype=dtype)
    assert outcomes(monkeypatch, lambda: CachegenCodec(2).decode(bad, out))[0][0] == "corrupt"


def _streams(count: int = 40, s: int = 4):
    rng = np.random.default_rng(3)
    sym = rng.integers(0, 5, (s, count))
    tables = normalize(np.bincount((np.arange(s)[:, None] * 5 + sym).ravel(), minlength=5 * s).reshape(s, 5))
    return sym, tables, rans.encode_streams(sym, tables)


def test_int64_lengths_wrapping_past_2_63_are_corrupt(monkeypatch):
    # regression: the reference summed int64 lengths unchecked, so [2**62] * 3 + [2**62 + n] passed
    # the sum check and indexing the data raised IndexError
    sym, tables, coded = _streams()
    n = len(coded.data)
    lengths = np.array([2**62, 2**62, 2**62, 2**62 + n], dtype=np.int64)
    assert int(lengths.sum()) % 2**64 == n
    for decode in (rans.decode_streams, native.decode_streams):
        assert outcomes(monkeypatch, lambda d=decode: d(coded.data, lengths, tables, 40))[0][0] == "corrupt"


def test_count_at_the_bound_decodes_and_past_it_is_corrupt_without_allocating(monkeypatch):
    sym, tables, coded = _streams()
    kind, value = outcomes(monkeypatch, lambda: native.decode_streams(coded.data, coded.lengths, tables, 40,
                                                                      max_count=40))[0]
    assert kind == "ok" and np.array_equal(value, sym)
    tracemalloc.start()
    for count, bound in ((41, 40), (2**62, rans.MAX_COUNT), (-1, 40), (rans.MAX_COUNT + 1, rans.MAX_COUNT)):
        result = outcomes(monkeypatch, lambda c=count, b=bound: native.decode_streams(
            coded.data, coded.lengths, tables, c, max_count=b))
        assert result[0][0] == "corrupt"
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()


def test_tables_giving_frequency_beyond_bins_or_k_are_corrupt(monkeypatch):
    tokens = 512
    record = _RECORDS["1-channel"]
    rec = fmt.parse(record, (LAYERS, tokens, CHANNELS))
    assert rec.grouping == fmt.BY_CHANNEL
    shallow = rec.bins.reshape(-1).repeat(CHANNELS) - 1  # symbols each table may have
    row = int(np.argmin(shallow))  # a table with fewer symbols than the record's K
    tables = rec.tables.copy()
    top = int(np.argmax(tables[row]))
    tables[row, top] -= 16
    tables[row, shallow[row]] += 16  # the first symbol beyond its layer's bins
    bad = fmt.to_bytes(fmt.CodedRecord(rec.level, rec.dtype_code, rec.grouping, rec.shape, rec.bins,
                                       rec.scales, tables, rec.lengths, rec.streams))
    out = torch.empty(2, LAYERS, tokens, CHANNELS, dtype=torch.float16)
    with pytest.raises(CorruptRecord, match="beyond"):
        CachegenCodec(2).decode(bad, out)
    # straight to the coder: a table wider than 256 symbols, or one not summing to the scale
    sym, good, coded = _streams()
    for t in (np.full((4, 257), 0, np.uint32), good + 1, good.astype(np.int64) - 2**40):
        if t.shape[1] == 257:
            t[:, 0] = PROB_SCALE
        result = outcomes(monkeypatch, lambda t=t: native.decode_streams(coded.data, coded.lengths, t, 40))
        assert result[0][0] == "corrupt"


def _hostile(layers: int, tokens: int, channels: int, *, tables: bytes, bins: int = 256) -> bytes:
    """A per-channel level-3 record of the given table block, flat scales and 4-byte streams."""
    s = 2 * layers * channels
    head = struct.pack("<4sBBBBIII", b"KVCG", 1, 3, CODES_BY_NAME["float16"], fmt.BY_CHANNEL, layers, tokens,
                       channels)
    return (head + bytes([bins // 2]) * (2 * layers) + np.ones(2 * layers * tokens, "<f2").tobytes()
            + struct.pack("<I", len(tables)) + tables + np.full(s, 4, "<u4").tobytes()
            + (1 << 23).to_bytes(4, "big") * s)


def _wide_tables(s: int) -> bytes:
    """S canonical 8-bit tables with 254 stored entries each (lo 0, hi 254, width 8): the largest table
    block a per-channel record of 256 bins can have, 254 bytes a table."""
    entries = bytes([1, 128] + [0] * 252)
    return bytes([0, 254, 8]) * s + entries * s


def test_a_maximal_table_block_costs_memory_of_the_chunk_not_of_its_bits(monkeypatch):
    # regression: unpack_tables expanded the table block to ~7 int64 arrays per *bit* (~250x its
    # bytes): a record as large as a raw chunk cost gigabytes per read thread
    layers, tokens, channels = 2, 256, 64
    record = _hostile(layers, tokens, channels, tables=_wide_tables(2 * layers * channels))
    raw = 2 * layers * tokens * channels * 2
    assert len(record) < raw  # it fits a read buffer sized for the raw chunk
    out = torch.empty(2, layers, tokens, channels, dtype=torch.float16)
    for name in ("reference", "native")[: 1 + native.AVAILABLE]:
        monkeypatch.setenv(native.ENV, name)
        tracemalloc.start()
        with pytest.raises(CorruptRecord, match="ends before"):  # flat 4-byte streams cannot hold 256 symbols
            CachegenCodec(2).decode(record, out)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 32 * raw, (name, peak / raw)  # was 143x; now the tables, a few words an entry


def test_per_channel_tables_of_more_symbols_than_tokens_are_refused():
    # regression: 2LC tables of 255 symbols for a few tokens made the tables (and their int64 scratch)
    # hundreds of times the chunk's size
    layers, channels = 2, 64
    for tokens, refused in ((8, True), (254, True), (255, False)):
        record = _hostile(layers, tokens, channels, tables=bytes([0, 0, 0]) * (2 * layers * channels))
        out = torch.empty(2, layers, tokens, channels, dtype=torch.float16)
        if refused:
            with pytest.raises(CorruptRecord, match="per-channel tables"):
                CachegenCodec(2).decode(record, out)
        else:  # one-symbol tables: every stream decodes its symbols from the state alone
            CachegenCodec(2).decode(record, out)
            assert (out == -1).all()  # symbol 0 of 255 is -scale


def test_a_record_claiming_a_larger_shape_than_its_buffer_is_corrupt(monkeypatch):
    level, tokens, dtype = CASES["2-layer-f32"]
    record = _RECORDS["2-layer-f32"]
    shape = (2, LAYERS, tokens, CHANNELS)
    nbytes = int(np.prod(shape)) * 4
    claims = ((2, LAYERS, tokens * 4, CHANNELS), (2, LAYERS + 1, tokens, CHANNELS), (2, 2**20, 2**20, 2**20))
    for claim in claims:
        header = decode_header(encode_header(KEY, claim, dtype, record, codec=CACHEGEN_ID))
        buf = np.zeros(nbytes, np.uint8)
        buf[: len(record)] = np.frombuffer(record, np.uint8)
        assert outcomes(monkeypatch, lambda h=header, b=buf: decode_in_place(h, b))[0][0] == "corrupt"
    # the payload's own header claims more tokens than `out` has: a mismatch, not a read past it
    claims_more = bytearray(record)
    claims_more[12:16] = struct.pack("<I", tokens + 1)
    out = torch.empty(shape, dtype=dtype)
    assert outcomes(monkeypatch, lambda: CachegenCodec(2).decode(bytes(claims_more), out))[0][0] == "corrupt"
    header = decode_header(encode_header(KEY, shape, dtype, bytes(nbytes + 1), codec=CACHEGEN_ID))
    with pytest.raises(CorruptRecord):  # a payload longer than the buffer it was read into
        decode_in_place(header, np.zeros(nbytes, np.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eight_threads_decoding_shared_records_get_the_single_threaded_results(monkeypatch, backend):
    monkeypatch.setenv(native.ENV, backend)
    names = ["lossless", "1-layer", "3-layer-bf16", "1-channel"]
    corrupt = [_RECORDS["1-channel"][:-3], _RECORDS["1-channel"] + b"\0"]

    def decode(i: int):
        name = names[i % len(names)]
        _, tokens, dtype = CASES[name]
        out = torch.empty(2, LAYERS, tokens, CHANNELS, dtype=dtype)
        CachegenCodec(2).decode(_RECORDS[name], out)
        half = torch.empty(2, LAYERS, 512, CHANNELS, dtype=torch.float16)
        with pytest.raises(CorruptRecord, match="stream|table"):  # refused by the decoder, past the header
            CachegenCodec(2).decode(corrupt[i % 2], half)
        return out

    alone = [decode(i) for i in range(len(names))]
    start = threading.Barrier(8)

    def racing(i: int):
        start.wait()
        return [decode(i + k) for k in range(0, 16, 4)]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(racing, range(8)))
    for i, outs in enumerate(together):
        for out in outs:
            assert torch.equal(out.view(torch.uint8), alone[i % len(names)].view(torch.uint8))
