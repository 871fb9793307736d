"""Tests for kvtier/controller/memory_state.py beyond the shared FleetState contract (test_state.py):
what an index entry costs in memory, that index_size says so honestly, and threads at once."""

from __future__ import annotations

import os
import threading
import tracemalloc

from fleet_states import T0, registration, stored

from kvtier.controller.memory_state import MemoryState

INSTANCES = 8
PER_INSTANCE = 25_000
MAX_BYTES_PER_ENTRY = 130  # measured ~100 (64-byte key object + a dict slot)


def fill(state: MemoryState, per_instance: int) -> list[list[bytes]]:
    held = []
    for i in range(INSTANCES):
        name = f"i{i}"
        state.register(registration(name), T0)
        keys = [os.urandom(24) for _ in range(per_instance)]
        state.apply(name, state.session, 1, [stored("cpu", keys), stored("disk", keys[::3])], T0)
        held.append(keys)
    return held


def test_an_index_entry_costs_about_100_bytes_and_index_size_says_so():
    state = MemoryState(10.0)
    state.register(registration("warm"), T0)  # the per-instance structures outside the measurement
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = fill(state, PER_INSTANCE)
        del held  # the test's own copies of the key lists; the index keeps the key objects alive
        measured = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    entries, estimate = state.index_size()
    assert entries == INSTANCES * PER_INSTANCE
    assert measured / entries < MAX_BYTES_PER_ENTRY
    assert abs(estimate - measured) / measured < 0.15, (estimate, measured)


def test_a_sweep_returns_the_memory_of_a_down_instance():
    state = MemoryState(10.0)
    fill(state, 1000)
    assert state.heartbeat("i0", state.session, [], T0 + 5)
    assert state.sweep(T0 + 11) == (INSTANCES - 1) * 1000
    entries, size = state.index_size()
    assert entries == 1000 and size < 2 * 1000 * MAX_BYTES_PER_ENTRY


def test_threads_reporting_and_looking_up_at_once_keep_every_key():
    state = MemoryState(10.0)
    held = fill(state, 0)
    for keys in held:
        keys.extend(os.urandom(24) for _ in range(2000))
    errors = []

    def report(i: int) -> None:
        keys = held[i]
        for seq, start in enumerate(range(0, len(keys), 100), start=2):
            state.apply(f"i{i}", state.session, seq, [stored("cpu", keys[start:start + 100])], T0)

    def look() -> None:
        for _ in range(200):
            for holders in state.holders(held[0][:128]):
                if holders and set(holders) != {"i0"}:
                    errors.append(holders)

    threads = [threading.Thread(target=report, args=(i,)) for i in range(INSTANCES)]
    threads += [threading.Thread(target=look) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert state.index_size()[0] == INSTANCES * 2000
    assert all(h == {f"i{i}": 1} for i in range(INSTANCES) for h in state.holders(held[i]))
