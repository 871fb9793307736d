"""The bundled engine end to end over P2P: a kvtier_controller and two `kvtier_engine serve` processes
whose kvtier configs have a `controller:` and a `p2p:` section, each its own disk directory, no shared
store. A long prompt served by the first engine, then by the second: the second loads the prompt's KV
from the first (its reply's `kvtier.tokens_loaded`, its p2p tier's hits) and answers token for token
as the first did (temperature 0).
"""

from __future__ import annotations

import re
import sys
import urllib.request
from pathlib import Path

import pytest
from fleet_processes import hits, running_fleet, wait_up
from p2p_processes import TRANSPORTS, leases, p2p_section, require
from waiting import wait_until

sys.path.insert(0, str(Path(__file__).parents[1] / "controller"))
from test_engine_joins import MODEL, EngineServer  # noqa: E402

CHUNK = 32
IDS = ["engine-1", "engine-2"]
PROMPT = [(11 * i + 5) % 500 for i in range(8 * CHUNK + 7)]  # 8 whole chunks and a partial one


def kvtier_config(folder: Path, controller, instance_id: str, transport: str) -> dict:
    return {"chunk_size": CHUNK, "write_through": True, "cpu": {"capacity": "64MiB", "pin_memory": "off"},
            "disk": {"path": str(folder / "disk"), "capacity": "256MiB", "io_threads": 1},
            "controller": {"url": controller.url, "instance_id": instance_id, "token": controller.token,
                           "heartbeat_s": 0.2},
            "p2p": p2p_section(transport)}


@pytest.fixture(params=TRANSPORTS)
def engines(request, tmp_path):
    require(request.param)
    with running_fleet(tmp_path) as fleet:
        controller = fleet.start_controller({"heartbeat_timeout_s": 30.0})
        servers = []
        try:
            for instance_id in IDS:
                folder = tmp_path / instance_id
                folder.mkdir()
                servers.append(EngineServer(folder, kvtier_config(folder, controller, instance_id,
                                                                  request.param)))
            for server in servers:  # started side by side: the wait is about one start
                server.wait_ready()
            yield request.param, controller, servers
        finally:
            for server in servers:
                server.stop()


def complete(server: EngineServer) -> dict:
    status, body = server.request("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 8,
                                                       "temperature": 0, "logprobs": 1})
    assert status == 200 and body["usage"]["prompt_tokens"] == len(PROMPT)
    return body


def metric(server: EngineServer, name: str) -> float:
    """One sample of the engine's /metrics (kvtier's counters are in it), e.g. 'kvtier_p2p_leases_total'
    or 'kvtier_tier_hits_total{tier="p2p"}'."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30) as resp:
        found = re.search(rf"^{re.escape(name)} (\S+)$", resp.read().decode(), re.M)
    assert found, f"no {name} in the engine's metrics"
    return float(found.group(1))


def test_second_engine_answers_token_identical_with_the_prompt_loaded_from_the_first_over_p2p(engines):
    transport, controller, (first, second) = engines
    client = controller.client()
    views = wait_up(client, IDS, 30.0)
    model_id = views[IDS[0]]["model_id"]
    assert all(views[i]["p2p_url"] for i in IDS), views
    assert [t["name"] for t in views[IDS[1]]["tiers"]] == ["cpu", "disk"]  # no shared store

    computed = complete(first)
    assert computed["kvtier"]["tokens_loaded"] == 0
    whole = len(PROMPT) // CHUNK * CHUNK
    wait_until(lambda: hits(client, PROMPT, model_id).get(IDS[0], 0) >= whole,
               "the first engine's prompt in the controller's index", 20.0)

    loaded = complete(second)
    assert loaded["kvtier"]["tokens_loaded"] > 0, loaded["kvtier"]
    assert loaded["kvtier"]["prefill_tokens_computed"] < len(PROMPT)
    assert [c["text"] for c in loaded["choices"]] == [c["text"] for c in computed["choices"]]
    assert ([c["logprobs"]["tokens"] for c in loaded["choices"]]
            == [c["logprobs"]["tokens"] for c in computed["choices"]])
    chunks = loaded["kvtier"]["tokens_loaded"] // CHUNK
    assert metric(second, 'kvtier_tier_hits_total{tier="p2p"}') >= chunks > 0
    assert metric(first, "kvtier_p2p_served_chunks_total") >= chunks
    leased = metric(first, "kvtier_p2p_leases_total")  # NIXL reads leased slabs; TCP replies
    assert leased > 0 if transport == "nixl" else leased == 0
    for view in wait_up(client, IDS).values():
        wait_until(lambda url=view["p2p_url"]: leases(url) == 0, f"{view['instance_id']}'s leases at zero")
