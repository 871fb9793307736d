"""Payload movement for host-memory entries: record reads from the tiers below into slabs (and the
copy out of a retrieve's slabs, `MemoryPool.copy_chunks`), record writes from slabs to the tiers below
(reads from every tier below, P2P included; writes only to the writable tiers the caller passes).

Where it runs: copies of CPU hits on the caller's thread; of lower-tier reads on the caller's thread
too while it waits for the first tier's reads, each as its read lands (`_CopyOut`), and on the read
thread that landed them after that (a next tier's); each into its own tokens of `out`. Where `out`
is contiguous in host memory, the disk tier leaves each raw record's checksum to its copy out, which
checks it in the same pass (kvtier.checksum_copy: one read of the payload from RAM instead of two). Reads fan
out over the read threads (TierReader), each job making its own read requests (`_SlabRequests`,
on its read thread); writes run on the StorageManager's write threads. It holds
no index state and takes no lock but `_CopyOut`'s own hand-over: the StorageManager decides what
moves and keeps each slab alive (a reader on its entry) while it moves; this module only moves
bytes, once, never through Python bytes objects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass

import numpy as np
import torch

from kvtier import checksum_copy
from kvtier.checksum_copy import PieceCopy
from kvtier.codecs.records import drop_record
from kvtier.job_queue import TransferQueue
from kvtier.keys import ChunkKey, ChunkSpan
from kvtier.layout import KVLayout
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.record import encode_header, tensor_bytes
from kvtier.tiers.base import PutItem, Tier
from kvtier.tiers.cpu import CpuEntry
from kvtier.transfers import ReadRequest, TierReader

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ChunkRead:
    """One chunk of a retrieve: where it comes from and the slab it is in (or is read into)."""

    span: ChunkSpan
    # Held (a reader) by the read: a CPU entry, or a fresh slab for a lower-tier read; None for a
    # `device` read (GPUDirect Storage from the disk tier straight into `out`: kvtier.tiers.gds).
    entry: CpuEntry | None
    from_cpu: bool
    device: bool = False


def _bytes_of(out: torch.Tensor | None) -> np.ndarray | None:
    """`out`'s bytes, for the disk tier to copy chunks into as it verifies them (kvtier.checksum_copy),
    or None where that does not apply: no extension, or an `out` not contiguous in host memory."""
    if (out is None or not checksum_copy.AVAILABLE or out.device.type != "cpu" or not out.is_contiguous()
            or out.requires_grad or out.is_inference()):  # (writes there must go through torch)
        return None
    try:
        return out.view(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError):  # (a tensor with no numpy view)
        return None


class _SlabRequests(Sequence[ReadRequest]):
    """The lower-tier reads of a plan as TierReader's requests, each made when indexed: by the read
    job that reads it, on its thread, so the first reads start at once rather than after the
    retrieving thread made them all (~1.2 ms for 512 chunks: a slab view and a request each). With
    an `out` in host memory, each request also says where its chunk goes there (`ReadRequest.copy`)."""

    def __init__(self, pool: MemoryPool, layout: KVLayout, reads: list[ChunkRead], out: torch.Tensor | None):
        self.pool, self.layout, self.reads = pool, layout, reads
        self.copies: list[PieceCopy | None] = [None] * len(reads)  # each request's, once made
        self.out_bytes = _bytes_of(out)
        if self.out_bytes is not None:  # [2, L, T, H*D], contiguous: strides in bytes
            self.out_tokens = out.shape[2]
            self.kv_stride, self.layer_stride, self.token_bytes = (out.stride(d) * out.element_size()
                                                                  for d in range(3))

    def __len__(self) -> int:
        return len(self.reads)

    def __getitem__(self, i: int) -> ReadRequest:  # (no slices: TierReader indexes one at a time)
        r = self.reads[i]
        self.copies[i] = copy = self._copy(r.span)
        return ReadRequest(r.span.key, self.pool.tensor(r.entry.slab, self.pool.slab_stride),
                           self.layout.chunk_shape(r.span.num_tokens), copy)

    def _copy(self, span: ChunkSpan) -> PieceCopy | None:
        """Where `span`'s payload ([2, L, t, H*D]) goes in `out`: its t rows of each of the 2 x L planes."""
        if self.out_bytes is None or span.start + span.num_tokens > self.out_tokens:
            return None
        return PieceCopy(self.out_bytes, span.start * self.token_bytes, span.num_tokens * self.token_bytes,
                         2, self.kv_stride, self.layout.num_layers, self.layer_stride)


