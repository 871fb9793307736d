"""kvtier_engine proxy: the disaggregated-prefill router against stub prefill and decode instances
(`proxy_stubs.py`), all in-process on uvicorn threads, spoken to over HTTP; its command line
in-process (usage errors), and once as a process. The choice by cached prefix (--controller) is
test_proxy_prefix.py's.

Every test ends with the proxy's in-flight counts back to 0 (`wait_idle`): a path that leaks a count
would skew every later choice of instance.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from fleet_processes import free_port
from waiting import wait_until

from kvtier_engine.serving.cli import main
from kvtier_engine.serving.proxy_backends import BackendAddress, BackendPool, parse_backend_url
from kvtier_engine.serving.proxy_bodies import error_event
from kvtier_engine.serving.proxy_prefix import TOKEN_ENV
from kvtier_engine.serving.proxy_relay import Relay
from kvtier_engine.serving.proxy_upstream import UpstreamError

from .proxy_stubs import DECODED, SSE_BODY, SSE_EVENTS, request

BODY = {"model": "m", "prompt": "hello world", "max_tokens": 8, "temperature": 0}
STREAM_BODY = dict(BODY, stream=True, stream_options={"include_usage": True})
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
             "stream": True, "stream_options": {"include_usage": True}}
HEADER = "x-kvtier-disagg"


def post(proxy, body, path="/v1/completions", timeout_s=10):
    return request(proxy.port, "POST", path, body, timeout_s)


def closed_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # bound, then closed: connections are refused


def prefilled(body: dict) -> dict:
    """What a prefill instance must get for `body`."""
    sent = dict(body, stream=False, max_tokens=1, kv_transfer_params={"do_remote_decode": True})
    sent.pop("stream_options", None)
    return sent


def wait_released(stub, n: int = 1) -> None:
    wait_until(lambda: len(stub.releases) >= n, "the release reaches the prefill instance", timeout_s=5)
    assert stub.releases == [{"transfer_id": t["transfer_id"]} for t in stub.transfers]


def sse_events(body: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in body.split(b"\n\n") if event]


# -- the disaggregated path ----------------------------------------------------------------------


def test_disaggregated_json(fleet):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "json")
    proxy = fleet.proxy([prefill.url], [decode.url])
    status, headers, body = post(proxy, BODY)
    assert (status, json.loads(body)) == (200, dict(DECODED, served_by="decode"))
    assert headers[HEADER] == "disaggregated"
    assert headers["content-type"] == "application/json"
    assert prefill.bodies() == [prefilled(BODY)]
    assert decode.bodies() == [dict(BODY, kv_transfer_params=prefill.transfers[0])]
    wait_released(prefill)
    proxy.wait_idle()


def test_disaggregated_stream_is_passed_on_byte_for_byte(fleet):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "sse")
    proxy = fleet.proxy([prefill.url], [decode.url])
    status, headers, body = post(proxy, STREAM_BODY)
    assert (status, body) == (200, SSE_BODY)  # the stub cuts its last event across two writes
    assert headers["content-type"].startswith("text/event-stream")
    assert headers[HEADER] == "disaggregated"
    assert prefill.bodies() == [prefilled(STREAM_BODY)]  # no stream_options without stream
    assert decode.bodies() == [dict(STREAM_BODY, kv_transfer_params=prefill.transfers[0])]
    wait_released(prefill)
    proxy.wait_idle()


def test_chat_prefill_caps_max_completion_tokens_too(fleet):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "sse")
    proxy = fleet.proxy([prefill.url], [decode.url])
    status, _, body = post(proxy, CHAT_BODY, "/v1/chat/completions")
    assert (status, body) == (200, SSE_BODY)
    assert prefill.calls == [("/v1/chat/completions", dict(prefilled(CHAT_BODY), max_completion_tokens=1))]
    params = prefill.transfers[0]
    assert decode.calls == [("/v1/chat/completions", dict(CHAT_BODY, kv_transfer_params=params))]
    wait_released(prefill)
    proxy.wait_idle()


@pytest.mark.parametrize("body", [dict(BODY, n=2), dict(BODY, kv_transfer_params={"transfer_id": "x"}),
                                  dict(BODY, prompt=["one", "two"]), dict(BODY, prompt=[[1, 2], [3]])],
                         ids=["n", "kv_transfer_params", "text batch", "token batch"])
def test_unsplittable_requests_go_to_decode_whole(fleet, body):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "json")
    proxy = fleet.proxy([prefill.url], [decode.url])
    status, headers, _ = post(proxy, body)
    assert (status, headers[HEADER]) == (200, "colocated")
    assert decode.bodies() == [body]
    assert prefill.calls == []
    proxy.wait_idle()


def test_a_prompt_of_token_ids_is_split(fleet):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "json")
    proxy = fleet.proxy([prefill.url], [decode.url])
    _, headers, _ = post(proxy, dict(BODY, prompt=[1, 2, 3]))
    assert headers[HEADER] == "disaggregated"
    assert prefill.bodies()[0]["prompt"] == [1, 2, 3]


# -- prefill failures ----------------------------------------------------------------------------


def test_prefill_down_serves_colocated(fleet):
    decode = fleet.stub("decode", "json")
    proxy = fleet.proxy([closed_url()], [decode.url])
    status, headers, body = post(proxy, BODY)
    assert (status, json.loads(body)["served_by"], headers[HEADER]) == (200, "decode", "colocated")
    assert decode.bodies() == [BODY]  # the original: no kv_transfer_params
    proxy.wait_idle()


@pytest.mark.parametrize("status", [400, 404, 413])
def test_prefill_client_error_reaches_the_client_unchanged(fleet, status):
    prefill, decode = fleet.stub("prefill", f"status:{status}"), fleet.stub("decode", "json")
    proxy = fleet.proxy([prefill.url], [decode.url])
    got, headers, body = post(proxy, BODY)
    assert (got, json.loads(body)) == (status, {"error": {"message": f"prefill says {status}", "type": "x",
                                                          "param": None, "code": None}})
    assert headers["content-type"] == "application/json"
    assert decode.calls == []
    proxy.wait_idle()


@pytest.mark.parametrize("script", ["status:500", "status:503", "no_params", "hang"])
def test_prefill_failure_serves_colocated(fleet, script):
    prefill, decode = fleet.stub("prefill", script), fleet.stub("decode", "json")
    proxy = fleet.proxy([prefill.url], [decode.url], timeout_s=1.0)
    start = time.monotonic()
    status, headers, _ = post(proxy, BODY)
    assert (status, headers[HEADER]) == (200, "colocated")
    assert time.monotonic() - start < 4  # a hung prefill costs --timeout (1 s), not the stub's hold
    assert len(prefill.calls) == 1
    assert decode.bodies() == [BODY]
    assert prefill.releases == []  # nothing is held: there was no transfer
    proxy.wait_idle()


# -- decode failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("first", ["down", "status:503"])
def test_decode_failing_before_any_byte_is_retried_colocated_on_the_other(fleet, first):
    prefill, good = fleet.stub("prefill", "transfer"), fleet.stub("good", "json")
    bad = fleet.stub("bad", first) if first != "down" else None
    # Both idle: the first listed is picked first.
    proxy = fleet.proxy([prefill.url], [bad.url if bad else closed_url(), good.url])
    status, headers, body = post(proxy, BODY)
    assert (status, json.loads(body)["served_by"], headers[HEADER]) == (200, "good", "colocated")
    if bad is not None:
        assert bad.bodies() == [dict(BODY, kv_transfer_params=prefill.transfers[0])]
    assert good.bodies() == [BODY]
    wait_released(prefill)
    proxy.wait_idle()


def test_both_decodes_down_is_a_502_naming_them(fleet):
    prefill = fleet.stub("prefill", "transfer")
    first, second = closed_url(), closed_url()
    proxy = fleet.proxy([prefill.url], [first, second])
    status, headers, body = post(proxy, STREAM_BODY)
    error = json.loads(body)["error"]
    assert (status, error["type"]) == (502, "server_error")
    assert f"decode instance {second} failed: unreachable" in error["message"]
    assert first in error["message"]
    wait_released(prefill)
    proxy.wait_idle()


def test_decode_dying_mid_stream_ends_the_stream_with_an_error(fleet):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "die_mid_stream")
    proxy = fleet.proxy([prefill.url], [decode.url])
    status, headers, body = post(proxy, STREAM_BODY)
    assert (status, headers[HEADER]) == (200, "disaggregated")
    events = sse_events(body)
    # The first event whole; of the second only half came, and none of it is passed on.
    assert events[0] == SSE_EVENTS[0]
    error = json.loads(events[1].removeprefix(b"data: "))["error"]
    assert decode.url in error["message"] and error["type"] == "server_error"
    assert events[2:] == [b"data: [DONE]\n\n"]
    wait_released(prefill)
    proxy.wait_idle()


def sent(proxy, body: dict) -> http.client.HTTPConnection:
    """A connection to `proxy` that has sent `body` to /v1/completions, its answer not read yet."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    conn.request("POST", "/v1/completions", body=json.dumps(body))
    return conn


