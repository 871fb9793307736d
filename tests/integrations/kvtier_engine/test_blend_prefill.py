"""Tests for kvtier_engine/blend.py (CacheBlend prefill) and the attention it uses,
`layers/attention.causal_attention_at`.

The models are conftest's tiny random checkpoints (std 0.2 weights: attention is peaked, so a key read
from the wrong row moves the logits far more than the tolerance), with full attention, Mistral's
window of 8 in every layer and Qwen2's window from layer 1 on, and SmolLM2-135M-Instruct for what
only a trained model shows: that recomputing the rows whose K deviates most brings a blend of
passages prefilled alone closer to a full prefill (the CacheBlend premise).

The reference is a full prefill over ContiguousKVCache. What is pinned down:
- ratio 1.0 is a full prefill (last logits and merged K/V within 1e-4 in fp32), whatever was loaded;
- exact loaded K/V at ratio 0 is a full prefill too (nothing needs recomputing);
- a recomputed row never attends to a later position: row p's hidden states do not move when the
  loaded K/V after p are scrambled, and they do under a bottom-right-aligned mask (the reference
  implementations' bug), so the test tells the two apart;
- uncached rows and the last row are always recomputed; bad arguments are ValueErrors;
- `self_test` passes on good models and raises BlendSelfTestFailed on a broken blend.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from kvtier.blend.rope_shift import shift_keys
from kvtier.blend.selection import select_rows
from kvtier_engine import blend
from kvtier_engine.blend import BlendInput, BlendSelfTestFailed, blend_prefill, self_test
from kvtier_engine.layers import attention
from kvtier_engine.layers.attention import ContiguousKVCache, causal_attention, causal_attention_at
from kvtier_engine.layers.rotary import inverse_frequencies
from kvtier_engine.models.loader import load_model

logger = logging.getLogger(__name__)

ATOL = 1e-4
TINY = ["llama", "llama-llama3-rope", "mistral-window-8", "qwen2-window-8-from-layer-1"]
SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="module", params=TINY)
def tiny(request, reference):
    return load_model(reference(request.param).path)


@pytest.fixture(scope="module")
def llama(reference):
    return load_model(reference("llama").path)


@pytest.fixture(scope="module")
def smollm():
    return load_model(SMOLLM)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from kvtier_engine.tokenizer import load_tokenizer
    return load_tokenizer(SMOLLM)


def full_prefill(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Last logits, K and V [L, T, Hkv, D] of a whole-prompt prefill over the reference backend."""
    cache = ContiguousKVCache(model.config, len(ids))
    with torch.no_grad():
        logits = model(ids, torch.arange(len(ids)), cache)
    return logits[-1], cache.k, cache.v


