"""Tokenizers: a GGUF file's vocabulary, a model folder's `tokenizer.json` (both through
`tokenizers`), else byte-level.

Random presets have no vocabulary, so they use the byte-level tokenizer: ids 0..255 are the UTF-8
bytes of the text, then BOS and EOS. Any model whose vocab is at least 258 can run on it.

Every tokenizer carries what the chat endpoint needs besides `encode`/`decode`: `chat_template`
(jinja2 text, None when the model has none), `bos_token`/`eos_token` (their text, for templates that
write them) and their ids; None wherever the model does not say.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizerModel

from kvtier_engine.models.gguf_file import gguf_path, read_metadata

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    eos_token_id: int | None
    bos_token_id: int | None
    eos_token: str | None
    bos_token: str | None
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    BOS, EOS = 256, 257
    vocab_size = 258
    # BOS and EOS are ids without text: no chat template can write them.
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None

    def __init__(self, add_bos: bool = False):
        self.add_bos = add_bos
        self.eos_token_id: int | None = self.EOS
        self.bos_token_id: int | None = self.BOS

    def encode(self, text: str) -> list[int]:
        return ([self.BOS] if self.add_bos else []) + list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


class FolderTokenizer:
    """`tokenizer.json` from a Hugging Face model folder; EOS from its config files, the chat template
    from `chat_template.jinja` or `tokenizer_config.json`."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self._tok = HFTokenizerModel.from_file(str(folder / "tokenizer.json"))
        config = _json(folder / "tokenizer_config.json")
        self.eos_token_id = _eos_id(folder, self._tok)
        self.eos_token = self._tok.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None
        self.bos_token = _token_text(config.get("bos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token is not None else None
        self.chat_template = _folder_chat_template(folder, config)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_text(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _folder_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    if (folder / "chat_template.jinja").exists():  # where transformers 4.43+ saves it
        return (folder / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def _eos_id(folder: Path, tok: HFTokenizerModel) -> int | None:
    for name in ("generation_config.json", "config.json"):
        eos = _json(folder / name).get("eos_token_id")
        if eos is not None:
            return eos[0] if isinstance(eos, list) else int(eos)
    token = _token_text(_json(folder / "tokenizer_config.json").get("eos_token"))
    return tok.token_to_id(token) if token is not None else None


class GGUFTokenizer:
    """The byte-level BPE (`tokenizer.ggml.model` "gpt2") a GGUF file's metadata describes: its
    vocabulary and merges, its control tokens matched whole in text, its chat template and special
    ids. Built the way transformers builds it from the same file (GPT-2 byte alphabet, ByteLevel
    pre-tokenizer and decoder), so both encode any text to the same ids."""

    def __init__(self, meta: dict[str, Any], source: str | Path):
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"{source}: tokenizer model {kind!r} is not supported; "
                             "only byte-level BPE ('gpt2') GGUF vocabularies load")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        self._tok = _byte_level_bpe(tokens, meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.pre"))
        _add_special_tokens(self._tok, tokens, meta.get("tokenizer.ggml.token_type") or [])
        self.eos_token_id: int | None = meta.get("tokenizer.ggml.eos_token_id")
        self.bos_token_id: int | None = meta.get("tokenizer.ggml.bos_token_id")
        self.eos_token = tokens[self.eos_token_id] if self.eos_token_id is not None else None
        self.bos_token = tokens[self.bos_token_id] if self.bos_token_id is not None else None
        self.chat_template: str | None = meta.get("tokenizer.chat_template")
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and self.bos_token_id is not None

    @classmethod
    def from_file(cls, path: str | Path) -> GGUFTokenizer:
        return cls(read_metadata(path), path)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text).ids
        return [self.bos_token_id, *ids] if self.add_bos else ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)

    def tokenizer_json(self) -> str:
        """The vocabulary as a `tokenizers` JSON document (a folder's `tokenizer.json`)."""
        return self._tok.to_str()


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character map: printable bytes stand for themselves, the others (space,
    control bytes) for characters from 256 up, so every token is a string of visible characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


# How each `tokenizer.ggml.pre` splits text before BPE (llama.cpp's names); GPT-2's split otherwise.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT}
# SmolLM's own split isolates digits, which its vocabulary never merges: GPT-2's gives the same ids.
_GPT2_SPLIT_NAMES = (None, "default", "gpt2", "smollm")


_BYTE_ALPHABET = _byte_alphabet()
_SPELLED = frozenset(_BYTE_ALPHABET.values())


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> HFTokenizerModel:
    # A token written in raw UTF-8 rather than the byte alphabet (some converters do) is respelled,
    # or BPE could never produce it and decoding would garble it.
    vocab = {token if set(token) <= _SPELLED else "".join(_BYTE_ALPHABET[b] for b in token.encode()): i
             for i, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tok = HFTokenizerModel(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    if pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2_SPLIT_NAMES:
            logger.warning("GGUF pre-tokenizer %r is unknown here: splitting text as GPT-2 does", pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _add_special_tokens(tok: HFTokenizerModel, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens (type 3, like `<|im_start|>`) become special tokens and user-defined ones
    (type 4) plain added tokens: both are matched whole in text, never cut into pieces. A control
    token outside the byte alphabet is a llama.cpp mislabel and stays out, as in transformers."""
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, token_types) if kind == 3 and set(t) <= _SPELLED]
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, token_types) if kind == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """A GGUF file's (or named model's) tokenizer; the folder's when it has a `tokenizer.json`;
    else the byte-level one."""
    path = gguf_path(spec)
    if path is not None:
        return GGUFTokenizer.from_file(path)
    folder = Path(str(spec))
    if folder.is_dir() and (folder / "tokenizer.json").exists():
        return FolderTokenizer(folder)
    return ByteTokenizer()