def test_client_leaving_mid_stream_closes_the_decode_call(fleet):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "one_then_hold")
    proxy = fleet.proxy([prefill.url], [decode.url])
    conn = sent(proxy, STREAM_BODY)
    resp = conn.getresponse()
    # The first event arrives while the decode still holds its stream open: relayed, not buffered.
    assert resp.read1(65536) == SSE_EVENTS[0]
    assert proxy.in_flight() == [0, 1]
    resp.close()
    conn.close()
    wait_until(decode.stream_closed.is_set, "the decode instance sees its client (the proxy) leave",
               timeout_s=5)
    wait_released(prefill)
    proxy.wait_idle()


def test_client_leaving_during_prefill_closes_the_prefill_call(fleet):
    prefill, decode = fleet.stub("prefill", "hang"), fleet.stub("decode", "json")
    proxy = fleet.proxy([prefill.url], [decode.url])
    conn = sent(proxy, BODY)
    wait_until(lambda: prefill.calls, "the prefill instance has the request", timeout_s=5)
    assert proxy.in_flight() == [1, 0]
    conn.close()
    proxy.wait_idle()
    assert decode.calls == []


# -- the proxy's own answers ---------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b"NaN"])
def test_a_body_that_is_not_a_json_object_is_a_400(fleet, raw):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "json")
    proxy = fleet.proxy([prefill.url], [decode.url])
    status, _, body = post(proxy, raw)
    error = json.loads(body)["error"]
    assert (status, error["type"], set(error)) == (400, "invalid_request_error",
                                                   {"message", "type", "param", "code"})
    assert prefill.calls == decode.calls == []


