"""The typed, nested kvtier configuration: YAML file, then `KVTIER_*` environment overrides.

Where the config comes from, in order (later wins):

1. the embedded defaults (the dataclass defaults below: a CPU tier plus a disk tier);
2. a YAML file: the `path` argument, else the file named by `KVTIER_CONFIG`, else none;
3. environment overrides, one variable per key, nesting spelled with a double underscore::

       KVTIER_CHUNK_SIZE=128            -> chunk_size: 128
       KVTIER_CPU__CAPACITY=8GiB        -> cpu: {capacity: 8GiB}
       KVTIER_DISK__IO_THREADS=2        -> disk: {io_threads: 2}
       KVTIER_DISK=null                 -> disk: null   (no disk tier)

   The key part after `KVTIER_` is case-insensitive (two variables naming one key, such as
   `KVTIER_CHUNK_SIZE` and `KVTIER_chunk_size`, are an error). A string-typed key takes the raw
   text, never parsed (`KVTIER_SALT=123` is the salt "123", `KVTIER_REMOTE__TOKEN='s3cret #1'` the
   whole token); only an optional string reads the exact text `null` as None. Every other value (numbers,
   booleans, sizes, lists, whole sections) is read as YAML ("128" is an int, "true" a bool, "null"
   None, `KVTIER_BLEND__SEPARATOR_IDS='[1, 2]'` a list).
   All are then validated exactly like a file value. Whole-section overrides apply before field
   overrides, and a field override on a disabled (null) section re-enables it from that section's
   defaults. `KVTIER_CONFIG` itself is not an override.

Validation is strict and fails closed (`kvtier.config_load` walks these dataclasses' fields, type
hints and metadata (`kvtier.config_fields` declares them), so a new section is just a new dataclass
here; `kvtier.config_values` checks each value, `kvtier.config_yaml` reads YAML with bounded size and
nesting and no aliases, `kvtier.config_checks` what spans keys and sections: P2P beyond loopback
needs a token, blend exactly one separator). Any problem raises one `ConfigError` naming the dotted
key and where it came from (the file, or the environment variable), and never showing the value of
a `secret` key (tokens, the salt) or the credentials or query of a URL, wherever the URL was written.
YAML 1.1's surprises are refused rather than read: `07000` (octal), `1:20` (base 60). Loading is
side-effect free apart from reading the file and stat-ing the paths; nothing is created on disk here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvtier.admission import ADMISSIONS, DEFAULT_ADMISSION
from kvtier.codecs.base import BACKEND_ENV, CODEC_NAMES
from kvtier.config_checks import ADAPTIVE, check_sections
from kvtier.config_connector import MAX_SEPARATOR_IDS, BlendConfig, LoadsConfig, TraceLogConfig
from kvtier.config_fields import (
    MAX_SECONDS,
    MAX_TOKEN_BYTES,
    SWITCH,
    at_least,
    choice_key,
    default_disk_path,
    policy_key,
    repr_redacting_urls,
    seconds_key,
    secret_key,
    size_key,
    url_key,
)
from kvtier.config_load import DEFAULT_SOURCE, load, override
from kvtier.config_values import (
    MAX_SIZE,
    GiB,
    check_directory,
    check_host,
    check_memory,
    check_text,
    check_url,
    hide_url_secrets,
    parse_size,
    show,
    show_key,
)
from kvtier.config_yaml import parse_yaml, read_config_file
from kvtier.errors import ConfigError
from kvtier.policy_registry import DEFAULT_CPU_POLICY

__all__ = [
    # the configuration and its loaders
    "KvtierConfig", "CpuConfig", "DiskConfig", "RedisConfig", "RemoteConfig", "ServerConfig", "SpillConfig",
    "FleetConfig", "ControllerConfig", "P2PConfig", "BlendConfig", "LoadsConfig", "TraceLogConfig",
    "load_config", "load_server_config", "load_controller_config", "override", "parse_size", "ConfigError",
    "ENV_PREFIX", "ENV_CONFIG", "SERVER_ENV_PREFIX", "SERVER_ENV_CONFIG", "CONTROLLER_ENV_PREFIX",
    "CONTROLLER_ENV_CONFIG", "DEFAULT_SOURCE", "GiB", "MAX_SIZE", "MAX_SECONDS", "MAX_REDIS_CONNECTIONS",
    "MAX_TOKEN_BYTES", "CODECS", "MAX_SEPARATOR_IDS",
    # re-exported from their own modules (config_values, config_yaml, config_fields), where they are defined
    "check_directory", "check_host", "check_memory", "check_text", "check_url", "hide_url_secrets",
    "show", "show_key", "parse_yaml", "read_config_file",
]

ENV_PREFIX = "KVTIER_"
ENV_CONFIG = "KVTIER_CONFIG"
SERVER_ENV_PREFIX = "KVTIER_SERVER_"
SERVER_ENV_CONFIG = "KVTIER_SERVER_CONFIG"
CONTROLLER_ENV_PREFIX = "KVTIER_CONTROLLER_"
CONTROLLER_ENV_CONFIG = "KVTIER_CONTROLLER_CONFIG"
MAX_REDIS_CONNECTIONS = 10_000  # Redis's own default maxclients; redis-py fills its pool up front
# How a tier below host memory codes its records: a codec (kvtier.codecs.base.CODEC_NAMES), or several
# levels per chunk picked per read under `load_slo_s` (kvtier.tiers.adaptive). config_checks: the pairing.
CODECS = (*CODEC_NAMES, ADAPTIVE)
_SLO = {"min": 0.001, "max": MAX_SECONDS}  # load_slo_s: seconds a load from the tier may take


@dataclass(frozen=True, slots=True)
class CpuConfig:
    capacity: int = size_key(2 * GiB, memory=True)
    pin_memory: str = choice_key("auto", SWITCH)
    # Eviction order (kvtier.policy_registry), built for `capacity` bytes: kvtier's adaptive policy,
    # the best measured for host memory (benchmarks/README.md, policy_replay.py).
    policy: str = policy_key(DEFAULT_CPU_POLICY)
    # Which stored chunks join that order (kvtier.admission); a declined one is only the next victim
    # (and is written below all the same). "whole": a prompt's partial last chunk is declined.
    admission: str = choice_key(DEFAULT_ADMISSION, tuple(ADMISSIONS))


@dataclass(frozen=True, slots=True)
class DiskConfig:
    path: str = field(default_factory=default_disk_path, metadata={"path": True})
    capacity: int = size_key(16 * GiB)
    o_direct: str = choice_key("auto", SWITCH)
    io_threads: int = at_least(4, 1)
    fsync: bool = False
    codec: str = choice_key("raw", CODECS)
    load_slo_s: float | None = field(default=None, metadata=_SLO)
    policy: str = policy_key()  # eviction order (kvtier.policy_registry): built for `capacity` bytes
    gds: str = choice_key("auto", SWITCH)  # GPUDirect Storage reads into GPU memory (kvtier.tiers.gds)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """A Redis (or Redis Cluster) tier: one key per chunk holding its whole record."""

    url: str = url_key("redis://127.0.0.1:6379/0", ("redis", "rediss", "unix"))  # cluster: any node
    cluster: bool = False
    ttl_s: int | None = field(default=None, metadata={"min": 1, "max": MAX_SECONDS})  # None = never
    timeout_s: float = seconds_key(1.0, 0.001)  # connect and read timeout per round trip
    # redis-py's blocking pool puts one slot per connection in a queue when built (on the first
    # lookup): 10**7 took 7.5 s there, 2**63-1 never returned.
    max_connections: int = field(default=16, metadata={"min": 1, "max": MAX_REDIS_CONNECTIONS})
    batch_size: int = at_least(32, 1)  # chunks per pipelined round trip
    retry_after_s: float = seconds_key(1.0, 0.0)  # first back-off after a failure; doubles up to retry_max_s
    retry_max_s: float = seconds_key(30.0, 0.0)
    key_prefix: str = field(default="kvtier:", metadata={"empty": True})
    codec: str = choice_key("raw", CODECS)
    load_slo_s: float | None = field(default=None, metadata=_SLO)

    def __repr__(self) -> str:
        return repr_redacting_urls(self)


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    """A `kvtier_server` tier."""

    url: str = url_key("kvtier://127.0.0.1:7000", ("kvtier",))
    token: str | None = secret_key()  # the server's shared secret, when it has one
    timeout_s: float = seconds_key(5.0, 0.001)
    connections: int = at_least(4, 1)
    retry_after_s: float = seconds_key(1.0, 0.0)
    retry_max_s: float = seconds_key(30.0, 0.0)
    codec: str = choice_key("raw", CODECS)
    load_slo_s: float | None = field(default=None, metadata=_SLO)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The `controller:` section of an instance (a CacheEngine, kvtier_server): join a fleet."""

    url: str = url_key("http://127.0.0.1:7100", ("http", "https"))  # the kvtier_controller
    instance_id: str | None = None  # None: "<host name>-<pid>"; set it to keep one id across restarts
    token: str | None = secret_key()  # the controller's shared secret, when it has one
    heartbeat_s: float = seconds_key(2.0, 0.05)  # between heartbeats (and at most between event batches)
    timeout_s: float = seconds_key(5.0, 0.001)  # per request to the controller
    # Where this instance takes the controller's commands (HTTP, a per-process secret): 0 = any port.
    command_host: str = field(default="127.0.0.1", metadata={"host": True})
    command_port: int = field(default=0, metadata={"min": 0, "max": 65535})
    advertise_host: str | None = field(default=None, metadata={"host": True})  # None: command_host
    max_pending_events: int = at_least(100_000, 1)  # keys queued for the controller; beyond: dropped


