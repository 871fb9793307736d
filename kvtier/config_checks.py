"""Checks across keys and sections of a `KvtierConfig`, which no single key's validation can see.

Run on the final config by `kvtier.config.load_config` (after the environment overrides, which may
add or remove a section one variable at a time), and again by the engine for a config built in code.
Pure: raises `ConfigError` naming the section or key, never showing a secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.config_values import require_token_beyond_loopback
from kvtier.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.config import KvtierConfig


ADAPTIVE = "cachegen-adaptive"  # a codec name (kvtier.tiers.coded): several levels, one picked per read


def check_sections(config: KvtierConfig) -> None:
    """Each tier's codec and load SLO go together (`check_codecs`); blend names one separator
    (`check_blend`); P2P needs a token wherever peers beyond this machine can reach the endpoint
    (it serves this instance's KV). Without a controller: section a P2P instance reads only from
    peers a request names (disaggregated prefill: kvtier.p2p.directory's hints)."""
    check_codecs(config)
    check_blend(config)
    p2p = config.p2p
    if p2p is None:
        return
    try:
        require_token_beyond_loopback(p2p.host, p2p.token, "set p2p.token (KVTIER_P2P__TOKEN)")
    except ConfigError as exc:
        raise ConfigError(f"{config.source}: p2p.host: {exc}") from None


def check_codecs(config: KvtierConfig) -> None:
    """`load_slo_s` is set exactly on the tiers whose codec is `cachegen-adaptive`: the adaptive
    tier picks each chunk's level by the time left before it, and no other codec reads it."""
    for name in ("disk", "redis", "remote"):
        section = getattr(config, name)
        if section is None:
            continue
        variable = f"KVTIER_{name.upper()}__LOAD_SLO_S"
        if section.codec == ADAPTIVE and section.load_slo_s is None:
            raise ConfigError(f"{config.source}: {name}.load_slo_s: codec {ADAPTIVE} needs a load SLO in "
                              f"seconds: set {name}.load_slo_s ({variable})")
        if section.codec != ADAPTIVE and section.load_slo_s is not None:
            raise ConfigError(f"{config.source}: {name}.load_slo_s: only codec {ADAPTIVE} reads a load "
                              f"SLO; {name}.codec is {section.codec}: remove it or unset {variable}")


def check_blend(config: KvtierConfig) -> None:
    """`blend:` names its separator exactly one way: token ids, or a string the engine tokenises alone.
    Checked here, not per key: an environment override sets one key at a time on the section's
    defaults, which name neither."""
    blend = config.blend
    if blend is None:
        return
    how = ("set blend.separator_ids (KVTIER_BLEND__SEPARATOR_IDS) or blend.separator "
           "(KVTIER_BLEND__SEPARATOR)")
    if blend.separator_ids is not None and blend.separator is not None:
        raise ConfigError(f"{config.source}: blend.separator_ids: both blend.separator_ids and "
                          f"blend.separator are set; {how}, not both")
    if blend.separator_ids is None and blend.separator is None:
        raise ConfigError(f"{config.source}: blend.separator_ids: blending needs a separator: {how}")
    if blend.separator == "":
        raise ConfigError(f"{config.source}: blend.separator: must not be empty (it would never split a "
                          f"prompt); {how}")