def test_a_body_over_1_mib_is_a_413(fleet):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "json")
    proxy = fleet.proxy([prefill.url], [decode.url])
    status, _, body = post(proxy, dict(BODY, prompt="x" * (1 << 20)))
    assert (status, json.loads(body)["error"]["type"]) == (413, "invalid_request_error")
    assert prefill.calls == decode.calls == []


def test_health_lists_the_instances_and_models_come_from_a_decode(fleet):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "json")
    proxy = fleet.proxy([prefill.url + "/"], [decode.url])
    assert proxy.health() == {"status": "ok", "prefill": [{"url": prefill.url, "in_flight": 0}],
                              "decode": [{"url": decode.url, "in_flight": 0}]}
    status, _, body = request(proxy.port, "GET", "/v1/models")
    assert (status, json.loads(body)["data"][0]["id"]) == (200, "decode")


def test_least_loaded_prefill_gets_the_next_request(fleet):
    busy, idle = fleet.stub("busy", "hang"), fleet.stub("idle", "transfer")
    decode = fleet.stub("decode", "json")
    proxy = fleet.proxy([busy.url, idle.url], [decode.url])
    held = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    held.request("POST", "/v1/completions", body=json.dumps(BODY))  # both idle: the first listed
    wait_until(lambda: busy.calls, "the first request is held on the first prefill", timeout_s=5)
    # Round robin would send the third back to `busy`; load sends both to `idle`.
    for _ in range(2):
        assert post(proxy, BODY)[1][HEADER] == "disaggregated"
    assert (len(busy.calls), len(idle.calls)) == (1, 2)
    busy.hold.set()
    assert held.getresponse().status == 200
    held.close()
    proxy.wait_idle()


def test_pool_breaks_ties_round_robin_and_leases_end_once():
    pool = BackendPool("decode", [parse_backend_url(f"http://127.0.0.1:{port}") for port in (1, 2, 3)])
    leases = [pool.lease() for _ in range(3)]
    assert [lease.backend.address.port for lease in leases] == [1, 2, 3]
    leases[1].end()
    leases[1].end()  # a second end is a no-op, never a negative count
    assert [b["in_flight"] for b in pool.snapshot()] == [1, 0, 1]
    assert pool.lease().backend.address.port == 2
    assert pool.lease(avoid=pool.backends[1]).backend.address.port != 2
    # Narrowed to some (a prefix hit): the least loaded of those, however idle the others are.
    assert pool.lease(among=pool.backends[1:]).backend.address.port == 3


