"""Checks across sections of a `KvtierConfig`, which no single key's validation can see.

Run on the final config by `kvtier.config.load_config` (after the environment overrides, which may
add or remove a section one variable at a time), and again by the engine for a config built in code.
Pure: raises `ConfigError` naming the section, never showing a secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.config_values import require_token_beyond_loopback
from kvtier.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.config import KvtierConfig


def check_sections(config: KvtierConfig) -> None:
    """P2P needs a controller (it says which peer holds what), and a token wherever peers beyond
    this machine can reach the endpoint (it serves this instance's KV)."""
    p2p = config.p2p
    if p2p is None:
        return
    if config.controller is None:
        raise ConfigError(f"{config.source}: p2p: P2P needs a controller: section: the controller says "
                          f"which peer holds what")
    try:
        require_token_beyond_loopback(p2p.host, p2p.token, "set p2p.token (KVTIER_P2P__TOKEN)")
    except ConfigError as exc:
        raise ConfigError(f"{config.source}: p2p.host: {exc}") from None
