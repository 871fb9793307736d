"""Holding chunks in memory-pool slabs while a peer reads them: what the P2P endpoint serves from.

Where it runs: on the peer server's connection threads (and its lease sweeper for `let_go`), beside
the StorageManager's own callers. `hold` blocks: it may wait (until its deadline) for memory, and it
reads lower-tier records on the calling thread. Both functions take the StorageManager's lock for
their bookkeeping only, never around I/O.

    hold(storage, keys, deadline)  the LEADING run of `keys` this instance holds, each kept in a slab
                                   (`CpuEntry.hold()`: neither freed nor reused) until `let_go`
    let_go(storage, held)          give every chunk of `held` back, once

How a hold keeps the StorageManager's invariants: it works like one retrieve wave
(`StorageManager._plan_wave` / `_finish_wave`). Host copies are held as they are; chunks only in a
writable lower tier (never a non-writable one such as the P2P tier: no chains of peers) get fresh
slabs (`_alloc_for_read_locked`, which may evict or wait like a retrieve) and are read into them,
then promoted into the CPU tier as a retrieve promotes its hits (`promote_on_hit`). Every held
chunk counts as one of the manager's holders until let go, so memory waits and `check_invariants`
see it; the read itself runs inside the manager's call gate, so `close()` waits for it. A read
whose key got a host copy meanwhile keeps its own slab (detached, freed by `let_go`) rather than
switching to that copy: its header was computed over its own bytes.

Each `HeldChunk` carries its record header (kvtier.record) over the payload in its slab: the bytes
a peer receives (over TCP) or READs (over NIXL) verify against it. It is hashed once per entry
(`CpuEntry.header`, shared with the writes below) or comes with the record read from below.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvtier.errors import KvtierError
from kvtier.keys import ChunkKey
from kvtier.lookup import prefix_length
from kvtier.record import CODEC_RAW, RecordHeader, encode_header, tensor_bytes
from kvtier.tiers.cpu import CpuEntry

if TYPE_CHECKING:
    from collections.abc import Iterator

    from kvtier.memory import Slab
    from kvtier.storage import StorageManager


@dataclass(frozen=True, slots=True)
class HeldChunk:
    key: ChunkKey
    slot: int  # slab index in the pool's arena
    header: bytes  # kvtier.record.encode_header(key, shape, dtype, payload) of the held payload
    payload_len: int
    entry: CpuEntry  # held (entry.hold()); private to holding.py


@dataclass(slots=True)
class _Planned:
    """One key of a hold being planned: a held host copy, or a fresh slab to read it into."""

    key: ChunkKey
    entry: CpuEntry | None = None  # a host copy, held
    slab: Slab | None = None  # ... or a fresh slab for a lower-tier read
    num_tokens: int = 0  # known once the copy is held or the record read
    header: bytes = b""


def present(storage: StorageManager, keys: Sequence[ChunkKey]) -> list[bool]:
    """Which `keys` host memory or a writable lower tier holds. Index only: no payload I/O."""
    keys = list(keys)
    with storage._lock:
        flags = storage.cpu.present(keys)
    for tier in storage.writable:
        missing = [i for i, flag in enumerate(flags) if not flag]
        if not missing:
            break
        for i, found in zip(missing, tier.has([keys[i] for i in missing])):
            flags[i] = found
    return flags


def hold(storage: StorageManager, keys: Sequence[ChunkKey], deadline: float) -> list[HeldChunk]:
    """The LEADING run of `keys` this instance holds, each held in a slab until let_go: host-memory
    entries as they are; chunks in its writable lower tiers (never a non-writable one: no P2P
    chains) read into fresh slabs and promoted. Stops at the first miss or when memory runs out."""
    keys = list(keys)
    with storage._lock:
        in_memory = storage.cpu.present(keys)
    # Index lookups first: a peer asking for chunks this instance lacks must not evict any for them.
    n = prefix_length(keys, in_memory, storage.writable)
    if not n:
        return []
    with _inside(storage) as open_:
        if not open_:
            return []
        plan = _plan(storage, keys[:n], deadline)
        found = 0
        try:
            found = _read(storage, plan)
        finally:
            held = _finish(storage, plan, found)
    return held


def let_go(storage: StorageManager, held: Sequence[HeldChunk]) -> None:
    """Give back what `hold` held (each chunk exactly once): slabs of chunks that left host memory
    meanwhile, or were read for this hold alone and not promoted, are freed."""
    if not held:
        return
    with storage._lock:
        for chunk in held:
            chunk.entry.release(storage.pool)
        storage._holders -= len(held)
        storage._progress.notify_all()  # memory waits may go on (as StorageManager._let_go_locked)


def payload_view(storage: StorageManager, chunk: HeldChunk) -> memoryview:
    """The held payload's bytes, zero-copy (valid until `let_go`)."""
    return tensor_bytes(storage.pool.tensor(chunk.entry.slab, chunk.payload_len))


