"""kvtier_engine/disagg.py: what a request's kv_transfer_params may ask of an instance of each
--kv-role (anything else is a ValueError, a 400), what a role needs of the kvtier config, and a
prefill's last output held until its KV is stored. The whole flow, with real processes:
serving/test_disagg.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvtier import CacheEngine, KVLayout
from kvtier.config import CpuConfig, KvtierConfig, P2PConfig
from kvtier.errors import ConfigError
from kvtier_engine import disagg
from kvtier_engine.disagg import Disaggregation, check_role
from kvtier_engine.llm_engine import RequestOutput
from kvtier_engine.request import RequestMetrics

CONFIG = KvtierConfig(chunk_size=16, save_partial_chunks=True, disk=None,
                      cpu=CpuConfig(capacity=4 << 20, pin_memory="off"), p2p=P2PConfig(transport="tcp"))
PEER = "kvtier://127.0.0.1:4567"
PROMPT = list(range(40))


@pytest.fixture
def kvtier():
    with CacheEngine(CONFIG, KVLayout(2, 2, 16, torch.float32), "disagg-test") as engine:
        yield engine


def decode_params(kvtier: CacheEngine, **changes) -> dict:
    return {"do_remote_prefill": True, "remote_p2p_url": PEER, "namespace": kvtier.db.namespace_digest.hex(),
            "num_tokens": 40, "transfer_id": "t", **changes}


def test_roles_other_than_both_need_p2p_and_partial_chunks():
    check_role("both", None)
    with pytest.raises(ConfigError, match="--kv-role prefill needs a kvtier config with a p2p: section"):
        check_role("prefill", None)
    with pytest.raises(ConfigError, match="needs save_partial_chunks: true"):
        check_role("decode", dataclasses.replace(CONFIG, save_partial_chunks=False))
    with pytest.raises(ConfigError, match="--kv-role must be one of"):
        check_role("router", CONFIG)
    with pytest.raises(ConfigError, match="--kv-peer: 'http://x:1' is not a kvtier://host:port URL"):
        Disaggregation("both", ["http://x:1"], None)


def test_a_decode_reads_only_from_a_peer_it_was_told_of_and_only_its_own_namespace(kvtier):
    decode = Disaggregation("decode", [PEER], kvtier)
    assert decode.admit(PROMPT, decode_params(kvtier))["remote_p2p_url"] == PEER
    directory = kvtier._p2p.directory
    assert directory.locate(kvtier.db.keys(PROMPT))[0].p2p_url == PEER  # hinted: no controller asked
    for changes, message in (({"remote_p2p_url": "kvtier://127.0.0.1:9"}, "--kv-peer"),
                             ({"remote_p2p_url": "http://127.0.0.1:9"}, "not a kvtier://"),
                             ({"namespace": "00" * 8}, "namespace"), ({"num_tokens": 41}, "num_tokens"),
                             ({"num_tokens": True}, "num_tokens"), ({"num_tokens": 0}, "num_tokens")):
        with pytest.raises(ValueError, match=message):
            decode.admit(PROMPT, decode_params(kvtier, **changes))
    with pytest.raises(ValueError, match="only decodes"):
        decode.admit(PROMPT, {"do_remote_decode": True})
    with pytest.raises(ValueError, match="an object of at most"):
        decode.admit(PROMPT, {f"k{i}": i for i in range(40)})
    assert decode.admit(PROMPT, {"other": "field"}) is None and decode.admit(PROMPT, None) is None


def test_a_prefill_only_prefills_and_both_does_either(kvtier):
    with pytest.raises(ValueError, match="only prefills"):
        Disaggregation("prefill", [], kvtier).admit(PROMPT, decode_params(kvtier))
    both = Disaggregation("both", [PEER], kvtier)
    assert both.admit(PROMPT, {"do_remote_decode": True}) == {"do_remote_decode": True}
    assert both.admit(PROMPT, decode_params(kvtier))["num_tokens"] == 40
    with pytest.raises(ValueError, match="needs kvtier with a p2p: section"):
        Disaggregation("both", [], None).admit(PROMPT, {"do_remote_decode": True})


def output(request_id: str, params: dict | None) -> RequestOutput:
    return RequestOutput(request_id, None, PROMPT, "x", [1], True, "length", RequestMetrics(0.0),
                         kv_transfer_params=params)


def test_a_prefills_last_output_waits_for_its_kv_and_goes_without_params_past_the_wait(kvtier, monkeypatch):
    prefill = Disaggregation("prefill", [], kvtier)
    plain, held = output("a", None), output("b", {"transfer_id": "1"})
    late = output("c", {"transfer_id": "2"})
    assert prefill.hold_back([plain, held]) == [plain] and prefill.waiting
    assert prefill.ready(set()) == [] and prefill.ready({"b"}) == [held] and not prefill.waiting
    monkeypatch.setattr(disagg, "STORE_WAIT_S", 0.0)
    prefill.hold_back([late])
    assert prefill.ready(set()) == [dataclasses.replace(late, kv_transfer_params=None)]
    prefill.hold_back([output("d", {"transfer_id": "3"})])
    prefill.drop("d")  # the client left
    assert not prefill.waiting


def test_with_a_sink_a_held_output_goes_out_as_its_kv_lands_and_only_once(kvtier):
    prefill = Disaggregation("prefill", [], kvtier)
    held = output("b", {"transfer_id": "1"})
    prefill.hold_back([held])
    prefill.stored("b")  # without a sink: left for the step's end
    assert prefill.waiting
    sent: list[RequestOutput] = []
    prefill.sink = sent.append
    prefill.stored("b")  # (on the saver thread, while the engine may be mid-step)
    assert sent == [held] and not prefill.waiting
    assert prefill.ready({"b"}) == []  # the step's end does not send it again
    prefill.stored("unknown")
    assert sent == [held]
