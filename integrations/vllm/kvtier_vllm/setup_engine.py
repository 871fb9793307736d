"""What the connector builds from vLLM's config: the vLLM versions it runs under, the kvtier config it
reads, the KV geometry (namespace) both of its sides agree on, and the CacheEngine of each process.

The two sides of the connector live wherever vLLM puts them: one process for both on a GPU with one
rank (the "uni" executor), separate processes on CPU (vLLM always starts its "mp" executor there) and
with several ranks. Each process builds one CacheEngine per (config, model, rank) and shares it
between the sides it holds (`shared_engine`), so where the two sides meet in a process, the
scheduler sees host memory too. Across processes the scheduler's own CacheEngine sees only the
tiers the processes share (disk, Redis, kvtier_server, peers); its host memory stays empty, so it
is kept at its minimum (`scheduler_config`).

Config: `kv_connector_extra_config` carries `kvtier_config` (a YAML path; else `$KVTIER_CONFIG`,
else kvtier's defaults) and optionally `model_id` (else the model vLLM serves, as given). `KVTIER_*`
variables override the file, as everywhere in kvtier.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping

import torch

from kvtier.config import KvtierConfig, load_config
from kvtier.engine import CacheEngine
from kvtier.layout import KVLayout

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = ((0, 32), (0, 33))  # [from, to): the minor versions this connector was tested with
_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# The scheduler's host memory when its process holds no worker: room for a few chunks (it never
# stores; only a lookup's read-through could put something there).
SCHEDULER_CPU_CHUNKS = 4


class UnsupportedVllm(RuntimeError):
    """This vLLM (its version, or a setting kvtier cannot serve) is not one the connector supports."""


def check_version(version: str) -> None:
    """Raise UnsupportedVllm, one line, unless `version` (vllm.__version__) is in SUPPORTED_VLLM."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    low, high = SUPPORTED_VLLM
    if len(major_minor) != 2 or not low <= major_minor < high:
        raise UnsupportedVllm(f"kvtier's vLLM connector supports vLLM {low[0]}.{low[1]} to before "
                              f"{high[0]}.{high[1]}; this is vLLM {version}")


def extra_config(vllm_config) -> Mapping[str, object]:
    return vllm_config.kv_transfer_config.kv_connector_extra_config or {}


def kvtier_config(vllm_config) -> KvtierConfig:
    path = extra_config(vllm_config).get("kvtier_config")
    if path is not None and not isinstance(path, str):
        raise UnsupportedVllm(f"kv_connector_extra_config.kvtier_config must be a path, got {path!r}")
    return load_config(path)


def model_id(vllm_config) -> str:
    given = extra_config(vllm_config).get("model_id", vllm_config.model_config.model)
    if not isinstance(given, str) or not given:
        raise UnsupportedVllm(f"kv_connector_extra_config.model_id must be a non-empty string, got {given!r}")
    return given


def kv_layout(vllm_config) -> KVLayout:
    """The KV geometry of one tensor-parallel rank, as vLLM will allocate it."""
    model, parallel, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    if cache.cache_dtype == "auto":
        dtype = model.dtype
    elif cache.cache_dtype in _CACHE_DTYPES:
        dtype = _CACHE_DTYPES[cache.cache_dtype]
    else:
        raise UnsupportedVllm(f"kvtier cannot store a KV cache of dtype {cache.cache_dtype!r}")
    return KVLayout(num_layers=model.get_num_layers(parallel), num_kv_heads=model.get_num_kv_heads(parallel),
                    head_dim=model.get_head_size(), dtype=dtype, block_size=cache.block_size)


def scheduler_config(config: KvtierConfig, layout: KVLayout) -> KvtierConfig:
    """`config` for a scheduler's CacheEngine in a process without a worker: host memory at its minimum,
    unpinned, and no prefetch (it would move chunks into this process's memory, which no load reads)."""
    capacity = SCHEDULER_CPU_CHUNKS * layout.chunk_bytes(config.chunk_size)
    cpu = dataclasses.replace(config.cpu, capacity=capacity, pin_memory="off")
    loads = dataclasses.replace(config.loads, prefetch=False)
    return dataclasses.replace(config, cpu=cpu, loads=loads)


_engines: dict[tuple, list] = {}  # key -> [engine, holders]
_engines_lock = threading.Lock()


def shared_engine(key: tuple, build: Callable[[], CacheEngine]) -> CacheEngine:
    """The CacheEngine this process holds under `key`, built on first use; `release_engine` once per call."""
    with _engines_lock:
        held = _engines.get(key)
        if held is None:
            held = _engines[key] = [build(), 0]
        held[1] += 1
        return held[0]


def release_engine(key: tuple) -> None:
    """One holder of `key`'s engine is done; the last one flushes and closes it."""
    with _engines_lock:
        held = _engines.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _engines[key]
    held[0].close()
