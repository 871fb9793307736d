"""What every benchmark here shares: console and logging, a scratch folder that is removed
afterwards, the progress bar, the machine description, the shape of the model a spec names, and
writing the results.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvtier_engine.model_config import ModelConfig
from kvtier_engine.models.gguf import gguf_config
from kvtier_engine.models.gguf_file import gguf_path, open_gguf
from kvtier_engine.models.loader import RANDOM_PREFIX
from kvtier_engine.models.presets import PRESETS

logger = logging.getLogger(__name__)


def console_and_logging(width: int, kvtier_level: int) -> Console:
    """A rich console (fixed width when not a terminal, so logs stay readable) that logging uses."""
    console = Console() if sys.stdout.isatty() else Console(width=width)
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    logging.getLogger("kvtier").setLevel(kvtier_level)
    return console


@contextmanager
def scratch_run(base: Path) -> Iterator[Path]:
    """A per-run folder under `base`, deleted afterwards with `base` itself if that left it empty."""
    root = base / f"run-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if base.is_dir() and not any(base.iterdir()):
            base.rmdir()


@functools.cache
def model_config(spec: str) -> ModelConfig:
    """The shape of the model the engine loads for `spec`, resolved as its loader does: a
    `random:<preset>`, a named model (e.g. smollm2-135m-instruct), a .gguf file or a Hugging Face
    folder. Cached: a GGUF header takes seconds to parse and every setup's engine asks."""
    if spec.startswith(RANDOM_PREFIX):
        name = spec.removeprefix(RANDOM_PREFIX)
        if name not in PRESETS:
            raise ValueError(f"unknown preset {spec!r}; presets: {[RANDOM_PREFIX + n for n in PRESETS]}")
        return PRESETS[name]
    path = gguf_path(spec)
    if path is not None:
        file = open_gguf(path)
        return gguf_config(file.metadata, {t.name for t in file.tensors}, path)
    return ModelConfig.from_folder(spec)


def progress_bar(console: Console) -> Progress:
    # No auto-refresh: its thread would take the GIL inside timed regions.
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, auto_refresh=False)


def write_results(out: Path, name: str, report: dict, plot: Callable[[Path], None] | None) -> None:
    """`<out>/<name>.json` and, with a `plot`, `<out>/<name>.png`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None:
        plot(out / f"{name}.png")
    logger.info("wrote %s%s", out / f"{name}.json", "" if plot is None else f" and {out / name}.png")


def machine_info(folder: Path) -> dict:
    def first(path: str, prefix: str) -> str:
        return next((line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines()
                     if line.startswith(prefix)), "")

    dev, fstype = "", ""
    for d, mount, fs in sorted((line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()),
                               key=lambda m: len(m[1])):
        if Path(mount) == folder or Path(mount) in folder.parents:
            dev, fstype = d, fs
    driver = Path(f"/sys/block/{Path(dev).name}/device/driver")
    ram_kib = int(first("/proc/meminfo", "MemTotal").split()[0])
    return {"cpu_model": first("/proc/cpuinfo", "model name") or platform.processor(),
            "cores": os.cpu_count(), "ram_gib": round(ram_kib / 2**20),
            "torch": torch.__version__, "python": platform.python_version(), "kernel": platform.release(),
            "disk_device": dev, "disk_fs": fstype,
            "disk_driver": driver.resolve().name if driver.exists() else "",
            "bench_dir": str(folder), "load_avg_1m": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
