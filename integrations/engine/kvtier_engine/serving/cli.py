"""The `kvtier_engine` command: `kvtier_engine serve MODEL [options]` (also `python -m kvtier_engine`),
and `kvtier_engine proxy --prefill URL --decode URL [--controller URL]` (disaggregated prefill:
serving/proxy.py).

    kvtier_engine serve random:llama-small --kvtier-config configs/cpu_disk.yaml --port 8000

MODEL is a Hugging Face model folder or a `random:<preset>`. Process-wide setup (logging, and the
signal handlers through `serve`) happens here, never in the library.

Exit status: 0 after SIGINT/SIGTERM (kvtier drained); EXIT_CONFIG (2) for a configuration error,
printed as one line naming the file and key (before the model loads when the file itself is wrong);
`server.EXIT_ENGINE_FAILED` (1) when the engine became unusable. A supervisor restarts on non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from kvtier.config import load_config, parse_size
from kvtier.errors import ConfigError
from kvtier_engine.llm_engine import KV_ROLES, EngineOptions
from kvtier_engine.serving.proxy import DEFAULT_TIMEOUT_S as DEFAULT_PROXY_TIMEOUT_S
from kvtier_engine.serving.proxy import ProxyConfig, run_proxy
from kvtier_engine.serving.proxy_backends import BackendAddress, parse_backend_url
from kvtier_engine.serving.proxy_prefix import TOKEN_ENV, controller_link
from kvtier_engine.serving.server import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_READ_TIMEOUT_S,
    ServerLimits,
    serve,
)

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
EXIT_CONFIG = 2  # as argparse's usage errors: the command line or its files are wrong


def build_parser() -> argparse.ArgumentParser:
    # Defaults from an instance: EngineOptions has slots, so its class attributes are descriptors.
    defaults = EngineOptions(model="")
    parser = argparse.ArgumentParser(prog="kvtier_engine", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("serve", help="an OpenAI-compatible HTTP server",
                                description="Serve MODEL over an OpenAI-compatible HTTP API.")
    command.add_argument("model", metavar="MODEL", help="a Hugging Face model folder or random:<preset>")
    command.add_argument("--kvtier-config", metavar="FILE", default=None,
                       help="kvtier YAML configuration; without it kvtier is off")
    command.add_argument("--host", default="127.0.0.1", type=_bind_host,
                         help="address to bind (default: loopback only)")
    command.add_argument("--port", type=int, default=8000)
    command.add_argument("--served-model-name", metavar="NAME", default=None,
                       help="the name clients pass as `model` (default: MODEL)")
    command.add_argument("--kv-cache-bytes", type=_size("--kv-cache-bytes"), default=defaults.kv_cache_bytes,
                       metavar="N",
                       help="paged KV cache size, in bytes or like 512MiB (default: %(default)s bytes)")
    command.add_argument("--max-body-bytes", type=_size("--max-body-bytes"), default=DEFAULT_MAX_BODY_BYTES,
                       metavar="N", help="largest request body accepted, larger ones get 413 "
                       "(default: %(default)s bytes)")
    command.add_argument("--read-timeout", type=_seconds, default=DEFAULT_READ_TIMEOUT_S, metavar="S",
                       help="seconds a connection may take to send a request head, and then its body "
                       "(a late body gets 408) (default: %(default)s)")
    command.add_argument("--max-requests", type=_positive, default=DEFAULT_MAX_REQUESTS, metavar="N",
                         help="requests accepted and not yet finished; more get 503 (default: %(default)s)")
    command.add_argument("--max-num-seqs", type=_positive, default=defaults.max_num_seqs, metavar="N")
    command.add_argument("--max-num-batched-tokens", type=_positive,
                       default=defaults.max_num_batched_tokens, metavar="N")
    command.add_argument("--seed", type=int, default=defaults.seed, help="random presets' weights")
    command.add_argument("--device", default="auto", help="cuda, cpu, ... (default: cuda when present)")
    command.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    command.add_argument("--chat-template", metavar="FILE", default=None,
                         help="a jinja2 chat template for /v1/chat/completions, replacing the model's own")
    command.add_argument("--kv-role", default=defaults.kv_role, choices=KV_ROLES,
                         help="disaggregated prefill: 'prefill' runs requests to their first token and "
                         "holds their KV for a decode instance, 'decode' loads a prefill instance's KV "
                         "named in a request's kv_transfer_params, 'both' does either (default: %(default)s)")
    command.add_argument("--kv-peer", metavar="URL", action="append", default=[],
                         help="a prefill instance's kvtier P2P URL (kvtier://host:port) this instance may "
                         "load from; repeat for several (decode and both roles; none: any is refused)")
    command.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    _add_proxy_command(commands)
    return parser


def _add_proxy_command(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser(
        "proxy", help="a disaggregated-prefill router in front of serve instances",
        description="Serve the OpenAI API by running each request's prefill on a --prefill instance and "
        "its decode on a --decode instance (`kvtier_engine serve --kv-role prefill|decode`).")
    command.add_argument("--prefill", metavar="URL", action="append", required=True, type=_backend_url,
                         help="a prefill instance, http://host:port; repeat for several")
    command.add_argument("--decode", metavar="URL", action="append", required=True, type=_backend_url,
                         help="a decode instance, http://host:port; repeat for several")
    command.add_argument("--host", default="127.0.0.1", type=_bind_host,
                         help="address to bind (default: loopback only)")
    command.add_argument("--port", type=int, default=8000)
    command.add_argument("--timeout", type=_seconds, default=DEFAULT_PROXY_TIMEOUT_S, metavar="S",
                         help="seconds each read from an instance may take, and a prefill call in all "
                         "(default: %(default)s)")
    command.add_argument("--controller", metavar="URL", type=_backend_url, default=None,
                         help="a kvtier_controller, http://host:port: send each request to the decode "
                         f"instance holding its longest cached prefix (its /v1/route); the token from "
                         f"${TOKEN_ENV}, needed unless the controller is on loopback")
    command.add_argument("--log-level", default="info", choices=LOG_LEVELS)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "proxy":
        sys.exit(_proxy(args))
    try:
        # Loaded here, before the model: a wrong file fails in a moment, not after the load.
        kvtier_config = load_config(args.kvtier_config) if args.kvtier_config is not None else None
        options = EngineOptions(model=args.model, kvtier_config=kvtier_config, device=args.device,
                                dtype=args.dtype, seed=args.seed, kv_cache_bytes=args.kv_cache_bytes,
                                max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=args.max_num_batched_tokens, kv_role=args.kv_role,
                                kv_peers=tuple(args.kv_peer))
        limits = ServerLimits(args.max_body_bytes, args.read_timeout, args.max_requests)
        template = _read_template(args.chat_template)
        status = serve(options, args.host, args.port, args.served_model_name, args.log_level, limits,
                       template)
    except ConfigError as exc:  # also what the tiers find wrong when they open (paths, sizes)
        print(f"kvtier_engine: configuration error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    sys.exit(status)


def _proxy(args: argparse.Namespace) -> int:
    try:
        # The token only from the environment: a command line is visible to every user of the host.
        controller = None if args.controller is None else controller_link(args.controller, os.environ)
    except ConfigError as exc:
        print(f"kvtier_engine: configuration error: --controller {args.controller.url}: {exc}",
              file=sys.stderr)
        return EXIT_CONFIG
    config = ProxyConfig(tuple(args.prefill), tuple(args.decode), args.timeout, controller=controller)
    return run_proxy(config, args.host, args.port, args.log_level)


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--chat-template {path}: {exc}") from None


def _backend_url(text: str) -> BackendAddress:
    try:
        return parse_backend_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bind_host(text: str) -> str:
    # uvicorn takes "" for every interface: an empty value (an unset variable) must not open the server.
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (0.0.0.0 binds every interface)")
    return text


def _size(flag: str):
    def parse(text: str) -> int:
        try:
            return parse_size(int(text) if text.isdigit() else text, flag)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
