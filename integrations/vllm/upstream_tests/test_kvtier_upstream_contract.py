"""vLLM's KV-connector unit tests (tests/v1/kv_connector/unit, vLLM v0.32.0), the ones about the generic
connector contract, re-aimed at kvtier's `KvtierConnector`.

Upstream drives vLLM's real `Scheduler` with a mocked connector (test_kv_load_failure_recovery,
test_invalid_blocks_correctness, test_error_propagation, test_cache_pollution_prevention) or with
its ExampleConnector / OffloadingConnector and a hand-written model-runner loop
(offloading_connector/utils.py RequestRunner, test_kv_connector_lifecycle, test_multi_connector).
Here the same scenarios run with nothing mocked on the connector side:

- the scheduler is vLLM's `Scheduler`, built by upstream's `create_scheduler` / `create_vllm_config`,
  whose SCHEDULER-role connector is `KvtierConnector` (loaded by module path, as users do);
- the WORKER-role `KvtierConnector` is vLLM's global KV transfer agent
  (`ensure_kv_transfer_initialized`), and every step goes through vLLM's own model-runner wrapper
  (`KVConnectorModelRunnerMixin._get_kv_connector_output`: bind, start_load_kv before or after the
  forward as `has_sync_kv_loads` says, wait_for_save, get_transfer_results, invalid blocks, stats,
  worker meta, clear);
- the "forward" is a stand-in that writes a known KV value (a function of token, position and layer)
  into the blocks of the tokens each step computes, through the per-layer hooks an attention layer
  calls; after every step the test reads every scheduled request's blocks back and checks each
  position holds that value. KV kvtier loaded into the wrong block, a load that falls short and is
  not recomputed, or a recomputation that is skipped all show up as a wrong value.

Two process layouts, as kvtier's connector tells them apart: "uni" (both sides share one CacheEngine,
vLLM on one GPU) and "mp" (each side its own CacheEngine and only the disk tier shared, which is how
vLLM always runs on CPU). Run with vLLM's test tree on sys.path (run.sh does this).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kvtier_contract import (
    BLOCK,
    CHUNK,
    MODEL,
    MODES,
    KvtierEngine,
    add,
    first_schedule_of,
    prompt,
)
from tests.v1.kv_connector.unit.utils import (
    assert_scheduler_empty,
)
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import RequestStatus
from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

pytestmark = pytest.mark.skipif(
    not MODEL or not Path(MODEL, "config.json").exists(),
    reason="VLLM_TEST_LOCAL_MODEL must name a local Hugging Face model folder (run.sh exports SmolLM2-135M)")


# ---------------------------------------------------------------------------------------------------
# Store, then load (test_example_connector / test_multi_connector: a second generation of the same
# prompt is served by the connector; upstream's assert_scheduler_empty after each)


@pytest.mark.parametrize("backend,asynchronous", MODES)
def test_prompt_stored_by_one_request_is_loaded_by_the_next(make_engine, backend, asynchronous):
    engine = make_engine(backend=backend, asynchronous=asynchronous)
    tokens = prompt(1, 3 * CHUNK + 10)
    first = add(engine, tokens)
    engine.run()
    assert first.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert_scheduler_empty(engine.scheduler)  # upstream: no request, block or ref count left behind
    engine.settle()
    assert engine.leases() == {}

    second = add(engine, tokens + [7, 8, 9])
    engine.run()
    sched = first_schedule_of(engine, second.request_id)
    assert sched.num_computed_tokens == 3 * CHUNK  # kvtier's three chunks, vLLM's prefix cache off
    assert engine.external(second.request_id) == 3 * CHUNK
    # What vLLM's stat loggers get: the connector's prefix-cache hits and kvtier's transfer counters.
    hits = [s.connector_prefix_cache_stats for s in engine.scheduler_stats if s.connector_prefix_cache_stats]
    assert sum(h.hits for h in hits) == 3 * CHUNK and sum(h.requests for h in hits) == 2
    moved = [s.kv_connector_stats for s in engine.scheduler_stats if s.kv_connector_stats]
    assert sum(m.get("loaded_tokens", 0) for m in moved) == 3 * CHUNK
    if asynchronous == "on":  # parked while its KV loads, then scheduled with it
        assert any(second.request_id in (o.kv_connector_output.finished_recving or ())
                   for o in engine.outputs if o.kv_connector_output)
    assert_scheduler_empty(engine.scheduler)
    engine.settle()
    assert engine.leases() == {}


# ---------------------------------------------------------------------------------------------------
# A load that falls short (test_kv_load_failure_recovery, test_invalid_blocks_correctness,
# test_error_propagation, test_cache_pollution_prevention)


def corrupt_chunk_on_disk(engine: KvtierEngine, tokens: list[int], index: int) -> None:
    """Only disk holds the prompt's chunks (CPU tiers cleared); chunk `index`'s record is zeroed."""
    engine.worker_engine.clear("cpu")
    engine.scheduler_engine.clear("cpu")
    disk = engine.worker_engine.storage.lower[0]
    record = disk.path_for(engine.worker_engine.db.keys(tokens)[index])
    record.write_bytes(bytes(record.stat().st_size))


@pytest.mark.parametrize("backend,asynchronous", MODES)
def test_a_load_that_falls_short_is_recomputed_not_failed(make_engine, backend, asynchronous):
    """Upstream: invalid blocks truncate num_computed_tokens to the first of them and the request
    recomputes from there ("recompute") or is finished with an error ("fail"). kvtier sets the policy
    to "recompute" whatever the config says (a cache miss is never a request failure): the config
    here says "fail", as upstream's create_vllm_config does."""
    engine = make_engine(backend=backend, asynchronous=asynchronous, failure_policy="fail")
    assert engine.config.kv_transfer_config.kv_load_failure_policy == "recompute"
    assert engine.scheduler.recompute_kv_load_failures
    tokens = prompt(2, 3 * CHUNK + 5)
    add(engine, tokens)
    engine.run()
    engine.settle()
    corrupt_chunk_on_disk(engine, tokens, 1)

    second = add(engine, tokens + [1, 2])
    engine.run()  # check_blocks after every step: the recomputed positions hold the right KV
    assert second.status == RequestStatus.FINISHED_LENGTH_CAPPED  # not FINISHED_ERROR
    assert engine.external(second.request_id) == 3 * CHUNK  # offered three chunks ...
    invalid = set().union(*(o.kv_connector_output.invalid_block_ids for o in engine.outputs
                            if o.kv_connector_output))
    assert len(invalid) == 2 * CHUNK // BLOCK  # ... the load stopped at chunk 1: its blocks and chunk 2's
    # vLLM truncated the request to the first invalid block and recomputed the rest: the prompt's
    # tokens from there were scheduled (again, for a synchronous load, whose first step computed the
    # tail after the offered hit), plus 2 decode steps.
    scheduled = sum(so.num_scheduled_tokens.get(second.request_id, 0) for so in engine.schedules)
    first_pass = len(tokens) + 2 - 3 * CHUNK if asynchronous == "off" else 0
    assert scheduled == first_pass + (len(tokens) + 2 - CHUNK) + 2
    assert_scheduler_empty(engine.scheduler)
    engine.settle()
    assert engine.leases() == {}

    # The lost chunks were saved again by the recomputing request (kvtier's update_connector_output
    # lowers what it counts as saved to where the load stopped): a third request loads all three,
    # with no load error.
    assert engine.worker_engine.lookup(tokens) == 3 * CHUNK, "the recomputed chunks were not saved again"
    engine.worker_engine.clear("cpu")
    since = len(engine.outputs)
    third = add(engine, tokens + [3])
    engine.run()
    assert engine.external(third.request_id) == 3 * CHUNK
    assert not set().union(*(o.kv_connector_output.invalid_block_ids for o in engine.outputs[since:]
                             if o.kv_connector_output))


