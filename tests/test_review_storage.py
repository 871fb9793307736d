"""Review regressions for kvtier/storage.py and kvtier/slab_io.py (issue 8 follow-up), and the
retrieve that takes a known hit (issue 9): stale, partial, larger than the tokens, over a demotion in
flight or a tier whose reads raise, and under threads storing, moving and clearing at once."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as real_wait

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens
from test_storage_stress import THREADS, Workload

import kvtier.slab_io


def test_a_retrieve_whose_copy_out_fails_frees_no_slab_a_read_below_still_writes_into(
        make_manager, db, layout, monkeypatch):
    """The copy of the CPU hits runs while the lower-tier reads fill their slabs; when it raised,
    the wave let go of those slabs at once, and a read still running wrote into a freed slab (the
    next owner's KV)."""
    manager = make_manager(slabs=4)
    spans = db.spans(seeded_tokens(2 * CHUNK, 1))
    assert manager.put(spans, seeded_kv(layout, 2 * CHUNK, 1)) == 2
    assert manager.flush(timeout=10)
    assert manager.move_down([spans[1].key], manager.lower[0]) == 1  # chunk 0 in CPU, chunk 1 only on disk

    go, seen = threading.Event(), []
    disk, pool = manager.lower[0], manager.pool
    real_get, real_free, real_copy = disk.get, pool.free, pool.copy_chunks

    def blocked_get(keys, dests, *copies):  # on a read thread: blocked until the slab is freed or waited for
        go.wait(10)
        seen.append(pool.used_slabs)
        return real_get(keys, dests, *copies)

    def free(slab):
        real_free(slab)
        go.set()

    def waiting(futures):
        go.set()
        return real_wait(futures)

    def copy(chunks, kv, layout, into_slabs):
        if not into_slabs:
            raise RuntimeError("device lost")
        return real_copy(chunks, kv, layout, into_slabs)

    monkeypatch.setattr(disk, "get", blocked_get)
    monkeypatch.setattr(pool, "free", free)
    monkeypatch.setattr(pool, "copy_chunks", copy)
    monkeypatch.setattr(kvtier.slab_io, "wait", waiting, raising=False)

    out = seeded_kv(layout, 2 * CHUNK, 0)
    with pytest.raises(RuntimeError, match="device lost"):
        manager.get(spans, out)
    assert manager._reads.drain(10)
    assert seen == [2]  # the CPU chunk's slab and the read's, still held while the read ran
    assert pool.used_slabs == 1
    manager.check_invariants()


def test_a_known_hit_reads_whole_stored_chunks_within_it_and_within_the_tokens(make_engine, layout):
    engine = make_engine("cpu_disk", save_partial_chunks="true", cpu__capacity="16KiB")
    tokens, kv = seeded_tokens(3 * CHUNK + 5, 2), seeded_kv(layout, 3 * CHUNK + 5, 2)
    engine.store(tokens, kv)  # 4 slabs: the partial last chunk too
    hit = engine.lookup(tokens)
    assert hit == 3 * CHUNK + 5
    # (known hit, what it serves): the lookup's, one token short of it (the partial chunk is
    # not within it), far beyond the tokens, none.
    for known, served in [(hit, hit), (hit - 1, 3 * CHUNK), (10**9, hit), (0, 0)]:
        got, n = engine.retrieve(tokens, known_hit=known)
        assert n == served and torch.equal(got, kv[:, :, :n])
        got, n = engine.retrieve(tokens, start=CHUNK, known_hit=known)
        assert n == (served if served > CHUNK else 0) and torch.equal(got, kv[:, :, CHUNK:max(n, CHUNK)])
    assert engine.flush(timeout=10)
    engine.storage.check_invariants()
    engine.clear()
    engine.storage.check_invariants(empty=True)


def test_a_known_hit_over_a_tier_whose_reads_raise_serves_host_memory_and_leaks_nothing(
        make_engine, layout, monkeypatch):
    engine = make_engine("cpu_disk")
    tokens, kv = seeded_tokens(3 * CHUNK, 3), seeded_kv(layout, 3 * CHUNK, 3)
    engine.store(tokens, kv)
    assert engine.flush(timeout=10)
    engine.clear("cpu")
    engine.store(tokens[:CHUNK], kv[:, :, :CHUNK])  # chunk 0 in CPU, chunks 1-2 on disk only
    disk = engine.storage.lower[0]

    def broken(keys, dests, *copies):
        raise OSError("injected: the disk read fails")

    with monkeypatch.context() as patch:
        patch.setattr(disk, "get", broken)
        got, n = engine.retrieve(tokens, known_hit=3 * CHUNK)
    assert n == CHUNK and torch.equal(got, kv[:, :, :CHUNK])
    assert engine.storage.pool.owners() == {"cpu": 1}  # the failed reads' slabs went back
    got, n = engine.retrieve(tokens, known_hit=3 * CHUNK)
    assert n == 3 * CHUNK and torch.equal(got, kv)
    assert engine.flush(timeout=10)
    engine.storage.check_invariants()


def test_a_known_hit_over_a_chunk_being_demoted_reads_it_from_its_slab(make_engine, layout, monkeypatch):
    engine = make_engine("cpu_disk", write_through="false", cpu__capacity="8KiB")  # 2 slabs
    disk = engine.storage.lower[0]
    gate, writing, real_put = threading.Event(), threading.Event(), disk.put

    def held_put(items):
        writing.set()
        assert gate.wait(10)
        return real_put(items)

    monkeypatch.setattr(disk, "put", held_put)
    tokens, kv = seeded_tokens(2 * CHUNK, 4), seeded_kv(layout, 2 * CHUNK, 4)
    assert engine.store(tokens, kv) == 2
    engine.store(seeded_tokens(CHUNK, 5), seeded_kv(layout, CHUNK, 5))  # demotes chunk 0: write held
    assert writing.wait(10) and engine.stats()["pool"]["demoting_chunks"] == 1

    got, n = engine.retrieve(tokens, known_hit=2 * CHUNK)
    assert n == 2 * CHUNK and torch.equal(got, kv)
    gate.set()
    assert engine.flush(timeout=10)
    engine.storage.check_invariants()
    got, n = engine.retrieve(tokens, known_hit=2 * CHUNK)  # chunk 0 from disk now
    assert n == 2 * CHUNK and torch.equal(got, kv)
    engine.clear()
    engine.storage.check_invariants(empty=True)


def known_hit_thread(engine, work: Workload, seed: int, deadline: float, stale: list) -> int:
    """Stores, moves, clears, leases, and retrieves given a hit: the lookup's just now, one
    another thread looked up a while ago (stale), or an arbitrary one. Every retrieve is exact."""
    rng, held, served = random.Random(seed), [], 0
    try:
        while time.monotonic() < deadline:
            tokens = rng.choice(work.prompts)
            start = rng.randrange(len(tokens) // CHUNK + 1) * CHUNK
            op = rng.random()
            if op < 0.25:
                engine.store(tokens, work.kv_of(tokens)[:, :, start:], start=start)
            elif op < 0.6:
                hit = engine.lookup(tokens) if op < 0.5 else rng.choice([0, len(tokens) + 99,
                                                                         rng.randrange(len(tokens))])
                keys = engine.lease(tokens, hit) if op < 0.4 else []
                stale.append((tokens, hit))
                if rng.random() < 0.3:
                    tokens, hit = stale[rng.randrange(len(stale))]
                try:
                    kv, n = engine.retrieve(tokens, start=start, known_hit=hit)
                finally:
                    engine.release(keys)
                assert n == 0 or (n >= start and torch.equal(kv, work.kv_of(tokens)[:, :, start:n]))
                served += max(n - start, 0)
            elif op < 0.7:
                held.append(engine.lease(tokens, engine.lookup(tokens)))
                if len(held) > 3:
                    engine.release(held.pop(0))
            elif op < 0.78:
                engine.pin(tokens) if op < 0.74 else engine.unpin(tokens)
            elif op < 0.96:
                engine.move(tokens, rng.choice(["cpu", "disk"]))
            else:
                engine.clear(rng.choice([None, "cpu", "disk"]))
    finally:
        for keys in held:
            engine.release(keys)
    return served


@pytest.mark.parametrize("write_through", ["true", "false"])
def test_threads_retrieving_with_stale_and_arbitrary_known_hits_stay_exact_and_leak_nothing(
        make_engine, layout, write_through):
    # Tiny tiers (4 slabs over 6 disk records), partial last chunks, a third of the records
    # unwritable, leases held across calls: known hits go stale under evictions, moves and clears.
    engine = make_engine("cpu_disk", cpu__capacity="16KiB", disk__capacity=f"{6 * 2 * 4096}B",
                         save_partial_chunks="true", write_through=write_through)
    work = Workload(layout)
    work.prompts += [p[:-5] for p in work.prompts[::2]]
    disk = engine.storage.lower[0]
    for i, key in enumerate({k for p in work.prompts for k in engine.db.keys(p)}):
        if i % 3 == 0:
            disk.path_for(key).mkdir(parents=True)  # its writes all fail
    stale: list = []
    deadline = time.monotonic() + 4.0
    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(known_hit_thread, engine, work, seed, deadline, stale)
                   for seed in range(THREADS)]
        served = sum(f.result(timeout=40) for f in futures)
    assert served > 0
    assert engine.flush(timeout=10)
    engine.storage.check_invariants()
    engine.clear()
    engine.storage.check_invariants(empty=True)
