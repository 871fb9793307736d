"""kvtier/codecs/cachegen.py: lossless exact, each level within half a bin, presets, table
grouping, coded size within 2% of the symbols' entropy, `out` checks."""

import numpy as np
import pytest
import torch

from kvtier.codecs import cachegen_format as fmt
from kvtier.codecs import quantize as q
from kvtier.codecs.cachegen import CHANNEL_TABLE_MIN_TOKENS, CachegenCodec, preset_bins
from kvtier.codecs.rans import STATE_BYTES, decode_streams
from kvtier.codecs.rans_tables import PROB_BITS


def laplacian(tokens: int, dtype=torch.float16, layers: int = 4, channels: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(1, layers, 1, channels, generator=g) * 3 + 0.1  # channels differ, like real KV
    u = torch.rand(2, layers, tokens, channels, generator=g) - 0.5
    return (-spread * u.sign() * torch.log1p(-2 * u.abs())).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [64, 600])
def test_lossless_is_bit_exact(dtype, tokens):
    x = laplacian(tokens, dtype)
    x.view(torch.int16)[0, 1, 3, :4] = torch.tensor([0x7C00, 0xFC00, 0x7E01, -32768])  # inf, -inf, nan, -0
    out = torch.empty_like(x)
    CachegenCodec("lossless").decode(CachegenCodec("lossless").encode(x), out)
    assert torch.equal(out.view(torch.int16), x.view(torch.int16))


def test_lossless_refuses_float32_on_encode():
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        CachegenCodec("lossless").encode(torch.zeros(2, 1, 4, 8))


@pytest.mark.parametrize("level", [1, 2, 3])
def test_float32_beyond_fp16_range_is_refused(level):
    """A lossy level quantises float32 KV as its fp16 rounding: a value fp16 cannot hold is refused."""
    x = torch.zeros(2, 1, 4, 8)
    x[1, 0, 2, 3] = 1e6
    with pytest.raises(ValueError, match="finite"):
        CachegenCodec(level).encode(x)


# float32: quantised as its fp16 rounding (2**-11 of |x| <= scale) and decoded through fp16 (2**-11 more)
@pytest.mark.parametrize("dtype, rel", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8),
                                        (torch.float32, 2.0**-10)])
@pytest.mark.parametrize("tokens", [64, 600])
@pytest.mark.parametrize("level", [1, 2, 3])
def test_error_within_half_a_bin_of_each_token_scale(level, tokens, dtype, rel):
    x = laplacian(tokens, dtype, seed=level)
    data = CachegenCodec(level).encode(x)
    out = torch.empty_like(x)
    CachegenCodec(level).decode(data, out)
    rec = fmt.parse(data, (4, tokens, 32))
    scale = rec.scales.astype(np.float64)[..., None]
    m = q.levels(rec.bins)[:, :, None, None]
    # half a bin, plus the rounding of x_hat (|x_hat| <= scale) to out's dtype, plus float32 slack
    bound = scale / (2 * m) + scale * (rel + 1e-6)
    err = np.abs(x.double().numpy() - out.double().numpy())
    assert (err <= bound).all()
    assert (rec.bins == preset_bins(level, 4)).all()


def test_presets_follow_the_study():
    one, two, three = (preset_bins(level, 30) for level in (1, 2, 3))
    assert (one[0, :10] == 32).all() and (one[0, 10:] == 16).all()
    assert (one[1, :2] == 16).all() and (one[1, 2:] == 8).all()
    assert (two[0] == 32).all() and (two[1] == one[1]).all()
    assert (three == 32).all()
    small = preset_bins(1, 4)
    assert small[:, 0].tolist() == [32, 16] and small[:, 1:].max(axis=1).tolist() == [16, 8]
    with pytest.raises(ValueError):
        CachegenCodec(4)


@pytest.mark.parametrize("tokens", [CHANNEL_TABLE_MIN_TOKENS - 1, CHANNEL_TABLE_MIN_TOKENS])
def test_table_grouping_switches_at_the_threshold(tokens):
    rec = fmt.parse(CachegenCodec(2).encode(laplacian(tokens, layers=1, channels=8)), (1, tokens, 8))
    expected = fmt.BY_CHANNEL if tokens >= CHANNEL_TABLE_MIN_TOKENS else fmt.BY_LAYER
    assert rec.grouping == expected
    assert rec.tables.shape[0] == (16 if expected == fmt.BY_CHANNEL else 2)
    # per-channel tables are stored with 8-bit frequencies, per-layer ones with the coder's 12
    assert (rec.tables % 16 == 0).all() == (expected == fmt.BY_CHANNEL)


def _bits_under(symbols: np.ndarray, tables: np.ndarray) -> float:
    f = np.take_along_axis(tables.astype(np.float64), symbols.astype(np.intp), axis=1)
    return float(-np.log2(f / 2**PROB_BITS).sum())


def _empirical_bits(symbols: np.ndarray) -> float:
    total = 0.0
    for row in symbols:
        p = np.bincount(row) / row.size
        p = p[p > 0]
        total -= row.size * float((p * np.log2(p)).sum())
    return total


@pytest.mark.parametrize("level", ["lossless", 1, 2, 3])
@pytest.mark.parametrize("tokens", [64, 600])
def test_coded_size_within_two_percent_of_entropy(level, tokens):
    data = CachegenCodec(level).encode(laplacian(tokens))
    rec = fmt.parse(data, (4, tokens, 32))
    _, count = fmt.stream_layout(rec.level, rec.grouping, rec.shape)
    symbols = decode_streams(rec.streams, rec.lengths, rec.tables, count)
    under_tables = _bits_under(symbols, rec.tables) / 8
    stream_bytes = rec.lengths.sum()
    # Each stream also flushes its 4-byte final state: framing, counted with the header bytes.
    assert stream_bytes - STATE_BYTES * rec.lengths.size <= 1.02 * under_tables
    assert under_tables <= 1.02 * _empirical_bits(symbols) / 8
    overhead = len(data) - stream_bytes
    assert len(data) <= 1.02 * under_tables + overhead + STATE_BYTES * rec.lengths.size


def test_any_cachegen_codec_decodes_any_level():
    x = laplacian(64)
    out_a, out_b = torch.empty_like(x), torch.empty_like(x)
    CachegenCodec(1).decode(CachegenCodec(3).encode(x), out_a)
    CachegenCodec(3).decode(CachegenCodec(3).encode(x), out_b)
    assert torch.equal(out_a, out_b)


@pytest.mark.parametrize("out", [torch.empty(2, 4, 63, 32, dtype=torch.float16),
                                 torch.empty(2, 3, 64, 32, dtype=torch.float16),
                                 torch.empty(2, 4, 64, 32, dtype=torch.bfloat16),
                                 torch.empty(2, 4, 64, 32),
                                 torch.empty(2, 4, 32, 64, dtype=torch.float16).transpose(2, 3),
                                 torch.empty(4, 64, 32, dtype=torch.float16)])
@pytest.mark.parametrize("level", ["lossless", 2])
def test_out_of_another_shape_or_dtype_is_a_value_error(out, level):
    data = CachegenCodec(level).encode(laplacian(64))
    with pytest.raises(ValueError):
        CachegenCodec(level).decode(data, out)
