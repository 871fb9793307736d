"""The routes `kvtier_engine proxy` reads on an instance (serving/disagg_routes.py' instance card,
serving/tokenize_route.py), on the real app (`build_app`) served by uvicorn on a thread, around fake
engines: a real kvtier CacheEngine that joined a (silent) controller for the card, a recording fake
for /tokenize, so that its ids can be checked against what the chat route hands the engine."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

import pytest
from conftest import small_layout

from kvtier import CacheEngine
from kvtier.config import load_config
from kvtier_engine.llm_engine import EngineOptions
from kvtier_engine.serving.engine_loop import EngineLoop
from kvtier_engine.serving.server import ServedModel, build_app
from kvtier_engine.tokenizer import ByteTokenizer

from .proxy_stubs import request, serving
from .test_server import RecordingEngine

TEMPLATE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@dataclass
class CardEngine:
    """What the instance card reads of an LLMEngine."""

    kvtier: CacheEngine | None
    options: EngineOptions
    tokenizer = ByteTokenizer()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def card(engine) -> dict:
    with serving(build_app(EngineLoop(engine), ServedModel("m", 64, 0))) as url:
        status, _, body = request(int(url.rsplit(":", 1)[1]), "GET", "/v1/kvtier/instance")
    assert status == 200
    return json.loads(body)


def test_instance_card_names_the_fleet_id_and_model_id(tmp_path):
    yaml = tmp_path / "kvtier.yaml"
    yaml.write_text(f"chunk_size: 16\ndisk: null\ncpu: {{capacity: 1MiB, pin_memory: 'off'}}\n"
                    f"controller: {{url: 'http://127.0.0.1:{closed_port()}', instance_id: decode-a}}\n")
    cache = CacheEngine(load_config(yaml, env={}), small_layout(), "tiny@seed0")
    try:
        joined = card(CardEngine(cache, EngineOptions(model="", kv_role="decode")))
    finally:
        cache.close()
    assert joined == {"instance_id": "decode-a", "model_id": "tiny@seed0", "role": "decode"}
    assert cache.instance_id is None  # closed: it left the fleet
    alone = card(CardEngine(None, EngineOptions(model="")))
    assert alone == {"instance_id": None, "model_id": None, "role": "both"}


@pytest.fixture
def app_port():
    engine = RecordingEngine()
    loop = EngineLoop(engine)
    loop.start()
    try:
        with serving(build_app(loop, ServedModel("m", 64, 0, TEMPLATE))) as url:
            yield engine, int(url.rsplit(":", 1)[1])
    finally:
        loop.close()


def test_tokenize_gives_the_ids_the_completion_routes_run(app_port):
    engine, port = app_port
    tokenized = []
    for body, path in (({"prompt": "hi there"}, "/v1/completions"),
                       ({"messages": MESSAGES}, "/v1/chat/completions")):
        status, _, reply = request(port, "POST", "/tokenize", dict(body, model="m"))
        assert status == 200, reply
        tokenized.append(json.loads(reply))
        assert request(port, "POST", path, dict(body, max_tokens=1))[0] == 200
    assert [t["tokens"] for t in tokenized] == engine.added  # what the engine was given, id for id
    assert tokenized[1]["tokens"] == list(b"[system]be brief[user]hi[assistant]")
    assert [(t["count"], t["max_model_len"]) for t in tokenized] == [(8, 64), (35, 64)]
    status, _, reply = request(port, "POST", "/tokenize", {"prompt": [5, 0, 7] * 40})
    assert (status, json.loads(reply)["count"]) == (200, 120)  # over the context: counted, not refused


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": [1, True]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": "x", "messages": MESSAGES}, "prompt"),
    ({"prompt": "x", "add_special_tokens": False}, "add_special_tokens"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    (b"[1, 2", None),
])
def test_tokenize_refuses_bad_input_with_a_400_naming_the_field(app_port, body, param):
    engine, port = app_port
    status, _, reply = request(port, "POST", "/tokenize", body)
    error = json.loads(reply)["error"]
    assert (status, error["type"], error["param"]) == (400, "invalid_request_error", param)
    assert engine.added == []
