"""kvtier_engine.tokenizer: byte-level fallback and a model folder's tokenizer.json."""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from kvtier_engine.tokenizer import ByteTokenizer, FolderTokenizer, load_tokenizer


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
