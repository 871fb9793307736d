"""Tests for kvtier/packed_keys.py (with native_keys.packed_keys / keys_of / bytes_at and
KeyTable.prefix_packed behind it): packed keys are TokenDatabase.keys's bytes laid end to end for
every input form, a PackedKeys indexes and slices as that list would, input the extension cannot
judge gets None (TokenDatabase.keys then answers or raises as before), and CacheEngine.lookup
answers the same with packed keys as without them, across the CPU and disk tiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from native_paths import without_native

from kvtier import native_keys
from kvtier.keys import ChunkKey, Namespace, TokenDatabase
from kvtier.packed_keys import PackedKeys, packed_keys
from kvtier.tiers.cpu import CpuTier

needs_native = pytest.mark.skipif(not native_keys.AVAILABLE, reason=f"native keys off: {native_keys.WHY_NOT}")
SIZE = 16


def db(salt: str = "", partial: bool = False) -> TokenDatabase:
    return TokenDatabase(Namespace("test/model", "layout", salt=salt), chunk_size=SIZE, save_partial=partial)


def packed_of(d: TokenDatabase, tokens) -> PackedKeys | None:
    return packed_keys(tokens, d.namespace_digest, d.chunk_size, d.save_partial)


def python_keys(d: TokenDatabase, tokens) -> list[ChunkKey]:
    with without_native(native_keys):
        return d.keys(tokens)


FORMS = {
    "list": lambda a: a.tolist(),
    "tuple": lambda a: tuple(a.tolist()),
    "int64 tensor": lambda a: torch.from_numpy(a),
    "int32 tensor": lambda a: torch.from_numpy(a % 2**31).int(),
    "int16 tensor": lambda a: torch.from_numpy(a % 2**15).short(),
    "int8 tensor": lambda a: torch.from_numpy(a % 2**7).to(torch.int8),
    "uint32 tensor": lambda a: torch.from_numpy(a.astype(np.uint32)),  # (numpy's view: not signed)
    "int64 tensor at an offset": lambda a: torch.from_numpy(np.concatenate([[7, 8, 9], a]))[3:],
    "int64 array": lambda a: a,
    "uint32 array": lambda a: a.astype(np.uint32),
    "uint16 array": lambda a: (a % 2**16).astype(np.uint16),
}


@needs_native
@settings(max_examples=150, deadline=None)
@given(n=st.sampled_from([0, 1, SIZE - 1, SIZE, SIZE + 1, 4 * SIZE, 5 * SIZE + 3]) | st.integers(0, 9 * SIZE),
       partial=st.booleans(), form=st.sampled_from(sorted(FORMS)), salt=st.text(max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_packed_keys_are_the_chunk_keys_laid_end_to_end(n, partial, form, salt, seed):
    tokens = FORMS[form](np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.int64))
    d = db(salt, partial)
    got, want = packed_of(d, tokens), python_keys(d, tokens)
    assert got is not None and got.packed == b"".join(want)
    assert len(got) == len(want) == n // SIZE + (partial and n % SIZE > 0)
    assert list(got) == want and all(type(k) is ChunkKey for k in got)


@needs_native
@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 9), index=st.integers(-12, 12), start=st.none() | st.integers(-12, 12),
       stop=st.none() | st.integers(-12, 12), step=st.sampled_from([None, 1, 2, 3, -1, -2]))
def test_a_packed_sequence_indexes_and_slices_as_its_list(n, index, start, stop, step):
    keys = db().keys(list(range(n * SIZE)))
    packed = PackedKeys(b"".join(keys))
    assert packed[start:stop:step] == keys[start:stop:step]
    if -n <= index < n:
        assert packed[index] == keys[index] and type(packed[index]) is ChunkKey
    else:
        with pytest.raises(IndexError):
            packed[index]


def test_packed_bytes_must_hold_whole_keys():
    with pytest.raises(ValueError, match="24 bytes"):
        PackedKeys(bytes(25))
    assert len(PackedKeys(b"")) == 0


BAD = {  # ids kvtier.keys refuses: the extension leaves each to it, in a key's chunk or past them
    "negative in a list": [3, -1],
    "negative past the last chunk": list(range(SIZE)) + [-1],
    "2**32 past the last chunk of a tensor": torch.tensor([*range(2 * SIZE), 2**32]),
    "2**32 in a list": [1, 2**32],
    "a bool list": [True, False],
    "a str in a list": ["1"],
    "negative int64 tensor": torch.tensor([3, -5]),
    "2**32 int64 tensor": torch.tensor([2**32]),
    "bool tensor": torch.tensor([True, False]),
    "float tensor": torch.tensor([1.0]),
    "2-D tensor": torch.zeros(2, 3, dtype=torch.int64),
    "float array": np.array([1.0]),
}
ODD = {  # valid ids in a form the extension does not read: kvtier.keys converts them
    "strided tensor": torch.arange(4 * SIZE)[::2],
    "strided array": np.arange(4 * SIZE)[::2],
    "big-endian array": np.arange(2 * SIZE).astype(">i8"),
    "range": range(2 * SIZE),
    "sparse tensor": torch.arange(2 * SIZE).to_sparse(),
}


@needs_native
@pytest.mark.parametrize("case", sorted(BAD) + sorted(ODD))
def test_input_the_extension_cannot_judge_has_no_packed_keys(case):
    tokens = BAD.get(case, ODD.get(case))
    assert packed_of(db(), tokens) is None
    if case in BAD:
        with pytest.raises(ValueError):
            db().keys(tokens)
    elif case != "sparse tensor":  # (kvtier.keys has never taken a sparse tensor)
        assert len(db().keys(tokens)) == 2


@needs_native
def test_a_negated_tensor_view_keys_as_its_values_or_not_at_all():
    # torch._neg_view keeps the memory and negates what it reads; the extension reads the memory
    # of a signed tensor (refusing the negative ids there), and numpy's path resolves the rest.
    ids = torch.arange(1000, 1000 + 3 * SIZE)
    d = db()
    for view, values in ((torch._neg_view(-ids), ids), (torch._neg_view(ids * 0), ids * 0),
                         (torch._neg_view(-ids.int()), ids.int())):
        assert view.is_neg() and torch.equal(view, values)
        want = python_keys(d, values.clone())
        assert len(want) == 3 and d.keys(view) == python_keys(d, view) == want
        got = packed_of(d, view)
        assert got is None or got.packed == b"".join(want)


def test_without_the_extension_there_are_no_packed_keys(monkeypatch):
    class Refusing:
        def __getattr__(self, name):
            raise AssertionError(f"the extension was called ({name}) while reported unavailable")

    monkeypatch.setattr(native_keys, "AVAILABLE", False)
    monkeypatch.setattr(native_keys, "_ext", Refusing())
    assert packed_of(db(), list(range(2 * SIZE))) is None


@needs_native
def test_keys_of_and_bytes_at_refuse_what_they_cannot_make():
    packed = b"".join(db().keys(list(range(3 * SIZE))))
    ext = native_keys._ext
    for start, stop in ((-1, 1), (2, 1), (0, 4)):
        with pytest.raises(ValueError):
            ext.keys_of(packed, start, stop, ChunkKey)
    with pytest.raises(ValueError):
        ext.keys_of(packed + b"x", 0, 1, ChunkKey)
    with pytest.raises(TypeError):
        ext.keys_of(packed, 0, 1, int)
    assert ext.keys_of(packed, 3, 3, ChunkKey) == []
    ids = torch.arange(5, dtype=torch.int64)
    view = ext.bytes_at(ids.data_ptr(), ids.numel() * 8)
    assert view.readonly and bytes(view) == ids.numpy().tobytes()
    with pytest.raises(ValueError):
        ext.bytes_at(0, 8)
    with pytest.raises(ValueError):
        ext.bytes_at(ids.data_ptr(), -1)


# -- the lookup ----------------------------------------------------------------------------------


def lookups(engine, layout) -> list:
    """Lookups of prompts whose chunks sit in host memory, on disk, in both or nowhere."""
    a, b = seeded_tokens(4 * CHUNK + 5, 1), seeded_tokens(3 * CHUNK, 2)
    engine.store(a, seeded_kv(layout, len(a), 1))
    engine.store(b, seeded_kv(layout, len(b), 2))
    engine.flush()
    answers = [engine.lookup(a), engine.lookup(a.tolist()), engine.lookup(b[:2 * CHUNK + 1])]
    engine.clear("cpu")
    assert engine.move(a[:2 * CHUNK], "cpu") == 2  # a: chunks 0-1 in host memory, 2-3 on disk only
    disk = engine.storage.lower
    answers += [engine.lookup(a), engine.lookup(a, only=[]), engine.lookup(a[:2 * CHUNK], only=[]),
                engine.lookup(a, only=disk),
                engine.lookup(b), engine.lookup(seeded_tokens(3 * CHUNK, 3)), engine.lookup([])]
    engine.clear("disk")
    return answers + [engine.lookup(a), engine.lookup(b)]


@needs_native
def test_the_lookup_answers_alike_with_packed_keys_and_without(make_engine, layout, monkeypatch, tmp_path):
    probed = []
    real = CpuTier.probe_prefix
    monkeypatch.setattr(CpuTier, "probe_prefix", lambda self, keys, below: probed.append(type(keys)) or
                        real(self, keys, below))
    packed = lookups(make_engine("cpu_disk", disk_path=tmp_path / "a"), layout)
    assert PackedKeys in probed
    with without_native(native_keys):
        plain = lookups(make_engine("cpu_disk", disk_path=tmp_path / "b"), layout)
    two, three, four = 2 * CHUNK, 3 * CHUNK, 4 * CHUNK
    assert packed == plain == [four, four, two, four, None, two, four, three, 0, 0, two, 0]
