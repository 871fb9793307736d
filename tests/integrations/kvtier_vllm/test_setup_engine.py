"""Tests for integrations/vllm/kvtier_vllm/setup_engine.py: the versions the connector starts under,
the geometry both sides agree on (from vLLM's model and cache config, stood in for here), the
scheduler's minimal host memory, and one CacheEngine per process and key."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvtier.config import KvtierConfig
from kvtier_vllm import setup_engine
from kvtier_vllm.setup_engine import UnsupportedVllm


@pytest.mark.parametrize("version", ["0.32.0", "0.32.5rc1", "0.32.1+cpu"])
def test_the_tested_minor_version_starts(version):
    setup_engine.check_version(version)


@pytest.mark.parametrize("version", ["0.31.9", "0.33.0", "1.0.0", "dev", ""])
def test_another_version_refuses_with_one_line_naming_both(version):
    with pytest.raises(UnsupportedVllm) as err:
        setup_engine.check_version(version)
    assert "0.32" in str(err.value) and f"vLLM {version}" in str(err.value) and "\n" not in str(err.value)


def vllm_config(cache_dtype: str = "auto", extra: dict | None = None) -> SimpleNamespace:
    model = SimpleNamespace(model="/models/smol", dtype=torch.bfloat16, get_num_layers=lambda p: 30,
                            get_num_kv_heads=lambda p: 3, get_head_size=lambda: 64)
    return SimpleNamespace(model_config=model, parallel_config=SimpleNamespace(),
                           cache_config=SimpleNamespace(cache_dtype=cache_dtype, block_size=128),
                           kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))


@pytest.mark.parametrize(("cache_dtype", "dtype"), [("auto", torch.bfloat16), ("fp8", torch.float8_e4m3fn),
                                                    ("fp8_e5m2", torch.float8_e5m2)])
def test_the_layout_is_vllms_per_rank_geometry_in_its_cache_dtype(cache_dtype, dtype):
    layout = setup_engine.kv_layout(vllm_config(cache_dtype))
    assert (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size) == (30, 3, 64, 128)
    assert layout.dtype == dtype


def test_a_cache_dtype_kvtier_cannot_store_and_bad_extra_config_are_refused():
    with pytest.raises(UnsupportedVllm, match="int8"):
        setup_engine.kv_layout(vllm_config("int8"))
    with pytest.raises(UnsupportedVllm, match="kvtier_config"):
        setup_engine.kvtier_config(vllm_config(extra={"kvtier_config": 3}))
    with pytest.raises(UnsupportedVllm, match="model_id"):
        setup_engine.model_id(vllm_config(extra={"model_id": ""}))
    assert setup_engine.model_id(vllm_config()) == "/models/smol"
    assert setup_engine.model_id(vllm_config(extra={"model_id": "smol"})) == "smol"


def test_a_scheduler_without_a_worker_keeps_a_few_chunks_unpinned_and_no_prefetch():
    layout = setup_engine.kv_layout(vllm_config())
    config = setup_engine.scheduler_config(KvtierConfig(), layout)
    assert config.cpu.capacity == setup_engine.SCHEDULER_CPU_CHUNKS * layout.chunk_bytes(config.chunk_size)
    assert config.cpu.pin_memory == "off" and config.loads.prefetch is False


def test_one_engine_per_key_closed_by_its_last_holder():
    closed = []
    engine = SimpleNamespace(close=lambda: closed.append(1))
    key = ("m", 0, "L1", True)
    assert setup_engine.shared_engine(key, lambda: engine) is engine
    assert setup_engine.shared_engine(key, lambda: pytest.fail("built twice")) is engine
    setup_engine.release_engine(key)
    assert closed == []
    setup_engine.release_engine(key)
    assert closed == [1] and key not in setup_engine._engines
    setup_engine.release_engine(key)  # (once more: nothing)
