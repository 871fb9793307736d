"""ServerThread: an ASGI app served by uvicorn on a daemon thread of this process, on a socket the
caller bound. An instance's command server runs this way (kvtier.fleet.command_server), beside a
CacheEngine or kvtier_server that owns the main thread; so do the tests' stand-in controllers.

Why a socket bound beforehand: the port is known (and a port in use fails) before the thread starts,
with an OSError the caller can report, instead of uvicorn's `sys.exit` from inside the thread; and a
listening socket queues connections made before the loop starts.

Nothing process-wide is touched: no signal handlers (uvicorn installs none off the main thread), no
logging configuration (`log_config=None`), no lifespan. `stop()` asks uvicorn to exit (it polls
every 0.1 s), gives requests in flight `grace_s` and joins the thread for at most `timeout_s`: a
handler stuck in a blocking call cannot hold the caller (the thread is a daemon).

Thread-safety: `start` and `stop` from one owner thread; `stop` is idempotent.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn

logger = logging.getLogger(__name__)


def bind_socket(host: str, port: int, listen: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port), port 0 = any free one; listening unless `listen` is False
    (connections are then refused until the server starts). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # a reply's body waits ~40 ms behind its headers (Nagle against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def url_host(host: str) -> str:
    """`host` as it goes into a URL (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host else host


class ServerThread:
    def __init__(self, app, sock: socket.socket, name: str = "kvtier-http", grace_s: float = 1.0):
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", loop="asyncio",
                                timeout_graceful_shutdown=grace_s)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException:  # SystemExit included: uvicorn exits that way when startup fails
            logger.exception("HTTP server on port %d stopped", self.port)

    @property
    def started(self) -> bool:
        return self._server.started

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("HTTP server on port %d did not stop within %g s; left to exit with the "
                               "process", self.port, timeout_s)
        self._sock.close()
