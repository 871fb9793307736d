"""Concurrency stress for kvtier/storage.py through the CacheEngine: 8 threads store, retrieve,
look up, pin, unpin, move, clear and lease+retrieve+release overlapping prompts on a 16-slab CPU
tier over a disk tier. Every retrieve must be bit-exact, and after flush() + clear() the accounting
must be back to zero (StorageManager.check_invariants).

KV is a function of (token, position), so prompts sharing a prefix share its KV as in a real model,
and any prefix a retrieve returns can be checked against the prompt it asked for. Each thread draws
its operations from its own seeded RNG; what interleaves differs run to run, what is asserted does
not depend on it. Bounded by an operation count per thread and a wall-clock deadline.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from conftest import CHUNK

THREADS = 8
OPS_PER_THREAD = 500
DEADLINE_S = 20.0
VOCAB = 64


class Workload:
    def __init__(self, layout):
        g = torch.Generator().manual_seed(8)
        dims = (2, layout.num_layers)
        self.by_token = torch.randn(*dims, VOCAB, layout.hidden, generator=g).to(layout.dtype)
        self.by_position = torch.randn(*dims, 12 * CHUNK, layout.hidden, generator=g).to(layout.dtype)
        # 4 shared prefixes of 2 chunks, each with 3 continuations of 2 to 10 chunks: the longest
        # prompts (12 chunks) are most of the CPU tier, so waves, evictions and demotions all happen.
        prefixes = [torch.randint(0, VOCAB, (2 * CHUNK,), generator=g) for _ in range(4)]
        self.prompts = [torch.cat([p, torch.randint(0, VOCAB, (n * CHUNK,), generator=g)])
                        for p in prefixes for n in (2, 6, 10)]

    def kv_of(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.by_token[:, :, tokens] + self.by_position[:, :, : len(tokens)]


def run_thread(engine, work: Workload, seed: int, stop_at: float) -> dict[str, int]:
    rng = random.Random(seed)
    done = {"ops": 0, "served_tokens": 0}

    def check(tokens, got, n):
        assert n % CHUNK == 0 and 0 <= n <= len(tokens)
        assert torch.equal(got, work.kv_of(tokens)[:, :, :n]), "retrieve returned wrong KV"
        done["served_tokens"] += n

    for _ in range(OPS_PER_THREAD):
        if time.monotonic() > stop_at:
            break
        tokens = rng.choice(work.prompts)
        op = rng.random()
        if op < 0.30:
            engine.store(tokens, work.kv_of(tokens))
        elif op < 0.55:
            check(tokens, *engine.retrieve(tokens))
        elif op < 0.65:
            n = engine.lookup(tokens)
            assert n % CHUNK == 0 and 0 <= n <= len(tokens)
        elif op < 0.80:  # what the connector does: lease what lookup promised, load, release
            keys = engine.lease(tokens, engine.lookup(tokens))
            try:
                check(tokens, *engine.retrieve(tokens))
            finally:
                engine.release(keys)
        elif op < 0.86:
            engine.pin(tokens)
        elif op < 0.92:
            engine.unpin(tokens)
        elif op < 0.98:
            engine.move(tokens, rng.choice(["cpu", "disk"]))
        else:
            engine.clear(rng.choice([None, "cpu", "disk"]))
        done["ops"] += 1
    return done


def test_eight_threads_on_overlapping_prompts_get_exact_kv_and_leave_no_leak(make_engine, layout):
    engine = make_engine("cpu_disk", cpu__capacity="64KiB")  # 16 one-chunk slabs
    assert engine.stats()["pool"]["slabs"] == 16
    work = Workload(layout)
    stop_at = time.monotonic() + DEADLINE_S
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> dict[str, int]:
        start.wait(timeout=10)
        return run_thread(engine, work, seed, stop_at)

    with ThreadPoolExecutor(THREADS) as pool:
        results = [f.result(timeout=50) for f in [pool.submit(worker, seed) for seed in range(THREADS)]]

    assert sum(r["ops"] for r in results) >= THREADS  # every thread got going
    assert sum(r["served_tokens"] for r in results) > 0
    assert engine.flush(timeout=10)
    engine.storage.check_invariants()  # quiet, not yet cleared: every slab has exactly one owner
    engine.clear()
    engine.storage.check_invariants(empty=True)
    stats = engine.stats()
    assert stats["pool"]["used_slabs"] == 0 and stats["tiers"]["disk"]["bytes"] == 0
