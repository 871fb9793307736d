"""Instances' command servers for the controller's tests, without an engine behind them.

`CommandDouble`: a real HTTP server (FastAPI on uvicorn, in a daemon thread, on a free port) that
takes `POST /v1/command` with its bearer token, records each Command and answers
`CommandReply(chunks=len(keys) or CLEARED)`, or the 4xx the test asks for. `silent_url()`: a port
that accepts connections (the kernel's backlog) and never answers. `closed_url()`: a port nobody
listens on.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import uvicorn
from fastapi import FastAPI, Header, HTTPException
from waiting import wait_until

from kvtier.fleet.messages import Command, CommandReply

CLEARED = 7  # chunks a clear reports


class CommandDouble:
    def __init__(self, token: str):
        self.token = token
        self.commands: list[Command] = []
        self.refuse: str | None = None  # a detail: answer 400 with it
        self.app = FastAPI()

        @self.app.post("/v1/command", response_model=CommandReply)
        def command(command: Command, authorization: Annotated[str | None, Header()] = None) -> CommandReply:
            if authorization != f"Bearer {self.token}":
                raise HTTPException(401, "wrong command token")
            if self.refuse is not None:
                raise HTTPException(400, self.refuse)
            self.commands.append(command)
            return CommandReply(chunks=len(command.keys) if command.keys else CLEARED)

        self.url = ""

    @contextmanager
    def running(self) -> Iterator[CommandDouble]:
        server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_until(lambda: server.started, "the command double listens")
        self.url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        try:
            yield self
        finally:
            server.should_exit = True
            thread.join(10)


@contextmanager
def silent_url() -> Iterator[str]:
    """A URL whose connections open and then hear nothing."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # never accepted: connects succeed, no byte ever comes back
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def closed_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # bound, then closed: connections are refused
