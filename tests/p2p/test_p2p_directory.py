"""Tests for kvtier/p2p/directory.py (PeerDirectory): who holds which chunks, asked of a real
kvtier_controller (engines joined by HTTP alone: only the controller's index matters here), and of
a stand-in controller in a thread (real HTTP) for the failures the real one does not produce.
"""

from __future__ import annotations

import os
import socket

import pytest
from conftest import FakeClock
from fleet_processes import ControllerProcess
from p2p_reader_doubles import StandInController, fleet_config, join, key, peers_requests

from kvtier.fleet.messages import MAX_PEER_KEYS
from kvtier.metrics import Metrics
from kvtier.p2p.directory import PeerDirectory, leading_run

T, F = True, False


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    # Joined engines never heartbeat here: a long timeout keeps them up for the module.
    proc = ControllerProcess(tmp_path_factory.mktemp("controller"), {"heartbeat_timeout_s": 600.0})
    yield proc
    proc.stop()


@pytest.fixture
def ns() -> bytes:
    return os.urandom(8)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(["cpu", "p2p"])


def errors(metrics: Metrics) -> int:
    return int(metrics.value("kvtier_tier_errors_total", {"tier": "p2p"}))


@pytest.fixture
def make_directory(metrics):
    made = []

    def make(url: str, ttl_s: float = 1.0, clock=None, **fleet) -> PeerDirectory:
        kwargs = {"clock": clock} if clock is not None else {}
        made.append(PeerDirectory(fleet_config(url, **fleet), ttl_s, metrics, **kwargs))
        return made[-1]

    yield make
    for directory in made:
        directory.close()


def test_locate_ranks_holders_and_leaves_the_asker_out(controller, ns, make_directory):
    keys = [key(ns, i) for i in range(5)]
    tag = ns.hex()[:8]
    join(controller, f"self-{tag}", "kvtier://127.0.0.1:7300", {"cpu": keys})
    join(controller, f"a-{tag}", "kvtier://127.0.0.1:7301", {"disk": keys[:3], "cpu": keys[:1]})
    join(controller, f"b-{tag}", "kvtier://127.0.0.1:7302", {"cpu": keys[3:]})
    join(controller, f"c-{tag}", None, {"cpu": keys})  # no P2P endpoint
    directory = make_directory(controller.url)
    directory.instance_id = f"self-{tag}"
    got = [(p.instance_id, p.p2p_url, p.held, p.in_memory) for p in directory.locate(keys)]
    assert got == [(f"a-{tag}", "kvtier://127.0.0.1:7301", [T, T, T, F, F], [T, F, F, F, F]),
                   (f"b-{tag}", "kvtier://127.0.0.1:7302", [F, F, F, T, T], [F, F, F, T, T])]
    assert directory.locate([key(ns, 99)]) == []


def test_answers_are_cached_for_the_ttl(controller, ns, make_directory):
    """has() then get() costs one round trip; a key that arrives meanwhile shows after the TTL."""
    keys = [key(ns, i) for i in range(3)]
    join(controller, f"d-{ns.hex()[:8]}", "kvtier://127.0.0.1:7303", {"cpu": keys[:1]})
    clock = FakeClock()
    directory = make_directory(controller.url, ttl_s=1.0, clock=clock)
    before = peers_requests(controller)
    first = directory.locate(keys)
    assert [p.held for p in first] == [[T, F, F]]
    join(controller, f"e-{ns.hex()[:8]}", "kvtier://127.0.0.1:7304", {"cpu": keys})
    assert directory.locate(keys) == first  # cached: no round trip
    assert directory.locate(keys[:1]) == [p.model_copy(update={"held": [T], "in_memory": [T]}) for p in first]
    assert peers_requests(controller) == before + 1
    clock.now += 1.0
    assert sorted(p.held for p in directory.locate(keys)) == [[T, F, F], [T, T, T]]
    assert peers_requests(controller) == before + 2


def test_many_keys_go_in_chunks_of_max_peer_keys(controller, ns, make_directory):
    keys = [key(ns, i) for i in range(MAX_PEER_KEYS + 10)]
    join(controller, f"f-{ns.hex()[:8]}", "kvtier://127.0.0.1:7305", {"disk": keys[-5:]})
    directory = make_directory(controller.url, ttl_s=0.0)
    before = peers_requests(controller)
    (peer,) = directory.locate(keys)
    assert peer.held == [F] * (len(keys) - 5) + [T] * 5 and not any(peer.in_memory)
    assert peers_requests(controller) == before + 2


def test_a_dead_controller_is_a_miss_asked_once_per_backoff(make_directory, metrics, ns):
    keys = [key(ns, i) for i in range(3)]
    with socket.socket() as sock:  # a port with no server
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    clock = FakeClock()
    directory = make_directory(url, clock=clock, timeout_s=0.5)
    assert directory.locate(keys) == []
    assert errors(metrics) == 3
    assert directory.locate(keys) == []  # backing off: not asked, not counted
    assert errors(metrics) == 3
    clock.now += 1.0  # past the first back-off: one probe
    assert directory.locate(keys) == []
    assert errors(metrics) == 6


def test_a_failing_or_garbling_controller_never_raises(make_directory, metrics, ns):
    keys = [key(ns, i) for i in range(2)]
    answers = iter([(500, {"detail": "boom"}),
                    (200, {"peers": [{"instance_id": "x", "p2p_url": "kvtier://127.0.0.1:1", "held": [T],
                                      "in_memory": [T]}]}),  # one flag for two keys
                    (200, b"not json"),
                    (200, {"peers": [{"instance_id": "x", "p2p_url": "kvtier://127.0.0.1:1",
                                      "held": [T, F], "in_memory": [F, F]}]})])
    stand_in = StandInController(lambda body: next(answers))
    clock = FakeClock()
    try:
        directory = make_directory(stand_in.url, clock=clock)
        directory.instance_id = "me"
        for n in range(3):
            assert directory.locate(keys) == []
            assert errors(metrics) == 2 * (n + 1)
            clock.now += 100.0  # past any back-off
        (peer,) = directory.locate(keys)
        assert (peer.held, peer.in_memory) == ([T, F], [F, F])
        assert stand_in.bodies[-1] == {"keys": [k.hex() for k in keys], "exclude": "me"}
    finally:
        stand_in.close()


def test_a_wrong_token_is_a_miss_not_an_exception(controller, ns, make_directory, metrics):
    join(controller, f"g-{ns.hex()[:8]}", "kvtier://127.0.0.1:7306", {"cpu": [key(ns, 0)]})
    directory = make_directory(controller.url, token="not-the-token-0123456789")
    assert directory.locate([key(ns, 0)]) == []
    assert errors(metrics) == 1


def test_leading_run():
    assert [leading_run(f) for f in ([], [T], [F, T], [T, T, F, T])] == [0, 1, 0, 2]
