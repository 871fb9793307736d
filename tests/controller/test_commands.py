"""Tests for kvtier/controller/commands.py: a command's deadline holds for the worker thread too.

An instance that trickles its answer (headers, then a byte every 50 ms: each read is well inside the
socket timeout) used to keep its worker thread until it stopped, after the controller had answered
504; with one worker, every later command then waited behind it and timed out too. At the deadline
the running call's socket is now shut down, so the next command is served.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from command_double import CommandDouble

from kvtier.controller.commands import CommandFailed, CommandSender, CommandTarget
from kvtier.controller.state import InstanceRecord
from kvtier.fleet.messages import Command, Registration, TierUsage

TOKEN = "c" * 32
TIERS = [TierUsage(name="cpu", chunks=0, bytes_used=0, capacity_bytes=1 << 20)]


def target(instance_id: str, url: str) -> CommandTarget:
    registration = Registration(instance_id=instance_id, kind="engine", command_url=url, command_token=TOKEN,
                                model_id="m", namespace="0" * 16, chunk_size=16, tiers=TIERS)
    record = InstanceRecord(registration, last_heartbeat=0.0, tiers=tuple(TIERS), up=True, chunks_indexed=0)
    return CommandTarget(record, Command(op="pin", keys=["a" * 48]))


@contextmanager
def trickling_url() -> Iterator[str]:
    """A URL that answers 200 with a long body, one byte every 50 ms, until the test ends."""
    done = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n")
            try:
                while not done.wait(0.05):
                    conn.sendall(b" ")
            except OSError:  # the controller shut its side: what the fix does
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        listener.close()
        thread.join(5)


def test_a_trickling_instance_frees_its_worker_at_the_deadline():
    sender = CommandSender(timeout_s=1.0, max_workers=1)
    try:
        with trickling_url() as slow, CommandDouble(TOKEN).running() as healthy:
            with pytest.raises(CommandFailed) as failed:
                asyncio.run(sender.send([target("slow", slow)]))
            assert failed.value.status == 504 and "slow" in failed.value.detail
            # The one worker is free again: the healthy instance answers within the deadline.
            replies = asyncio.run(sender.send([target("healthy", healthy.url)]))
            assert replies[0].chunks == 1
            assert [c.op for c in healthy.commands] == ["pin"]
    finally:
        sender.close()
