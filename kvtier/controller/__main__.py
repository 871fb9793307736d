"""`kvtier_controller --host 127.0.0.1 --port P --config FILE --token-file F`: run the fleet controller
until SIGTERM/SIGINT (then exit 0).

The config comes from `load_controller_config` (defaults, the YAML file or
`$KVTIER_CONTROLLER_CONFIG`, `KVTIER_CONTROLLER_*` overrides); the flags given override all of it.
`--token-file` holds the token (stripped; an empty file is an error): never on the command line,
where every user sees it. A host other machines can reach needs a token. Config errors: one line on
stderr, exit 2. Once listening it prints one line to stdout, `kvtier_controller listening on
HOST:PORT` (the real port when asked for 0); logs go to stderr.

The index lives in memory, or in Redis when `index` is set. A sweeper thread calls
`state.sweep(now)` every second, so a silent instance's keys leave the index within its timeout.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from kvtier.config import ControllerConfig, load_controller_config, override
from kvtier.config_values import require_token_beyond_loopback
from kvtier.controller.app import build_app
from kvtier.controller.state import FleetState, StateUnavailable
from kvtier.errors import ConfigError

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier_controller", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML controller config (see configs/controller.yaml)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind; 0 = any free port (default 7100)")
    parser.add_argument("--token-file", help="file holding the bearer token clients must send")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def load(args: argparse.Namespace) -> ControllerConfig:
    """The config the flags ask for; ConfigError for anything wrong with it."""
    token = None
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--token-file {args.token_file}: cannot read it: {exc}") from exc
        if not token:
            raise ConfigError(f"--token-file {args.token_file}: the file is empty")
    config = override(load_controller_config(args.config), "command line",
                      {"host": args.host, "port": args.port, "token": token})
    require_token_beyond_loopback(config.host, config.token, "set KVTIER_CONTROLLER_TOKEN or --token-file")
    return config


def open_state(config: ControllerConfig) -> FleetState:
    if config.index is None:
        from kvtier.controller.memory_state import MemoryState

        return MemoryState(config.heartbeat_timeout_s)
    from kvtier.controller.redis_state import RedisState  # redis-py only when asked for

    return RedisState(config.index, config.index_cluster, config.index_timeout_s, config.heartbeat_timeout_s)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load(args)
        state = open_state(config)
    except ConfigError as exc:
        print(f"kvtier_controller: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve(config, state)
    finally:
        state.close()


def _serve(config: ControllerConfig, state: FleetState) -> int:
    # log_config None: uvicorn logs through the root logger (stderr); its access log would go to stdout.
    app = build_app(config, state, clock=time.time)
    server = _Server(uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                                    access_log=False, lifespan="on"), _announce)
    stop = threading.Event()
    sweeper = threading.Thread(target=_sweep, args=(state, stop), name="kvtier-sweeper", daemon=True)
    sweeper.start()
    try:
        server.run()  # a port that is taken: uvicorn logs it and exits 1 (SystemExit)
    finally:
        stop.set()
        sweeper.join()
    return 0 if server.started else 1


def _announce(host: str, port: int) -> None:
    print(f"kvtier_controller listening on {host}:{port}", flush=True)


class _Server(uvicorn.Server):
    """uvicorn's server that says where it listens once it does (the real port when asked for 0)."""

    def __init__(self, config: uvicorn.Config, ready: Callable[[str, int], None]):
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self._ready(host, port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn notes the signal and raises it again once it has shut down, which under Python's
        # defaults ends the process with -15 (or KeyboardInterrupt) instead of exit 0: a signal here
        # only asks the server to exit (a second SIGINT: at once).
        logger.info("%s: shutting down", signal.Signals(sig).name)
        super().handle_exit(sig, frame)
        self._captured_signals = []


def _sweep(state: FleetState, stop: threading.Event) -> None:
    while not stop.wait(SWEEP_INTERVAL_S):
        try:
            removed = state.sweep(time.time())
        except StateUnavailable as exc:  # Redis away: the next sweep catches up
            logger.warning("sweep skipped: %s", exc)
            continue
        except Exception:  # a bug must not stop the sweeping for good
            logger.exception("sweep failed")
            continue
        if removed:
            logger.info("swept %d keys of instances that are down", removed)


if __name__ == "__main__":
    sys.exit(main())
