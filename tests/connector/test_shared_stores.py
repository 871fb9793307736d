"""Two engine processes share KV through each shared store: Redis, Redis Cluster and kvtier_server.

A subprocess runs the bundled engine with kvtier on CPU + the shared store (no disk tier) and
generates for a prompt; then an engine in this process, whose CPU tier is empty, generates for the
same prompt. It must load everything but the last token from the store and produce the very tokens
the other process produced (and the engine produces without kvtier). Real servers throughout.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from kvtier import load_config

from .conftest import CHUNK, GREEDY, prompt

GENERATE = """
from kvtier import load_config
from kvtier_engine import LLM, SamplingParams

config = load_config({config!r}, env={env!r})
with LLM({model!r}, kvtier_config=config, device="cpu", dtype="float32", kv_cache_bytes=1 << 20) as llm:
    out = llm.generate({prompt!r}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
print(*out.token_ids)
"""


def store_env(kind: str, request) -> tuple[str, dict[str, str]]:
    """The config file and environment overrides that point kvtier at the store `kind`."""
    env = {"KVTIER_CHUNK_SIZE": str(CHUNK), "KVTIER_DISK": "null", "KVTIER_CPU__CAPACITY": "4MiB",
           "KVTIER_CPU__PIN_MEMORY": "off"}
    if kind == "kvtier_server":
        server = request.getfixturevalue("kvtier_server")
        return "remote.yaml", {**env, "KVTIER_REMOTE__URL": server.url}
    servers = request.getfixturevalue("redis_cluster" if kind == "redis_cluster" else "redis_server")
    file = "redis_cluster.yaml" if kind == "redis_cluster" else "redis.yaml"
    return file, {**env, "KVTIER_REDIS__URL": servers.url}


@pytest.mark.parametrize("kind", ["redis", "redis_cluster", "kvtier_server"])
def test_a_second_engine_process_loads_through_the_shared_store(kind, request, make_llm, model_dir, baseline):
    file, env = store_env(kind, request)
    config_path = str(REPO / "configs" / file)
    shared = prompt(48, seed=100 + len(kind))
    script = GENERATE.format(config=config_path, env=env, model=model_dir, prompt=shared)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = [int(t) for t in done.stdout.split()]

    llm = make_llm(load_config(config_path, env=env))
    out = llm.generate(shared, GREEDY)[0]

    assert (out.metrics.tokens_loaded, out.metrics.prefill_tokens_computed) == (len(shared) - 1, 1)
    assert out.token_ids == theirs == baseline(shared)
    tier = "remote" if kind == "kvtier_server" else "redis"
    assert llm.engine.kvtier.stats()["tiers"][tier]["hits"] == len(shared) // CHUNK