def noise_like(k: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(k.shape, generator=torch.Generator().manual_seed(seed)) * 3


def prompt(model, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def kl(full_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """KL(full || other) of the next-token distributions."""
    return F.kl_div(other_logits.log_softmax(-1), full_logits.log_softmax(-1), log_target=True,
                    reduction="sum").item()


def only(rows: list[int]):
    """A selector that picks exactly `rows` (the blend adds the uncached and last rows itself)."""
    return lambda k_new, k_loaded, cached, ratio: torch.tensor(rows, dtype=torch.long)


# -- causal_attention_at ---------------------------------------------------------------------------------


def written_out(q, k, v, positions, window):
    """softmax(q k^T / sqrt(D)) v over the keys at positions <= each query's (within the window), fp64."""
    hq, d = q.shape[1], q.shape[2]
    group = hq // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, pos in enumerate(positions.tolist()):
        keys = [j for j in range(pos + 1) if window is None or j > pos - window]
        for h in range(hq):
            probs = torch.softmax(k[keys, h // group].double() @ q[i, h].double() / d ** 0.5, dim=0)
            out[i, h] = probs @ v[keys, h // group].double()
    return out


@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("block", [attention.QUERY_BLOCK, 3])
def test_causal_attention_at_masks_by_true_positions(monkeypatch, window, block):
    monkeypatch.setattr(attention, "QUERY_BLOCK", block)
    gen = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(6, 4, 16, generator=gen) * 2, torch.randn(40, 2, 16, generator=gen) * 2, \
        torch.randn(40, 2, 16, generator=gen)
    positions = torch.tensor([0, 3, 4, 17, 30, 39])
    got = causal_attention_at(q, k, v, positions, window)
    assert max_diff(got.double(), written_out(q, k, v, positions, window)) < 1e-5


def test_causal_attention_at_contiguous_rows_equal_causal_attention():
    gen = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(23, 4, 16, generator=gen), torch.randn(50, 2, 16, generator=gen), \
        torch.randn(50, 2, 16, generator=gen)
    for window in (None, 16):
        assert torch.equal(causal_attention_at(q, k, v, torch.arange(27, 50), window),
                           causal_attention(q, k, v, 27, window))


# -- ratio 1.0 and exact loaded KV: a full prefill ---------------------------------------------------------


@pytest.mark.parametrize("check_layer", [1, 2])
def test_ratio_1_is_a_full_prefill(tiny, check_layer):
    ids = prompt(tiny, 40)
    logits, k, v = full_prefill(tiny, ids)
    cached = torch.arange(40) % 5 != 0
    out = blend_prefill(tiny, BlendInput(ids, noise_like(k, 1), noise_like(v, 2), cached, 1.0, check_layer))
    logger.info("ratio 1.0, check layer %d: max |logit diff| %.3g, K %.3g, V %.3g", check_layer,
                max_diff(out.last_logits, logits), max_diff(out.k, k), max_diff(out.v, v))
    assert out.last_logits.dtype == torch.float32
    assert max_diff(out.last_logits, logits) < ATOL
    assert max_diff(out.k, k) < ATOL and max_diff(out.v, v) < ATOL
    assert out.selected.tolist() == list(range(40)) and out.recomputed == 40


def test_ratio_1_in_small_row_blocks_with_a_window(monkeypatch, reference):
    """Row blocks of 7 queries over a window of 8: each block sees only the keys its rows can see."""
    model = load_model(reference("mistral-window-8").path)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 7)
    ids = prompt(model, 40)
    logits, k, v = full_prefill(model, ids)
    cached = torch.ones(40, dtype=torch.bool)
    out = blend_prefill(model, BlendInput(ids, noise_like(k, 3), noise_like(v, 4), cached, 1.0, 1))
    assert max_diff(out.last_logits, logits) < ATOL and max_diff(out.k, k) < ATOL


def test_ratio_1_is_a_full_prefill_on_smollm2(smollm):
    ids = prompt(smollm, 300, seed=3)
    logits, k, v = full_prefill(smollm, ids)
    cached = torch.arange(300) >= 20
    out = blend_prefill(smollm, BlendInput(ids, noise_like(k, 5), noise_like(v, 6), cached, 1.0, 1))
    logger.info("SmolLM2, 300 tokens, ratio 1.0: max |logit diff| %.3g, K %.3g, V %.3g",
                max_diff(out.last_logits, logits), max_diff(out.k, k), max_diff(out.v, v))
    assert max_diff(out.last_logits, logits) < ATOL
    assert max_diff(out.k, k) < ATOL and max_diff(out.v, v) < ATOL


def test_exact_loaded_kv_at_ratio_0_is_a_full_prefill(tiny):
    ids = prompt(tiny, 40)
    logits, k, v = full_prefill(tiny, ids)
    out = blend_prefill(tiny, BlendInput(ids, k, v, torch.ones(40, dtype=torch.bool), 0.0, 1))
    assert out.selected.tolist() == [39] and out.recomputed == 1
    assert max_diff(out.last_logits, logits) < ATOL
    assert max_diff(out.k, k) < ATOL and max_diff(out.v, v) < ATOL


def test_inputs_are_not_modified(llama):
    ids = prompt(llama, 40)
    _, k, v = full_prefill(llama, ids)
    loaded_k, loaded_v = noise_like(k, 1), noise_like(v, 2)
    before = loaded_k.clone(), loaded_v.clone()
    blend_prefill(llama, BlendInput(ids, loaded_k, loaded_v, torch.ones(40, dtype=torch.bool), 0.5, 1))
    assert torch.equal(loaded_k, before[0]) and torch.equal(loaded_v, before[1])


# -- a recomputed row never attends to a later position ----------------------------------------------------


def blend_with_hidden(model, inp: BlendInput) -> tuple[blend.BlendOutput, list[torch.Tensor]]:
    """The blend's output and every layer's output hidden states (rows S from check_layer on)."""
    hidden: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda module, args, out: hidden.append(out.clone()))
             for layer in model.model.layers]
    try:
        return blend_prefill(model, inp), hidden
    finally:
        for hook in hooks:
            hook.remove()


def row_p_unmoved_by_later_rows(model, p: int = 5) -> bool:
    """Recompute rows {p, 17, last} from layer 1 on; scramble the loaded K/V of every row after p.
    True when row p's K/V and hidden states in every carried layer are bit-equal to the unscrambled
    run's. Asserts the scrambling does reach the last row (it is heavy enough to show)."""
    ids = prompt(model, 40)
    _, k, v = full_prefill(model, ids)
    scrambled_k, scrambled_v = k.clone(), v.clone()
    scrambled_k[:, p + 1:] += noise_like(k[:, p + 1:], 11) * 3
    scrambled_v[:, p + 1:] += noise_like(v[:, p + 1:], 12) * 3
    cached, select = torch.ones(40, dtype=torch.bool), only([p, 17])
    clean, clean_hidden = blend_with_hidden(model, BlendInput(ids, k, v, cached, 0.15, 1, select))
    moved, moved_hidden = blend_with_hidden(model, BlendInput(ids, scrambled_k, scrambled_v, cached, 0.15, 1,
                                                              select))
    assert clean.selected.tolist() == [p, 17, 39]
    assert max_diff(clean.last_logits, moved.last_logits) > 1e-2  # later rows do see the scrambled rows
    same_kv = torch.equal(clean.k[1:, p], moved.k[1:, p]) and torch.equal(clean.v[1:, p], moved.v[1:, p])
    same_hidden = all(torch.equal(a[0], b[0]) for a, b in zip(clean_hidden[1:], moved_hidden[1:]))
    return same_kv and same_hidden


def test_recomputed_row_never_attends_to_a_later_position(tiny):
    assert row_p_unmoved_by_later_rows(tiny)


def test_the_check_fails_under_a_bottom_right_aligned_mask(monkeypatch, llama):
    """The mask the reference implementations use: the S selected queries aligned to the last S keys,
    so query i sees keys 0..N-S+i. Under it row p sees scrambled rows, and the check above catches it."""
    def bottom_right(q, k, v, positions, window):
        aligned = torch.arange(k.shape[0] - len(positions), k.shape[0])
        return causal_attention_at(q, k, v, aligned, window)

    monkeypatch.setattr(blend, "causal_attention_at", bottom_right)
    assert not row_p_unmoved_by_later_rows(llama)


# -- which rows are recomputed ------------------------------------------------------------------------------


def test_uncached_rows_and_the_last_row_are_always_recomputed(llama):
    ids = prompt(llama, 40)
    _, k, v = full_prefill(llama, ids)
    cached = torch.ones(40, dtype=torch.bool)
    cached[[0, 1, 2, 20, 21]] = False
    for select in (only([]), select_rows):
        out = blend_prefill(llama, BlendInput(ids, k, v, cached, 0.0, 1, select))
        assert out.selected.tolist() == [0, 1, 2, 20, 21, 39] and out.recomputed == 6
    loaded_k = k.clone()
    loaded_k[1, 10:14] += 5.0  # ratio 0.1 of 35 cached rows: these 4, the uncached and the last
    out = blend_prefill(llama, BlendInput(ids, loaded_k, v, cached, 0.1, 1))
    assert out.selected.tolist() == [0, 1, 2, 10, 11, 12, 13, 20, 21, 39] and out.recomputed == 10


def test_default_selection_takes_the_rows_whose_k_deviates_most(llama):
    ids = prompt(llama, 40)
    _, k, v = full_prefill(llama, ids)
    loaded_k = k.clone()
    loaded_k[1, [7, 30]] += 5.0  # wrong at the check layer: the two rows selected at ratio 2/40
    out = blend_prefill(llama, BlendInput(ids, loaded_k, v, torch.ones(40, dtype=torch.bool), 2 / 40, 1))
    assert out.selected.tolist() == [7, 30, 39]


def test_bad_arguments_are_value_errors(llama):
    ids = prompt(llama, 40)
    _, k, v = full_prefill(llama, ids)
    cached = torch.ones(40, dtype=torch.bool)
    layers = llama.config.num_layers
    for check_layer in (0, layers, layers + 5):
        with pytest.raises(ValueError, match="check_layer"):
            blend_prefill(llama, BlendInput(ids, k, v, cached, 0.15, check_layer))
    with pytest.raises(ValueError, match="loaded_k"):
        blend_prefill(llama, BlendInput(ids, k[:, :39], v, cached, 0.15, 1))
    with pytest.raises(ValueError, match="cached"):
        blend_prefill(llama, BlendInput(ids, k, v, cached[:39], 0.15, 1))
    with pytest.raises(ValueError, match="outside"):
        blend_prefill(llama, BlendInput(ids, k, v, cached, 0.15, 1, only([40])))
    with pytest.raises(ValueError, match="ratio"):
        blend_prefill(llama, BlendInput(ids, k, v, cached, 1.5, 1))


def test_keys_values_are_the_k_and_v_the_layer_hands_its_backend(llama):
    """DecoderLayer.keys_values: K as `keys` gives it, V as `forward` makes it (recorded at the backend)."""
    ids = prompt(llama, 12)
    decoder = llama.model
    x = decoder.embed_tokens(ids)
    cos, sin = decoder.rotary(torch.arange(12))

    class Recorder:
        def attend(self, layer, q, k, v):
            self.k, self.v = k, v
            return torch.zeros_like(q)

    seen = Recorder()
    with torch.no_grad():
        decoder.layers[1](x, cos, sin, seen)
        k, v = decoder.layers[1].keys_values(x, cos, sin)
        assert torch.equal(k, decoder.layers[1].keys(x, cos, sin))
    assert torch.equal(k, seen.k) and torch.equal(v, seen.v)


def test_the_deviation_field_picks_what_the_check_layer_scores(llama):
    """"v" selects the row whose loaded V is off, "k" (the default) the row whose K is; "kv" sees both,
    each relative to its scale; the default's result is the same with the field left out or set."""
    ids = prompt(llama, 40)
    _, k, v = full_prefill(llama, ids)
    cached = torch.ones(40, dtype=torch.bool)
    loaded_k, loaded_v = k.clone(), v.clone()
    loaded_k[1, 7] += 5.0
    loaded_v[1, 30] += 5.0 * v[1].abs().mean() / k[1].abs().mean()  # as far off as row 7, relatively
    inp = BlendInput(ids, loaded_k, loaded_v, cached, 1 / 40, 1)
    picked = {d: blend_prefill(llama, BlendInput(ids, loaded_k, loaded_v, cached, 2 / 40, 1, select_rows, d))
              for d in ("k", "v", "kv")}
    assert blend_prefill(llama, inp).selected.tolist() == [7, 39]
    assert blend_prefill(llama, BlendInput(ids, loaded_k, loaded_v, cached, 1 / 40, 1, select_rows,
                                           "v")).selected.tolist() == [30, 39]
    assert picked["kv"].selected.tolist() == [7, 30, 39]
    default = blend_prefill(llama, BlendInput(ids, loaded_k, loaded_v, cached, 2 / 40, 1))
    assert torch.equal(picked["k"].kv, default.kv)
    with pytest.raises(ValueError, match="deviation"):
        blend_prefill(llama, BlendInput(ids, k, v, cached, 0.15, 1, select_rows, "q"))


# -- the CacheBlend premise on a trained model --------------------------------------------------------------

HEAD = "You are a helpful assistant. Answer the question using only the documents below.\n\n"
PASSAGES = [
    "Document: The Rhine rises in the Swiss Alps and flows north through Lake Constance, then west "
    "along the German-Swiss border to Basel. From there it turns north, forming part of the border "
    "between France and Germany, passes Cologne and Duesseldorf, and enters the Netherlands, where it "
    "splits into several branches before reaching the North Sea near Rotterdam.\n\n",
    "Document: Marie Curie was born in Warsaw in 1867 and moved to Paris to study physics and "
    "mathematics at the Sorbonne. With her husband Pierre she discovered the elements polonium and "
    "radium. She was the first woman to win a Nobel Prize, and remains the only person to have won "
    "Nobel Prizes in two different sciences, physics in 1903 and chemistry in 1911.\n\n",
    "Document: The bakery on Station Road opens at six in the morning. Its sourdough is left to rise "
    "overnight in a cold room and baked in a wood-fired oven that the owner built himself in 2009. On "
    "Saturdays the queue reaches the corner, and the cinnamon rolls are usually sold out by nine.\n\n",
]
QUESTIONS = ["Question: In which city was Marie Curie born? Answer:",
             "Question: Into which sea does the Rhine flow? Answer:"]


def blended_from_passages_alone(model, pieces: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                           torch.Tensor, torch.Tensor]:
    """ids, loaded K, V and cached for head + passages + question: the head's K/V from a prefix cache
    (exact), each passage prefilled alone at positions 0.. and its K shifted to where it now sits,
    the question uncached."""
    ids = torch.tensor([t for piece in pieces for t in piece])
    _, k, v = full_prefill(model, ids[:len(pieces[0])])
    loaded_k, loaded_v = [k], [v]
    inv_freq = inverse_frequencies(model.config)
    start = len(pieces[0])
    for piece in pieces[1:-1]:
        _, k, v = full_prefill(model, torch.tensor(piece))
        loaded_k.append(shift_keys(k, start, inv_freq))
        loaded_v.append(v)
        start += len(piece)
    question = len(pieces[-1])
    loaded_k.append(torch.zeros_like(k[:, :question]))
    loaded_v.append(torch.zeros_like(v[:, :question]))
    cached = torch.arange(len(ids)) < start
    return ids, torch.cat(loaded_k, dim=1), torch.cat(loaded_v, dim=1), cached


def test_recomputing_the_most_deviating_rows_brings_passages_prefilled_alone_closer(smollm,
                                                                                   smollm_tokenizer):
    encode = smollm_tokenizer.encode
    ratios = (0.0, 0.15, 1.0)
    total = dict.fromkeys(ratios, 0.0)
    for order, question in zip(([1, 0, 2], [2, 0, 1]), QUESTIONS):
        pieces = [encode(HEAD)] + [encode(PASSAGES[i]) for i in order] + [encode(question)]
        ids, loaded_k, loaded_v, cached = blended_from_passages_alone(smollm, pieces)
        full_logits, _, _ = full_prefill(smollm, ids)
        for ratio in ratios:
            out = blend_prefill(smollm, BlendInput(ids, loaded_k, loaded_v, cached, ratio, 1))
            total[ratio] += kl(full_logits, out.last_logits)
    logger.info("SmolLM2, passages prefilled alone: summed KL vs full prefill %s", total)
    assert total[0.0] > 1e-3  # the premise: loaded passage KV alone is not what full prefill computes
    assert total[0.15] < total[0.0]
    assert total[1.0] < 1e-6


# -- self_test ----------------------------------------------------------------------------------------------


def test_self_test_passes_on_good_models(tiny):
    assert self_test(tiny) < ATOL
    assert self_test(tiny, check_layer=2, num_tokens=20) < ATOL


def test_self_test_passes_on_smollm2(smollm):
    assert self_test(smollm) < ATOL


def test_self_test_fails_when_the_attention_of_carried_rows_is_off(monkeypatch, llama):
    monkeypatch.setattr(blend, "causal_attention_at", lambda *args: causal_attention_at(*args) * 1.01)
    with pytest.raises(BlendSelfTestFailed, match=r"max \|.* difference\|"):
        self_test(llama)


def test_self_test_fails_when_the_last_row_is_dropped(monkeypatch, llama):
    rows_to_recompute = blend._rows_to_recompute
    monkeypatch.setattr(blend, "_rows_to_recompute", lambda *args: rows_to_recompute(*args)[:-1])
    with pytest.raises(BlendSelfTestFailed, match=r"max \|.* difference\|"):
        self_test(llama)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_self_test_bounds_16_bit_models_by_units_in_the_last_place(reference, dtype):
    model = load_model(reference("llama").path, dtype=dtype)
    worst = self_test(model)
    # within 8 ulp of the dtype at the compared values' magnitude (at least 1), which is above 1e-4
    assert worst <= blend.SELF_TEST_ULPS_16BIT * torch.finfo(dtype).eps * 64
    assert blend.self_test_tolerance(dtype, torch.tensor([3.0])) == pytest.approx(
        blend.SELF_TEST_ULPS_16BIT * torch.finfo(dtype).eps * 3.0)
    assert blend.self_test_tolerance(torch.float32, torch.tensor([300.0])) == blend.SELF_TEST_ATOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_self_test_fails_a_broken_blend_on_16_bit_models(monkeypatch, reference, dtype):
    model = load_model(reference("llama").path, dtype=dtype)
    rows_to_recompute = blend._rows_to_recompute
    monkeypatch.setattr(blend, "_rows_to_recompute", lambda *args: rows_to_recompute(*args)[:-1])
    with pytest.raises(BlendSelfTestFailed, match=r"max \|.* difference\|"):
        self_test(model)
