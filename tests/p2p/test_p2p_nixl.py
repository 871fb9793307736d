"""kvtier.p2p.nixl_transport against a holder in another process (tests/p2p/nixl_holder_process.py):
READs land bit-equal (several slots, out of order, four threads at once), a peer with other slot
sizes is refused, a holder killed (before or while we read) or frozen costs a False within the
deadline plus grace, never a hang, and a second holder still serves afterwards; close is idempotent
and refuses later reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from nixl_holder_process import pattern
from waiting import wait_until

from kvtier.p2p.nixl_transport import NixlEndpoint, TransportError, nixl_status

pytestmark = pytest.mark.skipif(nixl_status() is not None, reason=f"NIXL unusable: {nixl_status()}")

SCRIPT = Path(__file__).with_name("nixl_holder_process.py")
SLOTS = 8
SLOT = 64 * 1024
STRIDE = SLOT + 4096  # a gap between slots, as a pool with padding would have
BOUND_S = 1.0 + 1.0 + 2.0  # a 1 s deadline, its grace (>= 1 s), slack for a loaded machine


class Holder:
    def __init__(self, name: str, slots: int = SLOTS, slot_bytes: int = SLOT, stride: int = STRIDE):
        self.slot_bytes = slot_bytes
        self.process = subprocess.Popen([sys.executable, str(SCRIPT), name, str(slots), str(slot_bytes),
                                         str(stride)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        hello = self._reply()
        self.metadata = bytes.fromhex(hello["metadata"])
        self.geometry = hello["geometry"]

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"holder exited with {self.process.wait(5)}")
        return json.loads(line)

    def fill(self, slot: int, seed: int) -> None:
        self.process.stdin.write(json.dumps({"cmd": "fill", "slot": slot, "seed": seed}) + "\n")
        self.process.stdin.flush()
        assert self._reply() == {"ok": True}

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"cmd": "exit"}) + "\n")
            self.process.stdin.flush()
            assert self._reply() == {"ok": True}
            assert self.process.wait(20) == 0


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(name: str, **kwargs) -> Holder:
        started.append(Holder(name, **kwargs))
        return started[-1]

    yield start
    for holder in started:
        if holder.process.poll() is None:
            os.kill(holder.process.pid, signal.SIGCONT)
            holder.kill()


@pytest.fixture
def reader():
    arena = torch.zeros(SLOTS * STRIDE, dtype=torch.uint8)
    endpoint = NixlEndpoint(f"reader-{os.getpid()}", arena, STRIDE, SLOT, SLOTS)
    yield endpoint, arena
    endpoint.close()


def slot(arena: torch.Tensor, i: int) -> torch.Tensor:
    return arena[i * STRIDE:i * STRIDE + SLOT]


def test_reads_land_bit_equal_in_any_order(holders, reader):
    endpoint, arena = reader
    holder = holders("holder-a")
    peer = endpoint.connect(holder.metadata, holder.geometry)
    pairs = [(0, 5), (3, 1), (6, 6), (1, 0), (7, 2)]
    assert peer.read(pairs, time.monotonic() + 5)
    for local, remote in pairs:
        assert torch.equal(slot(arena, local), pattern(remote, SLOT))
    assert slot(arena, 2).count_nonzero() == 0  # nothing written outside the named slots
    assert arena[STRIDE - 4096:STRIDE].count_nonzero() == 0  # nor into the gap after a slot

    with pytest.raises(ValueError, match="out of range"):
        peer.read([(SLOTS, 0)], time.monotonic() + 5)
    holder.fill(5, seed=1234)  # the holder's bytes change: the next read sees them
    assert peer.read([(4, 5)], time.monotonic() + 5)
    assert torch.equal(slot(arena, 4), pattern(1234, SLOT))
    peer.close()
    holder.stop()


def test_four_threads_read_from_one_peer_at_once(holders, reader):
    endpoint, arena = reader
    holder = holders("holder-b")
    peer = endpoint.connect(holder.metadata, holder.geometry)
    failures: list[str] = []

    def read_twice_each(t: int) -> None:
        mine = [2 * t, 2 * t + 1]  # each thread its own local slots
        for round_ in range(10):
            remote = [(t + round_) % SLOTS, (t + round_ + 3) % SLOTS]
            if not peer.read(list(zip(mine, remote)), time.monotonic() + 10):
                failures.append(f"thread {t} round {round_}: read failed")
            for local, r in zip(mine, remote):
                if not torch.equal(slot(arena, local), pattern(r, SLOT)):
                    failures.append(f"thread {t} round {round_}: slot {local} != remote {r}")

    threads = [threading.Thread(target=read_twice_each, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    holder.stop()


def test_a_peer_with_other_slots_is_refused(holders, reader):
    endpoint, _ = reader
    holder = holders("holder-c", slots=4, slot_bytes=2 * SLOT, stride=2 * SLOT)
    with pytest.raises(TransportError, match="slots are"):
        endpoint.connect(holder.metadata, holder.geometry)
    with pytest.raises(TransportError, match="malformed"):
        endpoint.connect(holder.metadata, {"base": 1})
    with pytest.raises(TransportError):
        endpoint.connect(b"not nixl metadata", dict(holder.geometry, slot_bytes=SLOT, stride=SLOT))
    holder.stop()


def timed_read(peer, pairs, deadline_s: float = 1.0) -> tuple[bool, float]:
    started = time.monotonic()
    ok = peer.read(pairs, started + deadline_s)
    return ok, time.monotonic() - started


def test_holder_killed_before_the_read_is_a_false_and_others_go_on(holders, reader):
    endpoint, arena = reader
    doomed, alive = holders("holder-d"), holders("holder-e")
    dead_peer = endpoint.connect(doomed.metadata, doomed.geometry)
    live_peer = endpoint.connect(alive.metadata, alive.geometry)
    assert dead_peer.read([(0, 1)], time.monotonic() + 5)
    doomed.kill()
    ok, took = timed_read(dead_peer, [(0, 2), (1, 3)])
    assert not ok and took < BOUND_S
    assert dead_peer.broken and not dead_peer.read([(0, 2)], time.monotonic() + 5)
    assert live_peer.read([(2, 4), (3, 7)], time.monotonic() + 5)
    assert torch.equal(slot(arena, 2), pattern(4, SLOT)) and torch.equal(slot(arena, 3), pattern(7, SLOT))
    dead_peer.close()
    alive.stop()


def test_holder_killed_while_reading_is_a_false_within_the_deadline(holders):
    slot_bytes, slots = 4 << 20, 8  # 32 MiB per read: the kill lands mid-transfer or between
    arena = torch.zeros(slots * slot_bytes, dtype=torch.uint8)
    endpoint = NixlEndpoint(f"big-reader-{os.getpid()}", arena, slot_bytes, slot_bytes, slots)
    doomed = holders("holder-f", slots=slots, slot_bytes=slot_bytes, stride=slot_bytes)
    peer = endpoint.connect(doomed.metadata, doomed.geometry)
    outcomes: list[tuple[bool, float]] = []
    stop = threading.Event()

    def keep_reading() -> None:
        while not stop.is_set() and not peer.broken:
            outcomes.append(timed_read(peer, [(i, slots - 1 - i) for i in range(slots)]))

    thread = threading.Thread(target=keep_reading)
    thread.start()
    wait_until(lambda: len(outcomes) >= 2 or not thread.is_alive(), "two whole reads", 30)
    doomed.kill()
    thread.join(30)
    stop.set()
    assert not thread.is_alive()
    assert outcomes[0][0] and not outcomes[-1][0]
    assert all(took < BOUND_S for _, took in outcomes)
    second = holders("holder-g", slots=slots, slot_bytes=slot_bytes, stride=slot_bytes)
    fresh = endpoint.connect(second.metadata, second.geometry)
    assert fresh.read([(0, 5)], time.monotonic() + 10)
    assert torch.equal(arena[:slot_bytes], pattern(5, slot_bytes))
    peer.close()
    endpoint.close()
    second.stop()


def test_a_frozen_holder_costs_the_deadline_not_a_hang(holders, reader):
    """Frozen before we connect, the holder cannot complete UCX's wire-up: the READ stays in
    progress until its deadline, is aborted, and the peer is broken; once connected, a same-host
    READ (cma) needs nothing of the holder, so freezing later would not show this."""
    endpoint, _ = reader
    frozen = holders("holder-h")
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        peer = endpoint.connect(frozen.metadata, frozen.geometry)
        ok, took = timed_read(peer, [(1, 1), (2, 2)])
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)
    assert not ok and 1.0 <= took < BOUND_S
    assert peer.broken and not peer.read([(1, 1)], time.monotonic() + 5)
    with pytest.raises(TransportError, match="still use it"):  # its agent is stale until closed
        endpoint.connect(frozen.metadata, frozen.geometry)
    peer.close()
    again = endpoint.connect(frozen.metadata, frozen.geometry)
    assert again.read([(1, 1)], time.monotonic() + 5)
    again.close()
    frozen.stop()


def test_close_is_idempotent_and_refuses_later_reads(holders):
    arena = torch.zeros(SLOTS * STRIDE, dtype=torch.uint8)
    endpoint = NixlEndpoint(f"closing-{os.getpid()}", arena, STRIDE, SLOT, SLOTS)
    holder = holders("holder-i")
    peer = endpoint.connect(holder.metadata, holder.geometry)
    assert peer.read([(0, 3)], time.monotonic() + 5)
    peer.close()
    peer.close()
    assert not peer.read([(0, 3)], time.monotonic() + 5)
    again = endpoint.connect(holder.metadata, holder.geometry)  # the agent loads afresh
    assert again.read([(1, 4)], time.monotonic() + 5)
    endpoint.close()
    endpoint.close()
    assert not again.read([(1, 4)], time.monotonic() + 5)
    with pytest.raises(TransportError, match="closed"):
        endpoint.connect(holder.metadata, holder.geometry)
    holder.stop()


def test_slot_of_names_only_slot_starts_inside_the_arena():
    arena = torch.zeros(SLOTS * STRIDE, dtype=torch.uint8)
    endpoint = NixlEndpoint(f"slots-{os.getpid()}", arena, STRIDE, SLOT, SLOTS)
    try:
        assert endpoint.slot_of(slot(arena, 3)) == 3
        assert endpoint.slot_of(arena[3 * STRIDE:3 * STRIDE + 100]) == 3
        assert endpoint.slot_of(arena[3 * STRIDE + 1:3 * STRIDE + 100]) is None  # not a slot start
        # The memory pool hands out padded slab views (a slab's whole stride): still that slot.
        assert endpoint.slot_of(arena[3 * STRIDE:4 * STRIDE]) == 3
        assert endpoint.slot_of(arena[3 * STRIDE:4 * STRIDE + 1]) is None  # past its slot's stride
        assert endpoint.slot_of(torch.zeros(SLOT, dtype=torch.uint8)) is None     # another buffer
        assert endpoint.geometry() == {"base": arena.data_ptr(), "stride": STRIDE, "slot_bytes": SLOT,
                                       "slots": SLOTS}
    finally:
        endpoint.close()
    with pytest.raises(ValueError, match="do not fit"):
        NixlEndpoint("too-many", arena, STRIDE, SLOT, SLOTS + 1)
