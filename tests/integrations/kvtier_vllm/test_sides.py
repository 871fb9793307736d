"""Tests for integrations/vllm/kvtier_vllm/scheduler_side.py and worker_side.py: vLLM's requests,
block lists, SchedulerOutput and per-layer KV caches translated for kvtier's connector, driven the
way vLLM's scheduler and model runner call them. vLLM itself is not imported: its objects are stood
in for by plain ones with the same attributes (the real thing runs in tests/integrations/kvtier_vllm/
test_vllm.py, in the venv `make vllm-venv` builds). A real CacheEngine (CPU + disk tiers) holds the KV."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import CHUNK, seeded_tokens

from kvtier.config import LoadsConfig
from kvtier.sim.trace import read_trace
from kvtier_vllm.paged_kv import VllmPagedKV
from kvtier_vllm.scheduler_side import SchedulerSide
from kvtier_vllm.worker_side import WorkerSide, unfilled_blocks

BS, NB = CHUNK, 12  # vLLM blocks of one kvtier chunk each
SYNC = LoadsConfig(asynchronous="off", prefetch=False)


class ConstantList:  # vLLM's read-only view of a request's token list
    def __init__(self, x: list[int]):
        self._x = x

    def __len__(self):
        return len(self._x)

    def __getitem__(self, i):
        return self._x[i]

    def __iter__(self):
        return iter(self._x)


def request(request_id: str, tokens: list[int]) -> SimpleNamespace:
    return SimpleNamespace(request_id=request_id, all_token_ids=ConstantList(tokens), num_computed_tokens=0)


def blocks(ids: list[int]) -> SimpleNamespace:
    return SimpleNamespace(get_block_ids=lambda: (list(ids),))


def new_step(req, block_ids: list[int], computed: int, scheduled: int) -> SimpleNamespace:
    new = SimpleNamespace(req_id=req.request_id, block_ids=(list(block_ids),), num_computed_tokens=computed)
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    return SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=cached,
                           num_scheduled_tokens={req.request_id: scheduled})


class Instance:
    """One vLLM instance's two sides around one engine: `lease` as where the sides share a process."""

    def __init__(self, engine, one_process: bool = True, loads: LoadsConfig = SYNC):
        layout = engine.layout
        self.caches = {f"model.layers.{i}.self_attn.attn": torch.zeros(NB, layout.num_kv_heads, BS,
                                                                      2 * layout.head_dim, dtype=layout.dtype)
                       for i in range(layout.num_layers)}
        self.scheduler = SchedulerSide(engine, BS, loads, lease=one_process)
        self.worker = WorkerSide(engine, loads, lease=not one_process)
        self.worker.register_kv_caches(self.caches)

    def step(self, output, forward=None) -> dict:
        """One engine step: the metadata built, the worker's load, the forward (`forward()` writes
        the computed KV), the saves; returns what the worker reports back."""
        meta = self.scheduler.build_connector_meta(output)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv()
        for name in self.caches:
            self.worker.wait_for_layer_load(name)
        if forward is not None:
            forward()
        self.worker.wait_for_save()
        self.worker.clear_connector_metadata()
        saved, received = self.worker.get_finished()
        loaded = self.worker.take_loaded()
        self.scheduler.update_connector_output(loaded)
        errors = self.worker.take_load_errors()
        return {"loaded": loaded, "errors": errors, "saved": saved, "received": received}


def fill(paged: VllmPagedKV, block_ids: list[int], num_tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, paged.num_layers, num_tokens, paged.num_kv_heads * paged.head_dim, generator=g)
    paged.scatter(block_ids, kv.to(paged.dtype))
    return kv.to(paged.dtype)


