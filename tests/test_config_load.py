"""Tests for kvtier/config_load.py on a config tree of its own: the loader knows no kvtier section, so
a new section is only a new dataclass (kvtier's own sections are tested in test_config*.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kvtier.config_load import DEFAULT_SOURCE, load, override
from kvtier.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Pond:
    depth: int = field(default=3, metadata={"min": 1})
    path: str = field(default="/nonexistent-pond", metadata={"path": True})


@dataclass(frozen=True, slots=True)
class Garden:
    name: str = "rose"
    ratio: float = 0.5
    pond: Pond | None = None
    source: str = field(default=DEFAULT_SOURCE, metadata={"internal": True})


def load_garden(tmp_path, text: str | None, env: dict[str, str]) -> Garden:
    path = None
    if text is not None:
        path = tmp_path / "garden.yaml"
        path.write_text(text)
    return load(Garden, path, env, prefix="GARDEN_", config_var="GARDEN_CONFIG", foreign="GARDEN_SHED_")


def test_any_dataclass_tree_loads_from_defaults_file_and_environment(tmp_path):
    assert load_garden(tmp_path, None, {}) == Garden()
    garden = load_garden(tmp_path, "name: tulip\npond: {depth: 7}\n",
                         {"GARDEN_RATIO": "2", "GARDEN_POND__PATH": str(tmp_path / "water")})
    assert (garden.name, garden.ratio) == ("tulip", 2.0)  # an int is a float where a float is expected
    assert garden.pond == Pond(depth=7, path=str(tmp_path / "water"))
    assert garden.source == str(tmp_path / "garden.yaml")


def test_a_field_override_on_a_disabled_section_enables_it_from_its_defaults(tmp_path):
    garden = load_garden(tmp_path, "pond: null\n", {"GARDEN_POND__DEPTH": "9"})
    assert garden.pond == Pond(depth=9)


def test_the_config_variable_and_a_foreign_prefix_are_not_overrides(tmp_path):
    path = tmp_path / "named.yaml"
    path.write_text("name: lily\n")
    env = {"GARDEN_CONFIG": str(path), "GARDEN_SHED_DOOR": "open"}  # GARDEN_SHED_*: another loader's
    garden = load(Garden, None, env, prefix="GARDEN_", config_var="GARDEN_CONFIG", foreign="GARDEN_SHED_")
    assert garden.name == "lily"
    with pytest.raises(ConfigError, match=r"^environment GARDEN_SHED_DOOR: shed_door: unknown key"):
        load(Garden, None, env, prefix="GARDEN_", config_var="GARDEN_CONFIG")


def test_errors_name_the_dotted_key_and_where_the_value_came_from(tmp_path):
    with pytest.raises(ConfigError, match=r"garden.yaml: pond.deep: unknown key \(known: depth, path\)"):
        load_garden(tmp_path, "pond: {deep: 1}\n", {})
    with pytest.raises(ConfigError, match=r"^environment GARDEN_POND__DEPTH: pond.depth: must be >= 1"):
        load_garden(tmp_path, None, {"GARDEN_POND__DEPTH": "0"})
    with pytest.raises(ConfigError, match="unknown key"):  # `source` is internal, not a key
        load_garden(tmp_path, "source: elsewhere\n", {})


def test_machine_checks_blame_the_origin_of_the_value_or_the_defaults(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ConfigError, match=rf"^environment GARDEN_POND__PATH: pond.path: {afile} exists"):
        load_garden(tmp_path, None, {"GARDEN_POND__PATH": str(afile)})
    with pytest.raises(ConfigError, match=r"^command line: pond: expected a mapping of keys, got int 3"):
        override(Garden(), "command line", {"pond": 3})
    assert override(Garden(), "command line", {"name": "iris", "ratio": None}) == Garden(name="iris")
