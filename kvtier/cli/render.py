"""The `kvtier` command's tables for people (rich), one renderer per command.

A reply is first read into its message model (kvtier.fleet.messages), so a controller of another
version is one clear error (ReplyMismatch), never a KeyError half-way through a table.
"""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from itertools import groupby
from typing import Any

from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from kvtier.cli.exits import ReplyMismatch
from kvtier.fleet.messages import (
    AdminReply,
    InstancesReply,
    LookupReply,
    RouteReply,
    StatsReply,
    TierUsage,
)

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_VERBS = {"pin": "pinned", "unpin": "unpinned", "clear": "removed", "compress": "compressed",
          "decompress": "decompressed"}
_PLACES = {"move": "to", "clear": "from"}  # (compress, decompress: "in")


def render(args: Namespace, reply: Any, console: Console) -> None:
    model, show = _RENDERERS[args.command]
    try:
        body = model.model_validate(reply)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ReplyMismatch(f"the controller's reply is not what this kvtier expects ({where}: "
                            f"{error['msg']}): are both the same version?") from None
    show(args, body, console)


def _instances(args: Namespace, reply: InstancesReply, console: Console) -> None:
    if not reply.instances:
        console.print("no instance has registered")
        return
    table = _table("instance", "kind", "model", "state", "last heartbeat", "chunks", "tiers", "address")
    for i in reply.instances:
        state = "[green]up[/]" if i.up else "[red]down[/]"
        table.add_row(i.instance_id, i.kind, i.model_id or "-", state, f"{i.last_heartbeat_s:.1f} s ago",
                      str(i.chunks_indexed), _tiers(i.tiers), i.address)
    console.print(table)


def _stats(args: Namespace, reply: StatsReply, console: Console) -> None:
    table = _table("", "")
    table.add_row("instances up", str(reply.instances_up))
    table.add_row("instances down", str(reply.instances_down))
    table.add_row("index entries (chunk, instance)", str(reply.index_chunks))
    table.add_row("index memory", size_text(reply.index_bytes))
    for endpoint, count in sorted(reply.requests.items()):
        table.add_row(f"requests {endpoint}", str(count))
    console.print(table)


def _lookup(args: Namespace, reply: LookupReply, console: Console) -> None:
    instances = [i for i in reply.instances if args.instance in (None, i.instance_id)]
    console.print(f"model {reply.model_id}: {reply.num_tokens} tokens; longest cached prefix: "
                  f"{reply.hit_tokens} tokens ({_percent(reply.hit_tokens, reply.num_tokens)})")
    if not instances:
        console.print("no instance of this model is up" if args.instance is None
                      else f"instance {args.instance} is not an instance of this model that is up")
        return
    table = _table("instance", "hit tokens", "chunk size", "tiers of the hit chunks, in order")
    for i in instances:
        table.add_row(i.instance_id, str(i.hit_tokens), str(i.chunk_size), _runs(i.tiers))
    console.print(table)


def _route(args: Namespace, reply: RouteReply, console: Console) -> None:
    if not reply.instances:
        console.print(f"no engine of model {args.model} is up")
        return
    table = _table("rank", "instance", "hit tokens", "free in fastest tier")
    for rank, entry in enumerate(reply.instances, 1):
        table.add_row(str(rank), entry.instance_id, str(entry.hit_tokens), size_text(entry.free_bytes))
    console.print(table)


def _results(args: Namespace, reply: AdminReply, console: Console) -> None:
    verb = ("copied" if args.copy else "moved") if args.command == "move" else _VERBS[args.command]
    tier = args.to if args.command == "move" else getattr(args, "tier", None)
    where = "" if tier is None else f" {_PLACES.get(args.command, 'in')} {tier}"
    where += f" with {args.codec}" if args.command == "compress" else ""
    total = sum(r.chunks for r in reply.results)
    console.print(f"{verb} {_count(total, 'chunk')}{where} on {_count(len(reply.results), 'instance')}")
    if reply.results:
        table = _table("instance", "chunks")
        for result in reply.results:
            table.add_row(result.instance_id, str(result.chunks))
        console.print(table)


_RENDERERS: dict[str, tuple[type[BaseModel], Callable[[Namespace, Any, Console], None]]] = {
    "instances": (InstancesReply, _instances), "stats": (StatsReply, _stats),
    "lookup": (LookupReply, _lookup), "route": (RouteReply, _route),
    "pin": (AdminReply, _results), "unpin": (AdminReply, _results),
    "move": (AdminReply, _results), "clear": (AdminReply, _results),
    "compress": (AdminReply, _results), "decompress": (AdminReply, _results),
}


def _table(*columns: str) -> Table:
    table = Table(show_header=any(columns), show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _tiers(tiers: list[TierUsage]) -> str:
    shown = [f"{t.name} {size_text(t.bytes_used)}/{size_text(t.capacity_bytes)} "
             f"({_count(t.chunks, 'chunk')})" for t in tiers]
    return ", ".join(shown) or "-"


def _runs(tiers: list[str]) -> str:
    """Per-chunk tier names as runs: ["cpu", "cpu", "disk"] -> "cpu x2, disk x1"."""
    return ", ".join(f"{name} x{len(list(run))}" for name, run in groupby(tiers)) or "-"


def size_text(n: int) -> str:
    """`n` bytes in binary units, one decimal: 1536 -> "1.5 KiB" (the plan command's sizes too)."""
    power = 0
    while power < len(_UNITS) - 1 and n >= 1024 ** (power + 1):
        power += 1
    return f"{n} B" if power == 0 else f"{n / 1024 ** power:.1f} {_UNITS[power]}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"
