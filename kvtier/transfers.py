"""The reader that fans record reads from the tiers below host memory out over the I/O threads
(kvtier.job_queue's TransferQueue), lands each chunk as it is read, and settles which were found.

Where it runs: `start` and `finish` on the retrieving thread; the reads on the I/O threads (disk and
socket calls release the GIL, so threads overlap real I/O); a tier that fans out is read on the
retrieving thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

import torch

from kvtier.checksum_copy import PieceCopy
from kvtier.codecs.records import decode_or_drop, drop_record
from kvtier.job_queue import TransferQueue
from kvtier.keys import ChunkKey
from kvtier.log_limit import LogLimiter
from kvtier.metrics import Metrics
from kvtier.record import CODEC_RAW, RecordHeader
from kvtier.tiers.base import Tier

logger = logging.getLogger(__name__)

# Bytes of buffers one read job fills (at least one chunk): small enough that chunks land, and are
# handed to `landed`, while later ones are still being read (a 1 GiB retrieve whose copy out waited
# for the last read spent ~20 % of its time copying after the disk was done), and that the threads
# run out of jobs together (a cold 256 MiB retrieve of 512 KiB chunks: with 8 MiB jobs the threads'
# last reads ended 1-14 ms apart and the last job's copy out ran 2-8 ms past the last read; with
# 2 MiB, 2-3 ms and ~1 ms); large enough that a batched tier (Redis, the server) still gets several
# small chunks per round trip (1 MiB jobs cost ~25 us more between a thread's reads, in Python).
READ_JOB_BYTES = 2 << 20

Landed = Callable[[list[int]], None]  # indices of requests read and verified, called on the job's thread


def _run_here(fn: Callable, *args) -> Future:
    """`fn(*args)` run on this thread, as a finished Future (its result or its exception)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:  # reported where the result is read, as for a pooled job
        future.set_exception(exc)
    return future


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One record to read below: its key, the buffer for its payload, the shape it must have."""

    key: ChunkKey
    dest: torch.Tensor  # uint8, 4 KiB aligned, at least the padded payload
    shape: tuple[int, int, int, int]
    copy: PieceCopy | None = None  # where the payload goes next, for a tier that `copies_out`


@dataclass(slots=True)
class PendingReads:
    requests: Sequence[ReadRequest]  # indexed on the read threads (it may make each on demand)
    jobs: list[tuple[list[int], Future]]
    landed: Landed | None = None
    # Requests read with their checksum left to the copy out (`copy.pending`), by index: `_collect`
    # counts each only if its copy out checked it good.
    deferred: dict[int, tuple[ChunkKey, PieceCopy]] = field(default_factory=dict)


class TierReader:
    """Reads records from the tiers below host memory into caller buffers, on the read threads.

    `start(requests, landed)` splits the batch into jobs of about READ_JOB_BYTES against the first
    tier, which the read threads take in order, each the next one left, and returns at once (so
    the caller can copy its CPU hits meanwhile; a first tier that fans out, P2P, is read in
    `finish` instead, on the caller's thread); `finish(pending)` waits, asks each next tier for
    what the previous one missed, and returns one bool per request. `landed(indices)`, if given, is
    called by each job (on its thread) with the requests it read that are good (verified by the
    tier, decoded, of the expected shape), as soon as they are: the caller copies them out while
    later reads run. A request's `copy` (kvtier.checksum_copy) is given to a tier that `copies_out`
    (the disk tier), which may leave the record's checksum to it (`copy.pending`): `landed` must
    then check it as it copies the chunk out (`checksum_copy.finish`); `finish` counts the chunk
    found only if that check passed, and else asks the next tier. Jobs land in any order; which
    leading requests form the prefix is the caller's to decide from `finish`. A coded record (any
    tier may hold some: kvtier.tiers.coded) is decoded in place into its buffer by the job that
    read it, on the thread that ran the tier's `get`, so a chunk is decoded once, on its way up
    into host memory; one that fails to decode is a miss, counted corrupt and removed. A record
    whose codec, dtype or shape is not what the caller expects is dropped below and counted as
    corrupt; a tier that raises (it must not) costs its
    chunks, never the caller. `requests` may make each request when it is indexed (SlabIO's do): a
    job indexes its own, on its read thread, so the first reads need not wait for the whole batch.
    """

    def __init__(self, tiers: Sequence[Tier], dtype: torch.dtype, metrics: Metrics, queue: TransferQueue):
        self.tiers, self.dtype, self.metrics, self.queue = list(tiers), dtype, metrics, queue
        self._log = LogLimiter(logger)  # per tier: a broken tier fails or mismatches every read

    def start(self, requests: Sequence[ReadRequest], landed: Landed | None = None) -> PendingReads:
        # A first tier that fans out is read in `finish`, on the caller's thread (see `_submit`).
        pending = PendingReads(requests, [], landed)
        if requests and not self.tiers[0].fans_out:
            pending.jobs = self._submit(self.tiers[0], pending, range(len(requests)))
        return pending

    def _submit(self, tier: Tier, pending: PendingReads, todo) -> list[tuple[list[int], Future]]:
        """Jobs reading `todo` from `tier`; a tier that fans out is read here and now."""
        todo = list(todo)
        if tier.fans_out:
            # The tier spreads its own I/O (P2P: a thread per peer), so it gets the batch whole, on
            # the caller's thread (which waits for it anyway): a stalled peer then holds that caller
            # alone, never one of the shared read threads that other loads need (with P2P the only
            # tier below, one stalled load per read thread would stall every load).
            return [(todo, _run_here(self._read, tier, pending, todo))]
        # Consecutive runs, taken in order: the threads take the leading chunks first, so the
        # prefix lands first, and a thread that finishes early takes the next job (no straggler).
        per_job = max(1, READ_JOB_BYTES // max(pending.requests[todo[0]].dest.nbytes, 1)) if todo else 1
        per_job = min(per_job, -(-len(todo) // self.queue.threads))  # every thread gets work
        jobs: list[tuple[list[int], Future]] = [(todo[j:j + per_job], Future())
                                                for j in range(0, len(todo), per_job)]
        # One task per thread taking the next job left (a work queue) rather than a task per job:
        # 128 submits woke a thread each, which fought the submitting caller for the GIL (on a busy
        # machine the first read of a cold 256 MiB retrieve began 4-13 ms into it; now 2.4-3 ms).
        self._start_takers(tier, pending, jobs)
        return jobs

    def _start_takers(self, tier: Tier, pending: PendingReads, jobs: list[tuple[list[int], Future]]) -> None:
        """Submit the tasks that take `jobs`. One submit that fails (no thread to be had, the queue
        closed meanwhile) after another worked costs nothing: that task takes every job. With none
        started, every job is cancelled: its chunks are misses (`_collect`), and a task queued anyway
        skips them. An interrupt cancels the jobs not taken yet and waits for the others, since they
        write into buffers the caller frees next, then propagates."""
        taken = itertools.count()  # next() is one C call under the GIL: each job is taken once
        started = 0
        try:
            for _ in range(min(self.queue.threads, len(jobs))):
                self.queue.submit(self._take_jobs, tier, pending, jobs, taken)
                started += 1
        except Exception:
            self._log.error((tier.name, "submit"), "%s: read tasks could not all start (%d did)",
                            tier.name, started, exc_info=True)
            if not started:
                for _, future in jobs:
                    future.cancel()
        except BaseException:
            for _, future in jobs:
                future.cancel()
            wait([future for _, future in jobs])
            raise

    def _take_jobs(self, tier: Tier, pending: PendingReads, jobs: list[tuple[list[int], Future]],
                   taken: itertools.count) -> None:
        """On a read thread: run the next job not taken yet, until none is left; each job's outcome,
        a raised exception included, goes to its own future, as a pooled job's would."""
        while (j := next(taken)) < len(jobs):
            part, future = jobs[j]
            if not future.set_running_or_notify_cancel():
                continue  # cancelled by `_start_takers` (no task could start, or an interrupt)
            try:
                future.set_result(self._read(tier, pending, part))
            except BaseException as exc:  # noqa: BLE001 (an interrupt too: `finish` raises it)
                future.set_exception(exc)

    def _read(self, tier: Tier, pending: PendingReads, part: list[int]) -> list[bool]:
        """`tier.get` of `part`, each coded record then decoded into its buffer (on this thread: the
        read thread, or the caller's for a tier that fans out) and checked (`_fits`); the good ones
        handed to `landed`. One bool per request of `part`."""
        requests = [pending.requests[i] for i in part]  # each made once, here (see the class)
        keys, dests = [r.key for r in requests], [r.dest for r in requests]
        copies = [r.copy for r in requests] if getattr(tier, "copies_out", False) else []
        for copy in copies:
            if copy is not None:
                copy.pending, copy.passed = None, None
        headers = tier.get(keys, dests, copies) if any(copies) else tier.get(keys, dests)
        ok = []
        for i, request, header in zip(part, requests, headers):
            header = self._decoded(tier, header, request)
            ok.append(header is not None and self._fits(tier, header, request))
            if ok[-1] and request.copy is not None and request.copy.pending is not None:
                pending.deferred[i] = (request.key, request.copy)
        if pending.landed is not None and any(ok):
            pending.landed([i for i, good in zip(part, ok) if good])
        return ok

    def _decoded(self, tier: Tier, header: RecordHeader | None, request: ReadRequest) -> RecordHeader | None:
        """`header` after decoding its coded record in place (then its header as if raw: only `_fits`
        reads it); unchanged for a miss, a raw record, or one `_fits` rejects anyway (another dtype
        or shape); None, counted and removed, for one that fails to decode."""
        if (header is None or header.codec == CODEC_RAW or header.dtype != self.dtype
                or header.shape != request.shape):
            return header
        dest = request.dest
        buf = dest.numpy() if isinstance(dest, torch.Tensor) else dest
        if decode_or_drop(tier, header, buf, self.metrics, self._log) is None:
            return None
        nbytes = math.prod(header.shape) * header.dtype.itemsize
        return dataclasses.replace(header, codec=CODEC_RAW, payload_len=nbytes)

    def finish(self, pending: PendingReads) -> list[bool]:
        requests = pending.requests
        found = [False] * len(requests)
        jobs = pending.jobs
        for t, tier in enumerate(self.tiers):
            if t or tier.fans_out:  # (a first tier that fans out was not started: `start`)
                todo = [i for i, ok in enumerate(found) if not ok]
                if not todo:
                    break
                jobs = self._submit(tier, pending, todo)
            try:
                self._collect(tier, jobs, found, pending.deferred)
            except BaseException:
                # (an interrupt, or a job that raised one) The jobs still running write into the
                # caller's buffers, which it frees once this raises: let them end first.
                wait([future for _, future in jobs])
                raise
        return found

    def _collect(self, tier: Tier, jobs: list[tuple[list[int], Future]], found: list[bool],
                 deferred: dict[int, tuple[ChunkKey, PieceCopy]]) -> None:
        """Wait for `tier`'s jobs; what each read into `found`, and the tier's hit and miss counts.
        A read whose checksum was left to its copy out counts once that check passed (it has run by
        now: the caller copies the first tier's chunks before `finish`, the read threads a next
        tier's within their jobs); one that failed is a miss, dropped from `tier`, and the next tier
        is asked for it; one never checked (its copy out raised) is a miss, kept in `tier`."""
        asked = hits = 0
        for part, future in jobs:
            asked += len(part)
            try:
                ok = future.result()
            except Exception:
                self._log.error((tier.name, "get"), "%s: get failed", tier.name, exc_info=True)
                self.metrics.tier_inc(tier.name, "errors", len(part))  # per chunk, as tiers count
                continue
            for i, good in zip(part, ok):
                key, copy = deferred.pop(i, (None, None))
                if copy is not None and not copy.passed:
                    good = False
                    if copy.passed is False:  # (never checked: its copy out failed, not the record)
                        self._log.warning((tier.name, "checksum"), "%s: record %s failed its checksum; "
                                          "dropping", tier.name, key)
                        drop_record(tier, key, self.metrics)
                found[i] = good
                hits += good
        self.metrics.tier_inc(tier.name, "hits", hits)
        self.metrics.tier_inc(tier.name, "misses", asked - hits)

    def _fits(self, tier: Tier, header: RecordHeader, request: ReadRequest) -> bool:
        # The payload length is checked against the shape as well: a record whose checksum is valid
        # but whose payload is short would leave the rest of the slab's old bytes in the KV.
        nbytes = math.prod(request.shape) * self.dtype.itemsize
        if (header.codec == CODEC_RAW and header.dtype == self.dtype and header.shape == request.shape
                and header.payload_len == nbytes):
            return True
        self._log.warning((tier.name, "fits"), "%s: record %s has codec %d, shape %s, dtype %s, %d payload "
                          "bytes; expected raw %s %s, %d bytes; dropping", tier.name, header.key,
                          header.codec, header.shape, header.dtype, header.payload_len, request.shape,
                          self.dtype, nbytes)
        drop_record(tier, header.key, self.metrics)
        return False