@dataclass(frozen=True, slots=True)
class P2PConfig:
    """The `p2p:` section: read missed chunks from peers (the controller says who holds them) and
    serve this instance's chunks to them. Needs a `controller:` section."""

    transport: str = choice_key("auto", ("auto", "nixl", "tcp"))  # auto: NIXL when it loads, else TCP
    host: str = field(default="127.0.0.1", metadata={"host": True})  # where this endpoint listens
    port: int = field(default=0, metadata={"min": 0, "max": 65535})  # 0: any free port
    advertise_host: str | None = field(default=None, metadata={"host": True})  # None: host
    token: str | None = secret_key()  # peers' shared secret; required beyond loopback
    timeout_s: float = seconds_key(2.0, 0.001)  # a reader's deadline for one peer read, all in
    lease_s: float = seconds_key(10.0, 0.01)  # a holder keeps leased chunks at most this long
    max_bytes_in_flight: int = size_key(256 << 20)  # per reader: payload bytes being read from peers
    max_connections: int = at_least(64, 1)  # peers this endpoint serves at once
    directory_ttl_s: float = seconds_key(1.0, 0.0)  # how long the controller's answer is reused
    retry_after_s: float = seconds_key(1.0, 0.0)  # back-off of one failing peer, doubling to
    retry_max_s: float = seconds_key(30.0, 0.0)


