"""Attacks on the engine's P2P wiring (kvtier/engine.py, kvtier/p2p/setup.py): a construction that
fails part way leaves nothing behind (threads, sockets, file descriptors), transport nixl without a
usable NIXL is a ConfigError naming p2p.transport, and close() while P2P reads are in flight neither
hangs nor returns before those reads ended.

Engines are real (configs/cpu_disk.yaml plus a p2p: section), with the fleet's stand-in controller
(tests/fleet/fleet_doubles.py); the peers they read from are stand-ins of tests/p2p.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import fleet_doubles
import pytest
from conftest import CHUNK, seeded_tokens

from kvtier.errors import ConfigError
from kvtier.fleet.messages import PeerHolding

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "p2p"))
from p2p_reader_doubles import silent_peer  # noqa: E402

TIMEOUT_S = 1.0
MARGIN_S = 2.0


controller = fleet_doubles.controller  # a started StandInController


@pytest.fixture
def p2p_engine(make_engine, controller):
    def make(transport: str = "tcp", **overrides):
        return make_engine("cpu_disk", controller__url=controller.url, controller__instance_id="node-attack",
                           controller__heartbeat_s="0.05", p2p__transport=transport,
                           p2p__timeout_s=str(TIMEOUT_S), **overrides)

    return make


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def listening_side_sockets(port: int) -> set[str]:
    """The "socket:[inode]" names of this machine's TCP sockets whose local port is `port`."""
    names = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in open(table).read().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    names.add(f"socket:[{fields[9]}]")
    return names


def leaked_fds(before: set[str], controller_port: int) -> set[str]:
    """What the fds opened since `before` point at, less those closed meanwhile and the stand-in
    controller's own side of its connections (its server thread closes those on its own schedule;
    the engine's side of them would be a leak)."""
    opened = open_fds() - before
    server_side = listening_side_sockets(controller_port)
    leaked = set()
    for fd in opened:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # closed since the listing
            continue
        if target not in server_side:
            leaked.add(target)
    return leaked


def test_a_p2p_port_in_use_fails_the_engine_and_leaves_nothing_open(p2p_engine, controller, tmp_path):
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        p2p_engine(p2p__port=str(busy.getsockname()[1]))  # warm up imports (their fds stay)
    except ConfigError:
        pass
    fds, threads = open_fds(), threading.active_count()
    try:
        with pytest.raises(ConfigError, match="p2p"):
            p2p_engine(p2p__port=str(busy.getsockname()[1]), disk_path=tmp_path / "disk2")
    finally:
        busy.close()
    # The disk tier opened its directory before the P2P parts failed: it is closed again.
    controller_port = int(controller.url.rsplit(":", 1)[1])
    assert leaked_fds(fds, controller_port) == set(), "a failed construction left file descriptors open"
    assert threading.active_count() <= threads


def test_transport_nixl_where_nixl_is_unusable_is_a_config_error(p2p_engine, monkeypatch):
    from kvtier.p2p import nixl_transport

    monkeypatch.setattr(nixl_transport, "nixl_status", lambda: "UCX is not here (simulated)")
    threads = threading.active_count()
    with pytest.raises(ConfigError, match=r"p2p\.transport.*UCX is not here"):
        p2p_engine("nixl")
    assert threading.active_count() <= threads


def test_close_while_p2p_reads_are_in_flight_waits_for_them_and_does_not_hang(p2p_engine):
    engine = p2p_engine("tcp")
    silent = silent_peer()
    url = f"kvtier://127.0.0.1:{silent.getsockname()[1]}"
    tier = engine.tier("p2p")

    class SilentHolder:
        def locate(self, keys):
            keys = list(keys)
            return [PeerHolding(instance_id="silent", p2p_url=url, held=[True] * len(keys),
                                in_memory=[True] * len(keys))]

        def close(self):
            pass

    tier._directory = SilentHolder()
    tokens = seeded_tokens(2 * CHUNK, 5)
    outcome: list[object] = []

    def load() -> None:
        try:
            outcome.append(engine.retrieve(tokens, known_hit=2 * CHUNK)[1])
        except Exception as exc:  # noqa: BLE001 - a closed engine may refuse: not a hang
            outcome.append(exc)

    reader = threading.Thread(target=load)
    reader.start()
    try:
        from waiting import wait_until

        wait_until(lambda: tier._budget.in_flight > 0, "the P2P read is in flight")
        started = time.monotonic()
        engine.close()
        closed = time.monotonic()
        # (Read at once: the reader thread's own clock after retrieve returned may run after this.)
        reads_left = tier._budget.in_flight
        reader.join(TIMEOUT_S + MARGIN_S)
        assert not reader.is_alive() and outcome[0] in (0,)
        assert closed - started < TIMEOUT_S + MARGIN_S, "close() hung on a stalled peer"
        assert reads_left == 0, "close() returned while a P2P read could still write into a slab"
    finally:
        silent.close()
