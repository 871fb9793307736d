"""Tests for the `blend:` section (kvtier/config.py BlendConfig, kvtier/config_checks.py check_blend)
and the config loader's bounded lists (kvtier/config_load.py, kvtier/config_values.py check_items):
from a file and from the environment; every error names the dotted key and where it came from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvtier.config import MAX_SEPARATOR_IDS, BlendConfig, KvtierConfig, load_config
from kvtier.config_checks import check_sections
from kvtier.errors import ConfigError


def write(tmp_path: Path, blend: str) -> Path:
    """A config file whose disk tier lives in tmp_path, with `blend` (YAML lines) as its blend section."""
    path = tmp_path / "kvtier.yaml"
    path.write_text(f"disk:\n  path: {tmp_path / 'disk'}\nblend:\n{blend}")
    return path


def fails(path: Path, key: str, problem: str, env: dict[str, str] | None = None) -> None:
    """Loading `path` raises a ConfigError starting with the file and the dotted key."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {re.escape(key)}: .*{problem}"):
        load_config(path, env=env or {})


def test_no_blend_section_means_no_blending():
    assert KvtierConfig().blend is None
    assert load_config(env={}).blend is None


def test_separator_ids_and_every_key_are_read_from_the_file(tmp_path):
    text = "  separator_ids: [271, 198, 198]\n  ratio: 0.3\n  check_layer: 2\n  min_tokens: 32\n"
    blend = load_config(write(tmp_path, text), env={}).blend
    assert blend == BlendConfig(separator_ids=(271, 198, 198), ratio=0.3, check_layer=2, min_tokens=32)
    assert isinstance(blend.separator_ids, tuple)  # immutable, like the rest of the frozen config
    assert hash(blend) == hash(BlendConfig(separator_ids=(271, 198, 198), ratio=0.3, check_layer=2,
                                           min_tokens=32))


def test_a_block_list_and_the_defaults(tmp_path):
    blend = load_config(write(tmp_path, "  separator_ids:\n    - 0\n    - 4294967295\n"), env={}).blend
    assert blend.separator_ids == (0, 2**32 - 1)
    assert (blend.separator, blend.ratio, blend.check_layer, blend.min_tokens) == (None, 0.15, 1, 64)


def test_a_separator_string_is_kept_as_written_even_whitespace(tmp_path):
    blend = load_config(write(tmp_path, '  separator: "\\n\\n"\n'), env={}).blend
    assert (blend.separator, blend.separator_ids) == ("\n\n", None)
    assert load_config(write(tmp_path, "  separator: <passage>\n"), env={}).blend.separator == "<passage>"


@pytest.mark.parametrize("ratio", [0, 0.0, 1, 1.0, 0.05])
def test_ratios_from_0_to_1_load(tmp_path, ratio):
    blend = load_config(write(tmp_path, f"  separator_ids: [5]\n  ratio: {ratio}\n"), env={}).blend
    assert blend.ratio == ratio and isinstance(blend.ratio, float)


def test_both_or_neither_separator_is_refused_naming_the_key_and_file(tmp_path):
    fails(write(tmp_path, "  separator_ids: [5]\n  separator: x\n"), "blend.separator_ids", "not both")
    fails(write(tmp_path, "  ratio: 0.2\n"), "blend.separator_ids", "needs a separator")
    path = tmp_path / "empty_blend.yaml"
    path.write_text(f"disk:\n  path: {tmp_path}\nblend: {{}}\n")
    fails(path, "blend.separator_ids", "KVTIER_BLEND__SEPARATOR_IDS")
    fails(write(tmp_path, '  separator: ""\n'), "blend.separator", "must not be empty")


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("  ratio: 1.5\n", "blend.ratio", "must be <= 1.0, got 1.5"),
    ("  ratio: -0.1\n", "blend.ratio", "must be >= 0.0"),
    ("  ratio: .nan\n", "blend.ratio", "finite"),
    ("  ratio: high\n", "blend.ratio", "expected float"),
    ("  check_layer: 0\n", "blend.check_layer", "must be >= 1, got 0"),
    ("  check_layer: true\n", "blend.check_layer", "expected int"),
    ("  min_tokens: -1\n", "blend.min_tokens", "must be >= 0"),
    ("  enabled: true\n", "blend.enabled", "unknown key"),
])
def test_bad_values_name_the_key_and_file(tmp_path, text, key, problem):
    fails(write(tmp_path, "  separator_ids: [5]\n" + text), key, problem)


