"""`kvtier plan TRACE`: how big each tier should be for a trace's traffic, per eviction policy.

Local: it reads a trace file and replays it (kvtier.sim.plan); no controller. Options are read into a
PlanSettings first, the trace next, and any bad value, unreadable file or malformed line (with
--on-error fail) is a UsageError naming the option or `path:line` before anything is printed. Then
the replays run under a progress bar on stderr, and the tables go to stdout, the JSON and the PNG to
the files named.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvtier.cli.exits import UsageError
from kvtier.cli.plan_render import render_plan, write_plot
from kvtier.policy_registry import POLICIES
from kvtier.sim.plan import (
    DEFAULT_CPU,
    DEFAULT_DISK,
    DEFAULT_SWEEP,
    DEFAULT_TARGET,
    PlanSettings,
    measure_traffic,
    plan_dict,
    replay_count,
    run_plan,
)
from kvtier.sim.plan_geometry import (
    DEFAULT_MODEL,
    MODELS,
    Capacity,
    model_layout,
    parse_capacity,
    parse_layout,
)
from kvtier.sim.plan_trace import PlanTrace, load_trace
from kvtier.sim.tiers import BLOCK_TOKENS

logger = logging.getLogger(__name__)

# cachegen-2, the recommended lossy level: 6.00x smaller than fp16 KV at kvtier's 256-token chunks
# (benchmarks/README.md, "cachegen.py", codec part on SmolLM2; 6.73x at 1,024-token chunks).
DEFAULT_CODEC_RATIO = 6.0


def plan_options(parser: argparse.ArgumentParser) -> None:
    """The `plan` subcommand's arguments (parser.py adds the subcommand)."""
    shares = ",".join(f"{100 * f:g}%%" for f in DEFAULT_SWEEP)  # (argparse formats help with %)
    parser.add_argument("trace", metavar="TRACE", help="a Mooncake JSONL trace, or a kvtier trace log")
    parser.add_argument("--policies", metavar="A,B", help=f"eviction policies (default: every registered "
                        f"one: {', '.join(POLICIES)})")
    parser.add_argument("--capacities", metavar="C,C", help=f"the capacities swept, each a share of the "
                        f"trace's distinct blocks (5%%) or a size (64GiB) (default: {shares})")
    parser.add_argument("--cpu", metavar="SIZE", help=f"host memory above the swept disk tier "
                        f"(default: {100 * DEFAULT_CPU:g}%%)")
    parser.add_argument("--disk", metavar="SIZE", help="a disk tier of this size above a swept remote tier")
    parser.add_argument("--remote", action="store_true", help=f"sweep a remote tier too, under --disk "
                        f"(default disk: {100 * DEFAULT_DISK:g}%%)")
    geometry = parser.add_mutually_exclusive_group()
    geometry.add_argument("--model", metavar="NAME", help=f"the model whose KV is sized: {', '.join(MODELS)} "
                          f"(default: {DEFAULT_MODEL})")
    geometry.add_argument("--layout", metavar="SPEC", help="a KV geometry instead: "
                          "layers=32,kv_heads=8,head_dim=128,dtype=bfloat16")
    parser.add_argument("--block-tokens", metavar="N", type=int, help=f"tokens per hash id when the trace's "
                        f"lines carry no block_size (default: {BLOCK_TOKENS}, Mooncake's)")
    parser.add_argument("--codec-ratio", metavar="R", default=str(DEFAULT_CODEC_RATIO),
                        help=f"how many times smaller a compressed tier below host memory stores KV; per "
                        f"row the hit rate of a compressed tier of the same bytes (default "
                        f"{DEFAULT_CODEC_RATIO:g}: cachegen-2, the recommended lossy level, at 256-token "
                        f"chunks of 16-bit KV, from benchmarks/README.md, section cachegen.py; 1 = off)")
    parser.add_argument("--target", metavar="PCT", default=f"{100 * DEFAULT_TARGET:g}%",
                        help="the share of the infinite cache's hit rate a tier must reach "
                        "(default: %(default)s)")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                        help="a malformed trace line: fail (default) or skip it and say so")
    parser.add_argument("--json", metavar="PATH", dest="json_path", help="write every number to this file")
    parser.add_argument("--plot", metavar="PATH", help="write hit rate vs capacity to this PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


@dataclass(frozen=True, slots=True)
class _Options:
    """The options checked, before the trace is read (capacities still unresolved)."""

    model: str
    bytes_per_token: int
    policies: tuple[str, ...]
    capacities: tuple[Capacity, ...] | None
    cpu: Capacity | None
    disk: Capacity | None
    remote: bool
    codec_ratio: float
    target: float


def plan_command(args: Namespace, console: Console) -> int:
    """Run `kvtier plan`; UsageError for anything wrong in the options or the trace."""
    options = _options(args)
    for option, path in (("--json", args.json_path), ("--plot", args.plot)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise UsageError(f"{option} {path}: no such folder")
    trace = _trace(args)
    # A trace that declares its block size is kvtier's own: its blocks are kvtier's chunks, and a
    # partial last one is never stored (see PlanSettings.store_partial).
    traffic = measure_traffic(trace.requests, trace.block_tokens, store_partial=not trace.declared)
    settings = _settings(options, trace, traffic.distinct_blocks)
    errors = Console(stderr=True)
    # Only on a terminal: written to a pipe or file, rich cannot redraw it and leaves a stray line.
    with Progress(TextColumn("replays"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=errors, transient=True, disable=args.quiet or not errors.is_terminal) as progress:
        task = progress.add_task("replays", total=replay_count(settings, traffic))
        plan = run_plan(trace.requests, settings, traffic, lambda: progress.advance(task), trace.skipped)
    render_plan(plan, options.model, args.trace, console)
    if args.json_path is not None:
        data = {"trace": {"path": str(args.trace), "block_tokens_declared": trace.declared},
                "model": options.model, "bytes_per_token": options.bytes_per_token, **plan_dict(plan)}
        _write(args.json_path, "--json", json.dumps(data, indent=1, allow_nan=False) + "\n")
    if args.plot is not None:
        try:
            write_plot(plan, args.plot)
        except OSError as exc:
            raise UsageError(f"--plot {args.plot}: cannot write it: {exc.strerror or exc}") from None
    return 0


def _options(args: Namespace) -> _Options:
    model, bytes_per_token = _geometry(args)
    policies = tuple(p.strip() for p in args.policies.split(",")) if args.policies else tuple(POLICIES)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise UsageError(f"--policies: unknown eviction policy {', '.join(unknown) or '(none)'}; "
                         f"known: {', '.join(POLICIES)}")
    capacities = None
    if args.capacities is not None:
        capacities = tuple(_capacity("--capacities", c) for c in args.capacities.split(","))
    ratio = _number("--codec-ratio", args.codec_ratio)
    if ratio < 1:
        raise UsageError(f"--codec-ratio: must be >= 1 (1: no codec), got {args.codec_ratio}")
    percent = args.target.endswith("%")
    target = _number("--target", args.target.removesuffix("%")) / (100 if percent else 1)
    if not 0 < target <= 1:
        raise UsageError(f"--target: must be a share of the infinite hit rate in (0%, 100%], "
                         f"got {args.target}")
    if args.block_tokens is not None and args.block_tokens <= 0:
        raise UsageError(f"--block-tokens: must be a positive number of tokens, got {args.block_tokens}")
    cpu = _capacity("--cpu", args.cpu) if args.cpu is not None else None
    disk = _capacity("--disk", args.disk) if args.disk is not None else None
    return _Options(model, bytes_per_token, policies, capacities, cpu, disk, args.remote, ratio, target)


def _geometry(args: Namespace) -> tuple[str, int]:
    """(the model as shown, its KV bytes per token)."""
    try:
        if args.layout is not None:
            layout = parse_layout(args.layout)
            return f"layout {layout.describe()}", layout.bytes_per_token
        model = args.model or DEFAULT_MODEL
        return model, model_layout(model).bytes_per_token
    except ValueError as exc:
        raise UsageError(f"{'--layout' if args.layout is not None else '--model'}: {exc}") from None


def _capacity(option: str, text: str) -> Capacity:
    try:
        return parse_capacity(text)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _number(option: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"{option}: expected a number, got {text!r}")
    return value


def _trace(args: Namespace) -> PlanTrace:
    try:
        trace = load_trace(args.trace, args.on_error, args.block_tokens)
    except OSError as exc:
        raise UsageError(f"{args.trace}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:  # a malformed line (TraceError), a bad or disagreeing block_size
        raise UsageError(str(exc)) from None
    if not trace.requests:
        raise UsageError(f"{args.trace}: no requests in the trace"
                         + (f" ({len(trace.skipped)} malformed lines skipped)" if trace.skipped else ""))
    return trace


def _settings(options: _Options, trace: PlanTrace, distinct: int) -> PlanSettings:
    block_bytes = options.bytes_per_token * trace.block_tokens

    def blocks(option: str, capacity: Capacity) -> int:
        try:
            return capacity.blocks(distinct, block_bytes)
        except ValueError as exc:
            raise UsageError(f"{option}: {exc}") from None

    if options.capacities is not None:
        sweep = sorted({blocks("--capacities", c) for c in options.capacities})
    else:  # the default shares, at least one block each (a tiny trace's 1% may be none)
        sweep = sorted({max(1, int(f * distinct)) for f in DEFAULT_SWEEP})
    cpu = blocks("--cpu", options.cpu) if options.cpu else max(1, int(DEFAULT_CPU * distinct))
    disk = None
    if options.disk is not None:
        disk = blocks("--disk", options.disk)
    elif options.remote:
        disk = max(1, int(DEFAULT_DISK * distinct))
    return PlanSettings(options.policies, tuple(sweep), cpu, disk, options.codec_ratio, options.target,
                        trace.block_tokens, block_bytes, store_partial=not trace.declared)


def _write(path: str, option: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write it: {exc.strerror or exc}") from None