def test_bad_blocks_are_not_served_from_vllms_prefix_cache(make_engine):
    """test_cache_pollution_prevention's concern with recompute: blocks a short load left unfilled
    must not be handed to another request by vLLM's own prefix cache before they are recomputed.
    Two requests with the same prompt, prefix caching on, the second added right after the first's
    failed load step."""
    engine = make_engine(backend="uni", prefix_caching=True)
    tokens = prompt(3, 3 * CHUNK + 5)
    add(engine, tokens)
    engine.run()
    engine.settle()
    engine.scheduler.reset_prefix_cache()  # vLLM's cache empty: the next hit is kvtier's
    corrupt_chunk_on_disk(engine, tokens, 1)
    second = add(engine, tokens + [1])
    engine.step()  # the load: chunk 0 lands, chunks 1-2 are invalid blocks
    assert engine.outputs[-1].kv_connector_output.invalid_block_ids
    third = add(engine, tokens + [2])
    engine.run()  # check_blocks after every step covers the third request too
    assert second.status == third.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert_scheduler_empty(engine.scheduler)


# ---------------------------------------------------------------------------------------------------
# Preemption (scheduler preempts a running request; it comes back with all-new blocks)


@pytest.mark.parametrize("backend", ["uni", "mp"])
def test_preempted_request_resumes_with_correct_kv(make_engine, backend):
    # 15 usable blocks of 16: two prompts of 100 tokens (7 blocks each) growing by decode.
    engine = make_engine(backend=backend, num_blocks=16, max_batched=256)
    a = add(engine, prompt(4, 100), max_tokens=40)
    b = add(engine, prompt(5, 100), max_tokens=40)
    engine.run()
    assert a.num_preemptions + b.num_preemptions >= 1, "the test did not cause a preemption"
    assert any(so.preempted_req_ids for so in engine.schedules)
    resumed = [so for so in engine.schedules if so.scheduled_cached_reqs.resumed_req_ids]
    assert resumed, "no request came back from preemption"
    assert a.status == b.status == RequestStatus.FINISHED_LENGTH_CAPPED
    assert_scheduler_empty(engine.scheduler)
    engine.settle()
    assert engine.leases() == {}