@contextmanager
def _inside(storage: StorageManager) -> Iterator[bool]:
    """Inside the manager's call gate (its close() waits for us); False once it is closing."""
    try:
        storage._gate.enter()
    except KvtierError:
        yield False
        return
    try:
        yield True
    finally:
        storage._gate.leave()


def _plan(storage: StorageManager, keys: list[ChunkKey], deadline: float) -> list[_Planned]:
    """Hold the host copies of the leading `keys` and allocate slabs for the others, in order,
    until memory runs out (as `_plan_wave`). Every planned chunk counts as a holder."""
    plan: list[_Planned] = []
    with storage._lock:
        if storage._gate.closed:
            return plan
        # The run's resident chunks become the most recently used, the last one oldest: making room
        # for an earlier chunk's read evicts the one needed last (as a retrieve does).
        for key in reversed(keys):
            storage.cpu.get(key)
        for key in keys:
            entry = storage.cpu.held(key, touch=False)
            if entry is not None:
                entry.hold()
                plan.append(_Planned(key, entry=entry, num_tokens=entry.num_tokens))
                continue
            slab = storage._alloc_for_read_locked(bool(plan), deadline) if storage.writable else None
            if slab is None:
                break
            plan.append(_Planned(key, slab=slab))
        storage._holders += len(plan)
    return plan


def _read(storage: StorageManager, plan: list[_Planned]) -> int:
    """Read the planned lower-tier chunks into their slabs (each writable tier asked for what the
    ones before it missed), then take the headers of the leading run found (a record read below
    brings its own; a host copy's is hashed once and kept on its entry). Returns its length."""
    stride = storage.pool.slab_stride
    todo = [p for p in plan if p.entry is None]
    for tier in storage.writable:
        if not todo:
            break
        headers = tier.get([p.key for p in todo], [storage.pool.tensor(p.slab, stride) for p in todo])
        for p, header in zip(todo, headers):
            if header is not None and _fits(storage, header):
                p.num_tokens, p.header = header.num_tokens, header.to_bytes()  # verified by the tier
        todo = [p for p in todo if not p.num_tokens]
    found = next((i for i, p in enumerate(plan) if not p.num_tokens), len(plan))
    layout = storage.layout
    for p in plan[:found]:
        if p.entry is None:
            continue
        # A host copy: its header is hashed once per entry (kept on it), not once per peer read.
        if p.entry.header is None:
            payload = tensor_bytes(storage.pool.tensor(p.entry.slab, layout.chunk_bytes(p.num_tokens)))
            p.entry.header = encode_header(p.key, layout.chunk_shape(p.num_tokens), layout.dtype, payload)
        p.header = p.entry.header
    return found


def _fits(storage: StorageManager, header: RecordHeader) -> bool:
    """A record this instance's layout can hold in one slab (a tier verified its checksum and key)."""
    layout, tokens = storage.layout, header.num_tokens
    return (header.codec == CODEC_RAW and tokens > 0 and header.dtype == layout.dtype
            and header.shape == layout.chunk_shape(tokens)
            and header.payload_len == layout.chunk_bytes(tokens) <= storage.pool.slab_bytes)


def _finish(storage: StorageManager, plan: list[_Planned], found: int) -> list[HeldChunk]:
    """Keep the first `found` planned chunks held (promoting lower-tier reads, as `_finish_wave`),
    give the rest back."""
    held: list[HeldChunk] = []
    promoted = 0
    layout, pool = storage.layout, storage.pool
    with storage._lock:
        for i, p in enumerate(plan):
            if i >= found:
                if p.entry is not None:
                    p.entry.release(pool)
                else:
                    pool.free(p.slab)
                continue
            entry = p.entry
            if entry is None:
                entry = CpuEntry(p.slab, p.num_tokens, layout.chunk_bytes(p.num_tokens), persisted=True,
                                 detached=True, header=p.header)
                entry.hold()
                if storage.promote_on_hit and not storage.cpu.holds(p.key):
                    entry.attach()
                    storage.cpu.insert(p.key, entry)
                    entry.hold()  # (attach ended the read's hold: this one is ours)
                    promoted += 1
            held.append(HeldChunk(p.key, entry.slab.index, p.header, entry.nbytes, entry))
        if found < len(plan):
            storage._holders -= len(plan) - found
            storage._progress.notify_all()
    storage.metrics.inc("promotions", promoted)
    return held
