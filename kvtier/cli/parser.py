"""The `kvtier` command line: global options, one subcommand per controller endpoint.

The global options are accepted before or after the subcommand (`kvtier --json instances` and
`kvtier instances --json`). A bad argument is a UsageError (one line, exit 2), never argparse's
usage dump. The token is never an argument (a command line is visible to every user in `ps`).
"""

from __future__ import annotations

import argparse
import math
import sys

from kvtier.cli.exits import MEANINGS, UsageError
from kvtier.cli.plan import plan_options

DEFAULT_URL = "http://127.0.0.1:7100"
URL_ENV = "KVTIER_CONTROLLER_URL"
TOKEN_ENV = "KVTIER_CONTROLLER_TOKEN"
# Longer than the controller's default command_timeout_s (30 s), so that its own 504 arrives first.
DEFAULT_TIMEOUT_S = 60.0

_DESCRIPTION = ("Ask a kvtier_controller where a prompt's KV lives in the fleet, and pin, move, compress "
                "or clear it.")
_EPILOG = "\n".join([
    f"controller: --controller URL, else ${URL_ENV}, else {DEFAULT_URL}",
    f"token: read from --token-file F, else ${TOKEN_ENV} (never a command-line argument)",
    "",
    "exit status:",
    *(f"  {status}  {meaning}" for status, meaning in MEANINGS.items()),
])


_ALL_OF_MODEL = "only this instance (default: every instance of the model that is up)"
_TOKENIZERS = "a model folder with tokenizer.json, a .gguf file, a named model or random:<preset>"


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # No abbreviations: `--token SECRET` must not be read as `--token-file SECRET` (and the
        # secret shown back as a file name that cannot be read).
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):  # argparse's usage dump becomes one line and exit 2
        raise UsageError(f"{message} (see: {self.prog} --help)")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line; UsageError for a bad one (SystemExit after --help)."""
    argv = sys.argv[1:] if argv is None else argv
    # Checked before argparse, which would echo the argument after an unknown option (the secret).
    if any(arg == "--token" or arg.startswith("--token=") for arg in argv):
        raise UsageError(f"there is no --token option (a command line is visible to every user): "
                         f"give the token with --token-file F or ${TOKEN_ENV}")
    args = build_parser().parse_args(argv)
    if args.command == "plan" and args.json:
        raise UsageError("plan writes its JSON to a file: give --json PATH after the command")
    return args


def build_parser() -> Parser:
    parser = Parser(prog="kvtier", description=_DESCRIPTION, epilog=_EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(parser, after_command=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = Parser(add_help=False)
    _global_options(common, after_command=True)

    def command(name: str, help: str) -> Parser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    command("instances", "the fleet's instances: model, tiers, heartbeat, up or down")
    command("stats", "the controller's counters: instances up and down, index size, requests")
    lookup = _prompt_options(command("lookup", "which instances hold the prompt's prefix, in which tiers"))
    lookup.add_argument("--instance", metavar="I", help="show only this instance")
    _prompt_options(command("route", "the instances a router should send the prompt to, best first"))
    for name, verb in (("pin", "keep the prompt's cached chunks in host memory (never evicted)"),
                       ("unpin", "let the prompt's pinned chunks be evicted again")):
        _prompt_options(command(name, verb)).add_argument("--instance", metavar="I", help=_ALL_OF_MODEL)
    move = _prompt_options(command("move", "move (or copy) the prompt's chunks to another tier"))
    move.add_argument("--instance", metavar="I", required=True)
    move.add_argument("--to", metavar="TIER", required=True, help="the destination tier: cpu, disk, ...")
    move.add_argument("--copy", action="store_true", help="keep the chunks in their source tier too")
    _recode_commands(command)
    clear = command("clear", "remove cached chunks from instances")
    clear.add_argument("--instance", metavar="I", help="only this instance (default: every one that is up)")
    clear.add_argument("--tier", metavar="T", help="only this tier (default: every tier)")
    # Local, no controller: none of the global options; its own --json takes a file name.
    plan_help = "how big each tier should be for a trace's traffic, per eviction policy (local)"
    plan_options(commands.add_parser("plan", help=plan_help, description=plan_help))
    return parser


def _recode_commands(command) -> None:
    compress = _prompt_options(command("compress", "recode the prompt's chunks in a tier below host memory "
                                                   "with a codec"))
    compress.add_argument("--instance", metavar="I", required=True)
    compress.add_argument("--codec", metavar="C", required=True,
                          help="raw, cachegen-1 (smallest) to cachegen-3, or cachegen-lossless")
    compress.add_argument("--tier", metavar="T", required=True,
                          help="the tier whose records to recode: disk, redis, remote")
    decompress = _prompt_options(command("decompress", "recode the prompt's chunks raw again"))
    decompress.add_argument("--instance", metavar="I", required=True)
    decompress.add_argument("--tier", metavar="T",
                            help="only this tier (default: every tier below host memory)")


def _global_options(parser: argparse.ArgumentParser, after_command: bool) -> None:
    # After the command, an option left out must not overwrite the value given before it.
    def default(value):
        return argparse.SUPPRESS if after_command else value

    parser.add_argument("--controller", metavar="URL", default=default(None),
                        help=f"the controller's URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--token-file", metavar="F", default=default(None),
                        help=f"a file holding the controller's token (default: ${TOKEN_ENV})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the controller's JSON reply instead of a table")
    parser.add_argument("--timeout", metavar="S", type=_seconds, default=default(DEFAULT_TIMEOUT_S),
                        help=f"seconds to wait for the controller (default: {DEFAULT_TIMEOUT_S:g})")


def _prompt_options(parser: Parser) -> Parser:
    parser.add_argument("--model", metavar="M", required=True, help="the model id the instances registered")
    parser.add_argument("--tokens-file", metavar="F",
                        help="the prompt's token ids: a JSON list or whitespace-separated ints; - = stdin")
    parser.add_argument("--text", metavar="T", help="the prompt as text (with --tokenizer)")
    parser.add_argument("--tokenizer", metavar="PATH", help=_TOKENIZERS)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value