@dataclass(frozen=True, slots=True)
class KvtierConfig:
    chunk_size: int = at_least(256, 1)
    save_partial_chunks: bool = False
    # "" = no salt. A tenant's salt keeps its KV apart from others': treated as a secret.
    salt: str = field(default="", repr=False, metadata={"empty": True, "secret": True})
    write_through: bool = True  # store to lower tiers in the background as soon as stored in CPU
    promote_on_hit: bool = True  # a lower-tier hit is copied into the CPU tier
    cpu: CpuConfig = field(default_factory=CpuConfig)
    disk: DiskConfig | None = field(default_factory=DiskConfig)  # None: no disk tier
    redis: RedisConfig | None = None  # None: no Redis tier
    remote: RemoteConfig | None = None  # None: no kvtier_server tier
    controller: FleetConfig | None = None  # None: not part of a fleet
    p2p: P2PConfig | None = None  # None: no peer-to-peer reads or serving
    blend: BlendConfig | None = None  # None: no blending (prefix caching only)
    loads: LoadsConfig = field(default_factory=LoadsConfig)  # asynchronous loads and prefetch
    trace_log: TraceLogConfig = field(default_factory=TraceLogConfig)  # off unless it names a file
    # Where the config came from, for messages; not a config key.
    source: str = field(default=DEFAULT_SOURCE, metadata={"internal": True})


