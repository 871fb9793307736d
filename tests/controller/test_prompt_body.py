"""The fast prompt-body reader (kvtier.controller.prompt_body) and where the app answers a lookup:
on the event loop for a MemoryState and a body up to INLINE_BODY_BYTES, in the thread pool
otherwise, with the same answers either way."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from kvtier.config import ControllerConfig
from kvtier.controller import app as app_module
from kvtier.controller.app import build_app
from kvtier.controller.memory_state import MemoryState
from kvtier.controller.prompt_body import _BOOL_SCAN_HITS, BadBody, parse_prompt
from kvtier.keys import Namespace

TOKEN = "controller-secret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def body(model_id: str, tokens_json: str) -> bytes:
    return b'{"model_id": ' + json.dumps(model_id).encode() + b', "tokens": ' + tokens_json.encode() + b"}"


def test_tokens_come_back_as_the_uint32_array_of_the_list():
    model_id, tokens = parse_prompt(body("m", "[0, 1, 31999, 4294967295]"))
    assert model_id == "m"
    assert tokens.dtype == np.uint32 and tokens.tolist() == [0, 1, 31999, 2**32 - 1]
    assert parse_prompt(body("m", "[]"))[1].tolist() == []


@pytest.mark.parametrize("model_id", ["u" * 10, "f" * 10, "uf" * (_BOOL_SCAN_HITS + 1),
                                      "true" * 3, "false", "Instruct-uf"])
@pytest.mark.parametrize("tokens", ["[1, true]", "[false]", "[1, 2, false, 3]", "[true, true]"])
def test_a_boolean_is_refused_whatever_the_model_id_spells(model_id, tokens):
    """The bool guard checks each 'u'/'f' byte, and searches plainly past _BOOL_SCAN_HITS of them."""
    with pytest.raises(BadBody) as refused:
        parse_prompt(body(model_id, tokens))
    assert refused.value.status == 422 and "not booleans" in refused.value.detail
    reordered = b'{"tokens": ' + tokens.encode() + b', "model_id": ' + json.dumps(model_id).encode() + b"}"
    with pytest.raises(BadBody):
        parse_prompt(reordered)


@pytest.mark.parametrize("model_id", ["uf" * (_BOOL_SCAN_HITS + 1), "true false", "u", "f"])
def test_a_model_id_full_of_u_and_f_still_parses(model_id):
    parsed_model_id, tokens = parse_prompt(body(model_id, "[1, 2, 3]"))
    assert parsed_model_id == model_id and tokens.tolist() == [1, 2, 3]


@pytest.mark.parametrize("tokens,words", [("[1, 1e3]", "list of integers"), ("[1, 2.0]", "list of integers"),
                                          ("[-1]", "[0, 4294967296)"), ("[4294967296]", "[0, 4294967296)"),
                                          ("[1, {}]", "list of integers"), ('[1, "u"]', "list of integers")])
def test_a_token_that_is_no_uint32_is_422(tokens, words):
    with pytest.raises(BadBody) as refused:
        parse_prompt(body("m", tokens))
    assert refused.value.status == 422 and words in refused.value.detail


class LoopRecordingState(MemoryState):
    """A MemoryState that notes, per holders() call, whether it ran on the event loop's thread."""

    def __init__(self, timeout_s: float):
        super().__init__(timeout_s)
        self.on_loop: list[bool] = []

    def holders(self, keys):
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return super().holders(keys)


class Delegating:
    """A FleetState that is not in-process (as RedisState): every call goes to `inner`."""

    in_process = False

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def register(client: TestClient) -> None:
    reply = client.post("/v1/instances/register", json={
        "instance_id": "a", "kind": "engine", "command_url": "http://127.0.0.1:9", "command_token": "c" * 32,
        "model_id": "m", "namespace": Namespace("m", "L2xH2xD16 float16").digest().hex(), "chunk_size": 16,
        "tiers": [{"name": "cpu", "chunks": 0, "bytes_used": 0, "capacity_bytes": 1 << 20}]})
    assert reply.status_code == 200, reply.text


def lookups(state, monkeypatch, inline_bytes: int) -> list[dict]:
    monkeypatch.setattr(app_module, "INLINE_BODY_BYTES", inline_bytes)
    app = build_app(ControllerConfig(token=TOKEN), state)
    with TestClient(app, headers=AUTH) as client:
        register(client)
        replies = []
        for path in ("/v1/lookup", "/v1/route"):
            reply = client.post(path, json={"model_id": "m", "tokens": list(range(100))})
            assert reply.status_code == 200, reply.text
            replies.append(reply.json())
            bad = client.post(path, json={"model_id": "m", "tokens": [1, True]})
            assert bad.status_code == 422 and "booleans" in bad.json()["detail"]
        return replies


def test_small_lookups_on_a_memory_state_run_on_the_loop_others_in_the_pool(monkeypatch):
    inline = LoopRecordingState(10.0)
    pooled_by_size = LoopRecordingState(10.0)
    pooled_by_kind = LoopRecordingState(10.0)
    expected = lookups(inline, monkeypatch, 512 * 1024)
    assert lookups(pooled_by_size, monkeypatch, 16) == expected
    assert lookups(Delegating(pooled_by_kind), monkeypatch, 512 * 1024) == expected
    assert inline.on_loop == [True, True]
    assert pooled_by_size.on_loop == [False, False] and pooled_by_kind.on_loop == [False, False]
    assert expected[0]["instances"][0]["instance_id"] == "a"
