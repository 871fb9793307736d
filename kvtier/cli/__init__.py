"""`kvtier`: the fleet's command line, for people (tables) and scripts (`--json`).

    kvtier [--controller URL] [--token-file F] [--json] [--timeout S] COMMAND ...
    kvtier instances | stats
    kvtier lookup|route|pin|unpin --model M (--tokens-file F | --text T --tokenizer PATH) [--instance I]
    kvtier move --model M (...) --instance I --to TIER [--copy]
    kvtier compress --model M (...) --instance I --codec C --tier T
    kvtier decompress --model M (...) --instance I [--tier T]
    kvtier clear [--instance I] [--tier T]
    kvtier plan TRACE [--policies A,B] [--capacities C,C] [--cpu SIZE] [--disk SIZE] [--remote] ...

`plan` is local (kvtier.cli.plan): it replays a trace file and needs no controller.

One command is one request to kvtier_controller (kvtier.fleet.http_client.JsonClient, one deadline
per socket operation: --timeout). `--json` prints the controller's reply as it sent it (FastAPI's
compact JSON, one line); the tables are for people and may change. Every expected failure is one
line `kvtier: <message>` on stderr and an exit status from kvtier.cli.exits (0 ok, 1 the controller
answered an error, 2 usage, 3 unreachable, 4 auth, 5 unknown instance, 6 instance down).

Where it runs: a short-lived process, one thread. Imports stay light (no torch) unless --tokenizer
names a model that only kvtier_engine can read.
"""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from typing import Any

from rich.console import Console

from kvtier.cli.commands import Controller, Request, controller, request
from kvtier.cli.exits import INTERRUPTED, OK, USAGE, UsageError, failure, one_line
from kvtier.cli.parser import parse_arguments
from kvtier.cli.plan import plan_command
from kvtier.cli.render import render
from kvtier.errors import KvtierError
from kvtier.fleet.http_client import JsonClient

__all__ = ["main"]

PIPED_WIDTH = 200  # columns of a table written to a pipe or file: wide enough that ids are never folded


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_arguments(argv)
    except SystemExit as exc:  # --help printed
        return exc.code if isinstance(exc.code, int) else OK
    except UsageError as exc:
        return _fail(USAGE, str(exc))
    url = "?"
    try:
        if args.command == "plan":
            return plan_command(args, _console())
        target = controller(args, os.environ)
        url = target.url
        reply = _send(target, request(args), args.timeout)
        _print(args, _narrowed(args, reply))
        return OK
    except KvtierError as exc:
        return _fail(*failure(exc, url))
    except KeyboardInterrupt:
        return _fail(INTERRUPTED, "interrupted")
    except BrokenPipeError:  # `kvtier instances | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK


def _send(target: Controller, req: Request, timeout_s: float) -> Any:
    try:
        client = JsonClient(target.url, target.token, timeout_s)
    except ValueError as exc:  # not an http(s) URL, or a bad port
        raise UsageError(f"{target.url_from}: {exc}") from None
    try:
        return client.get(req.path) if req.body is None else client.post(req.path, req.body)
    finally:
        client.close()


def _narrowed(args: Namespace, reply: Any) -> Any:
    """`lookup --instance I`: the reply with only I's entry (the controller always answers for all)."""
    if args.command == "lookup" and args.instance is not None and isinstance(reply, dict):
        reply = {**reply, "instances": [i for i in reply.get("instances", [])
                                        if isinstance(i, dict) and i.get("instance_id") == args.instance]}
    return reply


def _print(args: Namespace, reply: Any) -> None:
    if args.json:
        # The controller's own encoding (starlette's JSONResponse), so the bytes are the ones it sent.
        print(json.dumps(reply, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
        return
    render(args, reply, _console())


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPED_WIDTH
    return console


def _fail(status: int, message: str) -> int:
    print(f"kvtier: {one_line(message)}", file=sys.stderr)
    return status
