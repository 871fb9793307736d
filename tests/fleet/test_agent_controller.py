"""join_fleet against the real kvtier_controller process: an in-process fake member registers, its keys
answer the controller's lookups, a pin reaches it over its command channel, and after the
controller restarts (empty, on the same port) it registers again and the index is whole again."""

from __future__ import annotations

from fleet_doubles import NAMESPACE, FakeMember
from fleet_processes import TOKEN, ControllerProcess, lookup, prompt, wait_up
from waiting import wait_until

from kvtier.config import FleetConfig
from kvtier.controller.fleet_lookup import prompt_keys
from kvtier.fleet.agent import join_fleet
from kvtier.keys import tokens_to_u32

ID = "fake-engine"
MODEL = "test-model"  # FakeDescription's


def test_joins_the_real_controller_and_heals_after_its_restart(tmp_path):
    controller = ControllerProcess(tmp_path / "controller")
    member = FakeMember()
    handle = join_fleet(FleetConfig(url=controller.url, instance_id=ID, token=TOKEN, heartbeat_s=0.2,
                                    timeout_s=5.0), member)
    try:
        tokens = prompt(1, 64)  # 4 chunks of the fake member's 16 tokens
        keys = prompt_keys(tokens_to_u32(tokens), bytes.fromhex(NAMESPACE), 16, False)
        member.store("cpu", *keys)
        member.store("disk", keys[0])
        client = controller.client()
        wait_up(client, [ID])
        hits = wait_until(lambda: (r := lookup(client, tokens, MODEL))["hit_tokens"] == 64 and r, "indexed")
        [hit] = hits["instances"]
        assert hit["instance_id"] == ID and hit["tiers"] == ["cpu"] * 4

        reply = client.post("/v1/pin", {"model_id": MODEL, "tokens": tokens, "instance_id": ID})
        assert reply["results"] == [{"instance_id": ID, "chunks": 4}]
        assert member.commands[-1].op == "pin" and member.commands[-1].keys == [k.hex() for k in keys]

        controller.restart()
        client = controller.client()
        wait_until(lambda: lookup(client, tokens, MODEL)["hit_tokens"] == 64, "indexed again")
        stats = handle.stats()
        assert stats.registrations == 2 and stats.registered and stats.events_dropped == 0
    finally:
        handle.close()
        controller.stop()
