"""Tests for the per-tier codec keys (kvtier/config.py, kvtier/config_checks.py) and their wiring
(kvtier/tiers/build.py build_lower_tiers, kvtier/tiers/coded.py with_codec): `codec` and `load_slo_s` on
the disk, redis and remote sections, from a file and from the environment; errors name the dotted
key and where it came from; configs/cachegen.yaml.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from kvtier.codecs.cachegen import CachegenCodec
from kvtier.codecs.records import CODEC_NAMES
from kvtier.config import CODECS, DiskConfig, KvtierConfig, RedisConfig, RemoteConfig, load_config
from kvtier.config_checks import check_sections
from kvtier.engine import build_lower_tiers
from kvtier.errors import ConfigError
from kvtier.metrics import Metrics
from kvtier.tiers.adaptive import AdaptiveTier
from kvtier.tiers.coded import CodedTier
from kvtier.tiers.disk import DiskTier

REPO = Path(__file__).parents[1]
SECTIONS = ("disk", "redis", "remote")


def write(tmp_path: Path, text: str, disk: str = "") -> Path:
    """A config file with a disk section in tmp_path (its other keys: `disk`), then `text`."""
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"disk:\n  path: {tmp_path / 'disk'}\n{disk}{text}")
    return path


def test_the_codec_choices_are_the_records_codecs_plus_adaptive():
    assert CODECS == (*CODEC_NAMES, "cachegen-adaptive")


def test_every_tier_below_defaults_to_raw_without_an_slo(tmp_path):
    config = load_config(write(tmp_path, "redis: {}\nremote: {}\n"), env={})
    for name in SECTIONS:
        section = getattr(config, name)
        assert (section.codec, section.load_slo_s) == ("raw", None)


@pytest.mark.parametrize("section", SECTIONS)
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_a_codec_is_read_from_the_file(tmp_path, section, codec):
    text = f"  codec: {codec}\n"
    path = write(tmp_path, "", disk=text) if section == "disk" else write(tmp_path, f"{section}:\n{text}")
    config = load_config(path, env={})
    assert getattr(config, section).codec == codec


@pytest.mark.parametrize("section", SECTIONS)
def test_adaptive_with_its_slo_is_read_from_the_file_and_the_environment(tmp_path, section):
    text = "  codec: cachegen-adaptive\n  load_slo_s: 0.25\n"
    path = write(tmp_path, "", disk=text) if section == "disk" else write(tmp_path, f"{section}:\n{text}")
    assert getattr(load_config(path, env={}), section).load_slo_s == 0.25
    env = {f"KVTIER_{section.upper()}__CODEC": "cachegen-adaptive",
           f"KVTIER_{section.upper()}__LOAD_SLO_S": "2"}
    config = load_config(write(tmp_path, ""), env=env)
    assert (getattr(config, section).codec, getattr(config, section).load_slo_s) == ("cachegen-adaptive", 2.0)


def test_an_environment_override_sets_the_codec(tmp_path):
    config = load_config(REPO / "configs" / "cpu_disk.yaml",
                         env={"KVTIER_DISK__CODEC": "cachegen-2", "KVTIER_DISK__PATH": str(tmp_path)})
    assert config.disk.codec == "cachegen-2"
    config = load_config(REPO / "configs" / "cachegen.yaml",
                         env={"KVTIER_DISK__CODEC": "raw", "KVTIER_DISK__PATH": str(tmp_path)})
    assert config.disk.codec == "raw"


def at(path: Path) -> str:
    """The start of a message about a key of the file `path`."""
    return rf"^{re.escape(str(path))}: "


def test_an_unknown_codec_names_the_key_and_the_file_or_variable(tmp_path):
    path = write(tmp_path, "redis:\n  codec: gzip\n")
    with pytest.raises(ConfigError, match=at(path) + r"redis\.codec: expected one of raw, cachegen-1, .*"
                                                     r"cachegen-adaptive; got str 'gzip'"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match=r"^environment KVTIER_DISK__CODEC: disk\.codec: expected one of"):
        load_config(write(tmp_path, ""), env={"KVTIER_DISK__CODEC": "cachegen-4"})


def test_adaptive_without_an_slo_names_the_key_and_the_source(tmp_path):
    path = write(tmp_path, "remote:\n  codec: cachegen-adaptive\n")
    needs = (r"remote\.load_slo_s: codec cachegen-adaptive needs a load SLO in seconds: "
             r"set remote\.load_slo_s \(KVTIER_REMOTE__LOAD_SLO_S\)")
    with pytest.raises(ConfigError, match=at(path) + needs):
        load_config(path, env={})
    with pytest.raises(ConfigError, match=r"^<defaults>: disk\.load_slo_s: codec cachegen-adaptive needs"):
        load_config(env={"KVTIER_DISK__CODEC": "cachegen-adaptive"})


def test_an_slo_without_the_adaptive_codec_names_the_key_and_the_source(tmp_path):
    path = write(tmp_path, "redis:\n  codec: cachegen-2\n  load_slo_s: 1.5\n")
    only = r"redis\.load_slo_s: only codec cachegen-adaptive reads a load SLO; redis\.codec is cachegen-2"
    with pytest.raises(ConfigError, match=at(path) + only):
        load_config(path, env={})
    only = r"disk\.load_slo_s: only codec cachegen-adaptive .*unset KVTIER_DISK__LOAD_SLO_S"
    with pytest.raises(ConfigError, match=only):
        load_config(write(tmp_path, ""), env={"KVTIER_DISK__LOAD_SLO_S": "1"})


@pytest.mark.parametrize(("value", "message"), [
    ("0", "must be >= 0.001"), ("soon", "expected float"), ("1.0e+12", "must be <= "),
    (".nan", "must be a finite number")])
def test_a_bad_slo_names_the_key(tmp_path, value, message):
    path = write(tmp_path, "", disk=f"  codec: cachegen-adaptive\n  load_slo_s: {value}\n")
    with pytest.raises(ConfigError, match=at(path) + rf"disk\.load_slo_s: {message}"):
        load_config(path, env={})


def test_cachegen_yaml_is_cpu_disk_with_a_cachegen_2_disk(tmp_path):
    env = {"KVTIER_DISK__PATH": str(tmp_path)}
    coded = load_config(REPO / "configs" / "cachegen.yaml", env=env)
    plain = load_config(REPO / "configs" / "cpu_disk.yaml", env=env)
    assert coded.disk.codec == "cachegen-2"
    assert dataclasses.replace(coded, disk=dataclasses.replace(coded.disk, codec="raw"), source="") == \
        dataclasses.replace(plain, source="")


# -- build_lower_tiers ------------------------------------------------------------------------------


def lower(tmp_path, **sections) -> list:
    config = KvtierConfig(disk=DiskConfig(path=str(tmp_path), **sections.pop("disk", {})), **sections)
    metrics = Metrics(["cpu", "disk", "redis", "remote"])
    return build_lower_tiers(config, b"namespac", lambda key: False, metrics)


def test_raw_tiers_are_not_wrapped_and_coded_ones_are(tmp_path):
    raw = lower(tmp_path)
    assert len(raw) == 1 and type(raw[0]) is DiskTier
    raw[0].close()
    tiers = lower(tmp_path, disk={"codec": "cachegen-1"},
                  redis=RedisConfig(url="redis://127.0.0.1:1/0", codec="cachegen-lossless"),
                  remote=RemoteConfig(url="kvtier://127.0.0.1:1", codec="cachegen-3"))
    try:
        assert [t.name for t in tiers] == ["disk", "redis", "remote"]
        assert all(isinstance(t, CodedTier) for t in tiers)
        assert isinstance(tiers[0].inner, DiskTier)
        assert [t.codec.name for t in tiers] == ["cachegen-1", "cachegen-lossless", "cachegen-3"]
        assert all(isinstance(t.codec, CachegenCodec) for t in tiers)
        assert hasattr(tiers[0], "keys") and not hasattr(tiers[1], "keys")  # only the disk reports keys
    finally:
        for t in tiers:
            t.close()


def test_an_adaptive_tier_gets_its_slo_and_namespace(tmp_path):
    tiers = lower(tmp_path, disk={"codec": "cachegen-adaptive", "load_slo_s": 0.5})
    try:
        assert isinstance(tiers[0], AdaptiveTier) and isinstance(tiers[0].inner, DiskTier)
        assert tiers[0].name == "disk" and hasattr(tiers[0], "keys")
        assert tiers[0].load_slo_s == 0.5
    finally:
        tiers[0].close()


def test_a_config_built_in_code_is_checked_too(tmp_path):
    with pytest.raises(ConfigError, match=r"disk\.load_slo_s: codec cachegen-adaptive needs"):
        lower(tmp_path, disk={"codec": "cachegen-adaptive"})
    with pytest.raises(ConfigError, match=r"remote\.load_slo_s: only codec cachegen-adaptive"):
        check_sections(KvtierConfig(remote=RemoteConfig(load_slo_s=1.0)))


def test_the_cachegen_backend_variable_is_not_a_config_key():
    """KVTIER_CACHEGEN_BACKEND shares the override prefix but belongs to kvtier.codecs.native."""
    config = load_config(env={"KVTIER_CACHEGEN_BACKEND": "reference", "KVTIER_DISK__CODEC": "cachegen-2"})
    assert config.disk.codec == "cachegen-2"
    with pytest.raises(ConfigError, match="KVTIER_CACHEGEN_BACKEN"):
        load_config(env={"KVTIER_CACHEGEN_BACKEN": "reference"})
