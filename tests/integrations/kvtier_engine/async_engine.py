"""The harness of the engine tests with asynchronous kvtier loads (test_async_loads.py,
test_async_load_attacks.py): a tier below the CPU whose reads a test holds (`Gate`, wrapped around
every lower tier of the engines a test builds by conftest.py's `gates` fixture), kvtier's state set
up (`warm`), the engine stepped to a condition or to the end (`step_until`, `drive`), and the rule
every such test ends on: once idle, nothing is left behind (`assert_idle`).

No sleeps and no wall-clock asserts: a held read waits on an Event the test sets, and every loop of
steps is bounded by MAX_STEPS, so a hang fails instead of blocking.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

from kvtier.config import KvtierConfig
from kvtier.tiers.wrapped import WrappedTier
from kvtier_engine import SamplingParams
from kvtier_engine.llm_engine import LLMEngine, RequestOutput

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
# The engines' options unless a test says otherwise: the tiny checkpoint in fp32 on the CPU, a 1 MiB
# paged cache, and no device prefix cache, so that every repeat is a kvtier load.
ENGINE_OPTIONS = {"device": "cpu", "dtype": "float32", "kv_cache_bytes": 1 << 20,
                  "enable_prefix_caching": False}
WAIT_S = 20.0
MAX_STEPS = 400  # a drive that has not finished by then is stuck


class Gate(WrappedTier):
    """A tier below the CPU whose next read (of a key in `keys`, any key when None) waits for
    `release` once `armed`, after setting `entered`; every read's keys are recorded. With `permits`
    (a semaphore the test feeds, e.g. one a step), each read first takes a permit: slow reads."""

    def __init__(self, inner):
        super().__init__(inner)
        self.permits: threading.Semaphore | None = None
        self.armed, self.keys = False, None
        self.entered, self.release = threading.Event(), threading.Event()
        self.read_keys: list = []
        self.lock = threading.Lock()

    def arm(self, keys=None) -> None:
        self.entered.clear()
        self.release.clear()
        self.keys, self.armed = None if keys is None else set(keys), True

    def get(self, keys, dests):
        with self.lock:
            self.read_keys.extend(keys)
            held = self.armed and (self.keys is None or bool(self.keys.intersection(keys)))
            self.armed = self.armed and not held
        if held:
            self.entered.set()
            assert self.release.wait(WAIT_S), "the test never released the held read"
        if self.permits is not None:
            assert self.permits.acquire(timeout=WAIT_S), "the test stopped handing out read permits"
        return self.inner.get(keys, dests)

    def open(self) -> None:
        """Let every read through from now on: the held one, and all later ones."""
        with self.lock:
            self.armed = False
        self.release.set()
        if self.permits is not None:
            self.permits.release(1000)


def with_loads(config: KvtierConfig, **loads) -> KvtierConfig:
    """`config` with its `loads:` section changed as given (asynchronous="on", prefetch=False, ...)."""
    return dataclasses.replace(config, loads=dataclasses.replace(config.loads, **loads))


def add(engine: LLMEngine, requests: dict[str, list[int]], params: SamplingParams = PARAMS) -> None:
    for rid, ids in requests.items():
        engine.add_request(ids, params, request_id=rid)


def step_until(engine: LLMEngine, condition: Callable[[], object], what: str,
               outputs: dict | None = None) -> None:
    """Step the engine until `condition()` holds (checked before each step); finished outputs
    collected into `outputs`."""
    for _ in range(MAX_STEPS):
        if condition():
            return
        for out in engine.step():
            if out.finished and outputs is not None:
                outputs[out.request_id] = out
    raise AssertionError(f"{what}: not within {MAX_STEPS} steps")


def drive(engine: LLMEngine, outputs: dict | None = None) -> dict[str, RequestOutput]:
    """Step until every request is done and its KV saved; request id -> its final output."""
    outputs = {} if outputs is None else outputs
    step_until(engine, lambda: not engine.has_unfinished(), "every request to finish", outputs)
    assert engine.wait_for_saves(WAIT_S)
    return outputs


def warm(engine: LLMEngine, *prompts: list[int]) -> None:
    """Store the prompts' KV in kvtier (one after another), then leave it on the tiers below the CPU
    only: loading any of it needs a read from below."""
    for ids in prompts:
        engine.add_request(ids, PARAMS)
        drive(engine)
    kv = engine.kvtier
    assert kv.flush(WAIT_S)
    kv.clear("cpu")
    assert all(kv.lookup(ids) >= 16 for ids in prompts) and kv.stats()["tiers"]["cpu"]["chunks"] == 0


def tokens_of(outputs: dict[str, RequestOutput]) -> dict[str, list[int]]:
    return {rid: out.token_ids for rid, out in outputs.items()}


def assert_idle(engine: LLMEngine) -> None:
    """Nothing left behind: no lease, staging byte, load in flight, parked request or held block."""
    scheduler, worker = engine.scheduler, engine.connector
    queues = (scheduler.loading, scheduler.ready, scheduler.held, scheduler.running, scheduler.waiting)
    assert not any(queues), queues
    assert scheduler.pool.num_free == len(scheduler.pool.blocks)
    assert engine.kvtier.stats()["pool"]["leased_chunks"] == 0
    loads = worker.async_stats()
    assert (loads["async_in_flight"], loads["async_staging_bytes"]) == (0, 0), loads
    assert scheduler.connector.prefetcher is None or scheduler.connector.prefetcher.wait_idle(WAIT_S)
    assert engine.kvtier.flush(WAIT_S)  # a quiet moment: the write-through of the last saves landed
    engine.kvtier.storage.check_invariants()
