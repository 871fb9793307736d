"""Tests for kvtier_engine/layers/triton_attention.py: the Triton paged-attention kernel against the
torch path (`PagedAttention`), and the backend choice.

CI has no GPU, so the Triton CPU interpreter (TRITON_INTERPRET=1) stands in for one: it runs the
kernel's own code, program by program, on CPU tensors. Triton reads the variable when `triton.jit`
decorates a kernel, i.e. when triton_attention.py is imported, so each comparison runs in a fresh
Python process: this file re-runs itself as a script (`python test_triton_attention.py CASE_JSON`) with
the variable set, and prints the errors as JSON. What the interpreter cannot show: GPU timing,
register pressure, and the tf32/ieee choice (it always multiplies in numpy).

One bug of the interpreter is worked around in the child: it keeps bf16 as uint16 bit patterns and
its `tl.dot` multiplies those raw patterns (triton-lang/triton#11584; unsupported upstream), so
the child converts bf16 dot operands to fp32 first, as the interpreter's own casts do.

Every case is the mixed batch the scheduler builds: a 40-token prefill chunk after 30 cached tokens,
a fresh 37-token prefill, two decodes (contexts 51 and 21) and a sequence with no new token this
step (its programs must end without writing); block_size 16, block tables drawn from a shuffled
cache and longer than the contexts. The cache starts full of noise, so a slot read past a context, a
wrong block or a missed mask shows up. Layer 0 attends fully; layer 1 has the case's sliding window
(or none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest
import torch

from kvtier_engine.kv_cache import PagedKVCache
from kvtier_engine.layers.attention import BatchMetadata, PagedAttention
from kvtier_engine.layers.triton_attention import TritonPagedAttention, paged_attention_backend, triton
from kvtier_engine.model_config import ModelConfig

NUM_COMPUTED = [30, 0, 50, 20, 16]
NUM_NEW = [40, 37, 1, 1, 0]
BLOCK_SIZE = 16
KV_HEADS = 2
# (atol, rtol) per dtype. fp16/bf16: p is rounded for P @ V, and both outputs are rounded to the dtype,
# where a last-bit difference is 2^-7 of the value in bf16 (0.03 for the outputs of ~4 this noise gives).
TOLERANCE = {"float32": (1e-4, 0.0), "float16": (2e-2, 0.0), "bfloat16": (2e-2, 1e-2)}

needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed on this platform")


@dataclass(frozen=True, slots=True)
class Case:
    dtype: str  # cache and q/k/v dtype, a torch attribute name
    group: int  # query heads per kv head
    head_dim: int = 32
    window: int | None = None  # layer 1's sliding window


def build(case: Case, num_layers: int = 2) -> tuple[ModelConfig, PagedKVCache, BatchMetadata]:
    heads = KV_HEADS * case.group
    config = ModelConfig("mistral", vocab_size=16, hidden_size=heads * case.head_dim, intermediate_size=16,
                         num_layers=num_layers, num_heads=heads, num_kv_heads=KV_HEADS,
                         head_dim=case.head_dim, sliding_window=case.window, window_layers=(1,))
    gen = torch.Generator().manual_seed(3)
    # One spare block past each context: the table's tail is noise the queries must not see.
    counts = [(done + new) // BLOCK_SIZE + 1 for done, new in zip(NUM_COMPUTED, NUM_NEW)]
    num_blocks = sum(counts) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for count in counts:
        tables.append(order[:count])
        order = order[count:]
    cache = PagedKVCache(config, num_blocks, BLOCK_SIZE, dtype=getattr(torch, case.dtype))
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=gen) * 3)
    return config, cache, BatchMetadata.build(tables, NUM_COMPUTED, NUM_NEW, BLOCK_SIZE)


def compare(case: Case) -> dict:
    """Child side: both backends over the same batch, layer by layer, from copies of one cache.
    Returns each layer's max |ours - torch|, its worst ratio to the tolerance (atol + rtol * |torch|;
    at most 1 passes) and whether the two caches ended up equal."""
    config, ref_cache, meta = build(case)
    cache = PagedKVCache(config, ref_cache.num_blocks, BLOCK_SIZE, dtype=ref_cache.kv.dtype)
    cache.kv.copy_(ref_cache.kv)
    ours, ref = TritonPagedAttention(cache, meta, config), PagedAttention(ref_cache, meta, config)
    gen = torch.Generator().manual_seed(4)
    tokens, dtype = sum(NUM_NEW), ref_cache.kv.dtype
    atol, rtol = TOLERANCE[case.dtype]
    errors, ratios = [], []
    for layer in range(config.num_layers):
        q = torch.randn(tokens, config.num_heads, case.head_dim, generator=gen).to(dtype)
        k, v = (torch.randn(tokens, KV_HEADS, case.head_dim, generator=gen).to(dtype) for _ in range(2))
        got, want = ours.attend(layer, q, k, v), ref.attend(layer, q, k, v)
        error = (got.float() - want.float()).abs()
        errors.append(error.max().item())
        ratios.append((error / (atol + rtol * want.float().abs())).max().item())
    return {"errors": errors, "ratios": ratios, "cache_equal": torch.equal(cache.kv, ref_cache.kv)}


def convert_bf16_dot_operands() -> None:
    """Child side: make the interpreter's tl.dot read bf16 operands as numbers (triton#11584)."""
    from triton.language import bfloat16, float32
    from triton.runtime.interpreter import InterpreterBuilder

    original = InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(x, float32) if x.dtype.scalar == bfloat16 else x for x in (a, b))
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    InterpreterBuilder.create_dot = create_dot


def run_interpreted(case: Case) -> dict:
    """Parent side: `compare(case)` in a child Python with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__, json.dumps(asdict(case))], env=env,
                          capture_output=True, text=True, timeout=50)
    if done.returncode != 0:
        pytest.fail(f"interpreted run of {case} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


CASES = [
    Case("float32", group=1),
    Case("float32", group=4),
    Case("float32", group=4, window=8),  # the window starts mid-block and mid-tile
    Case("float32", group=3, head_dim=24),  # a group that is no power of two; head_dim padded to 32
    Case("float16", group=4, window=8),
    Case("bfloat16", group=4, window=8),
    Case("bfloat16", group=1, head_dim=16),
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.dtype}-g{c.group}-d{c.head_dim}-w{c.window}")
def test_kernel_matches_the_torch_path_on_a_mixed_batch(case):
    result = run_interpreted(case)
    assert result["cache_equal"], "the new K/V were written differently"
    assert max(result["ratios"]) <= 1.0, result


def test_backend_for_a_cpu_cache_is_the_torch_path():
    config, cache, meta = build(Case("float32", group=4, window=8))
    assert type(paged_attention_backend(cache, meta, config)) is PagedAttention


@needs_triton
def test_kernel_refuses_head_dim_over_256():
    config, cache, meta = build(Case("float32", group=1, head_dim=512), num_layers=1)
    with pytest.raises(ValueError, match="head_dim"):
        TritonPagedAttention(cache, meta, config)


if __name__ == "__main__":
    import triton as _triton

    if not _triton.knobs.runtime.interpret:
        raise SystemExit("run with TRITON_INTERPRET=1: the kernel needs a GPU otherwise")
    convert_bf16_dot_operands()
    print(json.dumps(compare(Case(**json.loads(sys.argv[1])))))
