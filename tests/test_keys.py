"""Tests for kvtier/keys.py: chunking, the chained prefix hash, namespaces, input forms, stability."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import xxhash

from kvtier.keys import KEY_BYTES, ChunkKey, Namespace, TokenDatabase, tokens_to_u32
from kvtier.layout import KVLayout

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)
NS = Namespace.for_layout("test/model", LAYOUT)


def db(chunk_size: int = 256, save_partial: bool = False, ns: Namespace = NS) -> TokenDatabase:
    return TokenDatabase(ns, chunk_size=chunk_size, save_partial=save_partial)


def tokens(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 128_000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- chunking -------------------------------------------------------------------------------------


def test_default_chunk_size_is_256():
    assert TokenDatabase(NS).chunk_size == 256
    assert TokenDatabase(NS).save_partial is False


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, []),
        (255, []),
        (256, [(0, 256)]),
        (257, [(0, 256)]),
        (511, [(0, 256)]),
        (512, [(0, 256), (256, 512)]),
        (700, [(0, 256), (256, 512)]),
    ],
)
def test_full_chunks_only_by_default(n, expected):
    spans = db().spans(tokens(n))
    assert [(s.start, s.end) for s in spans] == expected
    assert all(s.num_tokens == 256 for s in spans)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, []),
        (5, [(0, 5)]),
        (256, [(0, 256)]),
        (300, [(0, 256), (256, 300)]),
        (512, [(0, 256), (256, 512)]),
    ],
)
def test_partial_tail_only_with_save_partial(n, expected):
    spans = db(save_partial=True).spans(tokens(n))
    assert [(s.start, s.end) for s in spans] == expected


def test_full_chunk_keys_do_not_depend_on_save_partial():
    toks = tokens(600)
    full = db().keys(toks)
    partial = db(save_partial=True).keys(toks)
    assert len(full) == 2 and len(partial) == 3
    assert partial[:2] == full


def test_partial_tail_key_differs_from_the_full_chunk_it_grows_into():
    toks = tokens(512)
    tail = db(save_partial=True).keys(toks[:300])[1]
    full = db().keys(toks)[1]
    assert tail != full


def test_limit_truncates_before_chunking():
    toks = tokens(1000)
    assert db().spans(toks, limit=600) == db().spans(toks[:600])
    assert db(save_partial=True).spans(toks, limit=600) == db(save_partial=True).spans(toks[:600])
    assert db().spans(toks, limit=5000) == db().spans(toks)
    assert db().spans(toks, limit=0) == []


def test_negative_limit_raises_instead_of_yielding_a_span_ending_at_minus_one():
    # Regression: min(-1, n) = -1 made save_partial emit ChunkSpan(start=0, end=-1).
    with pytest.raises(ValueError, match="limit"):
        db(chunk_size=4, save_partial=True).spans(list(range(10)), limit=-1)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        TokenDatabase(NS, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        TokenDatabase(NS, chunk_size=-256)


# --- the chained prefix property ------------------------------------------------------------------


def test_shared_prefix_gives_shared_leading_keys():
    base = tokens(1024, seed=1)
    other = base[:512] + tokens(512, seed=2)
    a, b = db().keys(base), db().keys(other)
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]


@pytest.mark.parametrize("i", [0, 255, 256, 600, 1023])
def test_changing_token_i_changes_its_chunk_and_every_later_key_only(i):
    base = tokens(1024, seed=3)
    changed = list(base)
    changed[i] = (changed[i] + 1) % 128_000
    a, b = db().keys(base), db().keys(changed)
    chunk = i // 256
    assert a[:chunk] == b[:chunk]
    assert all(x != y for x, y in zip(a[chunk:], b[chunk:]))


def test_same_chunk_content_at_different_positions_gets_different_keys():
    chunk = tokens(256, seed=4)
    keys = db().keys(chunk * 3)
    assert len(set(keys)) == 3


def test_keys_follow_the_documented_scheme():
    # prefix_hash[-1] = namespace digest; prefix_hash[i] = xxh3_128(prefix_hash[i-1] || u32le chunk i)
    toks = tokens(600, seed=5)
    ns_digest = xxhash.xxh3_64_digest("\x1f".join(["test/model", LAYOUT.describe(), "0", "1", ""]).encode())
    prev, expected = ns_digest, []
    for start in (0, 256):
        prev = xxhash.xxh3_128_digest(prev + np.asarray(toks[start:start + 256], dtype="<u4").tobytes())
        expected.append(ChunkKey(ns_digest, prev))
    assert db().keys(toks) == expected


# Golden values, computed once from the current scheme and hard-coded on purpose: if this test
# fails, the hash scheme changed and every cache written before the change silently becomes a miss
# (or, worse, mismatched across a fleet). Change these only together with a deliberate format bump.
GOLDEN_NS = Namespace.for_layout("golden/model", KVLayout(2, 1, 4, torch.float16))
GOLDEN_KEYS = [
    "932c871b03ee3825754260128ea0a372326502f130b6143a",
    "932c871b03ee382573cbbd7a237723ab4f2fdb54611f4792",
]


def test_golden_keys_pin_the_hash_scheme():
    keys = TokenDatabase(GOLDEN_NS, chunk_size=4).keys([1, 2, 3, 4, 5, 6, 7, 8])
    assert [k.hex() for k in keys] == GOLDEN_KEYS


# --- namespaces -----------------------------------------------------------------------------------


NAMESPACE_VARIANTS = {
    "model_id": Namespace.for_layout("other/model", LAYOUT),
    "layers": Namespace.for_layout("test/model", KVLayout(5, 2, 8, torch.float16)),
    "kv_heads": Namespace.for_layout("test/model", KVLayout(4, 4, 8, torch.float16)),
    "head_dim": Namespace.for_layout("test/model", KVLayout(4, 2, 16, torch.float16)),
    "dtype": Namespace.for_layout("test/model", KVLayout(4, 2, 8, torch.bfloat16)),
    "tp_rank": Namespace.for_layout("test/model", LAYOUT, tp_rank=1, tp_size=2),
    "tp_size": Namespace.for_layout("test/model", LAYOUT, tp_rank=0, tp_size=2),
    "salt": Namespace.for_layout("test/model", LAYOUT, salt="lora-7"),
}


@pytest.mark.parametrize("field", list(NAMESPACE_VARIANTS))
def test_namespace_field_separates_keys(field):
    toks = tokens(512, seed=6)
    base = db().keys(toks)
    other = db(ns=NAMESPACE_VARIANTS[field]).keys(toks)
    assert NAMESPACE_VARIANTS[field].digest() != NS.digest()
    assert all(a != b for a, b in zip(base, other))
    assert all(a.namespace != b.namespace and a.digest != b.digest for a, b in zip(base, other))


def test_all_namespace_variants_are_pairwise_distinct():
    digests = [ns.digest() for ns in NAMESPACE_VARIANTS.values()] + [NS.digest()]
    assert len(set(digests)) == len(digests)


def test_namespace_fields_do_not_run_together():
    # "ab" + "c" must not equal "a" + "bc": the fields are joined with a separator.
    assert Namespace("ab", "c").digest() != Namespace("a", "bc").digest()
    assert Namespace("m", "l", salt="1").digest() != Namespace("m", "l", tp_size=11).digest()


def test_block_size_does_not_enter_the_namespace():
    # block_size is how the serving engine pages KV, not what the KV is.
    other = KVLayout(4, 2, 8, torch.float16, block_size=32)
    assert Namespace.for_layout("test/model", other) == NS


def test_every_key_carries_the_namespace_digest():
    assert {k.namespace for k in db().keys(tokens(1024))} == {NS.digest()}


# --- input forms ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8, torch.uint32])
def test_torch_int_tensors_give_the_same_keys_as_a_list(dtype):
    toks = [t % 200 for t in tokens(600, seed=7)]  # fits every dtype above
    expected = db(save_partial=True).keys(toks)
    assert len(expected) == 3
    assert db(save_partial=True).keys(torch.tensor(toks, dtype=dtype)) == expected


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32, np.uint64, np.uint16, ">u4", ">i8"])
def test_numpy_arrays_give_the_same_keys_as_a_list(dtype):
    toks = [t % 60_000 for t in tokens(600, seed=8)]
    expected = db(save_partial=True).keys(toks)
    assert db(save_partial=True).keys(np.asarray(toks, dtype=dtype)) == expected


def test_strided_u32_tokens_hash_like_contiguous():
    # Regression: astype(copy=False) kept a strided u32 view, and hashing its bytes raised TypeError.
    arr = np.arange(1200, dtype=np.uint32)
    expected = db().keys(arr[::2].tolist())
    assert len(expected) == 2
    assert db().keys(arr[::2]) == expected
    assert db().keys(torch.from_numpy(arr)[::2]) == expected
    assert db().keys(torch.arange(1200, dtype=torch.int64)[::2]) == expected


def test_tensor_clone_and_range_give_the_same_keys():
    t = torch.arange(300, dtype=torch.int64)
    assert db().keys(t) == db().keys(t.clone()) == db().keys(range(300))


def test_max_u32_token_is_accepted():
    assert tokens_to_u32([0, 2**32 - 1]).tolist() == [0, 2**32 - 1]
    assert tokens_to_u32([]).dtype == np.dtype("<u4")


@pytest.mark.parametrize(
    "bad",
    [
        [1, -1, 2],
        [2**32],
        [2**64],
        [1.0, 2.0],
        [[1, 2], [3, 4]],
        np.array([1.5, 2.5]),
        np.zeros((2, 3), dtype=np.int64),
        np.array([True, False]),
        np.array(7),
        torch.tensor([1, -5]),
        torch.tensor([2**32], dtype=torch.int64),
        torch.tensor([1.0, 2.0]),
        torch.tensor([1, 2], dtype=torch.bfloat16),
        torch.tensor([True, False]),
        torch.zeros((2, 3), dtype=torch.int64),
        ["1", "2"],
    ],
)
def test_bad_token_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        db(chunk_size=1).keys(bad)


# --- ChunkKey -------------------------------------------------------------------------------------


def test_chunk_key_bytes_and_hex_round_trip():
    key = db().keys(tokens(256))[0]
    raw = key.to_bytes()
    assert len(raw) == KEY_BYTES == 24
    assert raw[:8] == key.namespace and raw[8:] == key.digest
    assert ChunkKey.from_bytes(raw) == key
    assert ChunkKey.from_bytes(memoryview(raw)) == key
    assert ChunkKey.from_bytes(bytearray(raw)) == key
    assert key.hex() == raw.hex() == str(key)
    assert ChunkKey.from_hex(key.hex()) == key
    assert hash(ChunkKey.from_hex(key.hex())) == hash(key)


@pytest.mark.parametrize("n", [0, 23, 25])
def test_chunk_key_from_bytes_rejects_wrong_length(n):
    with pytest.raises(ValueError, match="24 bytes"):
        ChunkKey.from_bytes(b"\0" * n)


def test_chunk_key_from_hex_rejects_bad_text():
    with pytest.raises(ValueError):
        ChunkKey.from_hex("zz" * 24)
    with pytest.raises(ValueError):
        ChunkKey.from_hex("00" * 23)


# --- stability across processes -------------------------------------------------------------------

_CHILD = """
import json, torch
from kvtier.keys import Namespace, TokenDatabase
from kvtier.layout import KVLayout
ns = Namespace.for_layout("test/model", KVLayout(4, 2, 8, torch.float16), tp_rank=1, tp_size=2, salt="s")
db = TokenDatabase(ns, chunk_size=256, save_partial=True)
print(json.dumps([k.hex() for k in db.keys(list(range(1000, 1700)))]))
"""


def test_keys_are_identical_across_processes_and_hash_seeds():
    ns = Namespace.for_layout("test/model", LAYOUT, tp_rank=1, tp_size=2, salt="s")
    here = [k.hex() for k in TokenDatabase(ns, save_partial=True).keys(list(range(1000, 1700)))]
    assert len(here) == 3
    # Both children run at once: each pays the torch import, so this keeps the test near 2 s.
    children = [subprocess.Popen([sys.executable, "-c", _CHILD], env={**os.environ, "PYTHONHASHSEED": seed},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for seed in ("0", "12345")]
    results = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        results.append(json.loads(out))
    assert results[0] == results[1] == here
