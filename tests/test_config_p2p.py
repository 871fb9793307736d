"""The `p2p:` section (kvtier/config.py P2PConfig) and its cross-section checks
(kvtier/config_checks.py): P2P without a controller reads only hinted peers, a P2P endpoint beyond
loopback needs a token;
checked on the final config (after the environment), so overrides may add sections in any order."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kvtier.config import KvtierConfig, P2PConfig, load_config
from kvtier.config_checks import check_sections
from kvtier.errors import ConfigError

REPO = Path(__file__).parents[1]
CONTROLLER = {"KVTIER_CONTROLLER__URL": "http://127.0.0.1:7100"}
SECRET = "p2p-secret-token-x"


def test_configs_p2p_yaml_loads_as_documented():
    config = load_config(REPO / "configs" / "p2p.yaml", env={})
    assert config.p2p is not None and config.controller is not None
    assert (config.p2p.transport, config.p2p.host, config.p2p.port) == ("auto", "127.0.0.1", 0)
    assert config.p2p.token is None and config.redis is None and config.remote is None  # P2P alone


def test_p2p_without_a_controller_loads_for_disaggregated_prefill(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("p2p:\n  transport: tcp\n")
    config = load_config(path, env={})
    assert config.p2p is not None and config.controller is None  # peers only as requests name them
    assert load_config(REPO / "configs" / "p2p.yaml", env={"KVTIER_CONTROLLER": "null"}).controller is None


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "peer.example"])
def test_an_endpoint_beyond_loopback_needs_a_token(host):
    with pytest.raises(ConfigError, match=rf"p2p\.host: host {host} is reachable .* set p2p\.token") as err:
        load_config(env={**CONTROLLER, "KVTIER_P2P__HOST": host})
    assert SECRET not in str(err.value)
    config = load_config(env={**CONTROLLER, "KVTIER_P2P__HOST": host, "KVTIER_P2P__TOKEN": SECRET})
    assert config.p2p.host == host and config.p2p.token == SECRET
    assert SECRET not in repr(config)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_endpoint_needs_no_token(host):
    assert load_config(env={**CONTROLLER, "KVTIER_P2P__HOST": host}).p2p.host == host


def test_env_overrides_set_every_kind_of_p2p_key():
    env = {**CONTROLLER, "KVTIER_P2P__TRANSPORT": "nixl", "KVTIER_P2P__PORT": "7300",
           "KVTIER_P2P__ADVERTISE_HOST": "node-a", "KVTIER_P2P__TIMEOUT_S": "0.5",
           "KVTIER_P2P__MAX_BYTES_IN_FLIGHT": "64MiB", "KVTIER_P2P__LEASE_S": "3",
           "KVTIER_P2P__DIRECTORY_TTL_S": "0"}
    p2p = load_config(env=env).p2p
    assert (p2p.transport, p2p.port, p2p.advertise_host, p2p.timeout_s, p2p.max_bytes_in_flight,
            p2p.lease_s, p2p.directory_ttl_s) == ("nixl", 7300, "node-a", 0.5, 64 << 20, 3.0, 0.0)


@pytest.mark.parametrize("name,value,message", [
    ("KVTIER_P2P__TRANSPORT", "udp", "expected one of auto, nixl, tcp"),
    ("KVTIER_P2P__PORT", "70000", "must be <= 65535"),
    ("KVTIER_P2P__TIMEOUT_S", "0", "must be >= 0.001"),
    ("KVTIER_P2P__HOST", "127.0.0.1 ", "expected a host name or IP address"),
    ("KVTIER_P2P__TOKEN", "", "must not be empty"),
])
def test_bad_p2p_values_are_refused_naming_the_key(name, value, message):
    with pytest.raises(ConfigError, match=rf"environment {name}: p2p\.\w+: {message}"):
        load_config(env={**CONTROLLER, name: value})


def test_the_section_can_be_switched_off_from_the_environment():
    assert load_config(REPO / "configs" / "p2p.yaml", env={"KVTIER_P2P": "null"}).p2p is None


def test_a_config_built_in_code_is_checked_too():
    with pytest.raises(ConfigError, match="set p2p.token"):
        check_sections(KvtierConfig(p2p=P2PConfig(host="10.1.2.3")))
    check_sections(KvtierConfig(p2p=P2PConfig()))  # loopback, no controller: fine
    check_sections(KvtierConfig())  # no p2p: nothing to check


def test_configs_p2p_yaml_spells_out_every_p2p_key_at_its_default_with_a_comment():
    path = REPO / "configs" / "p2p.yaml"
    keys = {f.name for f in dataclasses.fields(P2PConfig)}
    assert set(yaml.safe_load(path.read_text())["p2p"]) == keys
    assert load_config(path, env={}).p2p == P2PConfig()
    lines = path.read_text().splitlines()
    lines = lines[lines.index("p2p:"):]
    for key in keys:
        [at] = [i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:")]
        assert lines[at - 1].strip().startswith("#"), key
