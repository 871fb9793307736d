"""Two CacheEngines in this process with `p2p:` sections and no shared store, against a real
kvtier_controller process (tests/fleet_processes.py): what one stores the other loads bit for bit
through the P2P tier alone, over TCP and over NIXL where it can be used here. The wiring end to end
(kvtier/engine.py, kvtier/p2p/setup.py) with the real parts; the parts' own stories are in tests/p2p."""

from __future__ import annotations

import pytest
import torch
from conftest import CHUNK, seeded_kv, seeded_tokens
from fleet_processes import TOKEN, running_fleet
from waiting import wait_until


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    with running_fleet(tmp_path_factory.mktemp("p2p-pair")) as fleet:
        yield fleet.start_controller({"heartbeat_timeout_s": 5.0})


def nixl_usable() -> bool:
    try:
        from kvtier.p2p.nixl_transport import nixl_status
    except ImportError:
        return False
    return nixl_status() is None


@pytest.mark.parametrize("transport", ["tcp", pytest.param("nixl", marks=pytest.mark.skipif(
    not nixl_usable(), reason="NIXL with UCX cannot be used here"))])
def test_a_prompt_stored_by_one_engine_is_loaded_by_the_other_through_p2p(make_engine, controller, transport):
    def engine(name: str):
        return make_engine("cpu", controller__url=controller.url, controller__token=TOKEN,
                           controller__instance_id=f"{name}-{transport}", controller__heartbeat_s="0.1",
                           p2p__transport=transport, p2p__token="p2p-pair-secret-token")

    holder, reader = engine("holder"), engine("reader")
    assert [t.name for t in reader.storage.lower] == ["p2p"]
    tokens, kv = seeded_tokens(4 * CHUNK, 41), seeded_kv(holder.layout, 4 * CHUNK, 41)
    assert holder.store(tokens, kv) == 4
    client = controller.client()
    keys = [k.hex() for k in holder.db.keys(tokens)]

    def indexed() -> bool:
        peers = client.post("/v1/peers", {"keys": keys, "exclude": f"reader-{transport}"})["peers"]
        return [p["p2p_url"] for p in peers if all(p["held"])] == [holder.p2p_url]

    wait_until(indexed, "the controller knows the holder's keys and P2P endpoint")
    views = {v["instance_id"]: v["p2p_url"] for v in client.get("/v1/instances")["instances"]}
    assert views[f"reader-{transport}"] == reader.p2p_url != holder.p2p_url

    assert reader.lookup(tokens) == 4 * CHUNK
    got, n = reader.retrieve(tokens)
    assert n == 4 * CHUNK and torch.equal(got, kv)
    stats = reader.stats()
    assert stats["tiers"]["p2p"]["hits"] == 4 and stats["tiers"]["p2p"]["corrupt"] == 0
    assert holder.stats()["p2p_served_chunks"] == 4
    if transport == "nixl":
        assert holder.stats()["p2p_leases"] >= 1
