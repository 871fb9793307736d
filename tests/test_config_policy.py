"""Tests for the per-tier eviction `policy` keys (kvtier/config.py `cpu.policy`, `disk.policy`, the
server's `policy` and `spill.policy`, declared by kvtier/config_fields.py `policy_key`) and their wiring
(kvtier/engine.py, kvtier/tiers/build.py `tier_policy`, kvtier/server/app.py): names checked against
kvtier/policy_registry.py when the config loads, errors naming the key and where it came from, and
the tiers evicting in the configured policy's order (a most-recently-used stand-in registered here);
and the CPU tier's `admission` rule (kvtier/admission.py) in the storage path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

import pytest
from conftest import CHUNK, seeded_kv, seeded_tokens, small_layout

from kvtier import policy_registry
from kvtier.config import (
    CpuConfig,
    DiskConfig,
    KvtierConfig,
    ServerConfig,
    SpillConfig,
    load_config,
    load_server_config,
)
from kvtier.engine import CacheEngine
from kvtier.errors import ConfigError
from kvtier.policy import LRUPolicy
from kvtier.policy_registry import POLICIES
from kvtier.record_files import file_bytes
from kvtier.server.app import KvtierServer

REPO = Path(__file__).parents[1]
LAYOUT = small_layout()
CHUNK_BYTES = LAYOUT.chunk_bytes(CHUNK)  # 4 KiB: one slab
RECORD_BYTES = file_bytes(CHUNK_BYTES)  # one chunk's file on disk


class MRUPolicy(LRUPolicy):
    """The most recently used key first: the opposite of LRU (its order, walked from the other end),
    so that which chunks survive shows which policy a tier uses."""

    def victims(self, evictable: Callable[[Hashable], bool]) -> Iterator[Hashable]:
        return (key for key in reversed(self._order) if evictable(key))


@pytest.fixture
def mru(monkeypatch):
    """"mru" registered for this test only; the capacities its factory was built for."""
    capacities: list[int] = []

    def factory(capacity: int) -> MRUPolicy:
        capacities.append(capacity)
        return MRUPolicy()

    monkeypatch.setitem(POLICIES, "mru", factory)
    return capacities


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvtier.yaml"
    path.write_text(text)
    return path


# -- config --------------------------------------------------------------------------------------


def test_host_memory_defaults_to_adaptive_the_rest_to_the_registry_default_read_when_built(monkeypatch, mru):
    config = load_config(env={})
    assert config.cpu.policy == policy_registry.DEFAULT_CPU_POLICY == "adaptive"
    assert config.disk.policy == policy_registry.DEFAULT_POLICY == "lru"
    assert load_server_config(env={}).policy == SpillConfig().policy == "lru"
    monkeypatch.setattr(policy_registry, "DEFAULT_POLICY", "mru")
    assert (CpuConfig().policy, DiskConfig().policy, ServerConfig().policy) == ("adaptive", "mru", "mru")


def test_a_registered_name_loads_from_a_file(tmp_path, mru):
    path = write(tmp_path, f"cpu:\n  policy: mru\ndisk:\n  path: {tmp_path / 'disk'}\n  policy: lru\n")
    config = load_config(path, env={})
    assert (config.cpu.policy, config.disk.policy) == ("mru", "lru")


@pytest.mark.parametrize("section", ["cpu", "disk"])
def test_an_unknown_name_names_the_key_the_file_and_the_known_policies(tmp_path, section):
    path = write(tmp_path, f"{section}:\n  policy: lfu-ish\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    message = str(error.value)
    assert f"{path}: {section}.policy:" in message and "'lfu-ish'" in message
    assert all(name in message for name in POLICIES)


def test_a_name_registered_after_import_is_known_at_the_next_load(tmp_path, monkeypatch):
    path = write(tmp_path, "cpu:\n  policy: mru\n")
    with pytest.raises(ConfigError, match="cpu.policy"):
        load_config(path, env={})
    monkeypatch.setitem(POLICIES, "mru", lambda capacity: MRUPolicy())
    assert load_config(path, env={}).cpu.policy == "mru"


def test_environment_overrides_set_and_check_the_policy(mru):
    config = load_config(env={"KVTIER_CPU__POLICY": "mru", "KVTIER_DISK__POLICY": "mru"})
    assert (config.cpu.policy, config.disk.policy) == ("mru", "mru")
    with pytest.raises(ConfigError, match=r"environment KVTIER_CPU__POLICY: cpu\.policy: expected one of"):
        load_config(env={"KVTIER_CPU__POLICY": "MRU"})  # names are exact
    with pytest.raises(ConfigError, match="cpu.policy: expected one of .*; got str 'null'"):
        load_config(env={"KVTIER_CPU__POLICY": "null"})  # a string key: the raw text, never None


def test_the_server_takes_a_policy_for_memory_and_for_the_spill(tmp_path, mru):
    config = load_server_config(env={"KVTIER_SERVER_POLICY": "mru",
                                     "KVTIER_SERVER_SPILL__PATH": str(tmp_path / "spill"),
                                     "KVTIER_SERVER_SPILL__POLICY": "mru"})
    assert (config.policy, config.spill.policy) == ("mru", "mru")
    with pytest.raises(ConfigError, match="environment KVTIER_SERVER_SPILL__POLICY: spill.policy"):
        load_server_config(env={"KVTIER_SERVER_SPILL__POLICY": "nope"})
    server = KvtierServer(dataclasses.replace(config, capacity=1 << 20))
    # Both indexes built from the registry, each for its own capacity in bytes.
    assert isinstance(server.store._index._policy, MRUPolicy)
    assert isinstance(server.store.spill._index._policy, MRUPolicy)
    assert sorted(mru) == sorted([1 << 20, config.spill.capacity])


def test_every_shipped_config_spells_out_cpu_and_disk_policy_at_its_default():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name in ("controller.yaml", "server.yaml"):
            continue
        text = path.read_text()
        config = load_config(path, env={})
        assert config.cpu.policy == CpuConfig().policy, path.name
        sections = 2 if config.disk is not None else 1
        assert text.count("\n  policy: ") == sections, path.name  # written out, under a comment
        assert text.count("\n  admission: ") == 1 and config.cpu.admission == "whole", path.name
    assert load_server_config(REPO / "configs" / "server.yaml", env={}).policy == ServerConfig().policy


# -- wiring: the tiers evict in the configured policy's order -------------------------------------


def engine(tmp_path: Path, cpu_chunks: int, policy: str, disk_records: int | None = None,
           disk_policy: str = "lru", admission: str = "whole", save_partial: bool = False) -> CacheEngine:
    disk = None if disk_records is None else DiskConfig(
        path=str(tmp_path / "disk"), capacity=disk_records * RECORD_BYTES, o_direct="off", policy=disk_policy)
    cpu = CpuConfig(capacity=cpu_chunks * CHUNK_BYTES, pin_memory="off", policy=policy, admission=admission)
    config = KvtierConfig(chunk_size=CHUNK, cpu=cpu, disk=disk, save_partial_chunks=save_partial)
    return CacheEngine(config, LAYOUT, model_id="policy-test")


def store_three(eng: CacheEngine) -> list:
    """Prompts A, B, C of one chunk each, stored in that order (each flushed below)."""
    prompts = [seeded_tokens(CHUNK, seed) for seed in (1, 2, 3)]
    for seed, tokens in enumerate(prompts, start=1):
        eng.store(tokens, seeded_kv(LAYOUT, CHUNK, seed))
        assert eng.flush(10)
    return prompts


def survivors(eng: CacheEngine, prompts: list) -> str:
    return "".join(name for name, tokens in zip("ABC", prompts) if eng.lookup(tokens) == CHUNK)


@pytest.mark.parametrize(("policy", "kept"), [("lru", "BC"), ("mru", "AC")])
def test_the_cpu_tier_evicts_in_the_configured_order(tmp_path, mru, policy, kept):
    with engine(tmp_path, cpu_chunks=2, policy=policy) as eng:
        prompts = store_three(eng)
        assert survivors(eng, prompts) == kept  # MRU: C's store evicted B, the most recently used
        cpu = eng.stats()["tiers"]["cpu"]
        assert (cpu["policy"], cpu["evictions"]) == (policy, 1)
    assert mru == ([2 * CHUNK_BYTES] if policy == "mru" else [])  # built for the pool's bytes


@pytest.mark.parametrize(("policy", "kept"), [("lru", "BC"), ("mru", "AC")])
def test_the_disk_tier_evicts_in_the_configured_order(tmp_path, mru, policy, kept):
    with engine(tmp_path, cpu_chunks=8, policy="lru", disk_records=2, disk_policy=policy) as eng:
        prompts = store_three(eng)
        eng.clear("cpu")  # what is left is on disk
        assert survivors(eng, prompts) == kept
        tiers = eng.stats()["tiers"]
        assert (tiers["cpu"]["policy"], tiers["disk"]["policy"]) == ("lru", policy)
        assert tiers["disk"]["evictions"] == 1
    assert mru == ([2 * RECORD_BYTES] if policy == "mru" else [])  # built for the disk's bytes


def test_lru_is_what_the_default_config_builds(tmp_path):
    with engine(tmp_path, cpu_chunks=2, policy="lru", disk_records=2) as eng:
        assert type(eng.storage.cpu._index._policy) is LRUPolicy
        assert type(eng.tier("disk")._index._policy) is LRUPolicy


def test_a_config_built_in_code_with_an_unknown_policy_fails_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"cpu\.policy: unknown eviction policy 'mru'; known: .*lru"):
        engine(tmp_path, cpu_chunks=2, policy="mru")
    with pytest.raises(ConfigError, match=r"disk\.policy: unknown eviction policy 'mru'"):
        engine(tmp_path, cpu_chunks=2, policy="lru", disk_records=2, disk_policy="mru")


# -- admission (kvtier/admission.py): which stored chunks join the CPU tier's order ---------------


@pytest.mark.parametrize(("admission", "declined", "cpu_keeps_a"), [("whole", 1, "whole chunks"),
                                                                   ("all", 0, "its tail")])
def test_whole_admission_holds_a_partial_tail_as_the_next_victim_and_still_writes_it_below(
        tmp_path, admission, declined, cpu_keeps_a):
    with engine(tmp_path, cpu_chunks=3, policy="lru", disk_records=8, admission=admission,
                save_partial=True) as eng:
        a = seeded_tokens(2 * CHUNK + 5, 1)  # two whole chunks and a partial one
        eng.store(a, seeded_kv(LAYOUT, len(a), 1))
        assert eng.flush(10)
        eng.store(b := seeded_tokens(CHUNK, 2), seeded_kv(LAYOUT, CHUNK, 2))  # one slab: one eviction
        assert eng.flush(10)
        keys = eng.db.keys(a)
        held = [eng.storage.cpu.holds(key) for key in keys]
        # "whole": the tail went first; "all" (LRU): A's first chunk, the oldest, so A's prefix is gone.
        assert held == ([True, True, False] if cpu_keeps_a == "whole chunks" else [False, True, True])
        assert eng.lookup(a) == len(a) and eng.lookup(b) == CHUNK  # the disk has every chunk
        cpu = eng.stats()["tiers"]["cpu"]
        assert (cpu["admission"], cpu["declined"], cpu["evictions"]) == (admission, declined, 1)
        got = eng.retrieve(a)  # an exact repeat reads the tail from disk: it is admitted this time
        assert got is not None and eng.storage.cpu.holds(keys[-1])


def test_an_unknown_admission_rule_names_the_key_the_file_and_the_rules(tmp_path):
    path = write(tmp_path, "cpu:\n  admission: second-hit\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    message = str(error.value)
    assert f"{path}: cpu.admission:" in message and "'second-hit'" in message
    assert "expected one of all, whole" in message


def test_a_config_built_in_code_with_an_unknown_admission_rule_fails_naming_the_key(tmp_path):
    known = r"known: \['all', 'whole'\]"
    with pytest.raises(ConfigError, match=r"cpu\.admission: unknown admission rule 'none'; " + known):
        engine(tmp_path, cpu_chunks=2, policy="lru", admission="none")
