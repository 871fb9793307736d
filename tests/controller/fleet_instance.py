"""One fleet instance for the controller tests: a CacheEngine (cpu + disk tier, the small test layout)
whose config has a `controller:` section, so it joins the fleet by itself, driven by a line protocol.

    python tests/controller/fleet_instance.py CONFIG.json

CONFIG.json (written by tests/fleet_processes.py): controller_url, instance_id, token, disk,
model_id, chunk_size, heartbeat_s, cpu_capacity, disk_capacity, and optionally remote (a
kvtier:// URL: a kvtier_server tier below the disk).

It prints one JSON line when the engine is built ({"ready": true, "namespace": ...}), then reads
commands on stdin and answers each with one JSON line ({"error": "..."} when one fails):

    store <seed> <n>    store prompt(seed, n), wait for the background writes -> {"stored": chunks}
    lookup <seed> <n>   -> {"hit": tokens}
    tiers <seed> <n>    -> {"tiers": {tier: [holds chunk i, ...]}}
    stats               -> {"stats": CacheEngine.stats() plus "pinned"}
    flood <n>           store n new 4-chunk prompts and wait for the disk -> {"stored": chunks}
    exit                close the engine (its agent too) -> {"bye": true}, then exit 0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: fleet_processes.prompt, conftest.small_layout

import torch  # noqa: E402
import yaml  # noqa: E402
from conftest import small_layout  # noqa: E402
from fleet_processes import prompt  # noqa: E402

from kvtier import CacheEngine, load_config  # noqa: E402

FLUSH_S = 30.0
FLOOD_SEED = 1_000_000  # flood prompts never collide with a test's seeds


def build_engine(options: dict) -> CacheEngine:
    section = {"url": options["controller_url"], "instance_id": options["instance_id"],
               "heartbeat_s": options["heartbeat_s"]}
    if options.get("token"):
        section["token"] = options["token"]
    config = {"chunk_size": options["chunk_size"], "write_through": True,
              "cpu": {"capacity": options["cpu_capacity"], "pin_memory": "off"},
              "disk": {"path": options["disk"], "capacity": options["disk_capacity"], "io_threads": 1},
              "controller": section}
    if options.get("remote"):
        config["remote"] = {"url": options["remote"], "timeout_s": 5.0}
    path = Path(options["disk"]).parent / "kvtier.yaml"
    path.write_text(yaml.safe_dump(config))
    return CacheEngine(load_config(path, env={}), small_layout(), options["model_id"])


class Instance:
    def __init__(self, engine: CacheEngine):
        self.engine = engine
        self.floods = 0

    def store(self, seed: str, n: str) -> dict:
        tokens = prompt(int(seed), int(n))
        generator = torch.Generator().manual_seed(int(seed))
        kv = torch.randn(self.engine.layout.chunk_shape(len(tokens)), generator=generator)
        stored = self.engine.store(tokens, kv.to(self.engine.layout.dtype))
        self.engine.flush(FLUSH_S)
        return {"stored": stored}

    def lookup(self, seed: str, n: str) -> dict:
        return {"hit": self.engine.lookup(prompt(int(seed), int(n)))}

    def tiers(self, seed: str, n: str) -> dict:
        keys = self.engine.db.keys(prompt(int(seed), int(n)))
        storage = self.engine.storage
        held = {"cpu": storage.cpu.present(keys)}
        for tier in storage.lower:
            held[tier.name] = tier.has(keys)
        return {"tiers": held}

    def stats(self) -> dict:
        stats = self.engine.stats()
        stats["pinned"] = self.engine.storage.pins.num_pinned
        return {"stats": stats}

    def flood(self, count: str) -> dict:
        stored = 0
        for _ in range(int(count)):
            self.floods += 1
            stored += self.store(str(FLOOD_SEED + self.floods), str(4 * self.engine.db.chunk_size))["stored"]
        return {"stored": stored}


def main() -> int:
    options = json.loads(Path(sys.argv[1]).read_text())
    engine = build_engine(options)
    instance = Instance(engine)
    print(json.dumps({"ready": True, "namespace": engine.db.namespace_digest.hex()}), flush=True)
    for line in sys.stdin:
        op, *args = line.split()
        if op == "exit":
            engine.close()
            print(json.dumps({"bye": True}), flush=True)
            return 0
        try:
            reply = getattr(instance, op)(*args)
        except Exception as exc:  # reported to the test, which fails with it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply, default=str), flush=True)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
