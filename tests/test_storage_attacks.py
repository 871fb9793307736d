"""Attacks on kvtier/storage.py over a disk tier, each a regression test named after the bug it
found: leased chunks that no tier below has room for, a store whose copy fails, calls racing
close(), a disk that refuses every write; and 8 threads on tiny tiers with partial chunks,
offsets, held leases and failing writes, closed while running. StorageManagers are built from
real parts (memory pool, CPU tier, a DiskTier in `tmp_path`), as in tests/test_storage.py.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens, tier_counter
from test_storage_stress import THREADS, Workload
from waiting import wait_until

from kvtier.errors import KvtierError
from kvtier.memory import MemoryPool
from kvtier.metrics import Metrics
from kvtier.pins import PinTable
from kvtier.storage import READ_WAIT_S, StorageManager
from kvtier.tiers.disk import DiskTier

RECORD = 2 * 4096  # one chunk's record on disk: header block + a 4 KiB payload


def disk_counter(manager: StorageManager, name: str) -> int:
    return tier_counter(manager, "disk", name)


def test_a_leased_prompt_whose_cpu_chunks_find_no_room_below_streams_without_waiting_out_the_deadline(
        make_manager, db, layout):
    # 4 slabs over a disk of 5 records; an 8-chunk prompt stored chunk by chunk lands as chunks 0-4
    # on disk and 4-7 in host memory, then is leased whole. Streaming 0-3 in needs CPU slabs, but
    # the leased chunks 5-7 have no room below (the disk is full of leased records). Each refused
    # demotion put its chunk back as the next victim, so every wave re-wrote it until READ_WAIT_S
    # ran out: the retrieve took 4 x 5 s and thousands of refused writes.
    manager = make_manager(slabs=4, disk_bytes=5 * RECORD, write_through=False)
    tokens, kv = seeded_tokens(8 * CHUNK, 81), seeded_kv(layout, 8 * CHUNK, 81)
    spans = db.spans(tokens)
    for i in range(8):
        manager.put(spans[i:i + 1], kv)
        assert manager.flush(timeout=10)
    keys = [s.key for s in spans]
    assert manager.contains_prefix(keys) == 8
    manager.lease(keys)

    out = torch.zeros_like(kv)
    began = time.monotonic()
    got = manager.get(spans, out)
    took = time.monotonic() - began

    assert got == 8 and torch.equal(out, kv)
    assert took < READ_WAIT_S / 2, f"retrieve waited {took:.1f} s for writes that could not land"
    assert disk_counter(manager, "rejected") <= 3  # one refused demotion per leased chunk, not a loop
    manager.release(keys)
    assert manager.flush(timeout=10)
    manager.check_invariants()
    manager.clear()
    manager.check_invariants(empty=True)


def test_a_store_whose_copy_fails_gives_its_slabs_back(make_manager, db, layout):
    # The slabs were allocated, then the copy raised (a meta tensor here; a failed device in
    # production): they stayed allocated as "store" forever, and the store stayed counted as a
    # holder, so every later retrieve short of memory waited READ_WAIT_S for it.
    manager = make_manager(slabs=4, disk_bytes=8 * RECORD)
    spans = db.spans(seeded_tokens(2 * CHUNK, 82))
    kv = seeded_kv(layout, 2 * CHUNK, 82)

    with pytest.raises(NotImplementedError):
        manager.put(spans, kv.to("meta"))

    manager.check_invariants(empty=True)
    assert manager.put(spans, kv) == 2


class GatedDisk(DiskTier):
    """A real disk tier whose reads wait at a gate: a retrieve held in flight, deterministically."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reading, self.gate = threading.Event(), threading.Event()

    def get(self, keys, dests, *copies):
        self.reading.set()
        assert self.gate.wait(timeout=20)
        return super().get(keys, dests, *copies)


def test_close_waits_for_calls_in_flight_and_refuses_later_ones(tmp_path, db, layout):
    # close() shut the I/O queues and closed the disk tier's directory descriptor under calls in
    # flight: a store then raised "cannot schedule new futures after shutdown" and left its slabs
    # and holder count behind (a retrieve after it waited READ_WAIT_S), and a disk call racing it
    # used a closed descriptor, whose number the process reuses for whatever it opens next.
    metrics, pins = Metrics(["cpu", "disk"]), PinTable()
    pool = MemoryPool(4 * layout.chunk_bytes(CHUNK), layout.chunk_bytes(CHUNK), pin=False)
    disk = GatedDisk(tmp_path / "disk", db.namespace_digest, 1 << 20,
                     pins.__contains__, metrics)
    manager = StorageManager(layout, pool, [disk], metrics, pins=pins, io_threads=2)
    spans = db.spans(seeded_tokens(2 * CHUNK, 83))
    kv = seeded_kv(layout, 2 * CHUNK, 83)
    manager.put(spans, kv)
    assert manager.flush(timeout=10)
    manager.clear(manager.cpu)  # on disk only: a retrieve reads it through the gate
    out = torch.zeros_like(kv)
    with ThreadPoolExecutor(2) as threads:
        retrieve = threads.submit(manager.get, spans, out)
        assert disk.reading.wait(timeout=10)
        closing = threads.submit(manager.close)
        other, deadline = db.spans(seeded_tokens(CHUNK, 84)), time.monotonic() + 10
        with pytest.raises(KvtierError, match="closed"):
            while time.monotonic() < deadline:  # stores until close() has begun, then refused
                manager.put(other, kv[:, :, :CHUNK])
        assert not closing.done()  # close() waits for the retrieve in flight
        disk.gate.set()
        assert retrieve.result(timeout=10) == 2 and torch.equal(out, kv)
        closing.result(timeout=10)
    manager.check_invariants()
    manager.close()  # again: nothing happens


