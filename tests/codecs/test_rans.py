"""kvtier.codecs.rans and rans_tables: round trips, efficiency against entropy, hostile input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.codecs import rans
from kvtier.codecs.rans_tables import PROB_SCALE, check_tables, normalize, pack_tables, unpack_tables
from kvtier.errors import CorruptRecord


def _laplace_symbols(rng, k: int, width: float, shape) -> np.ndarray:
    v = rng.laplace(0.0, 1.0, shape) / width + (k - 1) / 2
    return np.clip(np.round(v), 0, k - 1).astype(np.int64)


def _tables_for(symbols: np.ndarray, k: int) -> np.ndarray:
    return normalize(np.stack([np.bincount(row, minlength=k) for row in symbols]))


def _round_trip(symbols: np.ndarray, tables: np.ndarray) -> rans.EncodedStreams:
    coded = rans.encode_streams(symbols, tables)
    decoded = rans.decode_streams(coded.data, coded.lengths, tables, symbols.shape[1])
    np.testing.assert_array_equal(decoded, symbols)
    return coded


@pytest.mark.parametrize(
    ("k", "n", "width"),
    [(1, 100, 1.0), (2, 1, 1.0), (2, 300, 0.2), (16, 0, 1.0), (16, 1, 1.0), (32, 777, 0.5), (256, 500, 0.02)],
)
def test_round_trip_edge_cases(k, n, width):
    rng = np.random.default_rng(k * 1000 + n)
    symbols = _laplace_symbols(rng, k, width, (7, n))
    tables = normalize(np.stack([np.bincount(r, minlength=k) for r in symbols]) + (n == 0))
    coded = _round_trip(symbols, tables)
    assert coded.lengths.shape == (7,) and (coded.lengths >= rans.STATE_BYTES).all()


def test_very_skewed_table_round_trips():
    freqs = np.zeros((2, 64), dtype=np.uint32)
    freqs[0, 5], freqs[0, 63] = PROB_SCALE - 1, 1
    freqs[1, :] = 1
    freqs[1, 0] += PROB_SCALE - 64
    rng = np.random.default_rng(3)
    symbols = np.stack([np.where(rng.random(2000) < 0.01, 63, 5), rng.integers(0, 64, 2000)])
    _round_trip(symbols, freqs)


def test_renormalisation_boundary_state_equal_to_bound():
    # f = 16 makes the encoder's first bound (L >> PROB_BITS << 8) * f equal to its start state L:
    # the state must be renormalised at equality, or it leaves [L, 256 L).
    freqs = np.array([[16, PROB_SCALE - 16]], dtype=np.uint32)
    coded = _round_trip(np.array([[0]]), freqs)
    assert coded.data[:1] < b"\x80"


def test_single_stream_forms_match_batch():
    rng = np.random.default_rng(4)
    symbols = _laplace_symbols(rng, 16, 1.0, (1, 900))
    tables = _tables_for(symbols, 16)
    data = rans.encode(symbols[0], tables[0])
    assert data == rans.encode_streams(symbols, tables).data
    np.testing.assert_array_equal(rans.decode(data, tables[0], 900), symbols[0])


@pytest.mark.parametrize(("k", "width"), [(16, 1.0), (32, 0.5), (32, 3.0), (2, 0.3), (256, 0.05)])
def test_coded_size_within_two_percent_of_entropy(k, width):
    rng = np.random.default_rng(k)
    symbols = _laplace_symbols(rng, k, width, (16, 4096))
    tables = _tables_for(symbols, k)
    coded = rans.encode_streams(symbols, tables)
    entropy_bytes = -np.log2(np.take_along_axis(tables, symbols, 1) / PROB_SCALE).sum(axis=1) / 8
    # The coder's own overhead is the 4-byte final state, less what the last renormalisation saved.
    assert (coded.lengths <= entropy_bytes * 1.02 + rans.STATE_BYTES).all()
    assert (coded.lengths >= entropy_bytes).all()


def test_normalize_invariants():
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 50, (200, 32)) * (rng.random((200, 32)) < 0.6)
    counts[:, 0] += 1
    counts[0] = 0
    counts[0, 7] = 10**9
    counts[0, 8] = 1
    tables = normalize(counts)
    assert (tables.sum(axis=1) == PROB_SCALE).all()
    assert ((tables > 0) == (counts > 0)).all()
    assert tables[0, 7] == PROB_SCALE - 1 and tables[0, 8] == 1
    np.testing.assert_array_equal(normalize(counts[3]), tables[3])
    # proportional: within one unit of the share left after every present symbol's floor of 1
    spare = PROB_SCALE - (counts > 0).sum(axis=1, keepdims=True)
    ideal = (counts > 0) + counts * spare / counts.sum(axis=1, keepdims=True)
    assert (np.abs(tables - ideal) < 1).all()


def test_normalize_is_deterministic_on_ties():
    tables = normalize(np.array([1, 1, 1], dtype=np.int64))
    assert tables.tolist() == [1366, 1365, 1365]
    # 100 equal remainders and fewer units than symbols: the lower indices win, whatever the sort
    spare = PROB_SCALE - 100
    tables = normalize(np.ones(100, dtype=np.int64))
    extra = spare - 100 * (spare // 100)
    assert (tables[:extra] == 1 + spare // 100 + 1).all() and (tables[extra:] == 1 + spare // 100).all()
    # many ties across a batch: equal counts get equal shares, the extra unit to the lower index
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 4, (300, 218)) * 3
    tables = normalize(counts + (counts.sum(axis=1, keepdims=True) == 0))
    for row_counts, row in zip(counts, tables):
        for value in np.unique(row_counts):
            same = row[row_counts == value].astype(np.int64)
            assert (np.diff(same) <= 0).all() and same[0] - same[-1] <= 1


@pytest.mark.parametrize(
    "counts", [np.zeros(4, dtype=np.int64), np.array([1, -1]), np.ones(257, dtype=np.int64)]
)
def test_normalize_rejects_bad_counts(counts):
    with pytest.raises(ValueError):
        normalize(counts)


def test_encode_rejects_zero_frequency_and_bad_tables():
    freqs = normalize(np.array([5, 0, 5]))
    with pytest.raises(ValueError, match="frequency 0"):
        rans.encode(np.array([0, 1, 2]), freqs)
    with pytest.raises(ValueError):
        rans.encode(np.array([0, 3]), freqs)
    with pytest.raises(ValueError):
        rans.encode(np.array([0]), freqs + 1)


def _coded_sample() -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(6)
    symbols = _laplace_symbols(rng, 16, 1.0, (1, 300))
    tables = _tables_for(symbols, 16)
    return rans.encode(symbols[0], tables[0]), tables[0]


def test_decode_rejects_hostile_input():
    data, freqs = _coded_sample()
    cases = [
        (data[:-1], freqs, 300),
        (data + b"\x00", freqs, 300),
        (data[:3], freqs, 300),
        (b"", freqs, 0),
        (data, freqs, 301),
        (data, freqs, 299),
        (b"\xff" * 4 + data[4:], freqs, 300),
        (data, freqs + 1, 300),
        (data, np.zeros(16, dtype=np.uint32), 300),
        (data, freqs, -1),
    ]
    for bad_data, bad_freqs, count in cases:
        with pytest.raises(CorruptRecord):
            rans.decode(bad_data, bad_freqs, count)
    with pytest.raises(CorruptRecord, match="outside"):
        rans.decode(data, freqs, 300, max_count=299)


def test_decode_streams_rejects_bad_lengths():
    data, freqs = _coded_sample()
    tables = np.stack([freqs, freqs])
    for lengths in ([len(data), 0], [len(data), 4], [len(data) - 4, 4], [len(data)]):
        with pytest.raises(CorruptRecord):
            rans.decode_streams(data + data[:4], np.array(lengths), tables, 300)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_decode_of_mutated_streams_returns_or_raises_corrupt(data):
    good, freqs = _coded_sample()
    buf = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    count = data.draw(st.sampled_from([0, 1, 299, 300, 301, 5000]))
    try:
        out = rans.decode(bytes(buf[:cut]), freqs, count, max_count=4096)
    except CorruptRecord:
        return
    assert out.shape == (count,) and (freqs[out] > 0).all()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 100))
def test_decode_of_garbage_returns_or_raises_corrupt(garbage, count):
    freqs = normalize(np.arange(1, 9))
    try:
        rans.decode(garbage, freqs, count)
    except CorruptRecord:
        pass


def test_pack_tables_round_trip_and_size():
    rng = np.random.default_rng(7)
    symbols = _laplace_symbols(rng, 32, 0.5, (50, 1024))
    tables = _tables_for(symbols, 32)
    tables[0] = 0
    tables[0, 31] = PROB_SCALE
    tables[1] = normalize(np.arange(32) % 3)
    packed = pack_tables(tables)
    np.testing.assert_array_equal(unpack_tables(packed, 50, 32), tables)
    assert len(packed) < 50 * 32 * 12 // 8  # under a plain 12-bit entry per symbol, headers included
    assert unpack_tables(pack_tables(tables[:0]), 0, 32).shape == (0, 32)


def test_unpack_tables_rejects_bad_bytes():
    tables = normalize(np.array([[3, 9, 0, 1], [0, 1, 3, 0]]))
    packed = pack_tables(tables)
    header = bytearray(packed)
    bad = [
        packed[:-1],
        packed + b"\x00",
        packed[:5],
        bytes([9]) + packed[1:],  # lo past hi
        packed[:1] + bytes([4]) + packed[2:],  # hi out of range for K = 4
        packed[:2] + bytes([13]) + packed[3:],  # width over PROB_BITS
        packed[:2] + bytes([header[2] + 1]) + packed[3:],  # non-canonical width (and wrong length)
        packed[:6] + b"\xff" * (len(packed) - 6),  # stored entries exceed the scale
        packed[:-1] + bytes([packed[-1] | 1]),  # nonzero padding bit
    ]
    assert packed[:6] == bytes([0, 3, 12, 1, 2, 11])  # 3 x 12 + 11 bits: one bit of padding
    for data in bad:
        with pytest.raises(CorruptRecord):
            unpack_tables(data, 2, 4)


def test_unpack_tables_rejects_wider_than_needed_entries():
    tables = np.array([[5, PROB_SCALE - 5]], dtype=np.uint32)
    assert pack_tables(tables) == bytes([0, 1, 3, 0b1010_0000])
    with pytest.raises(CorruptRecord, match="canonical"):
        unpack_tables(bytes([0, 1, 4, 0b0101_0000]), 1, 2)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 4), st.integers(1, 8))
def test_unpack_tables_of_garbage_is_valid_or_corrupt(garbage, count, k):
    try:
        tables = unpack_tables(garbage, count, k)
    except CorruptRecord:
        return
    check_tables(tables)
    assert pack_tables(tables) == garbage  # only the canonical form is accepted
