"""The prompt a `kvtier` command acts on: token ids from `--tokens-file`, or `--text` run through
`--tokenizer`.

A tokens file is a JSON list of ints or whitespace-separated ints (`-` reads stdin), read up to a
bound and checked token by token, so a mistake is one message naming the file and the token.
A tokenizer is a model folder's `tokenizer.json` (read with `tokenizers`), or whatever
`kvtier_engine` itself tokenizes with: a `.gguf` file, a named model, a `random:<preset>`
(byte-level). The engine's loader is imported only when needed (it imports torch). Text is
tokenized as the engine tokenizes a completions prompt (a chat's template adds tokens of its own).

Where it runs: the CLI's main thread. Everything here raises UsageError, never anything else, for
bad input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from kvtier.cli.exits import UsageError
from kvtier.cli.files import read_text
from kvtier.fleet.messages import MAX_TOKENS

MAX_TOKEN_ID = 2**32 - 1  # messages.Token
# 1M tokens of up to ten digits and a separator each, with room for JSON's spaces.
MAX_FILE_BYTES = 16 * MAX_TOKENS
_INTEGER = re.compile(r"[+-]?[0-9]+")


def prompt_tokens(tokens_file: str | None, text: str | None, tokenizer: str | None) -> list[int]:
    """The prompt's token ids from exactly one of the two sources."""
    if (tokens_file is None) == (text is None):
        raise UsageError("give the prompt with either --tokens-file F or --text T --tokenizer PATH")
    if tokens_file is not None:
        if tokenizer is not None:
            raise UsageError("--tokenizer goes with --text, not with --tokens-file")
        return read_tokens_file(tokens_file)
    if tokenizer is None:
        raise UsageError("--text needs --tokenizer (a model folder, a .gguf file or a named model)")
    return _checked(load_encoder(tokenizer)(text), f"--text (tokenized with {tokenizer})")


def read_tokens_file(name: str) -> list[int]:
    where = f"--tokens-file {'stdin' if name == '-' else name}"
    text = read_text(name, where, MAX_FILE_BYTES)
    is_json = text.lstrip()[:1] in ("[", "{", "\"")
    return _checked(_json_list(text, where) if is_json else text.split(), where)


def _json_list(text: str, where: str) -> list:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise UsageError(f"{where}: expected a JSON list of integers")
    return value


def _checked(items: list, where: str) -> list[int]:
    """`items` (ints, or the words of a text file) as token ids, each an integer in [0, 2**32)."""
    if not items:
        raise UsageError(f"{where}: no tokens")
    if len(items) > MAX_TOKENS:
        raise UsageError(f"{where}: {len(items)} tokens, over the limit of {MAX_TOKENS}")
    tokens = []
    for i, item in enumerate(items):
        if isinstance(item, str) and _INTEGER.fullmatch(item):
            item = int(item)
        # bool is an int subclass: `true` in a JSON list is a mistake, not token 1.
        if not isinstance(item, int) or isinstance(item, bool):
            raise UsageError(f"{where}: token {i} is {_shown(item)}, not an integer")
        if not 0 <= item <= MAX_TOKEN_ID:
            raise UsageError(f"{where}: token {i} is {item}, outside [0, {MAX_TOKEN_ID}]")
        tokens.append(item)
    return tokens


def _shown(item: object) -> str:
    text = json.dumps(item) if not isinstance(item, str) else repr(item)
    return text if len(text) <= 40 else text[:37] + "..."


def load_encoder(spec: str) -> Callable[[str], list[int]]:
    """text -> token ids, from a folder's tokenizer.json or through kvtier_engine's loader."""
    folder = Path(spec)
    if folder.is_dir():
        if not (folder / "tokenizer.json").is_file():
            raise UsageError(f"--tokenizer {spec}: the folder has no tokenizer.json")
        from tokenizers import Tokenizer  # imported here: only --text needs it

        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the library raises plain Exception for a malformed file
            raise UsageError(f"--tokenizer {spec}: cannot read tokenizer.json: {exc}") from None
        return lambda text: tokenizer.encode(text).ids
    return _engine_encoder(spec)


def _engine_encoder(spec: str) -> Callable[[str], list[int]]:
    try:
        from kvtier_engine.models.gguf_file import gguf_path
        from kvtier_engine.tokenizer import load_tokenizer
    except ImportError:
        raise UsageError(f"--tokenizer {spec}: not a folder with tokenizer.json (kvtier_engine, which reads "
                         ".gguf files and named models, is not installed)") from None
    try:
        path = gguf_path(spec)
    except FileNotFoundError as exc:  # a named model whose package is not installed
        raise UsageError(f"--tokenizer {spec}: {exc}") from None
    if path is None and not spec.startswith("random:"):
        raise UsageError(f"--tokenizer {spec}: not a folder with tokenizer.json, a .gguf file, a named "
                         "model or random:<preset>")
    if path is not None and not path.is_file():
        raise UsageError(f"--tokenizer {spec}: no such file")
    try:
        return load_tokenizer(spec).encode
    except Exception as exc:  # a damaged GGUF file fails in gguf's reader with any of several types
        raise UsageError(f"--tokenizer {spec}: cannot read its tokenizer: {exc}") from None