class FakeCall:
    """An Upstream whose body is `pieces` (an exception in it is raised when reached)."""

    url = "http://fake:1"

    def __init__(self, pieces: list):
        self.pieces, self.closed = pieces, 0

    async def next_chunk(self):
        piece = self.pieces.pop(0)
        if isinstance(piece, Exception):
            raise piece
        return piece

    def close(self):
        self.closed += 1


def relayed(first: bytes, pieces: list, stop_after: int | None = None):
    """What a Relay passes on (all of it, or `stop_after` pieces and then aclose), the call, the pool and
    how many times it ended."""
    pool = BackendPool("decode", [parse_backend_url("http://fake:1")])
    call, ended = FakeCall(pieces), []

    async def run() -> list[bytes]:
        body = Relay(call, pool.lease(), lambda: ended.append(1), first).body()
        out = [piece async for piece in body] if stop_after is None else \
            [await body.__anext__() for _ in range(stop_after)]
        await body.aclose()
        return out

    return asyncio.run(run()), call, pool, ended


def test_relay_passes_whole_events_and_ends_a_failed_stream_with_an_error():
    out, call, pool, ended = relayed(SSE_EVENTS[0][:5], [SSE_EVENTS[0][5:] + SSE_EVENTS[1][:7],
                                                         UpstreamError(FakeCall.url, "reset")])
    assert out[0] == SSE_EVENTS[0]  # the half event that follows it is dropped
    assert out[1] == error_event(f"decode instance {FakeCall.url} failed mid-stream: reset")
    assert (len(out), call.closed, pool.snapshot()[0]["in_flight"], ended) == (2, 1, 0, [1])


def test_relay_closed_mid_stream_closes_its_call():
    out, call, pool, ended = relayed(SSE_EVENTS[0], [SSE_EVENTS[1], None], stop_after=1)
    assert out == [SSE_EVENTS[0]]
    assert (call.closed, pool.snapshot()[0]["in_flight"], ended) == (1, 0, [1])


def test_relay_after_done_adds_no_error():
    out, call, _, _ = relayed(SSE_BODY, [UpstreamError(FakeCall.url, "reset")])
    assert (out, call.closed) == ([SSE_BODY], 1)


@pytest.mark.parametrize("text", ["https://h:1", "http://h:1/v1", "h:1", "http://:1", "http://h:x"])
def test_backend_urls_are_http_host_port(text):
    with pytest.raises(ValueError):
        parse_backend_url(text)
    assert parse_backend_url("http://h:1/") == BackendAddress("http://h:1", "h", 1)


# -- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, complaint", [
    (["--decode", "http://h:1"], "--prefill"),
    (["--prefill", "http://h:1"], "--decode"),
    (["--prefill", "http://h:1", "--decode", "http://h:2", "--host", ""], "--host"),
    (["--prefill", "https://h:1", "--decode", "http://h:2"], "--prefill"),
])
def test_cli_usage_errors(capsys, argv, complaint):
    with pytest.raises(SystemExit) as exited:
        main(["proxy", *argv])
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err


def test_cli_refuses_a_controller_beyond_loopback_without_a_token(capsys, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["proxy", "--prefill", "http://h:1", "--decode", "http://h:2",
              "--controller", "http://10.1.2.3:7100"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--controller http://10.1.2.3:7100" in err and f"set {TOKEN_ENV}" in err


def test_cli_proxy_process_serves_and_exits_0_on_sigterm(fleet):
    prefill, decode = fleet.stub("prefill", "transfer"), fleet.stub("decode", "json")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvtier_engine", "proxy", "--prefill", prefill.url,
                             "--decode", decode.url, "--port", str(port), "--log-level", "warning"],
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _answers(port), "the proxy process listens", timeout_s=30)
        status, headers, _ = request(port, "POST", "/v1/completions", BODY)
        assert (status, headers[HEADER]) == (200, "disaggregated")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


def _answers(port: int) -> bool:
    try:
        return request(port, "GET", "/health", timeout_s=2)[0] == 200
    except OSError:
        return False
