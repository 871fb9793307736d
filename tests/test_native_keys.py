"""Tests for kvtier/native_keys.py (and csrc/native_keys.cpp): the C keys equal the Python path's bit
for bit, bad input is judged by Python alone, and kvtier falls back to Python when the extension is
missing, cannot load XXH3 or disagrees with xxhash at import."""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from native_paths import without_native

from kvtier import keys as keys_module
from kvtier import native_keys
from kvtier.keys import ChunkKey, Namespace, TokenDatabase, chained_digests, tokens_to_u32

needs_native = pytest.mark.skipif(not native_keys.AVAILABLE, reason=f"native keys off: {native_keys.WHY_NOT}")
SIZE = 16
NS = Namespace("test/model", "layout")


def python_path():
    """The Python path, as kvtier runs without the extension."""
    return without_native(native_keys)


def both_paths(fn):
    """(fn() on the native path, fn() on the Python path)."""
    native = fn()
    with python_path():
        return native, fn()


def db(salt: str = "", size: int = SIZE, partial: bool = False) -> TokenDatabase:
    return TokenDatabase(Namespace("test/model", "layout", salt=salt), chunk_size=size, save_partial=partial)


FORMS = {
    "list": lambda a: a.tolist(),
    "int64 tensor": lambda a: torch.from_numpy(a.astype(np.int64)),
    "int32 tensor": lambda a: torch.from_numpy(a.astype(np.int32)),
    "int64 array": lambda a: a.astype(np.int64),
    "int32 array": lambda a: a.astype(np.int32),
    "uint32 array": lambda a: a.astype(np.uint32),
    "tuple": lambda a: tuple(a.tolist()),
}


@needs_native
@settings(max_examples=150, deadline=None)
@given(n=st.sampled_from([0, 1, SIZE - 1, SIZE, SIZE + 1, 3 * SIZE, 5 * SIZE + 7]) | st.integers(0, 9 * SIZE),
       partial=st.booleans(), form=st.sampled_from(sorted(FORMS)), salt=st.text(max_size=8),
       seed=st.integers(0, 2**32 - 1), top=st.sampled_from([2**31 - 1, 2**32 - 1]))
def test_native_keys_equal_the_python_path(n, partial, form, salt, seed, top):
    ids = np.random.default_rng(seed).integers(0, top, n, endpoint=True, dtype=np.int64)
    if "int32" in form:
        ids %= 2**31
    tokens = FORMS[form](ids)
    native, python = both_paths(lambda: db(salt, partial=partial).keys(tokens))
    assert native == python
    assert len(native) == n // SIZE + (partial and n % SIZE > 0)
    assert all(type(k) is ChunkKey and hash(k) == hash(bytes(k)) for k in native)


@needs_native
def test_a_memo_hit_extends_with_native_keys_as_python_would():
    ids = np.random.default_rng(1).integers(0, 50_000, 10 * SIZE + 5)
    base, longer = ids[:6 * SIZE + 3], ids
    for partial in (False, True):
        native_db = db(partial=partial)
        native_db.keys(torch.from_numpy(base))
        got = native_db.keys(longer.tolist())  # chunks 0-5 from the memo, the rest hashed in C
        with python_path():
            assert got == db(partial=partial).keys(longer.tolist())


@needs_native
def test_native_keys_are_chunk_keys_that_behave_as_the_python_ones():
    key = db().keys(list(range(SIZE)))[0]
    made = ChunkKey(key.namespace, key.digest)
    assert type(key) is ChunkKey and key == made and hash(key) == hash(made) and {made: 1}[key] == 1
    assert key.hex() == made.hex() and repr(key) == repr(made) and len(key.to_bytes()) == 24
    assert not gc.is_tracked(key)  # no references to follow: left out of the cycle collector
    del key
    gc.collect()


@needs_native
@settings(max_examples=100, deadline=None)
@given(seed=st.binary(max_size=20), start=st.integers(0, 40), cuts=st.lists(st.integers(0, 90), max_size=8),
       ordered=st.booleans(), form=st.sampled_from([list, tuple, range]))
def test_native_chained_digests_equal_the_python_loop(seed, start, cuts, ordered, form):
    raw = np.arange(7, 7 + 64, dtype="<u4").tobytes()
    ends = [start + c for c in (sorted(cuts) if ordered else cuts)]  # unordered or past raw: Python's
    if form is range:
        ends = range(start, start + 64, 16)
    else:
        ends = form(ends)
    native, python = both_paths(lambda: chained_digests(memoryview(raw), seed, ends, start))
    assert native == python


def test_chunk_keys_refuses_a_key_type_not_laid_out_as_bytes():
    if not native_keys.AVAILABLE:
        pytest.skip(native_keys.WHY_NOT)

    class WithDict(bytes):
        pass

    raw = bytes(4 * SIZE)
    for bad in (WithDict, int, "ChunkKey"):
        with pytest.raises(TypeError, match="key_type"):
            native_keys.chunk_keys(raw, 0, bytes(8), bytes(8), SIZE, False, bad)
    with pytest.raises(ValueError, match="chunk boundary"):
        native_keys.chunk_keys(raw, 3, bytes(8), bytes(8), SIZE, False, ChunkKey)


