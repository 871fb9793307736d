"""Scheduler side of CacheBlend: which passages of a prompt kvtier holds, and which to save.

Where it runs: in the engine's scheduler, on its thread, called by `KvtierSchedulerConnector` at a
request's lookup. Index lookups only (no payload I/O). Not thread-safe (one scheduler thread).

A prompt is split on the configured separator ids (`kvtier.blend.segments.split_segments`). Only
"passage" segments of at least `min_tokens` take part: the head is prefix caching's, the suffix (the
question) is always computed. For each such passage:

    held    its leading segment chunks that some tier holds (keyed on the passage's own tokens,
            `SegmentKeys`); a passage whose held chunks reach past the request's head (what the
            device holds plus the prefix load) is a blend hit. One that straddles the head counts:
            the device prefix cache often holds a few blocks into the first passage (every passage
            starts with the same separator and often the same header), and the rows before the head
            come from the request's blocks, exact, whatever was read for them
    missing its chunks from the first one not held on: saved once the prompt is computed

A separator that never occurs in a prompt leaves prefix caching alone; that is said once in the log
(a configuration that never matches is worth one line, not one a request).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.blend.segments import Segment, SegmentKeys, split_segments
from kvtier.config import BlendConfig
from kvtier.connector.metadata import PassageSpans
from kvtier.engine import CacheEngine

logger = logging.getLogger(__name__)

# Passages of one prompt that take part (looked up, leased, read, saved); later ones are computed.
# Each costs an index lookup per step the request waits and a lease key per chunk: a prompt cut into
# thousands of tiny passages (`min_tokens: 0`, or a separator an attacker repeats) stays bounded.
MAX_PASSAGES = 256


@dataclass(frozen=True, slots=True)
class PassagePlan:
    held: list[PassageSpans]  # passages after the head whose leading chunks are held (blend hits)
    missing: list[PassageSpans]  # every passage's chunks kvtier does not hold yet (to save)


class BlendPlanner:
    def __init__(self, engine: CacheEngine, config: BlendConfig, separator_ids: Sequence[int]):
        if not separator_ids:
            raise ValueError("blend: the separator must be at least one token id")
        self.engine = engine
        self.config = config
        self.separator = [int(t) for t in separator_ids]
        self.keys = SegmentKeys(engine.db.namespace_digest, engine.db.chunk_size)
        self._said_no_separator = False
        self._said_too_many = False

    def passages(self, tokens: Sequence[int]) -> list[Segment]:
        """The prompt's passages long enough to reuse, in order."""
        segments = split_segments(tokens, self.separator)
        if len(segments) == 1 and segments[0].kind == "head" and not self._said_no_separator:
            self._said_no_separator = True
            logger.info("blend: a prompt of %d tokens holds no separator %s: prefix caching only "
                        "(said once)", len(tokens), self.separator)
        passages = [s for s in segments if s.kind == "passage" and s.num_tokens >= self.config.min_tokens]
        if len(passages) > MAX_PASSAGES and not self._said_too_many:
            self._said_too_many = True
            logger.warning("blend: a prompt of %d passages; only its first %d are reused, the rest "
                           "computed (said once)", len(passages), MAX_PASSAGES)
        return passages[:MAX_PASSAGES]

    def plan(self, tokens: Sequence[int], head: int) -> PassagePlan:
        """The passages of `tokens` held (those whose held chunks reach past `head`) and still missing."""
        held, missing = [], []
        for segment in self.passages(tokens):
            spans = self.keys.spans(tokens, segment)
            n = self.engine.storage.contains_prefix([s.key for s in spans])
            if n < len(spans):
                missing.append(PassageSpans(segment.start, segment.end, spans[n:]))
            if n and spans[n - 1].end > head:
                held.append(PassageSpans(segment.start, segment.end, spans[:n]))
        return PassagePlan(held, missing)
