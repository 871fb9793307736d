"""POST /v1/compress and /v1/decompress (kvtier/controller/admin_routes.py), the compress and
decompress commands (kvtier/fleet/messages.py, engine_member.py, server_member.py) and the fleet
as real processes: a controller, a CacheEngine instance and a kvtier_server.

In process first (FastAPI's TestClient and a command double, as tests/controller/
test_controller_app.py tests /v1/move); then the commands on a real engine; then the processes
(as tests/controller/test_fleet_processes.py tests /v1/move), where what the instance's disk holds
is read from its record files (the header's codec id) and what it serves from its retrieves.
"""

from __future__ import annotations

import typing

import pytest
import torch
from command_double import CommandDouble
from conftest import CHUNK, seeded_kv, seeded_tokens
from fastapi.testclient import TestClient
from fleet_processes import MODEL as FLEET_MODEL
from fleet_processes import prompt, running_fleet, wait_hits, wait_up
from test_controller_app import (
    AUTH,
    COMMAND_TIMEOUT_S,
    COMMAND_TOKEN,
    MODEL,
    TIMEOUT_S,
    TOKEN,
    TOKENS,
    detail,
    join,
    keys_of,
)

from kvtier.codecs.base import CACHEGEN_ID, RAW_ID
from kvtier.codecs.records import CODEC_NAMES
from kvtier.config import ControllerConfig
from kvtier.controller.app import build_app
from kvtier.controller.memory_state import MemoryState
from kvtier.fleet.engine_member import EngineMember
from kvtier.fleet.http_client import HttpError
from kvtier.fleet.messages import CodecName, Command, CompressRequest
from kvtier.fleet.server_member import ServerMember
from kvtier.record import HEADER_SIZE, decode_header

# -- in process: the routes and what they send ----------------------------------------------------


@pytest.fixture
def client(clock):
    config = ControllerConfig(token=TOKEN, command_timeout_s=COMMAND_TIMEOUT_S, heartbeat_timeout_s=TIMEOUT_S)
    with TestClient(build_app(config, MemoryState(TIMEOUT_S), clock=clock), headers=AUTH) as client:
        yield client


@pytest.fixture
def double():
    with CommandDouble(COMMAND_TOKEN).running() as running:
        yield running


def test_the_messages_codec_names_are_the_codecs(client):
    assert typing.get_args(CodecName) == CODEC_NAMES
    for name in CODEC_NAMES:
        request = CompressRequest(model_id=MODEL, tokens=[1], instance_id="a", codec=name, tier="disk")
        assert request.codec == name
    with pytest.raises(ValueError, match="codec"):
        Command(op="compress", codec="zstd", tier="disk")


