"""configs/controller.yaml and configs/fleet.yaml, the files the README's "Running a fleet" starts
from: they load, they spell out every key of their section at its default, and each key is commented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from kvtier.config import ControllerConfig, FleetConfig, load_config, load_controller_config

CONFIGS = Path(__file__).parents[2] / "configs"


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _commented(path: Path, keys: set[str]) -> None:
    """Each of `keys` is written once, right under a comment line."""
    lines = path.read_text().splitlines()
    for key in keys:
        at = [i for i, line in enumerate(lines) if line.strip().startswith(f"{key}:")]
        assert len(at) == 1, (path.name, key)
        assert lines[at[0] - 1].strip().startswith("#"), (path.name, key)


def test_controller_yaml_is_every_key_at_its_default():
    path = CONFIGS / "controller.yaml"
    assert set(yaml.safe_load(path.read_text())) == _fields(ControllerConfig)
    assert dataclasses.replace(load_controller_config(path, env={}), source="") == ControllerConfig(source="")
    _commented(path, _fields(ControllerConfig))


def test_fleet_yaml_is_cpu_disk_plus_a_controller_section():
    path = CONFIGS / "fleet.yaml"
    assert set(yaml.safe_load(path.read_text())["controller"]) == _fields(FleetConfig)
    config = load_config(path, env={})
    assert config.controller == FleetConfig()
    alone = load_config(CONFIGS / "cpu_disk.yaml", env={})
    assert dataclasses.replace(config, controller=None, source="") == dataclasses.replace(alone, source="")
    _commented(path, _fields(FleetConfig))