@needs_native
def test_large_prompts_hash_without_the_gil_on_several_threads_alike():
    prompts = [np.random.default_rng(i).integers(0, 2**32, 64 * 1024, dtype=np.int64) for i in range(4)]
    with python_path():
        want = [db(size=256).keys(p) for p in prompts]
    got: dict[int, list] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, db(size=256).keys(prompts[i])))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(4)] == want


# --- input judged by Python alone ---------------------------------------------------------------


def bad_inputs():
    return {
        "negative in a list": [1, -1, 2],
        "2**32 in a list": [1, 2**32],
        "a float in a list": [1, 2.0],
        "a str in a list": ["1"],
        "negative int64 tensor": torch.tensor([3, -5]),
        "2**32 int64 tensor": torch.tensor([2**32]),
        "negative int32 array": np.array([1, -1], dtype=np.int32),
        "2**32 uint64 array": np.array([2**32], dtype=np.uint64),
        "bool tensor": torch.tensor([True, False]),
        "bool array": np.array([True, False]),
        "bool list": [True, False, True],
        "bool tuple": (True, False),
        "2-D array": np.zeros((2, 3), dtype=np.int64),
        "float array": np.array([1.0]),
    }


@pytest.mark.parametrize("case", sorted(bad_inputs()))
def test_bad_ids_raise_the_same_value_error_on_both_paths(case):
    tokens = bad_inputs()[case]
    errors = []
    for path in (contextlib.nullcontext, python_path):
        with path(), pytest.raises(ValueError) as err:
            db(size=1).keys(tokens)
        errors.append(str(err.value))
    assert errors[0] == errors[1]


def test_a_list_of_bools_is_refused_and_a_list_of_ints_with_bools_taken_as_numpy_would():
    # Regression: array('I') took a list of bools as ids 0/1, where bool tensors and arrays are refused.
    for path in (contextlib.nullcontext, python_path):
        with path():
            with pytest.raises(ValueError, match="bools"):
                tokens_to_u32([True, False])
            with pytest.raises(ValueError, match="bools"):
                db().keys([False] * (2 * SIZE))
            assert tokens_to_u32([5, True, 0]).tolist() == np.asarray([5, True, 0]).tolist() == [5, 1, 0]
            assert tokens_to_u32([]).tolist() == []


def test_range_errors_keep_their_wording():
    for path in (contextlib.nullcontext, python_path):
        with path():
            with pytest.raises(ValueError, match=r"token ids must lie in \[0, 2\*\*32\)"):
                tokens_to_u32(torch.tensor([0, 2**32]))
            with pytest.raises(ValueError, match=r"integer token ids in \[0, 2\*\*32\)"):
                tokens_to_u32([0, -1])


@needs_native
def test_less_common_inputs_key_alike_on_both_paths():
    ids = np.random.default_rng(3).integers(0, 60_000, 5 * SIZE)
    # Big-endian, strided, a range: left to Python by the extension; 16-bit and uint64: taken by it.
    others = [ids.astype(">i8"), np.repeat(ids, 2)[::2], torch.from_numpy(np.repeat(ids, 2))[::2],
              range(5 * SIZE), ids.astype(np.uint16), ids.astype(np.uint64),
              torch.from_numpy(ids % 30_000).short()]
    for tokens in others:
        native, python = both_paths(lambda t=tokens: db().keys(t))
        assert native == python and len(native) == 5


# --- falling back -------------------------------------------------------------------------------


class Refusing:
    def __getattr__(self, name):
        raise AssertionError(f"the extension was called ({name}) while reported unavailable")


def test_unavailable_extension_is_never_called_and_python_gives_the_pinned_keys(monkeypatch):
    monkeypatch.setattr(native_keys, "AVAILABLE", False)
    monkeypatch.setattr(native_keys, "_ext", Refusing())
    ns_digest = Namespace("test/model", "layout").digest()
    ids = list(range(100, 100 + 2 * SIZE))
    prev, want = ns_digest, []
    for start in (0, SIZE):
        prev = xxhash.xxh3_128_digest(prev + np.asarray(ids[start:start + SIZE], dtype="<u4").tobytes())
        want.append(ChunkKey(ns_digest, prev))
    assert db().keys(ids) == db().keys(torch.tensor(ids)) == want
    raw = np.asarray(ids, "<u4").tobytes()
    assert chained_digests(raw, ns_digest, [SIZE, 2 * SIZE]) == [k.digest for k in want]
    assert keys_module.tokens_to_u32(ids).tolist() == ids


