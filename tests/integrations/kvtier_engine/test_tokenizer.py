"""kvtier_engine.tokenizer: byte-level fallback, a model folder's tokenizer.json, and a GGUF file's
vocabulary (against transformers building its tokenizer from the same file)."""

from __future__ import annotations

import json

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from kvtier_engine.models.gguf_file import gguf_path
from kvtier_engine.tokenizer import ByteTokenizer, FolderTokenizer, GGUFTokenizer, load_tokenizer


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    text = "kvtier caches KV — déjà vu ✓"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode(ids + [ByteTokenizer.EOS]) == text  # specials are not text


def test_byte_tokenizer_bos_and_eos():
    tok = ByteTokenizer(add_bos=True)
    assert tok.encode("a") == [ByteTokenizer.BOS, ord("a")] and tok.eos_token_id == ByteTokenizer.EOS


def test_a_folder_without_tokenizer_json_and_a_preset_use_bytes(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer("random:llama-tiny"), ByteTokenizer)


def test_folder_tokenizer_json_is_used_with_its_eos(tmp_path):
    # A tiny BPE trained here, saved the way a Hugging Face folder holds it.
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<s>", "</s>"])
    bpe.train_from_iterator(["the cache hands back the prefix", "the engine skips the prefill"] * 20, trainer)
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))

    tok = load_tokenizer(tmp_path)

    assert isinstance(tok, FolderTokenizer) and tok.eos_token_id == 2
    ids = tok.encode("the cache skips the prefill")
    assert len(ids) < len("the cache skips the prefill")  # merged tokens, not bytes
    assert tok.decode(ids).replace(" ", "") == "thecacheskipstheprefill"


def test_folder_tokenizer_reads_chat_template_and_special_tokens(tmp_path):
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["hello there"] * 5, trainers.BpeTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>"}, "eos_token": "</s>",
        "chat_template": "{{ messages[0]['content'] }}"}))

    tok = load_tokenizer(tmp_path)

    assert (tok.bos_token, tok.bos_token_id, tok.eos_token, tok.eos_token_id) == ("<s>", 1, "</s>", 2)
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    (tmp_path / "chat_template.jinja").write_text("{{ 'from the jinja file' }}")
    assert load_tokenizer(tmp_path).chat_template == "{{ 'from the jinja file' }}"


def test_byte_tokenizer_has_no_template_or_token_text():
    tok = ByteTokenizer()
    assert (tok.chat_template, tok.bos_token, tok.eos_token) == (None, None, None)
    assert (tok.bos_token_id, tok.eos_token_id) == (ByteTokenizer.BOS, ByteTokenizer.EOS)


# -- GGUF vocabularies: SmolLM2-135M-Instruct's, against transformers building one from the same file --

GGUF_TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 12,345.67 of them!",
    "whitespace": " two  spaces,\ttabs\t\tand\n\nnewlines \n  trailing   ",
    "unicode": "déjà vu — naïve café ✓ 日本語のテキスト 🙂👍🏽 Ελληνικά עברית e\u0301 \u200b",
    "code": "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "special-tokens": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>a<|im_end|>b <|im_start|> c<repo_name>",
    "empty": "",
}


@pytest.fixture(scope="module")
def smollm_tokenizers():
    """(ours, transformers') for the named model's GGUF."""
    transformers = pytest.importorskip("transformers")
    path = gguf_path("smollm2-135m-instruct")
    hf = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return load_tokenizer("smollm2-135m-instruct"), hf


@pytest.mark.parametrize("name", GGUF_TEXTS)
def test_gguf_tokenizer_encodes_as_transformers(smollm_tokenizers, name):
    ours, hf = smollm_tokenizers
    text = GGUF_TEXTS[name]
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    if "<|" not in text:
        assert ours.decode(ids) == text  # byte-level BPE round-trips any text


def test_gguf_tokenizer_chat_prompt_and_special_tokens(smollm_tokenizers):
    ours, hf = smollm_tokenizers
    assert isinstance(ours, GGUFTokenizer)
    assert (ours.bos_token, ours.eos_token, ours.bos_token_id, ours.eos_token_id) == (
        "<|im_start|>", "<|im_end|>", 1, 2)
    assert ours.chat_template == hf.chat_template and "<|im_start|>" in ours.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    prompt = ImmutableSandboxedEnvironment().from_string(ours.chat_template).render(
        messages=messages, add_generation_prompt=True)
    assert prompt == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = ours.encode(prompt)
    assert ids == hf.encode(prompt)
    assert ids[0] == ours.bos_token_id and ids.count(ours.eos_token_id) == 2  # matched whole, not in pieces


def test_gguf_tokenizer_rejects_other_vocabulary_models():
    with pytest.raises(ValueError, match="tokenizer model 'llama' is not supported"):
        GGUFTokenizer({"tokenizer.ggml.model": "llama"}, "model.gguf")
