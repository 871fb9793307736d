"""Disaggregated prefill end to end (kvtier_engine/disagg.py, kvtier/connector/handoffs.py, the P2P
directory's hints, serving/proxy.py): a prefill instance and a decode instance as real
`kvtier_engine serve` processes on 127.0.0.1 (random:llama-tiny, P2P over TCP, no controller), the
proxy in front of them (in-process, on its own server thread), and the same model in-process for
the colocated answer. The tests run in file order: the last ones kill the prefill instance."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest
import torch
from engine_server import EngineServer
from fleet_processes import free_port
from p2p.p2p_processes import unread_bytes
from waiting import wait_until

from kvtier_engine import LLM, SamplingParams

from .proxy_stubs import request, running_proxy

MODEL = "random:llama-tiny"
PROMPT = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(19)).tolist()
GREEDY = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
PREFILL = {**GREEDY, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}  # as the proxy asks


def instance(folder: Path, role: str, p2p_port: int, *extra: str) -> EngineServer:
    """`kvtier_engine serve MODEL --kv-role ROLE`, P2P over TCP on `p2p_port` (fixed, so that the decode
    instance can name the prefill one in --kv-peer before it starts; 0 for any)."""
    config = {"chunk_size": 16, "save_partial_chunks": True, "disk": None,
              "cpu": {"capacity": "32MiB", "pin_memory": "off"},
              "p2p": {"transport": "tcp", "host": "127.0.0.1", "port": p2p_port, "timeout_s": 2.0,
                      "retry_after_s": 0.2, "retry_max_s": 0.4}}
    server = EngineServer(folder, config, MODEL, "--kv-role", role, *extra)
    server.p2p_port = p2p_port
    return server


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("disagg")
    p2p_port = free_port()
    prefill = instance(folder / "prefill", "prefill", p2p_port)
    decode = instance(folder / "decode", "decode", 0, "--kv-peer", f"kvtier://127.0.0.1:{p2p_port}")
    try:
        prefill.wait_ready()
        decode.wait_ready()
        yield prefill, decode
    finally:
        prefill.stop()
        decode.stop()


def colocated_answer(prompt: list[int]) -> str:
    """The answer of one instance that does everything: the model in-process, no kvtier."""
    llm = LLM(MODEL, kv_cache_bytes=16 << 20)
    try:
        return llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].text
    finally:
        llm.close()


@pytest.fixture(scope="module")
def colocated() -> str:
    return colocated_answer(PROMPT)


def complete(server: EngineServer, body: dict) -> tuple[int, dict]:
    return server.request("/v1/completions", body)


def nothing_held(prefill: EngineServer, decode: EngineServer) -> bool:
    return (prefill.metric("kvtier_leased_chunks") == 0 and decode.metric("kvtier_leased_chunks") == 0
            and decode.metric("kvtier_engine_waiting_for_kv_requests") == 0)


def test_through_the_proxy_the_decode_loads_the_prompt_and_answers_as_one_instance_would(pair, colocated):
    prefill, decode = pair
    with running_proxy([prefill.url], [decode.url], timeout_s=30) as proxy:
        status, headers, raw = request(proxy.port, "POST", "/v1/completions", GREEDY, timeout_s=30)
        body = json.loads(raw)
        assert status == 200 and headers["x-kvtier-disagg"] == "disaggregated", body
        assert body["choices"][0]["text"] == colocated
        assert body["kvtier"]["tokens_loaded"] == len(PROMPT) - 1
        assert body["kvtier"]["prefill_tokens_computed"] <= 1
        streamed = request(proxy.port, "POST", "/v1/completions", {**GREEDY, "stream": True}, timeout_s=30)[2]
        events = [json.loads(line[6:]) for line in streamed.decode().splitlines()
                  if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == colocated
        proxy.wait_idle()
    wait_until(lambda: nothing_held(prefill, decode), "the leases on both sides back to zero")


def test_a_decode_refuses_a_peer_it_was_not_told_of_and_a_prefill_refuses_to_decode(pair):
    prefill, decode = pair
    status, params = complete(prefill, PREFILL)
    assert status == 200
    params = params["kv_transfer_params"]
    assert complete(prefill, {**GREEDY, "kv_transfer_params": params})[0] == 400  # a prefill only prefills
    stranger = {**params, "remote_p2p_url": "kvtier://127.0.0.1:1"}
    status, body = complete(decode, {**GREEDY, "kv_transfer_params": stranger})
    assert status == 400 and "--kv-peer" in body["error"]["message"]
    status, body = complete(decode, {**GREEDY, "kv_transfer_params": {**params, "namespace": "00" * 8}})
    assert status == 400 and "namespace" in body["error"]["message"]
    assert request(prefill.port, "POST", "/v1/kv/release", {"transfer_id": params["transfer_id"]})[2] \
        == b'{"released":true}'


def test_a_prefill_killed_mid_transfer_leaves_the_decode_to_compute_the_prompt(pair, colocated):
    prefill, decode = pair
    # Another prompt's tail: the decode holds the first prompt's chunks already (it kept what it loaded).
    prompt = PROMPT[:50] + [(t + 1) % 512 for t in PROMPT[50:]]
    status, reply = complete(prefill, {**PREFILL, "prompt": prompt})
    assert status == 200
    prefill.proc.send_signal(signal.SIGSTOP)  # the decode's P2P read reaches a peer that never answers
    answer: dict = {}
    body = {**GREEDY, "prompt": prompt, "kv_transfer_params": reply["kv_transfer_params"]}
    thread = threading.Thread(target=lambda: answer.update(zip(("status", "body"), complete(decode, body))))
    thread.start()
    wait_until(lambda: unread_bytes(prefill.p2p_port) > 0, "the decode's read reached the prefill")
    prefill.proc.kill()
    prefill.proc.wait()
    thread.join(30)
    assert answer["status"] == 200 and answer["body"]["choices"][0]["text"] == colocated_answer(prompt)
    # Nothing arrived: the first 48 tokens (the first prompt's) were in the decode's device cache, the
    # rest was computed there.
    info = answer["body"]["kvtier"]
    assert info["tokens_loaded"] == 0 and info["prefill_tokens_computed"] == len(prompt) - 48
    assert info["tokens_cached_on_device"] == 48
    assert decode.metric("kvtier_leased_chunks") == 0
    assert decode.metric("kvtier_engine_waiting_for_kv_requests") == 0


def test_with_the_prefill_gone_the_proxy_answers_colocated(pair, colocated):
    prefill, decode = pair
    assert prefill.proc.poll() is not None  # killed by the test before
    with running_proxy([prefill.url], [decode.url], timeout_s=30) as proxy:
        status, headers, raw = request(proxy.port, "POST", "/v1/completions", GREEDY, timeout_s=30)
        assert status == 200 and headers["x-kvtier-disagg"] == "colocated"
        assert json.loads(raw)["choices"][0]["text"] == colocated
        proxy.wait_idle()
