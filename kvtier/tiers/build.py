"""The tiers below host memory a config asks for, built in lookup order (an explicit list, no plugin
scan): disk, Redis, kvtier_server, each wrapped as its section's `codec` asks. The P2P tier, last, is
`kvtier.p2p.setup`'s. Called once per CacheEngine; imports a network tier's module only when configured.
The CPU and disk tiers evict in the order of their section's `policy` (`tier_policy`); the others
are stores with their own eviction (Redis's maxmemory-policy, kvtier_server's, a peer's).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from kvtier.admission import admission_rule
from kvtier.config import KvtierConfig
from kvtier.config_checks import check_codecs
from kvtier.errors import ConfigError
from kvtier.metrics import Metrics
from kvtier.policy import EvictionPolicy
from kvtier.policy_registry import make_policy
from kvtier.tiers import gds
from kvtier.tiers.base import PinPredicate, Tier
from kvtier.tiers.coded import with_codec
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.gds import GdsReader, GdsStatus


def build_lower_tiers(config: KvtierConfig, namespace: bytes, is_pinned: PinPredicate,
                      metrics: Metrics) -> list[Tier]:
    """The configured tiers below host memory, in lookup order, each wrapped as its section's `codec`
    asks (kvtier.tiers.coded.with_codec)."""
    check_codecs(config)  # a config built in code has not been through load_config
    tiers: list[Tier] = []
    if config.disk is not None:
        policy = tier_policy("disk.policy", config.disk.policy, config.disk.capacity)
        status, reader = gds_reader(config.disk.gds, config.disk.codec)
        tiers.append(DiskTier(config.disk.path, namespace, config.disk.capacity, is_pinned, metrics,
                              o_direct=config.disk.o_direct, fsync=config.disk.fsync, policy=policy,
                              gds=reader, gds_status=status))
    # Shared stores evict by their own policy, so they cannot honour this process's pins.
    if config.redis is not None:
        from kvtier.tiers.redis import RedisTier  # imported only when configured

        tiers.append(RedisTier(config.redis, namespace, metrics))
    if config.remote is not None:
        from kvtier.tiers.remote import RemoteTier

        tiers.append(RemoteTier(config.remote, namespace, metrics))
    sections = [s for s in (config.disk, config.redis, config.remote) if s is not None]
    return [with_codec(tier, s.codec, s.load_slo_s, namespace=namespace, metrics=metrics)
            for tier, s in zip(tiers, sections)]


def gds_reader(mode: str, codec: str) -> tuple[GdsStatus, GdsReader | None]:
    """The disk tier's GPUDirect Storage reader where `disk.gds` selects it and it is usable here
    (kvtier.tiers.gds.probe), and why not where not; only for raw records (a coded one is decoded on
    the host)."""
    if codec != "raw":
        if mode == "on":
            raise ConfigError(f"disk.gds: 'on' needs disk.codec 'raw' (records of {codec!r} are decoded on "
                              "the host)")
        return GdsStatus(False, f"disk.codec is {codec!r}: records are decoded on the host"), None
    status, kvikio = gds.probe(mode)
    return status, GdsReader(kvikio, status) if status.enabled else None


def tier_policy(key: str, name: str, capacity_bytes: int) -> EvictionPolicy:
    """A new eviction policy `name` for a tier of `capacity_bytes`; ConfigError naming `key` and the
    known policies when there is none of that name (a config built in code was never loaded)."""
    try:
        return make_policy(name, capacity_bytes)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None


def cpu_admission(config: KvtierConfig) -> Callable[[int], bool]:
    """Whether a stored chunk of n tokens joins the CPU tier's eviction order (`cpu.admission`);
    ConfigError naming the key and the known rules for a config built in code with another name."""
    try:
        rule = admission_rule(config.cpu.admission)
    except ValueError as error:
        raise ConfigError(f"cpu.admission: {error}") from None
    return partial(rule, chunk_tokens=config.chunk_size)


def tier_policies(config: KvtierConfig) -> dict[str, str | None]:
    """Every tier's eviction policy by name (as `tier_names`), None for a store that evicts by its own."""
    policies = dict.fromkeys(tier_names(config))
    policies["cpu"] = config.cpu.policy
    if config.disk is not None:
        policies["disk"] = config.disk.policy
    return policies


def tier_names(config: KvtierConfig) -> list[str]:
    """Every tier's name, fastest first, P2P included: what the engine's metrics count."""
    optional = {"disk": config.disk, "redis": config.redis, "remote": config.remote, "p2p": config.p2p}
    return ["cpu"] + [name for name, section in optional.items() if section is not None]
