"""kvtier.connector.handoffs: a prefill's KV held for a decode instance under a transfer id, until
released, past its TTL, or pushed out by newer ones; and the scheduler connector handing a finished
remote-decode request's prompt to it (the end-to-end flow is tests/integrations/kvtier_engine/
serving/test_disagg.py, with real processes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvtier import CacheEngine, KVLayout
from kvtier.config import CpuConfig, KvtierConfig, P2PConfig
from kvtier.connector import KvtierSchedulerConnector
from kvtier.connector import handoffs as handoffs_module
from kvtier.connector.handoffs import Handoffs, wants_remote_decode

LAYOUT = KVLayout(2, 2, 16, torch.float32)
TOKENS = list(range(40))  # 2 whole chunks of 16 and a partial one


@pytest.fixture
def engine():
    config = KvtierConfig(chunk_size=16, save_partial_chunks=True, disk=None,
                          cpu=CpuConfig(capacity=4 << 20, pin_memory="off"), p2p=P2PConfig(transport="tcp"))
    with CacheEngine(config, LAYOUT, "handoffs-test") as engine:
        yield engine


def leased(engine: CacheEngine) -> int:
    return engine.stats()["pool"]["leased_chunks"]


def test_hold_leases_the_prompt_and_says_where_and_what_to_read_until_released(engine):
    handoffs = Handoffs(engine)
    params = handoffs.hold(TOKENS, 40)
    assert params["remote_p2p_url"] == engine.p2p_url and params["num_tokens"] == 40
    assert params["namespace"] == engine.db.namespace_digest.hex() and params["do_remote_prefill"] is True
    assert leased(engine) == 3 and len(handoffs) == 1
    assert handoffs.release(params["transfer_id"]) is True
    assert leased(engine) == 0 and handoffs.release(params["transfer_id"]) is False  # once
    assert handoffs.release("never-held") is False


def test_a_lease_ends_by_itself_after_its_ttl_and_the_oldest_beyond_the_bound(engine, monkeypatch):
    now = [0.0]
    handoffs = Handoffs(engine, ttl_s=10.0, clock=lambda: now[0])
    first = handoffs.hold(TOKENS, 40)
    now[0] = 5.0
    handoffs.hold(TOKENS[:16], 16)
    now[0] = 10.0
    assert handoffs.sweep() == 1 and leased(engine) == 1  # the first ran out; the second holds on
    assert handoffs.release(first["transfer_id"]) is False
    monkeypatch.setattr(handoffs_module, "MAX_HELD", 2)
    for _ in range(3):
        handoffs.hold(TOKENS[:16], 16)
    assert len(handoffs) == 2
    handoffs.close()
    assert leased(engine) == 0 and len(handoffs) == 0


def test_without_a_p2p_endpoint_nothing_is_held():
    config = KvtierConfig(chunk_size=16, disk=None, cpu=CpuConfig(capacity=4 << 20, pin_memory="off"))
    with CacheEngine(config, LAYOUT, "handoffs-test") as engine:
        assert Handoffs(engine).hold(TOKENS, 40) is None and leased(engine) == 0


def test_the_connector_hands_a_remote_decode_requests_prompt_over_and_asks_to_hear_it_stored(engine):
    connector = KvtierSchedulerConnector(engine, 16)
    request = SimpleNamespace(request_id="r", all_token_ids=TOKENS + [7],
                              kv_transfer_params={"do_remote_decode": True})
    assert wants_remote_decode(request)
    connector.get_num_new_matched_tokens(request, 0)
    connector.update_state_after_alloc(request, [0, 1, 2], 0)
    hold, params = connector.request_finished(request, [0, 1, 2], 40)
    assert hold is True and params["num_tokens"] == 40  # the prompt, its partial chunk too
    # The prompt's keys are leased, its partial chunk's too (not the key of the prompt + the token
    # generated after it): none of them can be evicted before the decode instance reads them.
    assert engine.storage.pins.is_leased(engine.db.keys(TOKENS)[-1])
    assert not engine.storage.pins.is_leased(engine.db.keys(TOKENS + [7])[-1])
    meta = connector.build_connector_meta(1, [])
    assert meta.notify_stored == ["r"] and [(s.start, s.end, s.final) for s in meta.saves] == [(0, 40, True)]
    plain = SimpleNamespace(request_id="p", all_token_ids=TOKENS, kv_transfer_params=None)
    assert connector.request_finished(plain, [], 0) == (False, None)
    connector.close()
    assert leased(engine) == 0