# ---------------------------------------------------------------------------------------------------
# Aborts (test_remote_prefill_lifecycle's abort cases, for a connector whose loads are local)


@pytest.mark.parametrize("backend", ["uni", "mp"])
def test_abort_while_waiting_for_an_asynchronous_load(make_engine, backend):
    engine = make_engine(backend=backend, asynchronous="on")
    tokens = prompt(6, 4 * CHUNK + 1)
    add(engine, tokens)
    engine.run()
    engine.settle()

    second = add(engine, tokens + [4])
    engine.step()
    assert second.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    held = engine.scheduler.kv_cache_manager.get_block_ids(second.request_id)[0]
    engine.scheduler.finish_requests(second.request_id, RequestStatus.FINISHED_ABORTED)
    assert second.status == RequestStatus.FINISHED_ABORTED
    engine.run()
    # vLLM freed the blocks only once the worker reported the (cancelled or finished) load.
    assert any(second.request_id in (o.kv_connector_output.finished_recving or ())
               for o in engine.outputs if o.kv_connector_output)
    assert_scheduler_empty(engine.scheduler)
    engine.settle()
    assert engine.leases() == {}
    assert held  # (it had blocks to hold)


@pytest.mark.parametrize("backend", ["uni", "mp"])
def test_abort_mid_decode_saves_the_tail_before_blocks_are_freed(make_engine, backend):
    """request_finished -> True holds the blocks until the worker reports the final save
    (finished_sending), which arrives through a step with no forward. With whole chunks only, a
    chunk completed during decode is saved in the step that completes it (checked too); the final
    save is the partial tail (save_partial_chunks)."""
    engine = make_engine(backend=backend, save_partial=True)
    tokens = prompt(7, 2 * CHUNK - 3)  # the prompt ends 3 tokens short of chunk 2
    req = add(engine, tokens, max_tokens=20)
    while req.num_computed_tokens < 2 * CHUNK + 5:
        engine.step()
    computed = req.num_computed_tokens
    engine.scheduler.finish_requests(req.request_id, RequestStatus.FINISHED_ABORTED)
    assert req.request_id in engine.scheduler.requests  # blocks held for the final save
    steps = engine.run()
    assert steps <= 3
    assert any(req.request_id in (o.kv_connector_output.finished_sending or ())
               for o in engine.outputs if o.kv_connector_output)
    assert_scheduler_empty(engine.scheduler)
    engine.settle()
    # The prompt, the chunk completed by generated tokens, and the tail after it are all in kvtier.
    assert engine.worker_engine.lookup(list(req.all_token_ids[:computed])) == computed


# ---------------------------------------------------------------------------------------------------
# Worker-side lifecycle (test_kv_connector_lifecycle: a step with no forward still binds, saves and
# clears the metadata)


@pytest.mark.parametrize("backend", ["uni", "mp"])
def test_no_forward_step_binds_saves_and_clears_metadata(make_engine, backend):
    """A finished request's final save rides in the next step's metadata; that step has nothing to
    compute, so vLLM's runner takes kv_connector_no_forward: it must still save, report the request
    (finished_sending) and leave no metadata bound."""
    engine = make_engine(backend=backend, save_partial=True)
    req = add(engine, prompt(9, CHUNK + 20), max_tokens=2)
    while not req.is_finished():
        engine.step()
    assert req.request_id in engine.scheduler.requests  # held for its final save (the partial tail)
    so = engine.scheduler.schedule()
    assert so.total_num_scheduled_tokens == 0 and so.kv_connector_metadata.kvtier.saves
    out = KVConnectorModelRunnerMixin.kv_connector_no_forward(so, engine.config)
    assert engine.worker._connector_metadata is None and not engine.worker.has_connector_metadata()
    assert out.kv_connector_output is not None
    assert out.kv_connector_output.finished_sending == {req.request_id}
    engine.scheduler.update_from_output(so, out)
    assert_scheduler_empty(engine.scheduler)


