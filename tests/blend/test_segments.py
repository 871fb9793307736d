"""Tests for kvtier/blend/segments.py: splitting a prompt on separator ids into head / passages /
suffix, and the segments' position-independent chunk keys (never prefix keys, stable across processes)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvtier.blend.segments import SEGMENT_SEED_TAG, Segment, SegmentKeys, split_segments
from kvtier.keys import ChunkSpan, Namespace, TokenDatabase

NS = Namespace("test/model", "L2-H2-D16-float16")
CHUNK = 4
SEP = 9  # a one-id separator in the split tests


def keys(chunk_size: int = CHUNK, ns: Namespace = NS) -> SegmentKeys:
    return SegmentKeys(ns.digest(), chunk_size)


def split(tokens: list[int], separator: list[int]) -> list[tuple[int, int, str]]:
    return [(s.start, s.end, s.kind) for s in split_segments(tokens, separator)]


# --- splitting --------------------------------------------------------------------------------------


def test_a_one_id_separator_splits_head_passages_and_suffix():
    tokens = [1, 2, SEP, 3, 4, SEP, 5, SEP, 6, 7]
    assert split(tokens, [SEP]) == [(0, 2, "head"), (2, 5, "passage"), (5, 7, "passage"), (7, 10, "suffix")]


def test_a_several_id_separator_matches_only_the_whole_sequence():
    tokens = [1, 7, 8, 2, 7, 3, 8, 7, 8, 4]  # a lone 7 or 8 is not a separator
    assert split(tokens, [7, 8]) == [(0, 1, "head"), (1, 7, "passage"), (7, 10, "suffix")]


def test_a_separator_at_the_very_start_omits_the_empty_head():
    assert split([SEP, 1, SEP, 2], [SEP]) == [(0, 2, "passage"), (2, 4, "suffix")]
    assert split([7, 8, 1, 2], [7, 8]) == [(0, 4, "suffix")]


def test_adjacent_separators_make_a_passage_of_the_separator_alone():
    assert split([1, SEP, SEP, 2], [SEP]) == [(0, 1, "head"), (1, 2, "passage"), (2, 4, "suffix")]


def test_no_separator_is_one_head_segment_and_an_empty_prompt_none():
    assert split([1, 2, 3], [SEP]) == [(0, 3, "head")]
    assert split([1, 7, 2], [7, 8]) == [(0, 3, "head")]
    assert split([], [SEP]) == []


def test_a_separator_that_occurs_once_gives_head_and_suffix():
    assert split([1, 2, SEP, 3], [SEP]) == [(0, 2, "head"), (2, 4, "suffix")]
    assert split([1, 2, SEP], [SEP]) == [(0, 2, "head"), (2, 3, "suffix")]


def test_overlapping_occurrences_count_once_left_to_right():
    # 7 7 7: the separator [7, 7] matches at 1 and at 2; the leftmost wins, the next may start at 3.
    assert split([1, 7, 7, 7, 2, 7, 7], [7, 7]) == [(0, 1, "head"), (1, 5, "passage"), (5, 7, "suffix")]
    assert split([7, 7, 7, 7], [7, 7]) == [(0, 2, "passage"), (2, 4, "suffix")]
    assert split([1, 2, 1, 2, 1], [1, 2, 1]) == [(0, 5, "suffix")]


def reference_starts(tokens: list[int], separator: list[int]) -> list[int]:
    """The plain left-to-right scan the vectorised search must agree with."""
    starts, i, m = [], 0, len(separator)
    while i + m <= len(tokens):
        if tokens[i:i + m] == separator:
            starts.append(i)
            i += m
        else:
            i += 1
    return starts


@pytest.mark.parametrize("seed", range(50))
def test_splitting_agrees_with_a_plain_scan(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(3) for _ in range(rng.randrange(0, 40))]
    separator = [rng.randrange(3) for _ in range(rng.randrange(1, 4))]
    segments = split_segments(tokens, separator)
    starts = reference_starts(tokens, separator)
    assert [s.start for s in segments if s.kind != "head"] == starts
    # The segments tile the prompt, in order, and only the first can be a head.
    assert all(a.end == b.start for a, b in zip(segments, segments[1:]))
    assert sum(s.num_tokens for s in segments) == len(tokens)
    assert all(s.kind != "head" for s in segments[1:])
    if starts:
        assert segments[-1].kind == "suffix" and segments[-1].start == starts[-1]
    for s in segments:
        if s.kind != "head":
            assert tokens[s.start:s.start + len(separator)] == separator


def test_tensor_and_numpy_prompts_split_the_same():
    tokens = [1, 2, SEP, 3, 4, SEP, 5]
    expected = split_segments(tokens, [SEP])
    assert split_segments(torch.tensor(tokens), (SEP,)) == expected
    assert split_segments(np.array(tokens, dtype=np.int64), np.array([SEP])) == expected


@pytest.mark.parametrize("separator", [[], [-1], [2**32]])
def test_a_bad_separator_is_refused(separator):
    with pytest.raises(ValueError):
        split_segments([1, 2, 3], separator)


# --- keys -------------------------------------------------------------------------------------------


def prompt(*parts: list[int]) -> tuple[list[int], list[Segment]]:
    tokens = [t for part in parts for t in part]
    return tokens, split_segments(tokens, [SEP])


PASSAGE = [SEP, *range(100, 111)]  # 12 tokens: three chunks of 4
OTHER = [SEP, *range(200, 206)]


def passage_keys(tokens: list[int], segments: list[Segment], first: int) -> list[ChunkSpan]:
    segment = next(s for s in segments if s.start == tokens.index(first) - 1)
    return keys().spans(tokens, segment)


def test_the_same_passage_behind_other_heads_or_in_another_order_has_the_same_keys():
    a_tokens, a_segments = prompt([1, 2, 3], PASSAGE, OTHER, [SEP, 5, 6])
    b_tokens, b_segments = prompt([4, 4, 4, 4, 4, 4, 4], OTHER, PASSAGE, [SEP, 7])
    a = passage_keys(a_tokens, a_segments, 100)
    b = passage_keys(b_tokens, b_segments, 100)
    assert [s.key for s in a] == [s.key for s in b]
    assert a[0].start != b[0].start  # ... at other places in the prompt
    # Another passage, or the same one changed, keys differently.
    assert {s.key for s in a}.isdisjoint(s.key for s in passage_keys(a_tokens, a_segments, 200))


def test_spans_are_prompt_absolute_and_include_the_partial_tail():
    tokens, segments = prompt([1, 2, 3], [SEP, *range(100, 109)], [SEP, 5])  # a 10-token passage
    passage = segments[1]
    spans = keys().spans(tokens, passage)
    assert passage == Segment(3, 13, "passage")
    assert [(s.start, s.end) for s in spans] == [(3, 7), (7, 11), (11, 13)]
    assert spans[-1].num_tokens == 2
    assert all(s.key.namespace == NS.digest() for s in spans)


def test_keys_are_chained_within_the_segment_only():
    tokens, segments = prompt([1, 2, 3], PASSAGE, [SEP, 5])
    changed = list(tokens)
    changed[3 + 5] += 1  # a token of the passage's second chunk
    before, after = keys().spans(tokens, segments[1]), keys().spans(changed, segments[1])
    assert before[0].key == after[0].key
    assert before[1].key != after[1].key and before[2].key != after[2].key


def test_segment_keys_never_equal_prefix_keys_of_the_same_tokens():
    passage = PASSAGE
    segment_keys = {s.key for s in keys().spans(passage, Segment(0, len(passage), "passage"))}
    prefix_keys = TokenDatabase(NS, chunk_size=CHUNK, save_partial=True).keys(passage)
    assert len(segment_keys) == 3 and len(prefix_keys) == 3
    assert segment_keys.isdisjoint(prefix_keys)


def test_namespaces_and_chunk_sizes_key_apart():
    segment = Segment(0, len(PASSAGE), "passage")
    base = {s.key for s in keys().spans(PASSAGE, segment)}
    other_ns = Namespace("test/model", "L2-H2-D16-float16", salt="tenant")
    assert base.isdisjoint(s.key for s in keys(ns=other_ns).spans(PASSAGE, segment))
    by_five = keys(chunk_size=5).spans(PASSAGE, segment)
    assert [(s.start, s.end) for s in by_five] == [(0, 5), (5, 10), (10, 12)]


def test_an_empty_segment_has_no_spans_and_one_outside_the_prompt_is_refused():
    assert keys().spans([1, 2, 3], Segment(2, 2, "passage")) == []
    with pytest.raises(ValueError, match="outside"):
        keys().spans([1, 2, 3], Segment(2, 4, "suffix"))


def test_bad_construction_is_refused():
    with pytest.raises(ValueError):
        SegmentKeys(b"short", CHUNK)
    with pytest.raises(ValueError):
        SegmentKeys(NS.digest(), 0)


KEYS_SCRIPT = """
import json, sys
from kvtier.blend.segments import SegmentKeys, split_segments
from kvtier.keys import Namespace
tokens = list(range(1000, 1010)) + [9] + list(range(50, 60)) + [9, 1, 2]
segments = split_segments(tokens, [9])
spans = SegmentKeys(Namespace("test/model", "L2-H2-D16-float16").digest(), 4).spans(tokens, segments[1])
print(json.dumps([[s.key.hex(), s.start, s.end] for s in spans]))
"""


def test_keys_are_stable_across_processes():
    """Same keys in a fresh interpreter with another hash seed, and the same as pinned here: a change
    (of the seed tag, the chaining, the byte order) would orphan every stored segment chunk."""
    result = subprocess.run([sys.executable, "-c", KEYS_SCRIPT], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": "12345"}, timeout=60)
    theirs = json.loads(result.stdout)
    tokens = list(range(1000, 1010)) + [9] + list(range(50, 60)) + [9, 1, 2]
    ours = [[s.key.hex(), s.start, s.end] for s in keys().spans(tokens, split_segments(tokens, [9])[1])]
    assert theirs == ours
    assert [(start, end) for _, start, end in ours] == [(10, 14), (14, 18), (18, 21)]
    assert [key for key, _, _ in ours] == PINNED_KEYS
    assert SEGMENT_SEED_TAG == b"kvtier.blend.segment.v1"


PINNED_KEYS = ["82df9d24e2633cfd61121ed481b865ec28258b9e94403d10",
               "82df9d24e2633cfd8b9d404d0d6e81fb2f4439d93107520f",
               "82df9d24e2633cfd1fd1fc85b85d40f8d48cb58e58a3c628"]


# --- attacks (issue 14, H3) ---------------------------------------------------------------------------


def test_a_separator_at_the_very_end_is_a_suffix_of_itself():
    assert split([1, 2, SEP, 3, SEP], [SEP]) == [(0, 2, "head"), (2, 4, "passage"), (4, 5, "suffix")]
    assert split([SEP], [SEP]) == [(0, 1, "suffix")]


def test_a_prompt_of_64_passages_keys_each_on_its_own_tokens():
    bodies = [[1000 + i, 2000 + i, 3000 + i] for i in range(64)]
    tokens = [1, 2] + [t for body in bodies for t in (SEP, *body)] + [SEP, 5]
    segments = split_segments(tokens, [SEP])
    passages = [s for s in segments if s.kind == "passage"]
    assert len(passages) == 64 and all(s.num_tokens == 4 for s in passages)
    first_keys = [keys().spans(tokens, s)[0].key for s in passages]
    assert len(set(first_keys)) == 64
    # The same passages reversed and behind nothing key the same.
    reordered = [t for body in reversed(bodies) for t in (SEP, *body)] + [SEP, 5]
    again = [s for s in split_segments(reordered, [SEP]) if s.kind == "passage"]
    assert [keys().spans(reordered, s)[0].key for s in again] == first_keys[::-1]


def test_a_separator_past_any_vocabulary_never_matches():
    assert split([1, 2, 3, 4], [2**32 - 1]) == [(0, 4, "head")]
    with pytest.raises(ValueError):
        split([1, 2], [2**32])


def test_a_prompt_of_the_separators_first_id_splits_like_the_naive_scan():
    # Hostile: every token is the separator's first id, and a long separator; the scan stays exact.
    separator = [5] * 63 + [6]
    tokens = ([5] * 200 + [6]) * 3 + [5] * 100
    expected = [i for i in range(len(tokens) - 63) if tokens[i:i + 64] == separator]
    assert [s.start for s in split_segments(tokens, separator)][1:] == expected