@pytest.mark.parametrize(("ids", "key", "problem"), [
    ("[1, a]", "blend.separator_ids[1]", "expected int, got str 'a'"),
    ("[1, 2.5]", "blend.separator_ids[1]", "expected int, got float"),
    ("[true]", "blend.separator_ids[0]", "expected int, got bool"),
    ("[null]", "blend.separator_ids[0]", "expected int"),
    ("[[1]]", "blend.separator_ids[0]", "expected int, got list"),
    ("[-1]", "blend.separator_ids[0]", "must be >= 0, got -1"),
    ("[3, 4294967296]", "blend.separator_ids[1]", "must be <= 4294967295"),
    ("[]", "blend.separator_ids", "must not be an empty list"),
    ("5", "blend.separator_ids", "expected a list, got int 5"),
    ("'1, 2'", "blend.separator_ids", "expected a list, got str"),
    ("{a: 1}", "blend.separator_ids", "expected a list, got dict"),
    (str(list(range(MAX_SEPARATOR_IDS + 1))), "blend.separator_ids",
     f"at most {MAX_SEPARATOR_IDS} items, got {MAX_SEPARATOR_IDS + 1}"),
])
def test_bad_separator_ids_name_the_key_the_item_and_the_file(tmp_path, ids, key, problem):
    fails(write(tmp_path, f"  separator_ids: {ids}\n"), key, re.escape(problem))


def test_the_most_separator_ids_still_load(tmp_path):
    ids = list(range(MAX_SEPARATOR_IDS))
    assert load_config(write(tmp_path, f"  separator_ids: {ids}\n"), env={}).blend.separator_ids == tuple(ids)


def test_environment_overrides_set_separator_ids_and_ratio(tmp_path):
    config = load_config(env={"KVTIER_BLEND__SEPARATOR_IDS": "[1, 2]", "KVTIER_BLEND__RATIO": "0.3",
                              "KVTIER_DISK__PATH": str(tmp_path)})
    assert config.blend == BlendConfig(separator_ids=(1, 2), ratio=0.3)
    path = write(tmp_path, "  separator_ids: [5]\n  ratio: 0.2\n")
    config = load_config(path, env={"KVTIER_BLEND__SEPARATOR_IDS": "[7, 8, 9]", "KVTIER_BLEND__RATIO": "1"})
    assert (config.blend.separator_ids, config.blend.ratio) == ((7, 8, 9), 1.0)


def test_environment_overrides_switch_between_ids_and_a_string_or_disable_blending(tmp_path):
    path = write(tmp_path, "  separator: '###'\n")
    env = {"KVTIER_BLEND__SEPARATOR": "null", "KVTIER_BLEND__SEPARATOR_IDS": "[4]"}
    assert load_config(path, env=env).blend == BlendConfig(separator_ids=(4,))
    assert load_config(path, env={"KVTIER_BLEND__SEPARATOR": "<sep> 1"}).blend.separator == "<sep> 1"
    assert load_config(path, env={"KVTIER_BLEND": "null"}).blend is None


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("[-1]", "blend.separator_ids[0]", "must be >= 0"),
    ("[1, x]", "blend.separator_ids[1]", "expected int"),
    ("7", "blend.separator_ids", "expected a list"),
    ("[1, 2", "blend.separator_ids", "invalid YAML"),
])
def test_a_bad_environment_override_names_the_variable_and_the_key(text, key, problem):
    variable = "KVTIER_BLEND__SEPARATOR_IDS"
    with pytest.raises(ConfigError, match=rf"^environment {variable}: {re.escape(key)}: .*{problem}"):
        load_config(env={variable: text})


def test_an_override_that_leaves_no_separator_names_the_keys_to_set():
    with pytest.raises(ConfigError, match=r"^<defaults>: blend.separator_ids: .*KVTIER_BLEND__SEPARATOR_IDS"):
        load_config(env={"KVTIER_BLEND__RATIO": "0.3"})
    with pytest.raises(ConfigError, match=r"environment KVTIER_BLEND__RATIO: blend.ratio: must be <= 1.0"):
        load_config(env={"KVTIER_BLEND__SEPARATOR_IDS": "[1]", "KVTIER_BLEND__RATIO": "2"})


def test_a_config_built_in_code_is_checked_by_check_sections():
    with pytest.raises(ConfigError, match="blend.separator_ids: blending needs a separator"):
        check_sections(KvtierConfig(blend=BlendConfig()))
    check_sections(KvtierConfig(blend=BlendConfig(separator="\n\n")))