@dataclass(frozen=True, slots=True)
class SpillConfig:
    """Where `kvtier_server` spills what it evicts from memory (a disk tier directory)."""

    path: str = field(default_factory=default_disk_path, metadata={"path": True})
    capacity: int = size_key(16 * GiB)
    o_direct: str = choice_key("auto", SWITCH)
    policy: str = policy_key()  # the spill's eviction order (kvtier.policy_registry)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """`kvtier_server`: `load_server_config`, env overrides `KVTIER_SERVER_<KEY>`."""

    host: str = field(default="127.0.0.1", metadata={"host": True})
    port: int = field(default=7000, metadata={"min": 0, "max": 65535})  # 0: any free port (logged)
    capacity: int = size_key(4 * GiB, memory=True)  # bytes of records held in memory; evicted beyond
    policy: str = policy_key()  # memory's eviction order (kvtier.policy_registry)
    token: str | None = secret_key()  # shared secret every client must present; None = no auth
    max_frame_bytes: int = size_key(1 * GiB)  # largest frame accepted (header + payloads)
    max_connections: int = at_least(256, 1)  # authenticated connections; more get BUSY at HELLO
    max_handshakes: int = at_least(64, 1)  # connections before their HELLO; the oldest make room
    handshake_timeout_s: float = seconds_key(5.0, 0.001)  # from accept to a HELLO answered OK
    idle_timeout_s: float = seconds_key(300.0, 0.001)  # an authenticated connection silent this long closes
    receive_bytes: int = size_key(2 * GiB)  # payload bytes being received, all connections together
    reply_bytes: int = size_key(1 * GiB)  # reply bytes queued to send, all connections together
    send_timeout_s: float = seconds_key(30.0, 0.001)  # replies queued, none sent this long: closed
    spill: SpillConfig | None = None  # None: evicted records are dropped
    stats_interval_s: float = seconds_key(60.0, 0.0)  # one traffic log line per interval; 0 = never
    controller: FleetConfig | None = None  # None: not part of a fleet
    source: str = field(default=DEFAULT_SOURCE, metadata={"internal": True})


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """`kvtier_controller`: `load_controller_config`, env overrides `KVTIER_CONTROLLER_<KEY>`."""

    host: str = field(default="127.0.0.1", metadata={"host": True})
    port: int = field(default=7100, metadata={"min": 0, "max": 65535})  # 0: any free port (printed)
    token: str | None = secret_key()  # shared secret on every endpoint but /health; None = no auth
    # Where the chunk index and the instance registry live: None = this process's memory; a Redis URL
    # (redis://, rediss://, unix://) = Redis, so that several controllers behind one address answer the same.
    index: str | None = field(default=None, metadata={"url": ("redis", "rediss", "unix")})
    index_cluster: bool = False  # `index` names a node of a Redis Cluster
    index_timeout_s: float = seconds_key(1.0, 0.001)  # per Redis round trip
    heartbeat_timeout_s: float = seconds_key(10.0, 0.1)  # silent this long: down, its keys leave the index
    command_timeout_s: float = seconds_key(30.0, 0.001)  # a command to an instance (a move may write GBs)
    # Instances registered at once, down ones included (forgotten an hour after their last
    # heartbeat): a new id beyond it is refused with 429, so registrations cannot grow without bound.
    max_instances: int = at_least(4096, 1)
    max_body_bytes: int = size_key(64 << 20)  # largest request body
    source: str = field(default=DEFAULT_SOURCE, metadata={"internal": True})

    def __repr__(self) -> str:
        return repr_redacting_urls(self)


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> KvtierConfig:
    """Defaults, then the YAML file (`path`, else `$KVTIER_CONFIG`), then `KVTIER_*` overrides."""
    # The server's variables share kvtier's prefix, and so does the cachegen backend's: skipped here.
    config = load(KvtierConfig, path, env, prefix=ENV_PREFIX, config_var=ENV_CONFIG,
                  foreign=(SERVER_ENV_PREFIX, CONTROLLER_ENV_PREFIX, BACKEND_ENV))
    check_sections(config)  # across keys and sections (p2p needs controller): on the final config only
    return config


def load_server_config(path: str | os.PathLike[str] | None = None,
                       env: Mapping[str, str] | None = None) -> ServerConfig:
    """`kvtier_server`'s config: defaults, the YAML file (`path`, else `$KVTIER_SERVER_CONFIG`), then
    `KVTIER_SERVER_*` overrides (`KVTIER_SERVER_PORT=7001`, `KVTIER_SERVER_SPILL__PATH=/nvme`)."""
    return load(ServerConfig, path, env, prefix=SERVER_ENV_PREFIX, config_var=SERVER_ENV_CONFIG)


def load_controller_config(path: str | os.PathLike[str] | None = None,
                           env: Mapping[str, str] | None = None) -> ControllerConfig:
    """`kvtier_controller`'s config: defaults, the YAML file (`path`, else `$KVTIER_CONTROLLER_CONFIG`),
    then `KVTIER_CONTROLLER_*` overrides (`KVTIER_CONTROLLER_TOKEN`, `KVTIER_CONTROLLER_INDEX=redis://..`)."""
    # KVTIER_CONTROLLER__* (two underscores) belong to an instance's `controller:` section, and
    # KVTIER_CONTROLLER_URL to the `kvtier` CLI (where it finds the controller).
    return load(ControllerConfig, path, env, prefix=CONTROLLER_ENV_PREFIX, config_var=CONTROLLER_ENV_CONFIG,
                foreign=(CONTROLLER_ENV_PREFIX + "_", CONTROLLER_ENV_PREFIX + "URL"))
