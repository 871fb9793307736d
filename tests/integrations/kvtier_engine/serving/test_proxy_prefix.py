"""kvtier_engine proxy --controller (serving/proxy_prefix.py, proxy_instances.py): the decode instance
chosen by the longest cached prefix that kvtier_controller's /v1/route names, against stub instances
and a stub controller (`proxy_stubs.py`), in-process over HTTP; and the controller's token.

Every decode stub is listed so that load alone would pick another one than the prefix does, and
every test ends with the proxy's in-flight counts back to 0 (`wait_idle`).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from kvtier.errors import ConfigError
from kvtier_engine.serving.proxy_backends import Backend, parse_backend_url
from kvtier_engine.serving.proxy_instances import REFRESH_S, DecodeInstances
from kvtier_engine.serving.proxy_prefix import CACHED_TAIL_TOKENS, TOKEN_ENV, controller_link

from .proxy_stubs import MODEL_ID, SSE_BODY, stub_ids
from .test_proxy import BODY, CHAT_BODY, HEADER, closed_url, post, prefilled, wait_released

LONG = dict(BODY, prompt="x" * 1000)  # 1,000 stub ids: a hit of 300 leaves far more than a chunk
TOKEN = "s3cret"


def test_the_decode_holding_the_longest_prefix_gets_the_request(fleet):
    prefill = fleet.stub("prefill", "transfer")
    a, b = fleet.stub("a", "json", "engine-a"), fleet.stub("b", "json", "engine-b")
    # "elsewhere" (an engine the proxy does not front) holds less than b: no new look at the cards.
    controller = fleet.controller("route", {"engine-a": 100, "engine-b": 300, "elsewhere": 200})
    proxy = fleet.proxy([prefill.url], [a.url, b.url], controller=controller.url, token=TOKEN)
    status, headers, body = post(proxy, LONG)
    # By load alone `a` would serve it: both idle, it is listed first.
    assert (status, json.loads(body)["served_by"], headers[HEADER]) == (200, "b", "disaggregated")
    assert prefill.bodies() == [prefilled(LONG)]
    assert b.bodies() == [dict(LONG, kv_transfer_params=prefill.transfers[0])]
    assert controller.routes == [(f"Bearer {TOKEN}", {"model_id": MODEL_ID, "tokens": list(b"x" * 1000)})]
    assert a.tokenized + b.tokenized == [{"prompt": "x" * 1000}]
    assert (a.cards, b.cards) == (1, 1)
    assert proxy.health()["controller"] == {"url": controller.url, "backing_off": False,
                                            "decode_ids": {"engine-a": a.url, "engine-b": b.url}}
    wait_released(prefill)
    proxy.wait_idle()


@pytest.mark.parametrize("body, path", [
    (dict(CHAT_BODY, messages=[{"role": "user", "content": "x" * 1000}]), "/v1/chat/completions"),
    (dict(BODY, prompt=[7] * 1000), "/v1/completions"),
], ids=["chat", "token ids"])
def test_a_prompt_cached_but_for_its_last_chunk_skips_the_prefill(fleet, body, path):
    prefill = fleet.stub("prefill", "transfer")
    a, b = fleet.stub("a", "sse", "engine-a"), fleet.stub("b", "sse", "engine-b")
    tokens = stub_ids(body) if path.endswith("chat/completions") else body["prompt"]
    controller = fleet.controller("route", {"engine-a": 10, "engine-b": len(tokens) - CACHED_TAIL_TOKENS})
    proxy = fleet.proxy([prefill.url], [a.url, b.url], controller=controller.url)
    status, headers, reply = post(proxy, body, path)
    assert (status, headers[HEADER], reply) == (200, "cached", SSE_BODY)
    assert b.calls == [(path, body)]  # as the client sent it
    assert prefill.calls == a.calls == []
    assert controller.routes == [(None, {"model_id": MODEL_ID, "tokens": tokens})]
    # Ids in the body are looked up as they are; messages are tokenized by a decode instance.
    assert a.tokenized + b.tokenized == ([{"messages": body["messages"]}] if "messages" in body else [])
    proxy.wait_idle()


@pytest.mark.parametrize("script", ["down", "status:500", "garbage", "hang"])
def test_a_failing_controller_leaves_the_choice_to_load(fleet, script):
    prefill = fleet.stub("prefill", "transfer")
    a, b = fleet.stub("a", "json", "engine-a"), fleet.stub("b", "json", "engine-b")
    controller = fleet.controller(script, {"engine-b": 900}) if script != "down" else None
    proxy = fleet.proxy([prefill.url], [a.url, b.url], timeout_s=1.0,
                        controller=controller.url if controller is not None else closed_url())
    start = time.monotonic()
    answers = [post(proxy, LONG) for _ in range(2)]
    # A hung controller costs its timeout (1 s) once: then it is backed off from, not asked again.
    assert time.monotonic() - start < 4
    assert [(status, headers[HEADER]) for status, headers, _ in answers] == [(200, "disaggregated")] * 2
    assert [json.loads(body)["served_by"] for *_, body in answers] == ["a", "b"]  # by load: round robin
    if controller is not None:
        assert len(controller.routes) == 1
    assert proxy.health()["controller"]["backing_off"]
    wait_released(prefill, 2)
    proxy.wait_idle()


def test_instance_cards_are_read_again_when_an_id_is_unknown_at_most_once_a_period(fleet):
    decode = fleet.stub("decode", "json")  # no id yet: its kvtier has not joined the fleet
    now = [0.0]
    instances = DecodeInstances([Backend("decode", parse_backend_url(decode.url))], 1.0, lambda: now[0])

    async def story():
        first = await instances.current()
        decode.instance_id = "engine-a"
        too_soon = instances.refresh_soon()
        now[0] += REFRESH_S
        await instances.refresh_soon()
        return first, too_soon, await instances.current()

    first, too_soon, later = asyncio.run(story())
    assert (first.by_id, too_soon, decode.cards) == ({}, None, 2)
    assert [(i, b.url) for i, b in later.by_id.items()] == [("engine-a", decode.url)]
    assert (later.model_id, later.tokenizers) == (MODEL_ID, first.tokenizers)


def test_the_controller_token_comes_from_the_environment_only():
    loopback, remote = parse_backend_url("http://127.0.0.1:7100"), parse_backend_url("http://10.1.2.3:7100")
    assert controller_link(loopback, {}).token is None  # a controller on this machine may have none
    link = controller_link(remote, {TOKEN_ENV: " s3cret\n"})
    assert link.token == "s3cret" and "s3cret" not in repr(link)
    with pytest.raises(ConfigError, match="printable"):
        controller_link(remote, {TOKEN_ENV: "two words"})
