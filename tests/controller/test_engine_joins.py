"""`kvtier_engine serve` joins the fleet when its kvtier config has a `controller:` section: it
appears in /v1/instances, and after it served a long prompt, /v1/route ranks it first for that
prompt, ahead of an emptier engine of the same model: a KV-aware router sends the next request where
the prefix is.
"""

from __future__ import annotations

import pytest
from engine_server import EngineServer
from fleet_processes import instances, route, running_fleet, wait_up
from waiting import wait_until

MODEL = "random:llama-tiny"  # vocabulary of 512 token ids
ENGINE_ID = "engine-1"
CHUNK = 32


@pytest.fixture
def fleet(tmp_path):
    with running_fleet(tmp_path) as fleet:
        yield fleet


@pytest.fixture
def engine_server(fleet, tmp_path):
    controller = fleet.start_controller({"heartbeat_timeout_s": 30.0})
    kvtier_config = {
        "chunk_size": CHUNK, "write_through": True, "cpu": {"capacity": "64MiB", "pin_memory": "off"},
        "disk": {"path": str(tmp_path / "disk"), "capacity": "256MiB", "io_threads": 1},
        "controller": {"url": controller.url, "instance_id": ENGINE_ID, "token": controller.token,
                       "heartbeat_s": 0.2}}
    server = EngineServer(tmp_path, kvtier_config)
    try:
        server.wait_ready()
        yield controller, server
    finally:
        server.stop()


def register_empty_twin(client, view: dict) -> None:
    """An engine of the same model and namespace that holds nothing but has more free memory: a
    route by free memory alone would put it first."""
    tiers = [{"name": "cpu", "chunks": 0, "bytes_used": 0, "capacity_bytes": 1 << 40}]
    client.post("/v1/instances/register", {
        "instance_id": "empty-twin", "kind": "engine", "command_url": "http://127.0.0.1:9",
        "command_token": "t" * 32, "model_id": view["model_id"], "namespace": view["namespace"],
        "chunk_size": view["chunk_size"], "tiers": tiers})


def test_kvtier_engine_serve_joins_the_fleet_and_route_ranks_it_first_for_what_it_served(engine_server):
    controller, server = engine_server
    client = controller.client()
    view = wait_up(client, [ENGINE_ID], 30.0)[ENGINE_ID]
    assert view["kind"] == "engine" and view["chunk_size"] == CHUNK
    assert view["model_id"].startswith(MODEL) and view["namespace"]
    assert [t["name"] for t in view["tiers"]] == ["cpu", "disk"]
    register_empty_twin(client, view)
    model_id = view["model_id"]

    tokens = [(7 * i + 3) % 500 for i in range(8 * CHUNK + 5)]  # a long prompt: 8 whole chunks
    assert [r["instance_id"] for r in route(client, tokens, model_id)] == ["empty-twin", ENGINE_ID]
    status, body = server.request("/v1/completions", {"model": MODEL, "prompt": tokens, "max_tokens": 2,
                                                       "temperature": 0})
    assert status == 200 and body["usage"]["prompt_tokens"] == len(tokens)

    def ranked_first() -> list[dict] | None:
        ranked = route(client, tokens, model_id)
        return ranked if ranked[0]["instance_id"] == ENGINE_ID and ranked[0]["hit_tokens"] > 0 else None

    ranked = wait_until(ranked_first, "the engine's stored prompt reaches the index")
    assert ranked[0]["hit_tokens"] % CHUNK == 0 and ranked[0]["hit_tokens"] <= len(tokens)
    assert ranked[1] == {**ranked[1], "instance_id": "empty-twin", "hit_tokens": 0}
    assert instances(client)[ENGINE_ID]["chunks_indexed"] >= ranked[0]["hit_tokens"] // CHUNK
