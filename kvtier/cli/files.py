"""Files named on the `kvtier` command line (a tokens file, a token file): read whole, up to a
bound, as UTF-8 text; `-` reads stdin. Any failure is one UsageError naming the option and file."""

from __future__ import annotations

import sys

from kvtier.cli.exits import UsageError


def read_text(name: str, where: str, max_bytes: int) -> str:
    """The text of file `name` (stdin for `-`); `where` names it in messages ("--tokens-file F")."""
    try:
        if name == "-":
            data = sys.stdin.buffer.read(max_bytes + 1)
        else:
            with open(name, "rb") as f:
                data = f.read(max_bytes + 1)
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise UsageError(f"{where}: over {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None
