"""Tests for kvtier/sim/plan_geometry.py: the named models' KV bytes per token, `--layout` text, and
capacities written as shares or sizes turned into whole blocks."""

from __future__ import annotations

import pytest
import torch

from kvtier.sim.plan_geometry import MODELS, Capacity, model_layout, parse_capacity, parse_layout


@pytest.mark.parametrize("name, kib_per_token", [
    ("llama-3.1-8b", 128),  # 2 (K, V) x 32 layers x 8 heads x 128 dims x 2 bytes
    ("llama-3.2-1b", 32),
    ("llama-3.1-70b", 320),
    ("qwen2.5-7b", 56),
])
def test_each_named_model_weighs_what_its_config_says(name, kib_per_token):
    layout = model_layout(name)
    assert layout.bytes_per_token == kib_per_token * 1024 and layout.dtype == torch.bfloat16


def test_an_unknown_model_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'gpt-9'; known: llama-3.1-8b"):
        model_layout("gpt-9")
    assert len(MODELS) >= 4


def test_a_layout_is_read_field_by_field_with_bfloat16_by_default():
    assert parse_layout("layers=32,kv_heads=8,head_dim=128,dtype=bfloat16") == model_layout("llama-3.1-8b")
    assert parse_layout(" head_dim=128, kv_heads=4 ,layers=28") == model_layout("qwen2.5-7b")
    assert parse_layout("layers=2,kv_heads=1,head_dim=4,dtype=float32").bytes_per_token == 2 * 2 * 4 * 4


@pytest.mark.parametrize("text, words", [
    ("layers=32,kv_heads=8", "missing head_dim"),
    ("layers=32,kv_heads=8,head_dim=128,dtype=int4", "dtype 'int4'"),
    ("layers=0,kv_heads=8,head_dim=128", "layers must be a positive integer"),
    ("layers=x,kv_heads=8,head_dim=128", "layers must be a positive integer"),
    ("layers=32,heads=8,head_dim=128", "expected key=value"),
    ("32,8,128", "expected key=value"),
])
def test_a_bad_layout_says_what_is_wrong(text, words):
    with pytest.raises(ValueError, match=words):
        parse_layout(text)


def test_capacities_are_shares_of_the_distinct_blocks_or_sizes_rounded_down_to_whole_blocks():
    mib = 2**20
    assert parse_capacity("5%").blocks(distinct_blocks=1000, block_bytes=mib) == 50
    assert parse_capacity("0.5%").blocks(distinct_blocks=1000, block_bytes=mib) == 5
    assert parse_capacity("150%").blocks(distinct_blocks=10, block_bytes=mib) == 15
    assert parse_capacity("64GiB").blocks(distinct_blocks=1, block_bytes=64 * mib) == 1024
    assert parse_capacity("1.5 KiB").nbytes == 1536
    assert parse_capacity("3GB").blocks(distinct_blocks=1, block_bytes=mib) == 3 * 10**9 // mib


def test_a_capacity_under_one_block_is_refused():
    with pytest.raises(ValueError, match="less than one block"):
        Capacity("1%", fraction=0.01).blocks(distinct_blocks=50, block_bytes=1)
    with pytest.raises(ValueError, match=r"less than one block \(64 MiB\)"):
        parse_capacity("1MiB").blocks(distinct_blocks=50, block_bytes=64 * 2**20)


@pytest.mark.parametrize("text, words", [
    ("0%", "positive"), ("-5%", "positive"), ("0GiB", "positive"), ("nan%", "positive"),
    ("12", "give a share"), ("5 apples", "give a share"), ("-1GiB", "give a share"), ("", "give a share"),
])
def test_a_bad_capacity_says_what_is_wrong(text, words):
    with pytest.raises(ValueError, match=words):
        parse_capacity(text)