def test_compress_and_decompress_reach_only_the_named_instance_with_its_keys(client, double):
    join(client, "a", double.url)
    join(client, "b", double.url, chunk_size=32)
    reply = client.post("/v1/compress", json={"model_id": MODEL, "tokens": TOKENS, "instance_id": "b",
                                              "codec": "cachegen-2", "tier": "disk"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["results"] == [{"instance_id": "b", "chunks": 3}]
    reply = client.post("/v1/decompress", json={"model_id": MODEL, "tokens": TOKENS, "instance_id": "a"})
    assert reply.json()["results"] == [{"instance_id": "a", "chunks": 6}]
    reply = client.post("/v1/decompress", json={"model_id": MODEL, "tokens": TOKENS, "instance_id": "a",
                                                "tier": "redis"})
    assert reply.status_code == 200, reply.text
    sent = [(c.op, c.codec, c.tier, c.keys, c.num_tokens) for c in double.commands]
    assert sent == [("compress", "cachegen-2", "disk", [k.hex() for k in keys_of(TOKENS, 32)], len(TOKENS)),
                    ("decompress", None, None, [k.hex() for k in keys_of(TOKENS)], len(TOKENS)),
                    ("decompress", None, "redis", [k.hex() for k in keys_of(TOKENS)], len(TOKENS))]


@pytest.mark.parametrize("path,body,status,words", [
    ("/v1/compress", {"instance_id": "a", "codec": "zstd", "tier": "disk"}, 422, "codec"),
    ("/v1/compress", {"instance_id": "a", "tier": "disk"}, 422, "codec"),
    ("/v1/compress", {"instance_id": "a", "codec": "cachegen-2"}, 422, "tier"),
    ("/v1/compress", {"codec": "cachegen-2", "tier": "disk"}, 422, "instance_id"),
    ("/v1/compress", {"instance_id": "a", "codec": "cachegen-2", "tier": "Not A Tier"}, 422, "tier"),
    ("/v1/decompress", {"instance_id": "a", "tier": "Disk"}, 422, "tier"),
    ("/v1/decompress", {"instance_id": "a", "codec": "raw"}, 422, "codec"),  # no such field
    ("/v1/decompress", {}, 422, "instance_id"),
    ("/v1/compress", {"instance_id": "nobody", "codec": "cachegen-2", "tier": "disk"}, 404, "nobody"),
    ("/v1/decompress", {"instance_id": "nobody"}, 404, "nobody"),
])
def test_bad_bodies_are_422_naming_the_field_and_unknown_instances_404(client, path, body, status, words):
    reply = client.post(path, json={"model_id": MODEL, "tokens": TOKENS, **body})
    assert reply.status_code == status and words in detail(reply), reply.text


def test_a_down_instance_is_409_and_an_instances_refusal_is_a_400_with_its_detail(client, double, clock):
    join(client, "a", double.url)
    double.refuse = "tier 'cpu' is host memory, which holds raw KV"
    body = {"model_id": MODEL, "tokens": TOKENS, "instance_id": "a", "codec": "cachegen-2", "tier": "cpu"}
    reply = client.post("/v1/compress", json=body)
    assert reply.status_code == 400 and "holds raw KV" in detail(reply)
    clock.now += TIMEOUT_S + 5
    for path in ("/v1/compress", "/v1/decompress"):
        reply = client.post(path, json=body if path == "/v1/compress" else
                            {"model_id": MODEL, "tokens": TOKENS, "instance_id": "a"})
        assert reply.status_code == 409 and "instance a is down" in detail(reply)


def test_the_openapi_document_has_the_routes_with_their_bodies_and_errors(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, title in (("/v1/compress", "CompressRequest"), ("/v1/decompress", "DecompressRequest")):
        operation = paths[path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(title)
        assert {"200", "400", "401", "404", "409", "422", "502", "504"} <= set(operation["responses"])


# -- the commands on a real engine, and a kvtier_server's refusal ---------------------------------

def test_an_engine_member_runs_compress_and_decompress_and_refuses_what_it_cannot(make_engine, layout):
    engine = make_engine("cpu_disk")
    member = EngineMember(engine)
    tokens, kv = seeded_tokens(3 * CHUNK, 21), seeded_kv(layout, 3 * CHUNK, 21)
    engine.store(tokens, kv)
    assert engine.flush(30)
    keys = [k.hex() for k in engine.db.keys(tokens)]
    reply = member.run(Command(op="compress", keys=keys, tier="disk", codec="cachegen-2",
                               num_tokens=3 * CHUNK))
    assert reply.chunks == 3 and [t.name for t in reply.tiers] == ["cpu", "disk"]
    assert member.run(Command(op="decompress", keys=keys)).chunks == 3  # every tier below
    assert member.run(Command(op="decompress", keys=keys, tier="disk")).chunks == 0  # raw already
    for command in (Command(op="compress", keys=keys, tier="disk"),  # no codec
                    Command(op="compress", keys=keys, codec="cachegen-2"),  # no tier
                    Command(op="compress", keys=keys, tier="cpu", codec="cachegen-2"),
                    Command(op="compress", keys=keys, tier="tape", codec="cachegen-2"),
                    Command(op="decompress", keys=keys, tier="cpu")):
        with pytest.raises(ValueError):
            member.run(command)
    got, n = engine.retrieve(tokens)
    assert n == 3 * CHUNK and torch.equal(got, kv)  # (host memory's copy, raw all along)


@pytest.mark.parametrize("command", [Command(op="compress", codec="cachegen-2", tier="memory"),
                                     Command(op="decompress")])
def test_a_kvtier_server_refuses_compress_and_decompress(command):
    member = ServerMember(store=None, loop=None)  # refused before the store is touched
    with pytest.raises(ValueError, match="never decodes"):
        member.run(command)


# -- real processes ----------------------------------------------------------------------------------

N = 4 * CHUNK


def disk_codecs(instance) -> list[int]:
    """The codec id of every record file on the instance's disk (its namespace's folder)."""
    folder = instance.folder / "disk" / instance.info["namespace"]
    return sorted(decode_header(path.read_bytes()[:HEADER_SIZE]).codec for path in folder.rglob("*.kvr"))


def test_compress_and_decompress_through_rest_recode_the_instances_disk_records(tmp_path):
    with running_fleet(tmp_path) as fleet:
        controller = fleet.start_controller()
        fleet.start_server("server-1")
        (i1,) = fleet.start_instances(["i1"])
        client = controller.client()
        wait_up(client, ["i1", "server-1"])
        tokens = prompt(60, N)
        assert i1.store(60, N) == 4
        wait_hits(client, tokens, {"i1": N}, "stored, indexed")
        original = i1.digest(60, N)["digest"]
        assert disk_codecs(i1) == [RAW_ID] * 4
        body = {"model_id": FLEET_MODEL, "tokens": tokens, "instance_id": "i1"}

        reply = client.post("/v1/compress", {**body, "codec": "cachegen-2", "tier": "disk"})
        assert reply == {"results": [{"instance_id": "i1", "chunks": 4}]}
        assert disk_codecs(i1) == [CACHEGEN_ID] * 4
        client.post("/v1/clear", {"instance_id": "i1", "tier": "cpu"})
        served = i1.digest(60, N)  # from the disk, decoded on the way up
        assert served["hit"] == N and served["digest"] != original

        reply = client.post("/v1/decompress", body)
        assert reply == {"results": [{"instance_id": "i1", "chunks": 4}]}
        assert disk_codecs(i1) == [RAW_ID] * 4
        client.post("/v1/clear", {"instance_id": "i1", "tier": "cpu"})
        again = i1.digest(60, N)  # the decoded values, now raw on the disk
        assert (again["hit"], again["digest"]) == (N, served["digest"])

        for bad, words in (({"codec": "cachegen-2", "tier": "cpu"}, "raw KV"),
                           ({"codec": "cachegen-2", "tier": "nvme"}, "nvme")):
            with pytest.raises(HttpError) as err:
                client.post("/v1/compress", {**body, **bad})
            assert err.value.status == 400 and words in err.value.detail
        with pytest.raises(HttpError) as err:
            client.post("/v1/decompress", {**body, "instance_id": "server-1"})
        assert err.value.status == 400 and "never decodes" in err.value.detail
        i1.check()
