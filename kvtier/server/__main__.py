"""`kvtier_server --host 127.0.0.1 --port P --config FILE`: run the cache server until SIGTERM/SIGINT.

The config comes from `load_server_config` (defaults, the YAML file or `$KVTIER_SERVER_CONFIG`,
`KVTIER_SERVER_*` overrides); the command-line flags given override all of it. Once listening it
prints one line to stdout, `kvtier_server listening on HOST:PORT` (the real port when asked for 0);
logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from kvtier.config import load_server_config, override
from kvtier.config_values import require_token_beyond_loopback
from kvtier.errors import ConfigError
from kvtier.server.app import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier_server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML server config (see configs/server.yaml)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind; 0 = any free port (default 7000)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # No --token: a secret on the command line is visible to every user (ps); use the config
        # file or KVTIER_SERVER_TOKEN. Flags are checked like the file's values (--host "" is an
        # error, never every interface).
        config = override(load_server_config(args.config), "command line",
                          {"host": args.host, "port": args.port})
        require_token_beyond_loopback(config.host, config.token, "set token (KVTIER_SERVER_TOKEN)")
    except ConfigError as exc:
        print(f"kvtier_server: {exc}", file=sys.stderr)
        return 2

    def ready(address: tuple[str, int]) -> None:
        print(f"kvtier_server listening on {address[0]}:{address[1]}", flush=True)

    try:
        asyncio.run(serve(config, ready))
    except ConfigError as exc:  # found at start: a spill.path that is not a usable directory, ...
        print(f"kvtier_server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, the address is not ours, ...
        print(f"kvtier_server: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
