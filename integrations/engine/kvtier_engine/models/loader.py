"""Build a model from a spec: a local Hugging Face folder, a GGUF file or named model, or `random:<preset>`.

A folder holds `config.json` and safetensors weights, one file or shards listed in
`model.safetensors.index.json`. A `.gguf` path, or a name in `gguf_file.NAMED_MODELS`, is a
llama.cpp file (`models/gguf.py` reads it). The model is built on the meta device (no memory, no
random init) and materialised on the target device before the weights are copied in, so loading an
8B checkpoint never pays for a random initialisation first. Every parameter must be in the
checkpoint (tied output embeddings excepted); a missing tensor is a clear error, never a silent
random one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file

from kvtier_engine.model_config import ModelConfig
from kvtier_engine.models.gguf import check_tensor_types, gguf_config, gguf_tensors
from kvtier_engine.models.gguf_file import NAMED_MODELS, gguf_path, open_gguf
from kvtier_engine.models.llama import CausalLM
from kvtier_engine.models.presets import PRESETS

logger = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
INIT_STD = 0.02
# Tensors some checkpoints carry that this model computes instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DIGEST_BLOCK = 8 << 20


def load_model(spec: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               seed: int = 0) -> CausalLM:
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {spec!r}; presets: {[RANDOM_PREFIX + n for n in PRESETS]}")
        return random_model(PRESETS[name], dtype, device, seed)
    path = gguf_path(spec)
    if path is not None:
        return gguf_model(path, dtype, device)
    folder = Path(spec)
    if not folder.is_dir():
        raise ValueError(f"model {spec!r} is neither a local folder, a .gguf file, a named model "
                         f"{sorted(NAMED_MODELS)} nor {RANDOM_PREFIX}<preset>")
    return folder_model(folder, dtype, device)


def _empty_model(config: ModelConfig, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(config).to(dtype)  # cast while free: to_empty then allocates `dtype` only
    model = model.to_empty(device=device)
    if config.tie_word_embeddings:  # to_empty materialises the two names separately: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.train(False)  # inference mode: dropout and the like off


def random_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0) -> CausalLM:
    """Seeded random weights: normal(0, 0.02) for matrices, ones for norms, zeros for biases.
    Parameters are filled in name order from one generator, so a seed always gives the same model."""
    model = _empty_model(config, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, INIT_STD, generator=gen)
    return model


def folder_model(folder: Path, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    config = ModelConfig.from_folder(folder)
    model = _empty_model(config, dtype, device)
    _fill(model, _folder_tensors(folder, device), folder)
    logger.info("loaded %s (%s, %d layers) from %s", config.model_type, dtype, config.num_layers, folder)
    return model


def gguf_model(path: Path, dtype: torch.dtype, device: str | torch.device) -> CausalLM:
    file = open_gguf(path)
    config = gguf_config(file.metadata, {t.name for t in file.tensors}, path)
    check_tensor_types(file.tensors, path)  # before the model is allocated: fail in a moment
    model = _empty_model(config, dtype, device)
    _fill(model, ((path, name, tensor) for name, tensor in gguf_tensors(file.tensors, config, path)), path)
    logger.info("loaded %s (%s, %d layers) from %s", config.model_type, dtype, config.num_layers, path)
    return model


def _folder_tensors(folder: Path, device: str | torch.device) -> Iterable[tuple[Path, str, torch.Tensor]]:
    for shard in _shards(folder):
        for name, tensor in load_file(str(shard), device=str(device)).items():
            if not name.endswith(_IGNORED_SUFFIXES):
                yield shard, name, tensor


def _fill(model: CausalLM, tensors: Iterable[tuple[Path, str, torch.Tensor]], source: Path) -> None:
    """Copy each (file, name, tensor) into its parameter (casting to the parameter's dtype and
    device); every parameter must be filled exactly by shape."""
    config = model.config
    wanted = dict(model.named_parameters())
    if config.tie_word_embeddings:
        wanted.pop("lm_head.weight", None)
    loaded = set()
    with torch.no_grad():
        for where, name, tensor in tensors:
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue
            if name not in wanted:
                raise ValueError(f"{where}: tensor {name!r} has no place in a {config.model_type} model")
            if tensor.shape != wanted[name].shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(wanted[name].shape)}")
            wanted[name].copy_(tensor)
            loaded.add(name)
    missing = sorted(set(wanted) - loaded)
    if missing:
        raise ValueError(f"{source}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weights")
    return files


def model_identity(spec: str | Path, seed: int = 0) -> str:
    """A name for the weights, stable across processes and machines: kvtier puts it in every chunk
    key, so KV is only ever shared between identical weights. A preset is its name and seed; a folder
    or GGUF file is its name and a digest of its files (fine-tunes of one base never collide)."""
    spec = str(spec)
    if spec.startswith(RANDOM_PREFIX):
        return f"{spec}@seed{seed}"
    path = gguf_path(spec)
    if path is not None:
        return f"{path.name}@{_digest([path])}"
    folder = Path(spec)
    return f"{folder.resolve().name}@{_digest([folder / 'config.json', *_shards(folder)])}"


def _digest(paths: list[Path]) -> str:
    digest = xxhash.xxh3_64()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_DIGEST_BLOCK):
                digest.update(block)
    return digest.hexdigest()
