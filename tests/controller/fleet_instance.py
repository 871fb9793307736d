"""One fleet instance for the controller tests: a CacheEngine (cpu + disk tier, the small test layout)
whose config has a `controller:` section, so it joins the fleet by itself, driven by a line protocol.

    python tests/controller/fleet_instance.py CONFIG.json

CONFIG.json (written by tests/fleet_processes.py): controller_url, instance_id, token, disk,
model_id, chunk_size, heartbeat_s, cpu_capacity, disk_capacity, and optionally remote (a
kvtier:// URL: a kvtier_server tier below the disk), p2p (the engine's `p2p:` section: it serves its
chunks to peers and reads missed ones from them), io_threads (the disk's, 1 unless given) and layout
(KVLayout's num_layers, num_kv_heads, head_dim: larger chunks than the small test layout's).

It prints one JSON line when the engine is built ({"ready": true, "namespace": ...}), then reads
commands on stdin and answers each with one JSON line ({"error": "..."} when one fails):

    store <seed> <n>    store prompt(seed, n), wait for the background writes -> {"stored": chunks}
    lookup <seed> <n>   -> {"hit": tokens}
    tiers <seed> <n>    -> {"tiers": {tier: [holds chunk i, ...]}}
    stats               -> {"stats": CacheEngine.stats() plus "pinned"}
    flood <n>           store n new 4-chunk prompts and wait for the disk -> {"stored": chunks}
    digest <seed> <n>   retrieve prompt(seed, n) into a zeroed buffer ->
                        {"hit": tokens, "digest": kv_digest(buffer), "seconds": the retrieve's}
    check               check_invariants of the storage (it raises when broken) -> {"ok": true}
    begin <tag> <command ...>   run the command on a thread of its own -> {"begun": tag} at once
    end <tag>           wait for that command -> its reply
    exit                close the engine (its agent too) -> {"bye": true}, then exit 0
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: fleet_processes.prompt, conftest.small_layout

import torch  # noqa: E402
import yaml  # noqa: E402
from conftest import small_layout  # noqa: E402
from fleet_processes import prompt  # noqa: E402

from kvtier import CacheEngine, KVLayout, load_config  # noqa: E402
from kvtier.invariants import check_invariants  # noqa: E402

FLUSH_S = 30.0
FLOOD_SEED = 1_000_000  # flood prompts never collide with a test's seeds


def build_engine(options: dict) -> CacheEngine:
    section = {"url": options["controller_url"], "instance_id": options["instance_id"],
               "heartbeat_s": options["heartbeat_s"]}
    if options.get("token"):
        section["token"] = options["token"]
    config = {"chunk_size": options["chunk_size"], "write_through": True,
              "cpu": {"capacity": options["cpu_capacity"], "pin_memory": "off"},
              "disk": {"path": options["disk"], "capacity": options["disk_capacity"],
                       "io_threads": options.get("io_threads", 1)},
              "controller": section}
    if options.get("remote"):
        config["remote"] = {"url": options["remote"], "timeout_s": 5.0}
    if options.get("p2p"):
        config["p2p"] = options["p2p"]
    path = Path(options["disk"]).parent / "kvtier.yaml"
    path.write_text(yaml.safe_dump(config))
    layout = KVLayout(**options["layout"]) if options.get("layout") else small_layout()
    return CacheEngine(load_config(path, env={}), layout, options["model_id"])


def kv_digest(kv: torch.Tensor) -> str:
    """A hash of a KV tensor's bytes: equal digests, bit-equal tensors (the test computes the same)."""
    return hashlib.sha256(kv.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class Instance:
    def __init__(self, engine: CacheEngine):
        self.engine = engine
        self.floods = 0
        self.begun: dict[str, tuple[threading.Thread, dict]] = {}

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

    def digest(self, seed: str, n: str) -> dict:
        tokens = prompt(int(seed), int(n))
        out = torch.zeros(self.engine.layout.chunk_shape(len(tokens)), dtype=self.engine.layout.dtype)
        started = time.monotonic()
        _, hit = self.engine.retrieve(tokens, out=out)
        return {"hit": hit, "digest": kv_digest(out), "seconds": time.monotonic() - started}

    def check(self) -> dict:
        check_invariants(self.engine.storage)
        return {"ok": True}

    def begin(self, tag: str, op: str, *args: str) -> dict:
        """Run `op` on a thread (a retrieve that may wait on a stalled peer) while commands go on."""
        reply: dict = {}

        def run() -> None:
            try:
                reply.update(getattr(self, op)(*args))
            except Exception as exc:  # reported by `end`
                reply["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=run, name=f"begin-{tag}", daemon=True)
        self.begun[tag] = (thread, reply)
        thread.start()
        return {"begun": tag}

    def end(self, tag: str) -> dict:
        thread, reply = self.begun.pop(tag)
        thread.join()
        return reply

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


def protocol_stream():
    """This process's stdout for the JSON lines alone: file descriptor 1 itself goes to stderr (the
    log), because native libraries write there on their own (UCX logs its errors to stdout)."""
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return stream


def main() -> int:
    options = json.loads(Path(sys.argv[1]).read_text())
    out = protocol_stream()
    engine = build_engine(options)
    instance = Instance(engine)
    print(json.dumps({"ready": True, "namespace": engine.db.namespace_digest.hex()}), file=out, flush=True)
    for line in sys.stdin:
        op, *args = line.split()
        if op == "exit":
            engine.close()
            print(json.dumps({"bye": True}), file=out, flush=True)
            return 0
        try:
            reply = getattr(instance, op)(*args)
        except Exception as exc:  # reported to the test, which fails with it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply, default=str), file=out, flush=True)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
