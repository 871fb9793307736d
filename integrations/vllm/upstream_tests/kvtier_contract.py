"""The engine the adapted contract tests drive (test_kvtier_upstream_contract.py): vLLM's real
`Scheduler` (upstream's `create_scheduler`) with `KvtierConnector` as its connector, the WORKER-role
`KvtierConnector` as vLLM's KV transfer agent called through vLLM's own model-runner wrapper, and a
stand-in forward pass that writes a known KV value per (token, position, layer) and checks every
computed position after each step. Shared by the tests as a module (run.sh copies both files)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable
from pathlib import Path
from unittest.mock import MagicMock, patch

import pytest
import torch
from tests.v1.kv_connector.unit.utils import (
    create_request,
    create_scheduler,
    create_vllm_config,
)
from vllm import SamplingParams
from vllm.config import KVEventsConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_transfer_state import (
    ensure_kv_transfer_initialized,
    ensure_kv_transfer_shutdown,
    get_kv_transfer_group,
)
from vllm.forward_context import set_forward_context
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

MODEL = os.environ.get("VLLM_TEST_LOCAL_MODEL", "")
BLOCK = 16  # vLLM's block size in upstream's helpers
CHUNK = 64  # kvtier's chunk: 4 blocks
NUM_BLOCKS = 96
STEP_LIMIT = 400


# ---------------------------------------------------------------------------------------------------
# The engine: vLLM's scheduler + kvtier's two connector sides + a stand-in forward pass


def expected_kv(tokens: list[int], layers: int, heads: int, dim: int) -> torch.Tensor:
    """[2, layers, len(tokens), heads, dim]: K and V of each position, a function of (token,
    position, layer) only, so a block holding another position's or another prompt's KV differs."""
    t = torch.tensor(tokens, dtype=torch.float64)
    p = torch.arange(len(tokens), dtype=torch.float64)
    layer = torch.arange(layers, dtype=torch.float64)[:, None]
    base = torch.remainder(t * 1000.003 + p * 7.919 + layer * 104.729, 65.521)  # [L, T]
    offs = torch.arange(heads * dim, dtype=torch.float64).view(heads, dim) * 1e-4
    k = base[:, :, None, None] + offs
    return torch.stack([k, -k]).to(torch.float32)


class KvtierEngine:
    """One vLLM engine, in this process: the Scheduler (SCHEDULER-role KvtierConnector inside) and
    the WORKER-role KvtierConnector as vLLM's KV transfer agent, over FlashAttention-layout caches
    ([2, blocks, block, heads, dim] per layer)."""

    def __init__(self, kvtier_yaml: Path, backend: str = "uni", prefix_caching: bool = False,
                 num_blocks: int = NUM_BLOCKS, max_batched: int = 64, failure_policy: str = "fail",
                 kv_events: bool = False):
        self.config = create_vllm_config(
            model=MODEL, dtype="float32", block_size=BLOCK, max_num_batched_tokens=max_batched,
            max_model_len=2048, kv_connector="KvtierConnector", kv_connector_module_path="kvtier_vllm",
            kv_role="kv_both", kv_connector_extra_config={"kvtier_config": str(kvtier_yaml)},
            kv_load_failure_policy=failure_policy)
        self.config.parallel_config.distributed_executor_backend = backend
        self.config.cache_config.enable_prefix_caching = prefix_caching
        if kv_events:  # (the null publisher: the test reads what vLLM hands it)
            self.config.kv_events_config = KVEventsConfig(enable_kv_cache_events=True, publisher="null")
        self.scheduler = create_scheduler(self.config, num_blocks=num_blocks)
        self.published: list = []  # every KV event vLLM's scheduler published
        publish = self.scheduler.kv_event_publisher.publish

        def spy_publish(batch):
            self.published.extend(batch.events)
            return publish(batch)

        self.scheduler.kv_event_publisher.publish = spy_publish
        model, parallel = self.config.model_config, self.config.parallel_config
        self.layers = model.get_num_layers(parallel)
        self.heads, self.dim = model.get_num_kv_heads(parallel), model.get_head_size()
        tp_group = MagicMock()
        tp_group.broadcast_object.side_effect = lambda value, src=0: value
        with patch("vllm.distributed.parallel_state.get_tp_group", return_value=tp_group):
            ensure_kv_transfer_initialized(self.config, self.scheduler.kv_cache_config)
        self.worker = get_kv_transfer_group()
        assert self.worker.role == KVConnectorRole.WORKER
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(self.layers)]
        self.caches = {n: torch.zeros(2, num_blocks, BLOCK, self.heads, self.dim) for n in self.names}
        self.worker.register_kv_caches(self.caches)
        # What the connector answered vLLM, per request (a spy: the call goes through unchanged).
        self.matched: dict[str, list[tuple[int, tuple]]] = {}
        connector, ask = self.scheduler.connector, self.scheduler.connector.get_num_new_matched_tokens

        def spy(request, num_computed_tokens):
            answer = ask(request, num_computed_tokens)
            self.matched.setdefault(request.request_id, []).append((num_computed_tokens, answer))
            return answer

        connector.get_num_new_matched_tokens = spy
        self.outputs: list[ModelRunnerOutput] = []  # every step's model runner output
        self.schedules: list[SchedulerOutput] = []
        self.scheduler_stats: list = []  # SchedulerStats vLLM's logger receives
        self.token = 1000  # generated token ids count up from here

    # -- one step, the way vLLM's model runner calls the connector ---------------------------------

    def step(self, check: bool = True) -> SchedulerOutput:
        so = self.scheduler.schedule()
        self.schedules.append(so)
        if so.preempted_req_ids:
            self.worker.handle_preemptions(so.kv_connector_metadata)
        with set_forward_context(None, self.config), \
                KVConnectorModelRunnerMixin._get_kv_connector_output(so) as kv_out:
            if so.total_num_scheduled_tokens:
                self._forward(so)
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            req = self.scheduler.requests[rid]
            done_prefill = req.num_computed_tokens + so.num_scheduled_tokens[rid] >= req.num_prompt_tokens
            sampled.append([self._next_token()] if done_prefill else [])
        out = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={},
                                pooler_output=None, kv_connector_output=kv_out)
        self.outputs.append(out)
        for core_out in self.scheduler.update_from_output(so, out).values():
            if core_out.scheduler_stats is not None:
                self.scheduler_stats.append(core_out.scheduler_stats)
        if check:
            self.check_blocks(so)
        return so

    def _next_token(self) -> int:
        self.token += 1
        return self.token

    def _scheduled(self, so: SchedulerOutput) -> Iterable[tuple[str, int, int]]:
        """(request id, tokens computed before this step, tokens computed in it) for each request."""
        for new in so.scheduled_new_reqs:
            yield new.req_id, new.num_computed_tokens, so.num_scheduled_tokens[new.req_id]
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            yield rid, cached.num_computed_tokens[i], so.num_scheduled_tokens[rid]

    def _forward(self, so: SchedulerOutput) -> None:
        """Each attention layer: wait for its load, write the KV of the positions this step computes."""
        work = []
        for rid, before, count in self._scheduled(so):
            req = self.scheduler.requests[rid]
            blocks = self.scheduler.kv_cache_manager.get_block_ids(rid)[0]
            kv = expected_kv(list(req.all_token_ids[:before + count]), self.layers, self.heads, self.dim)
            pos = torch.arange(before, before + count)
            work.append((torch.tensor(blocks)[pos // BLOCK], pos % BLOCK, kv[:, :, before:before + count]))
        for layer, name in enumerate(self.names):
            self.worker.wait_for_layer_load(name)
            for blk, off, kv in work:
                self.caches[name][:, blk, off] = kv[:, layer]
            self.worker.save_kv_layer(name, self.caches[name], None)

    def held_kv(self, rid: str, num_tokens: int) -> torch.Tensor:
        blocks = torch.tensor(self.scheduler.kv_cache_manager.get_block_ids(rid)[0])
        pos = torch.arange(num_tokens)
        return torch.stack([self.caches[n][:, blocks[pos // BLOCK], pos % BLOCK] for n in self.names], 1)

    def check_blocks(self, so: SchedulerOutput) -> None:
        """Every request this step ran: its blocks hold the right KV at every position computed."""
        for rid, before, count in self._scheduled(so):
            req = self.scheduler.requests.get(rid)
            if req is None or req.is_finished():
                continue  # (blocks freed or about to be)
            n = min(before + count, req.num_computed_tokens)
            want = expected_kv(list(req.all_token_ids[:n]), self.layers, self.heads, self.dim)
            got = self.held_kv(rid, n)
            bad = (got != want).flatten(2).any(-1).any(0).any(0).nonzero().flatten().tolist()
            assert not bad, f"request {rid}: wrong KV at positions {bad[:8]}... (of {n})"

    def run(self, limit: int = STEP_LIMIT) -> int:
        """Step until the scheduler holds nothing (every request done, every held block freed)."""
        for steps in range(1, limit + 1):
            so = self.step()
            if not self.scheduler.has_requests():
                return steps
            if not so.total_num_scheduled_tokens:
                time.sleep(0.005)  # a background load or save in flight
        raise AssertionError(f"scheduler not idle after {limit} steps: {self.scheduler.requests}")

    # -- kvtier internals the tests look at ------------------------------------------------------

    @property
    def worker_engine(self):
        return self.worker._worker.engine

    @property
    def scheduler_engine(self):
        return self.scheduler.connector._scheduler.kv.engine

    def settle(self) -> None:
        """Every save the worker queued is stored and written through to disk (the scheduler side of
        an "mp" engine finds chunks on disk only)."""
        assert self.worker._worker.kv.drain(30) and self.worker_engine.flush(30)

    def external(self, rid: str) -> int:
        """The tokens kvtier offered the request at its first answered lookup."""
        answers = [answer[0] for _, answer in self.matched.get(rid, []) if answer[0] is not None]
        return answers[0] if answers else 0

    def leases(self) -> dict:
        return {**self.worker_engine.storage.pins._leases, **self.scheduler_engine.storage.pins._leases}

    def close(self) -> None:
        self.scheduler.shutdown()
        ensure_kv_transfer_shutdown()


def write_yaml(tmp_path: Path, asynchronous: str = "off", save_partial: bool = False) -> Path:
    path = tmp_path / "kvtier.yaml"
    partial = str(save_partial).lower()
    path.write_text(f"chunk_size: {CHUNK}\nsave_partial_chunks: {partial}\nwrite_through: true\n"
                    f"cpu:\n  capacity: 64MiB\n  pin_memory: 'off'\n"
                    f"disk:\n  path: {tmp_path / 'disk'}\n  capacity: 512MiB\n  o_direct: 'off'\n"
                    f"loads:\n  asynchronous: '{asynchronous}'\n  prefetch: false\n")
    return path


@pytest.fixture
def make_engine(tmp_path):
    made = []

    def make(**kwargs) -> KvtierEngine:
        yaml = write_yaml(tmp_path, kwargs.pop("asynchronous", "off"), kwargs.pop("save_partial", False))
        engine = KvtierEngine(yaml, **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104_729) % 40_000 + 100 for i in range(n)]


_ids = itertools.count(1)


def add(engine: KvtierEngine, tokens: list[int], max_tokens: int = 3) -> Request:
    """A request for `tokens` (upstream's create_request makes its own prompt; this one is its
    construction with a given prompt)."""
    create_request(num_tokens=1)  # (upstream's helper sets vLLM's block-hash seed once)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    req = Request(request_id=f"kv-{next(_ids)}", prompt_token_ids=list(tokens), sampling_params=params,
                  pooling_params=None, mm_features=None, block_hasher=get_request_block_hasher(BLOCK, sha256))
    engine.scheduler.add_request(req)
    return req


def first_schedule_of(engine: KvtierEngine, rid: str):
    for so in engine.schedules:
        for new in so.scheduled_new_reqs:
            if new.req_id == rid:
                return new
    raise AssertionError(f"{rid} never scheduled")


MODES = [pytest.param("uni", "off", id="uni-sync"), pytest.param("mp", "off", id="mp-sync"),
         pytest.param("uni", "on", id="uni-async"), pytest.param("mp", "on", id="mp-async")]