@needs_native
def test_self_test_reports_an_extension_that_disagrees():
    class Corrupt:
        def __getattr__(self, name):
            return getattr(native_keys._ext, name)

        def digests(self, raw, seed, ends, start):
            got = native_keys._ext.digests(raw, seed, ends, start)
            return got and [bytes(16)] + got[1:]

    assert native_keys.self_test(native_keys._ext) == ""
    assert "differ" in native_keys.self_test(Corrupt())


_CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")
import xxhash
{break_it}
from kvtier import native_keys
from kvtier.keys import Namespace, TokenDatabase
print("AVAILABLE", native_keys.AVAILABLE)
print("KEYS", [k.hex() for k in TokenDatabase(Namespace("m", "l"), chunk_size=4).keys(list(range(9)))])
"""
BREAKS = {
    "mismatch": "real = xxhash.xxh3_128_digest\nxxhash.xxh3_128_digest = lambda b: real(b + b'x')",
    "load error": "xxhash._xxhash.__file__ = '/nonexistent/_xxhash.so'",
}


@needs_native
@pytest.mark.parametrize("how", sorted(BREAKS))
def test_a_failed_self_test_or_load_falls_back_to_python_with_one_info_line(how):
    want = [k.hex() for k in TokenDatabase(Namespace("m", "l"), chunk_size=4).keys(list(range(9)))]
    child = subprocess.run([sys.executable, "-c", _CHILD.format(break_it=BREAKS[how])], capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert "AVAILABLE False" in lines
    info = "kvtier.native_keys INFO chunk keys computed in Python"
    assert sum(line.startswith(info) for line in lines) == 1
    if how == "load error":  # xxhash itself still works, so the keys are the usual ones
        assert f"KEYS {want}" in lines


# --- the build (setup.py) -----------------------------------------------------------------------


def _setup_module():
    spec = importlib.util.spec_from_file_location("kvtier_setup", Path(__file__).parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only as __main__
    return module


def test_setup_builds_the_keys_extension_without_torch_and_portable():
    setup = _setup_module()
    exts = {ext.name: ext for ext in setup.build_args()["ext_modules"]}
    keys = exts["kvtier._native_keys"]
    assert keys.sources == ["csrc/native_keys.cpp", "csrc/key_table.cpp", "csrc/checksum_copy.cpp",
                            "csrc/record_read.cpp"]
    assert all((Path(setup.__file__).parent / source).is_file() for source in keys.sources)
    assert not any("torch" in str(x) or "cuda" in str(x).lower() for x in keys.libraries + keys.include_dirs)
    assert not any(flag.startswith(("-march", "-mtune", "-mavx")) for flag in keys.extra_compile_args)


def test_setup_ships_the_extensions_that_built_when_one_fails(capsys):
    setup = _setup_module()

    class Ext:
        def __init__(self, name):
            self.name = name

    class HalfFailingBuild:
        def build_extensions(self):
            if self.extensions[0].name == setup.KEYS_EXTENSION:
                raise RuntimeError("Error compiling objects for extension")

    build = setup.optional_build(HalfFailingBuild)()
    build.extensions = [Ext(setup.EXTENSION), Ext(setup.KEYS_EXTENSION)]
    build.build_extensions()
    assert [ext.name for ext in build.extensions] == [setup.EXTENSION]
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "chunk key builder (kvtier._native_keys) was not built" in err
    assert "computes chunk keys in Python" in err


# -- review: index-like arguments, overflowing starts, copies ---------------------------------------


def test_numpy_integer_arguments_give_the_python_paths_keys(monkeypatch):
    """start, chunk_size and the like may be any index-like integer (a numpy one), as in Python."""
    tokens = list(range(10))
    native = TokenDatabase(NS, np.int64(4), True).keys(tokens)
    native_digests = chained_digests(bytes(40), bytes(8), [4, 8], np.int64(0))
    monkeypatch.setattr(native_keys, "AVAILABLE", False)
    assert native == TokenDatabase(NS, 4, True).keys(tokens)
    assert native_digests == chained_digests(bytes(40), bytes(8), [4, 8], 0)


@needs_native
def test_a_start_near_the_largest_index_hashes_like_python():
    """Ends are measured from `start` (no start + tokens sum to overflow); a negative start is
    left to the Python loop."""
    big, raw = sys.maxsize, bytes(range(40))
    want = [xxhash.xxh3_128_digest(bytes(8) + raw[:20])]
    assert native_keys.digests(raw, bytes(8), [big - 5], big - 10) == want
    assert native_keys.digests(raw, bytes(8), [big], big - 10) == [xxhash.xxh3_128_digest(bytes(8) + raw)]
    assert native_keys.digests(raw, bytes(8), [big], big - 11) is None  # past the 10 tokens of raw
    assert native_keys.digests(raw, bytes(8), [4], -4) is None


def test_chunk_keys_copy_to_equal_keys():
    for key in TokenDatabase(NS, 4).keys(list(range(8))):
        for twin in (copy.copy(key), copy.deepcopy(key)):
            assert twin == key and type(twin) is ChunkKey and twin.digest == key.digest