@pytest.mark.parametrize("one_process", [True, False], ids=["one process", "separate processes"])
def test_a_prompt_computed_once_is_loaded_into_another_requests_blocks(make_engine, one_process):
    engine = make_engine("cpu_disk")
    inst = Instance(engine, one_process)
    tokens = seeded_tokens(3 * CHUNK + 5, 1).tolist()
    first = request("a", tokens)
    assert inst.scheduler.get_num_new_matched_tokens(first, 0) == (0, False)
    inst.scheduler.update_state_after_alloc(first, blocks([0, 1, 2, 3]), 0)
    kv = None

    def forward():
        nonlocal kv
        kv = fill(inst.worker.paged, [0, 1, 2, 3], len(tokens), seed=7)

    report = inst.step(new_step(first, [0, 1, 2, 3], 0, len(tokens)), forward)
    assert report["errors"] == set() and report["loaded"] == {}
    assert inst.worker.kv.drain(10) and engine.flush(10)

    second = request("b", tokens + [5, 6])
    assert inst.scheduler.get_num_new_matched_tokens(second, 0) == (3 * CHUNK, False)
    inst.scheduler.update_state_after_alloc(second, blocks([8, 9, 10, 11]), 3 * CHUNK)
    report = inst.step(new_step(second, [8, 9, 10, 11], 3 * CHUNK, len(tokens) + 2 - 3 * CHUNK))
    assert report == {"loaded": {"b": 3 * CHUNK}, "errors": set(), "saved": None, "received": None}
    stats = inst.worker.take_stats()  # what vLLM logs: the counters gained since the last report
    assert stats["loads"] == 1 and stats["loaded_tokens"] == 3 * CHUNK and stats["saved_tokens"] == 3 * CHUNK
    assert inst.worker.take_stats() == {}
    assert torch.equal(inst.worker.paged.gather([8, 9, 10], 3 * CHUNK), kv[:, :, :3 * CHUNK])
    assert engine.storage.pins._leases == {}  # every lease taken (either side) was released


def test_a_load_that_falls_short_names_the_unfilled_blocks_and_is_never_tried_again(make_engine):
    engine = make_engine("cpu_disk")
    inst = Instance(engine)
    tokens = seeded_tokens(3 * CHUNK, 2).tolist()
    first = request("a", tokens)
    inst.scheduler.get_num_new_matched_tokens(first, 0)
    inst.scheduler.update_state_after_alloc(first, blocks([0, 1, 2]), 0)
    inst.step(new_step(first, [0, 1, 2], 0, len(tokens)),
              lambda: fill(inst.worker.paged, [0, 1, 2], len(tokens), seed=3))
    assert inst.worker.kv.drain(10) and engine.flush(10)

    engine.clear("cpu")  # the chunks are on disk only
    second = request("b", tokens + [9])
    assert inst.scheduler.get_num_new_matched_tokens(second, 0) == (3 * CHUNK, False)
    inst.scheduler.update_state_after_alloc(second, blocks([4, 5, 6, 7]), 3 * CHUNK)
    record = engine.storage.lower[0].path_for(engine.db.keys(tokens)[1])
    record.write_bytes(bytes(record.stat().st_size))  # chunk 1 corrupt on disk: the load stops before it
    report = inst.step(new_step(second, [4, 5, 6, 7], 3 * CHUNK, 1))
    assert report["loaded"] == {"b": CHUNK} and report["errors"] == {5, 6}
    # vLLM recomputes blocks 5 and 6 and asks again: kvtier does not offer that load a second time.
    assert inst.scheduler.get_num_new_matched_tokens(second, CHUNK) == (0, False)


def test_unfilled_blocks_run_from_the_block_of_the_token_reached_to_the_last_planned():
    spec = SimpleNamespace(block_ids=[10, 11, 12, 13], end=3 * BS + 1)
    assert unfilled_blocks(spec, 3 * BS + 1, BS) == set()
    assert unfilled_blocks(spec, BS, BS) == {11, 12, 13}
    assert unfilled_blocks(spec, 0, BS) == {10, 11, 12, 13}


