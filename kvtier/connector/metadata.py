"""What the scheduler side tells the worker side each step (built by `build_connector_meta`).

Token positions are absolute token indexes of the request. Block ids are the request's paged-cache
block table, position p living in block `block_ids[p // block_size]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvtier.keys import ChunkKey, ChunkSpan


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """Load tokens `start:end` of a request from kvtier into its blocks. `start` is what the device
    already holds (block aligned); `lease` holds the chunks against eviction until the load is done.
    `token_ids` end at the scheduler side's lookup hit: the worker reads them without looking up again.
    `asynchronous`: the load runs in the background across steps (`kvtier.connector.async_load`): its
    request is in no step until the worker reports it in `get_finished`."""

    request_id: str
    token_ids: Sequence[int]
    block_ids: Sequence[int]
    start: int
    end: int
    lease: Sequence[ChunkKey] = ()
    asynchronous: bool = False


@dataclass(frozen=True, slots=True)
class SaveSpec:
    """Save tokens `start:end` of a request (KV computed once this step's forward is done). `start`
    is a chunk boundary: every chunk before it is in kvtier already."""

    request_id: str
    token_ids: Sequence[int]
    block_ids: Sequence[int]
    start: int
    end: int
    final: bool = False  # the request has finished; its blocks are held until this save is gathered


@dataclass(frozen=True, slots=True)
class PassageSpans:
    """One passage of a blended prompt: the segment (prompt-absolute) and its chunk spans to read or
    save (`kvtier.blend.segments.SegmentKeys.spans`, prompt-absolute too)."""

    start: int
    end: int
    spans: Sequence[ChunkSpan]


@dataclass(frozen=True, slots=True)
class BlendLoadSpec:
    """Compute tokens `head:` of a request in one blended step: its passages' held chunks are read,
    moved to where each passage now sits, and the rest recomputed selectively. `head` (what the device
    holds plus the prefix load) is block aligned (rounded down, the prefix load stopping there); `lease`
    holds the passage chunks until read."""

    request_id: str
    token_ids: Sequence[int]  # the whole prompt
    head: int
    passages: Sequence[PassageSpans]
    lease: Sequence[ChunkKey] = ()


@dataclass(frozen=True, slots=True)
class SegmentSaveSpec:
    """Save the passages' chunks kvtier does not hold yet, from the request's blocks once this step's
    forward is done, under their segment keys with K normalised to the passage at position 0."""

    request_id: str
    block_ids: Sequence[int]
    passages: Sequence[PassageSpans]


@dataclass(frozen=True, slots=True)
class ConnectorMetadata:
    step: int  # the scheduler output's step counter; every load and save event carries it
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    blend_loads: list[BlendLoadSpec] = field(default_factory=list)  # only with `blend:` configured
    segment_saves: list[SegmentSaveSpec] = field(default_factory=list)
    cancel_loads: list[str] = field(default_factory=list)  # aborted requests: drop their queued async loads
    reset: bool = False  # the scheduler dropped every chunk: a worker with an engine of its own does too
    # Finished requests to report in `pop_kv_stored` once the saves handed over so far are stored
    # (a prefill's reply waits for its KV: kvtier.connector.handoffs).
    notify_stored: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class KVEvent:
    """One load or save, as it happened: for tests, logs and metrics."""

    step: int
    kind: str  # "load" or "save"
    request_id: str
    start: int
    end: int  # for a load: the end actually reached (< the planned end when a load fell short)