class _CopyOut:
    """TierReader's `landed` for a retrieve into `out`: copies each lower-tier chunk from its slab
    into its tokens of `out` as its read lands, while later reads run. Until the first tier's reads
    are done (`copy_while`), a read thread only hands its chunks over and the caller's thread, idle
    otherwise, copies them: on 2 cores a read thread that copied its 8 MiB job itself left the disk
    without its next read meanwhile (512 KiB chunks, side by side: 0.77-0.84x of the raw O_DIRECT
    read limit end to end; handed over, 0.81-0.89x). Chunks that land later (from a next tier) are
    copied by their read thread. The hand-over (`_queue`, `_caller_copies`, `_jobs_left`) is
    under `_landed`. A chunk whose tier left its checksum to the copy (kvtier.checksum_copy) is
    checked as it is copied (the reader counts it found only if it passed). A chunk
    after a miss is copied too, into tokens the caller is not told it has (only the prefix before
    the first miss counts as served). A failed copy (an `out` that cannot be written) is kept for
    `check`, which raises it on the caller's thread once no read is in flight."""

    def __init__(self, requests: _SlabRequests, out: torch.Tensor):
        self.requests, self.out = requests, out
        self.pool, self.layout, self.reads = requests.pool, requests.layout, requests.reads
        self.failure: BaseException | None = None
        self._landed = threading.Condition()
        self._queue: list[int] = []  # landed, for the caller to copy (until `copy_while` is done)
        self._caller_copies = True
        self._jobs_left = 0

    def __call__(self, indices: list[int]) -> None:  # on a read thread
        with self._landed:
            if self._caller_copies:
                self._queue += indices
                self._landed.notify()
                return
        self._copy(indices)

    def copy_while(self, jobs: list[Future]) -> None:
        """On the caller's thread: copy the chunks that land until every one of `jobs` is done (a
        job hands its chunks over before it is done, so none is left behind)."""
        with self._landed:
            self._jobs_left = len(jobs)
        for job in jobs:
            job.add_done_callback(self._job_done)
        while True:
            with self._landed:
                self._landed.wait_for(lambda: self._queue or not self._jobs_left)
                indices, self._queue = sorted(self._queue), []  # in order: runs copy as one
                if not indices:
                    self._caller_copies = False
                    return
            self._copy(indices)

    def _job_done(self, _job: Future) -> None:
        with self._landed:
            self._jobs_left -= 1
            self._landed.notify()

    def _copy(self, indices: list[int]) -> None:
        try:
            plain = [i for i in indices if not self._checked_copy(i)]
            chunks = [(self.reads[i].span, self.reads[i].entry.slab) for i in plain]
            self.pool.copy_chunks(chunks, self.out, self.layout, into_slabs=False)
        except BaseException as exc:  # raised on the caller's thread by `check`
            self.failure = self.failure or exc

    def _checked_copy(self, i: int) -> bool:
        """Copy chunk `i` out checking its checksum (`copy.passed` says how it went), where its tier
        left that to the copy; False, copying nothing, where it did not."""
        copy = self.requests.copies[i]
        if copy is None or copy.pending is None:
            return False
        checksum_copy.finish(copy, self.pool.tensor(self.reads[i].entry.slab, copy.nbytes).numpy())
        return True

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure


