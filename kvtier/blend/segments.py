"""Segments of a blended prompt and their position-independent chunk keys.

A retrieval-augmented prompt is a head (system prompt), passages, and a question. The same passage
comes back behind other heads and in other orders, so the prefix-chained keys of `kvtier.keys` miss
it. Here the prompt is cut on a separator given as token ids (never a string re-tokenised in
context: a separator tokenises differently next to other text, and the whole prompt became one
segment for LMCache users), and each segment's chunks are keyed on that segment's tokens alone:

    tokens:   [ head ......... ][SEP passage 1 .......][SEP passage 2 ...][SEP question ...]
    kind:       head (pos 0)     passage                passage             suffix
    keys:       prefix keys      chained from the per-namespace segment seed, on the segment's own
                (TokenDatabase)  tokens; the same whatever precedes the segment

- Every non-overlapping occurrence of the separator (scanned left to right) starts a segment and
  belongs to it. The head (before the first separator) sits at position 0, so prefix caching serves
  it; an empty head is omitted. The suffix (from the last separator on) is prefilled normally and
  never reused. No separator: one head, prefix caching only.
- Segment chunk `i` covers the segment's tokens `[i * chunk_size, (i + 1) * chunk_size)`; the
  partial tail is always keyed (passages rarely fill whole chunks). Spans carry prompt-absolute
  start/end so that callers index the prompt's KV directly.
- The segment seed is xxh3_128(namespace digest || a fixed tag): the chains start from a 16-byte
  seed where prefix chains start from the 8-byte namespace digest, so a segment key never equals a
  prefix key of the same tokens, and namespaces (model, geometry, dtype, TP, salt) stay apart.

Positions. Cached K is post-RoPE, so a segment chunk's record holds K rotated as if the segment
began at position 0 (its chunk `i` at segment positions `i * chunk_size ...`). On save, the K of a
segment found at `segment.start` is normalised by a shift of `-segment.start`
(`kvtier.blend.rope_shift.shift_keys`); on load it is moved to where the segment now sits by
`+segment.start`. V carries no position and is stored as computed.

Pure functions and a stateless class; side-effect free; safe from any thread. numpy and xxhash only
(no torch import), so the scheduler side can key segments cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import xxhash

from kvtier.keys import NAMESPACE_BYTES, ChunkKey, ChunkSpan, chained_digests, token_count, tokens_to_u32

if TYPE_CHECKING:
    import torch

SegmentKind = Literal["head", "passage", "suffix"]

# Part of every segment key (changing it orphans every stored segment): keeps segment chains apart
# from prefix chains, which are seeded with the bare namespace digest.
SEGMENT_SEED_TAG = b"kvtier.blend.segment.v1"


@dataclass(frozen=True, slots=True)
class Segment:
    """Tokens `[start, end)` of the prompt; `kind` says how the prompt's KV for them is obtained."""

    start: int
    end: int
    kind: SegmentKind

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def split_segments(tokens: Sequence[int] | torch.Tensor | np.ndarray,
                   separator: Sequence[int]) -> list[Segment]:
    """The prompt's segments in order: head (if not empty), passages, suffix; one head without a
    separator, none for an empty prompt. Raises ValueError for bad ids or an empty separator."""
    arr = tokens_to_u32(tokens)
    starts = separator_starts(arr, tokens_to_u32(separator))
    bounds = [0, *starts, len(arr)]
    segments = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        kind: SegmentKind = "head" if i == 0 else "suffix" if i == len(starts) else "passage"
        if end > start:
            segments.append(Segment(start, end, kind))
    return segments


def separator_starts(tokens: np.ndarray, separator: np.ndarray) -> list[int]:
    """Where each non-overlapping occurrence of `separator` starts, scanning left to right (u32
    arrays). Vectorised candidate check: a 128K-token prompt is one pass, not a Python loop."""
    m, n = len(separator), len(tokens)
    if m == 0:
        raise ValueError("the separator must hold at least one token id")
    if n < m:
        return []
    candidates = np.flatnonzero(tokens[: n - m + 1] == separator[0])
    # One id at a time over the surviving candidates: memory O(prompt), where a [candidates, m] window
    # is 64x the prompt for a hostile one made of the separator's first id.
    for j in range(1, m):
        candidates = candidates[tokens[candidates + j] == separator[j]]
    if len(candidates) < 2 or np.diff(candidates).min() >= m:
        return candidates.tolist()  # no two matches overlap
    starts: list[int] = []
    for c in candidates.tolist():
        # Overlapping matches (separator [7, 7] in 7 7 7) count once: the leftmost wins.
        if not starts or c >= starts[-1] + m:
            starts.append(c)
    return starts


class SegmentKeys:
    """Keys a segment's chunks on its own tokens. Stateless after construction; any thread."""

    def __init__(self, namespace_digest: bytes, chunk_size: int):
        if len(namespace_digest) != NAMESPACE_BYTES:
            raise ValueError(f"a namespace digest is {NAMESPACE_BYTES} bytes, got {len(namespace_digest)}")
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.namespace_digest = bytes(namespace_digest)
        self.chunk_size = chunk_size
        self.seed = xxhash.xxh3_128_digest(self.namespace_digest + SEGMENT_SEED_TAG)

    def spans(self, tokens: Sequence[int] | torch.Tensor | np.ndarray, segment: Segment) -> list[ChunkSpan]:
        """The chunk spans of `segment` of the prompt `tokens`: full chunks plus the partial tail,
        with prompt-absolute start/end. Raises ValueError for a segment outside the prompt."""
        total = token_count(tokens)
        if not 0 <= segment.start <= segment.end <= total:
            raise ValueError(f"segment [{segment.start}, {segment.end}) is outside the "
                             f"{total}-token prompt")
        # Only the segment's tokens are converted and checked: a planner asks for every passage of
        # a long prompt, and converting the whole prompt each time would be O(prompt x passages).
        arr = tokens_to_u32(tokens[segment.start : segment.end])
        n, size = segment.num_tokens, self.chunk_size
        ends = list(range(size, n + 1, size))
        if n % size:
            ends.append(n)
        raw = arr.tobytes()
        digests = chained_digests(raw, self.seed, ends)
        starts = [0, *ends][: len(ends)]
        return [ChunkSpan(ChunkKey(self.namespace_digest, digest), segment.start + s, segment.start + e)
                for digest, s, e in zip(digests, starts, ends, strict=True)]