def test_a_request_aborted_before_its_asynchronous_load_starts_loads_nothing_and_is_reported(make_engine):
    """vLLM holds the blocks of a request aborted while it waits for its KV until the worker reports
    it received; kvtier cancels the load, so nothing is written into blocks about to be freed."""
    engine = make_engine("cpu_disk")
    inst = Instance(engine, one_process=False, loads=LoadsConfig(asynchronous="on", prefetch=False))
    tokens = seeded_tokens(2 * CHUNK, 4).tolist()
    first = request("a", tokens)
    inst.scheduler.get_num_new_matched_tokens(first, 0)
    inst.scheduler.update_state_after_alloc(first, blocks([0, 1]), 0)
    inst.step(new_step(first, [0, 1], 0, len(tokens)),
              lambda: fill(inst.worker.paged, [0, 1], len(tokens), seed=5))
    assert inst.worker.kv.drain(10) and engine.flush(10)

    second = request("b", tokens + [1])
    assert inst.scheduler.get_num_new_matched_tokens(second, 0) == (2 * CHUNK, True)
    inst.scheduler.update_state_after_alloc(second, blocks([6, 7, 8]), 2 * CHUNK)
    assert inst.scheduler.request_finished(second, []) == (False, None)  # aborted, waiting for its KV
    nothing = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    empty = SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens={}, scheduled_cached_reqs=nothing)
    report = inst.step(empty)  # the load is handed over with its cancel: dropped before it starts
    assert report["received"] == {"b"} and report["loaded"] == {"b": 0}
    assert torch.count_nonzero(inst.worker.paged.gather([6, 7], 2 * CHUNK)) == 0  # nothing written
    assert engine.storage.pins._leases == {}


def cached_step(req, new_block_ids: list[int], computed: int, scheduled: int, resumed: bool = False):
    cached = SimpleNamespace(req_ids=[req.request_id], new_block_ids=[(list(new_block_ids),)],
                             num_computed_tokens=[computed],
                             resumed_req_ids={req.request_id} if resumed else set())
    return SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                           num_scheduled_tokens={req.request_id: scheduled})


def test_a_requests_blocks_follow_vllms_steps_new_cached_and_resumed(make_engine):
    """Chunked prefill over three steps, then a preemption: each step's save names the blocks vLLM
    gave the request by then, a resumed request's whole new list replacing the old one."""
    engine = make_engine("cpu_disk")
    inst = Instance(engine)
    tokens = seeded_tokens(4 * CHUNK, 6).tolist()
    req = request("a", tokens)
    inst.scheduler.get_num_new_matched_tokens(req, 0)
    inst.scheduler.update_state_after_alloc(req, blocks([3, 1]), 0)

    first = inst.scheduler.build_connector_meta(new_step(req, [3, 1], 0, 2 * CHUNK))
    second = inst.scheduler.build_connector_meta(cached_step(req, [7], 2 * CHUNK, CHUNK))
    resumed = inst.scheduler.build_connector_meta(cached_step(req, [9, 8, 2, 0], 0, 4 * CHUNK, resumed=True))

    assert [(s.block_ids, s.start, s.end) for s in first.saves] == [([3, 1], 0, 2 * CHUNK)]
    assert [(s.block_ids, s.start, s.end) for s in second.saves] == [([3, 1, 7], 2 * CHUNK, 3 * CHUNK)]
    # Recomputed from scratch after the preemption: only the chunk not saved yet is saved, from its
    # new blocks.
    assert [(s.block_ids, s.start, s.end) for s in resumed.saves] == [([9, 8, 2, 0], 3 * CHUNK, 4 * CHUNK)]
    assert inst.scheduler.request_finished(req, [9, 8, 2, 0]) == (False, None)  # every whole chunk saved


def test_the_scheduler_side_logs_a_trace_line_per_request_its_prompt_taken_when_vllm_adds_it(make_engine,
                                                                                              tmp_path):
    """`trace_log:` (kvtier.connector.trace_log) under vLLM: the prompt is the live token list when
    `on_new_request` sees it; what vLLM appends to it after is the output."""
    path = tmp_path / "trace.jsonl"
    side = SchedulerSide(make_engine("cpu", trace_log__path=path), BS, SYNC, lease=True)
    tokens = seeded_tokens(2 * CHUNK + 3, 7).tolist()
    req = request("a", list(tokens))
    side.on_new_request(req)
    assert side.get_num_new_matched_tokens(req, 0) == (0, False)
    req.all_token_ids._x.extend([1, 2, 3, 4])  # generated: vLLM appends to the list behind its view
    req.num_computed_tokens = len(tokens) + 3
    assert side.request_finished(req, []) == (False, None)
    side.close()

    (line,), _ = read_trace(path)
    assert (line.input_length, line.output_length, len(line.hash_ids)) == (2 * CHUNK + 3, 4, 3)
    assert side.kv.stats()["trace_lines"] == 1