class SlabIO:
    def __init__(self, pool: MemoryPool, layout: KVLayout, lower: Sequence[Tier], metrics: Metrics,
                 reads: TransferQueue):
        self.pool = pool
        self.layout = layout
        self.reader = TierReader(lower, layout.dtype, metrics, reads)
        # The disk tier that reads straight into GPU memory (GPUDirect Storage), if one does.
        self.direct_disk = next((t for t in lower if getattr(t, "gds", None) is not None), None)

    def read(self, plan: list[ChunkRead], out: torch.Tensor | None) -> int:
        """Read the planned lower-tier chunks into their slabs and copy them into `out` (every good one,
        as it lands: what lies past the first miss is written but not served). Returns chunks served."""
        lower = [r for r in plan if not r.from_cpu and not r.device]
        requests = _SlabRequests(self.pool, self.layout, lower, out)
        copy_out = _CopyOut(requests, out) if out is not None and lower else None
        # Start the lower-tier reads, copy the CPU hits and read the device ones meanwhile, then
        # copy each lower-tier read as it lands.
        pending = self.reader.start(requests, copy_out)
        direct: dict[int, bool] = {}
        try:
            if out is not None:
                hits = [(r.span, r.entry.slab) for r in plan if r.from_cpu]
                self.pool.copy_chunks(hits, out, self.layout, into_slabs=False)
                direct = self._read_direct([r for r in plan if r.device], out)
            if copy_out is not None:
                copy_out.copy_while([future for _, future in pending.jobs])
        except BaseException:
            # The reads still write into slabs that the caller frees once this raises: wait first.
            wait([future for _, future in pending.jobs])
            raise
        served = iter(self.reader.finish(pending))
        if copy_out is not None:
            copy_out.check()
        ok = [r.from_cpu or (direct.get(id(r), False) if r.device else next(served)) for r in plan]
        return ok.index(False) if False in ok else len(plan)

    def _read_direct(self, reads: list[ChunkRead], out: torch.Tensor) -> dict[int, bool]:
        """GPUDirect Storage reads of the disk tier's chunks into `out` (on its device), in order,
        through one staging buffer there; each read's id -> served. Stops at the first miss: what
        lies past it would not be served anyway."""
        if not reads:
            return {}
        disk = self.direct_disk
        largest = max(self.layout.chunk_bytes(r.span.num_tokens) for r in reads)
        try:
            staging = torch.empty(largest, dtype=torch.uint8, device=out.device)
        except RuntimeError:  # out of device memory: these chunks are misses, recomputed
            logger.warning("no %d bytes of %s memory to stage GPUDirect reads in", largest, out.device)
            return {}
        served: dict[int, bool] = {}
        for r in reads:
            span = r.span
            # GDS writes outside the stream's order: whatever the stream still does with this memory
            # (the last chunk's copy out, an earlier tensor's kernels before the allocator reused it)
            # must be done before the read lands.
            if staging.device.type == "cuda":
                torch.cuda.current_stream(staging.device).synchronize()
            header = disk.get_to_device(span.key, staging)
            shape = self.layout.chunk_shape(span.num_tokens)
            good = header is not None and (header.dtype == self.layout.dtype and header.shape == shape
                                           and header.payload_len == self.layout.chunk_bytes(span.num_tokens))
            if header is not None and not good:  # a valid record of another geometry: dropped, as below
                drop_record(disk, span.key, self.reader.metrics)
            self.reader.metrics.tier_inc(disk.name, "hits" if good else "misses")
            served[id(r)] = good
            if not good:
                break
            payload = staging[:header.payload_len].view(self.layout.dtype).view(shape)
            out[:, :, span.start:span.start + span.num_tokens].copy_(payload)
        return served

    def write(self, key: ChunkKey, entry: CpuEntry, tiers: Sequence[Tier], confirm: bool = False) -> bool:
        """Write one entry's chunk to `tiers` (blocking); True if any of them holds it now.
        `confirm`: it was written below before; when a tier still has it, that is enough (and
        spares checksumming up to a 32 MiB payload for nothing)."""
        if confirm and any(tier.has([key])[0] for tier in tiers):
            return True
        payload = self.pool.tensor(entry.slab, entry.nbytes)
        if entry.header is None:  # (two writes racing both compute the same bytes: harmless)
            entry.header = encode_header(key, self.layout.chunk_shape(entry.num_tokens), self.layout.dtype,
                                         tensor_bytes(payload))
        header = entry.header
        ok = False
        for tier in tiers:
            ok = tier.put([PutItem(key, header, payload)])[0] or ok
        return ok
