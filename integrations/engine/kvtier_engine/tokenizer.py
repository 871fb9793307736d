"""Tokenizers: the model folder's `tokenizer.json` (through `tokenizers`), else byte-level.

Random presets have no vocabulary, so they use the byte-level tokenizer: ids 0..255 are the UTF-8
bytes of the text, then BOS and EOS. Any model whose vocab is at least 258 can run on it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizerModel


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...


class ByteTokenizer:
    BOS, EOS = 256, 257
    vocab_size = 258

    def __init__(self, add_bos: bool = False):
        self.add_bos = add_bos
        self.eos_token_id: int | None = self.EOS

    def encode(self, text: str) -> list[int]:
        return ([self.BOS] if self.add_bos else []) + list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


class FolderTokenizer:
    """`tokenizer.json` from a Hugging Face model folder; EOS from its config files."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self._tok = HFTokenizerModel.from_file(str(folder / "tokenizer.json"))
        self.eos_token_id = _eos_id(folder, self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=True)


def _eos_id(folder: Path, tok: HFTokenizerModel) -> int | None:
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return eos[0] if isinstance(eos, list) else int(eos)
    config = folder / "tokenizer_config.json"
    if config.exists():
        token = json.loads(config.read_text()).get("eos_token")
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None:
            return tok.token_to_id(token)
    return None


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """The folder's tokenizer when it has a `tokenizer.json`, else the byte-level one."""
    folder = Path(str(spec))
    if folder.is_dir() and (folder / "tokenizer.json").exists():
        return FolderTokenizer(folder)
    return ByteTokenizer()