# ---------------------------------------------------------------------------------------------------
# reset_prefix_cache(reset_connector=True) (vLLM asks the connector to drop its cache, e.g. after a
# weight update; the KVConnectorBase_V1.reset_cache contract)


def test_reset_connector_cache_drops_kvtiers_chunks(make_engine):
    engine = make_engine(backend="uni")
    tokens = prompt(8, 2 * CHUNK + 3)
    add(engine, tokens)
    engine.run()
    engine.settle()
    assert engine.scheduler_engine.lookup(tokens) == 2 * CHUNK
    assert engine.scheduler.reset_prefix_cache(reset_connector=True)
    again = add(engine, tokens + [5])
    engine.run()
    assert engine.external(again.request_id) == 0, \
        "after reset_prefix_cache(reset_connector=True) kvtier still served KV computed before it"


# ---------------------------------------------------------------------------------------------------
# Several workers (test_output_aggregator, TestMultiConnectorStats): vLLM merges each rank's output
# with KVOutputAggregator, which calls kvtier's KvtierWorkerMeta.aggregate and KvtierStats.aggregate


def test_tensor_parallel_outputs_merge_through_vllms_aggregator():
    from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
    from vllm.v1.outputs import KVConnectorOutput

    from kvtier_vllm.connector import KvtierStats, KvtierWorkerMeta

    def rank_output(loaded, stats, sending=None, invalid=()):
        out = ModelRunnerOutput(req_ids=[], req_id_to_index={}, sampled_token_ids=[], logprobs=None,
                                prompt_logprobs_dict={}, pooler_output=None)
        out.kv_connector_output = KVConnectorOutput(
            finished_sending=sending, invalid_block_ids=set(invalid),
            kv_connector_stats=KvtierStats(data=dict(stats)),
            kv_connector_worker_meta=KvtierWorkerMeta(dict(loaded)))
        return out

    aggregator = KVOutputAggregator(expected_finished_count=2)
    merged = aggregator.aggregate([
        rank_output({"a": 192, "b": 64}, {"loads": 2, "loaded_tokens": 256}, sending={"x"}),
        rank_output({"a": 128}, {"loads": 2, "loaded_tokens": 192, "load_shortfalls": 1}, invalid={9})])
    kv = merged.kv_connector_output
    # A load counts as far as its slowest rank got; b, reported by one rank, keeps that rank's value.
    assert kv.kv_connector_worker_meta.loaded == {"a": 128, "b": 64}
    assert kv.invalid_block_ids == {9}
    assert kv.kv_connector_stats.reduce() == {"loads": 4, "loaded_tokens": 448, "load_shortfalls": 1}
    assert not kv.finished_sending  # one rank of two has reported x
    second = aggregator.aggregate([rank_output({}, {}), rank_output({}, {}, sending={"x"})])
    assert second.kv_connector_output.finished_sending == {"x"}


# ---------------------------------------------------------------------------------------------------
# KV cache events (offloading_connector/test_events: what a connector's tiers gain and lose reaches
# vLLM's event publisher, beside vLLM's own block events)


@pytest.mark.parametrize("backend", ["uni", "mp"])
def test_kv_events_reach_vllms_publisher(make_engine, backend):
    engine = make_engine(backend=backend, kv_events=True)
    tokens = prompt(10, 3 * CHUNK + 7)
    add(engine, tokens)
    engine.run()
    engine.settle()  # saves and write-through done: the tiers have changed
    add(engine, prompt(11, 20), max_tokens=1)  # steps that carry the events on
    engine.run()
    digests = [key.digest for key in engine.worker_engine.db.keys(tokens)]
    assert len(digests) == 3
    ours = [e for e in engine.published if getattr(e, "ownership", None) == "kvtier"]
    stored = {(e.medium, e.block_hashes[0]): e for e in ours if isinstance(e, BlockStored)}
    for medium in ("CPU", "STORAGE"):  # host memory, and the disk tier's write-through copy
        for i, digest in enumerate(digests):
            event = stored.get((medium, digest))
            assert event is not None, f"no BlockStored for chunk {i} in {medium}: {sorted(stored)}"
            assert event.parent_block_hash == (digests[i - 1] if i else None)
            assert list(event.token_ids) == tokens[i * CHUNK:(i + 1) * CHUNK]
            assert event.block_size == CHUNK
    engine.worker_engine.clear("cpu")
    add(engine, prompt(12, 20), max_tokens=1)
    engine.run()
    removed = {e.block_hashes[0] for e in engine.published if isinstance(e, BlockRemoved)
               and getattr(e, "ownership", None) == "kvtier" and e.medium == "CPU"}
    assert set(digests) <= removed
