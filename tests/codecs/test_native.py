"""kvtier/codecs/native.py and csrc/: the C++ coder gives the numpy reference's bytes, symbols and
values exactly; corrupt streams are a CorruptRecord (never a crash or an over-read) under both
backends; the fallback and KVTIER_CACHEGEN_BACKEND; setup.py installs without the extension when its
build fails; the extension is built wherever a C++ compiler is."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.codecs import cachegen_format as fmt
from kvtier.codecs import native, rans
from kvtier.codecs.cachegen import CHANNEL_TABLE_MIN_TOKENS, CachegenCodec
from kvtier.codecs.rans_tables import PROB_SCALE, normalize
from kvtier.errors import ConfigError, CorruptRecord

ROOT = Path(__file__).resolve().parents[2]
needs_native = pytest.mark.skipif(not native.AVAILABLE, reason=native.WHY_NOT)


backend = native.using  # (hypothesis-safe, unlike monkeypatch)


def both(fn, *args, **kwargs):
    """(reference result, native result) of fn, each an ('ok', value) or ('error', type)."""
    out = []
    for name in ("reference", "native"):
        with backend(name):
            try:
                out.append(("ok", fn(*args, **kwargs)))
            except (CorruptRecord, ValueError) as exc:
                out.append(("error", CorruptRecord if isinstance(exc, CorruptRecord) else ValueError))
    return out


def kv(tokens: int, dtype=torch.float16, layers: int = 3, channels: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(1, layers, 1, channels, generator=g) * 3 + 0.1  # channels differ, like real KV
    u = torch.rand(2, layers, tokens, channels, generator=g) - 0.5
    return (-spread * u.sign() * torch.log1p(-2 * u.abs())).to(dtype)


def test_extension_is_built_wherever_a_compiler_is():
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        pytest.skip("no C++ compiler on PATH: the install is expected to fall back")
    assert native.AVAILABLE, native.WHY_NOT
    with backend("auto"):
        assert native.backend() == "native"


@st.composite
def streams_and_tables(draw):
    s = draw(st.integers(1, 11))
    n = draw(st.sampled_from([0, 1, 2, 3, draw(st.integers(0, 600))]))
    k = draw(st.sampled_from([1, 2, 7, 31, 256]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    skew = draw(st.sampled_from(["flat", "laplace", "one-hot", "rare"]))
    if skew == "flat":
        sym = rng.integers(0, k, (s, n))
    elif skew == "laplace":
        sym = np.clip(np.round(rng.laplace(0, draw(st.floats(0.05, 20)), (s, n)) + k // 2), 0, k - 1)
    elif skew == "one-hot":
        sym = np.full((s, n), k - 1)
    else:
        sym = np.where(rng.random((s, n)) < 0.003, 0, k - 1)
    sym = sym.astype(np.int64)
    counts = np.stack([np.bincount(row, minlength=k) for row in sym]) if n else np.zeros((s, k), np.int64)
    counts[:, 0] += counts.sum(axis=1) == 0
    bits = draw(st.sampled_from([12, 8]))  # 8: the per-channel tables' coarser grid (LUT shift 4)
    if k > 1 << bits:
        bits = 12
    return sym, normalize(counts, bits) << np.uint32(12 - bits)


@needs_native
@settings(max_examples=150, deadline=None)
@given(streams_and_tables())
def test_native_encode_and_decode_are_the_reference(case):
    sym, tables = case
    (r_ok, ref), (n_ok, nat) = both(native.encode_streams, sym, tables)
    assert r_ok == n_ok == "ok"
    assert nat.data == ref.data and np.array_equal(nat.lengths, ref.lengths)
    assert nat.lengths.dtype == np.int64
    (_, ref_sym), (_, nat_sym) = both(native.decode_streams, ref.data, ref.lengths, tables, sym.shape[1])
    np.testing.assert_array_equal(ref_sym, sym)
    np.testing.assert_array_equal(nat_sym, sym)
    assert nat_sym.dtype == np.uint8 and nat_sym.flags.c_contiguous


@needs_native
@pytest.mark.parametrize("group", [2, 3, 8, 16])
def test_grouped_decode_is_the_transposed_reference(group):
    rng = np.random.default_rng(group)
    sym = rng.integers(0, 9, (group * 5, 77))
    tables = normalize(np.stack([np.bincount(r, minlength=9) for r in sym]))
    coded = rans.encode_streams(sym, tables)
    (_, ref), (_, nat) = both(native.decode_streams, coded.data, coded.lengths, tables, 77, group=group)
    assert ref.shape == nat.shape == (5, 77, group)
    np.testing.assert_array_equal(nat, ref)
    np.testing.assert_array_equal(nat[:, :, 1], sym[1::group])


@needs_native
@pytest.mark.parametrize("sym, match", [(np.array([[0, 40]]), "out of range"),
                                        (np.array([[0, 3]]), "frequency 0"),
                                        (np.array([[-1, 0]]), "out of range")])
def test_uncodable_symbols_are_value_errors_in_both(sym, match):
    tables = np.zeros((1, 31), dtype=np.uint32)
    tables[0, 0], tables[0, 1] = PROB_SCALE - 1, 1
    for name in ("reference", "native"):
        with backend(name), pytest.raises(ValueError, match=match):
            native.encode_streams(sym, tables)


def _same_outcome(results):
    (r_kind, r_value), (n_kind, n_value) = results
    assert r_kind == n_kind, results
    if r_kind == "ok":
        np.testing.assert_array_equal(np.asarray(r_value), np.asarray(n_value))
    else:
        assert r_value is n_value is CorruptRecord


@needs_native
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams_and_tables(), st.data())
def test_corrupt_streams_fail_alike_and_never_over_read(case, data):
    sym, tables = case
    coded = rans.encode_streams(sym, tables)
    buf = bytearray(coded.data)
    lengths = coded.lengths.copy()
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "truncate", "extend", "length", "count"]))
        if how == "flip" and buf:
            buf[data.draw(st.integers(0, len(buf) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "truncate" and buf:
            cut = data.draw(st.integers(0, len(buf)))
            buf = buf[:cut]
            lengths[-1] -= len(coded.data) - cut
        elif how == "extend":
            buf += bytes(data.draw(st.binary(min_size=1, max_size=8)))
        elif how == "length":
            lengths[data.draw(st.integers(0, len(lengths) - 1))] += data.draw(st.integers(-5, 5))
    count = sym.shape[1] + data.draw(st.sampled_from([0, 0, 1, -1, 1000]))
    _same_outcome(both(native.decode_streams, bytes(buf), lengths, tables, max(count, 0)))


@needs_native
def test_bad_tables_and_counts_are_corrupt_in_both():
    tables = np.full((1, 4), PROB_SCALE // 4, dtype=np.uint32)
    coded = rans.encode_streams(np.array([[1, 2, 3]]), tables)
    for bad_tables in (tables - 1, tables.reshape(4, 1), tables.astype(np.float32)):
        _same_outcome(both(native.decode_streams, coded.data, coded.lengths, bad_tables, 3))
    _same_outcome(both(native.decode_streams, coded.data, coded.lengths, tables, 3, max_count=2))
    _same_outcome(both(native.decode_streams, coded.data, coded.lengths[:0], tables, 3))
    outcome = both(native.decode_streams, coded.data, coded.lengths, tables - 1, 3)
    assert outcome[1] == ("error", CorruptRecord)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [CHANNEL_TABLE_MIN_TOKENS - 1, CHANNEL_TABLE_MIN_TOKENS + 5])
@pytest.mark.parametrize("level", [1, 2, 3, "lossless"])
def test_cachegen_records_and_values_are_identical_under_both_backends(level, tokens, dtype):
    x = kv(tokens, dtype, seed=tokens)
    x[0, 0, 3] = 0  # an all-zero token (scale 0)
    x[1, 2, 5, :3] = torch.tensor([1e-7, -3e-8, 6e-8])  # scales in fp16's subnormals
    codec = CachegenCodec(level)
    (_, ref), (_, nat) = both(codec.encode, x)
    assert nat == ref
    outs = []
    for name in ("reference", "native"):
        out = torch.full_like(x, float("nan"))
        with backend(name):
            codec.decode(ref, out)
        outs.append(out.view(torch.int16))
    assert torch.equal(outs[0], outs[1])
    if level != "lossless":
        grouping = fmt.parse(ref, tuple(x.shape[1:])).grouping
        assert grouping == (fmt.BY_CHANNEL if tokens >= CHANNEL_TABLE_MIN_TOKENS else fmt.BY_LAYER)


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e5])
def test_values_cachegen_cannot_quantise_are_value_errors_in_both(bad):
    x = kv(8, torch.bfloat16)
    x[1, 1, 2, 3] = bad
    assert both(CachegenCodec(2).encode, x) == [("error", ValueError)] * 2


@needs_native
@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 3, "lossless"]), st.sampled_from([40, CHANNEL_TABLE_MIN_TOKENS]), st.data())
def test_corrupt_cachegen_records_fail_alike(level, tokens, data):
    x = kv(tokens, layers=2, channels=8, seed=1)
    record = bytearray(CachegenCodec(level).encode(x))
    for _ in range(data.draw(st.integers(1, 3))):
        if record and data.draw(st.booleans()):
            record[data.draw(st.integers(0, len(record) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        else:
            record = record[: data.draw(st.integers(0, len(record)))]

    def decode(payload: bytes) -> torch.Tensor:
        out = torch.zeros_like(x)
        CachegenCodec(level).decode(payload, out)
        return out.view(torch.int16)

    _same_outcome(both(decode, bytes(record)))


@needs_native
def test_native_decodes_on_several_threads_at_once():
    records = [CachegenCodec(2).encode(kv(CHANNEL_TABLE_MIN_TOKENS, seed=i)) for i in range(4)]

    def decode(record: bytes) -> torch.Tensor:
        out = torch.empty(2, 3, CHANNEL_TABLE_MIN_TOKENS, 16, dtype=torch.float16)
        CachegenCodec(2).decode(record, out)
        return out

    with backend("native"):
        alone = [decode(r) for r in records]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(decode, records * 4))
    assert all(torch.equal(a, b) for a, b in zip(alone * 4, together))


def test_missing_extension_falls_back_to_the_reference_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(native, "_ext", None)
    monkeypatch.setattr(native, "AVAILABLE", False)
    monkeypatch.setattr(native, "WHY_NOT", "the C++ extension is not built (test)")
    monkeypatch.setattr(native, "_logged", native.threading.Event())
    monkeypatch.delenv(native.ENV, raising=False)
    x = kv(16)
    with caplog.at_level(logging.INFO, logger=native.__name__):
        coded = [CachegenCodec(level).encode(x) for level in (1, 2, "lossless")]
    warnings = [r for r in caplog.records if r.name == native.__name__]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "not built (test)" in warnings[0].getMessage()
    monkeypatch.undo()
    if native.AVAILABLE:  # the same bytes as the extension gives
        with backend("native"):
            assert coded == [CachegenCodec(level).encode(x) for level in (1, 2, "lossless")]


def test_backend_variable_is_validated(monkeypatch):
    monkeypatch.setenv(native.ENV, "fast")
    with pytest.raises(ConfigError, match=native.ENV):
        native.backend()
    with pytest.raises(ConfigError, match=native.ENV):
        CachegenCodec(2).encode(kv(4))
    monkeypatch.setenv(native.ENV, " Reference ")
    assert native.backend() == "reference"
    monkeypatch.setenv(native.ENV, "native")
    monkeypatch.setattr(native, "AVAILABLE", False)
    with pytest.raises(ConfigError, match=f"{native.ENV}=native"):
        native.backend()


def _setup_module():
    spec = importlib.util.spec_from_file_location("kvtier_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


def test_setup_installs_without_the_extension_when_its_build_fails(capsys):
    setup = _setup_module()

    class FailingBuild:
        def run(self):
            raise OSError("c++: command not found")

        def get_outputs(self):
            return ["kvtier/codecs/_cachegen_native.so"]

    build = setup.optional_build(FailingBuild)()
    build.extensions = ["the extension"]
    build.run()
    assert build.extensions == [] and build.get_outputs() == []
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "was not built: OSError: c++: command not found" in err


def test_setup_builds_portable_cpu_only_extensions():
    setup = _setup_module()
    args = setup.build_args()
    assert [ext.name for ext in args["ext_modules"]] == [
        "kvtier.codecs._cachegen_native", "kvtier._native_keys", "kvtier.platforms._paged_copy"]
    for ext in args["ext_modules"]:
        assert not any("cuda" in str(x).lower() for x in ext.libraries + ext.include_dirs + ext.sources)
        assert not any(flag.startswith(("-march", "-mtune", "-mavx")) for flag in ext.extra_compile_args)
        assert all((ROOT / src).is_file() for src in ext.sources)