def attack_thread(engine, work: Workload, seed: int, closing: threading.Event, closed: threading.Event,
                  deadline: float) -> dict:
    """Random store (from a chunk offset), retrieve (from an offset, leased or not), lookup, pin,
    unpin, move and clear; leases also held across operations, as a connector with several
    requests in flight does. Every retrieve is checked bit for bit. Once `closing`, a call may be
    refused with a KvtierError; once `closed` (close() returned), every call is."""
    rng, held, done = random.Random(seed), [], {"ops": 0, "served": 0, "refused": 0}
    try:
        while not closed.is_set() and time.monotonic() < deadline:
            tokens = rng.choice(work.prompts)
            start = rng.randrange(len(tokens) // CHUNK + 1) * CHUNK
            op = rng.random()
            try:
                if op < 0.25:
                    engine.store(tokens, work.kv_of(tokens)[:, :, start:], start=start)
                elif op < 0.55:
                    keys = engine.lease(tokens, engine.lookup(tokens)) if op < 0.4 else []
                    try:
                        kv, n = engine.retrieve(tokens, start=start)
                    finally:
                        engine.release(keys)
                    assert n == 0 or (n >= start and torch.equal(kv, work.kv_of(tokens)[:, :, start:n]))
                    done["served"] += max(n - start, 0)
                elif op < 0.65:
                    held.append(engine.lease(tokens, engine.lookup(tokens)))
                    if len(held) > 3:
                        engine.release(held.pop(0))
                elif op < 0.75:
                    engine.pin(tokens) if op < 0.7 else engine.unpin(tokens)
                elif op < 0.95:
                    engine.move(tokens, rng.choice(["cpu", "disk"]))
                else:
                    engine.clear(rng.choice([None, "cpu", "disk"]))
            except KvtierError:  # only once close() began
                assert closing.is_set()
                done["refused"] += 1
                break
            done["ops"] += 1
        if closed.is_set() and not done["refused"]:
            with pytest.raises(KvtierError, match="closed"):
                engine.lookup(tokens)
            done["refused"] += 1
    finally:
        for keys in held:
            engine.release(keys)
    return done


@pytest.mark.parametrize("write_through", ["true", "false"])
def test_eight_threads_on_tiny_tiers_with_failing_writes_stay_exact_leak_nothing_and_close_cleanly(
        make_engine, layout, write_through):
    # A 4-slab CPU tier over a 6-record disk tier, partial last chunks, offsets, leases held
    # across operations, and a directory planted at a third of the record names (their writes
    # all fail); then close() while all 8 threads are still going.
    engine = make_engine("cpu_disk", cpu__capacity="16KiB", disk__capacity=f"{6 * RECORD}B",
                         save_partial_chunks="true", write_through=write_through)
    work = Workload(layout)
    work.prompts += [p[:-5] for p in work.prompts[::2]]  # ending in a partial chunk
    disk = engine.storage.lower[0]
    for i, key in enumerate({k for p in work.prompts for k in engine.db.keys(p)}):
        if i % 3 == 0:
            disk.path_for(key).mkdir(parents=True)

    closing, closed = threading.Event(), threading.Event()

    def start(pool: ThreadPoolExecutor, seeds: range, seconds: float) -> list:
        deadline = time.monotonic() + seconds
        return [pool.submit(attack_thread, engine, work, seed, closing, closed, deadline) for seed in seeds]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [f.result(timeout=40) for f in start(pool, range(THREADS), 8.0)]
    assert sum(r["served"] for r in results) > 0
    assert engine.flush(timeout=10)
    engine.storage.check_invariants()
    engine.clear()
    engine.storage.check_invariants(empty=True)

    with ThreadPoolExecutor(THREADS) as pool:
        futures = start(pool, range(THREADS, 2 * THREADS), 20.0)
        ops = engine.metrics.value("kvtier_stored_chunks_total") + 20
        # close() once the threads are under way (or after 10 s in any case).
        wait_until(lambda: engine.metrics.value("kvtier_stored_chunks_total") >= ops, "threads under way",
                   10, required=False)
        closing.set()
        engine.close()
        closed.set()
        results = [f.result(timeout=40) for f in futures]
    assert sum(r["ops"] for r in results) > 0
    assert all(r["refused"] == 1 for r in results)  # every thread was refused, cleanly
    engine.storage.check_invariants()


def test_a_disk_that_refuses_every_write_does_not_make_the_cpu_tier_reject_stores(make_manager, db, layout):
    # Write-through to a disk that takes nothing (here: no record fits; a broken disk, or one full
    # of pinned chunks, alike). Evicting a chunk whose write had failed started another write (a
    # demotion) and gave the store no slab, so a full CPU tier rejected every new prompt: a
    # failing tier below made host memory worse than having no tier below at all.
    manager = make_manager(slabs=4, disk_bytes=4096)
    a, b = (db.spans(seeded_tokens(4 * CHUNK, seed)) for seed in (85, 86))
    kv = seeded_kv(layout, 4 * CHUNK, 85)
    assert manager.put(a, kv) == 4
    assert manager.flush(timeout=10)
    assert disk_counter(manager, "rejected") == 4

    assert manager.put(b, kv) == 4  # the old prompt's chunks are dropped, as with no disk
    assert manager.contains_prefix([s.key for s in b]) == 4
    out = torch.zeros_like(kv)
    assert manager.get(b, out) == 4 and torch.equal(out, kv)
    assert manager.flush(timeout=10)
    assert disk_counter(manager, "rejected") == 8  # b's own write-through; nothing written twice
    manager.clear()
    manager.check_invariants(empty=True)
