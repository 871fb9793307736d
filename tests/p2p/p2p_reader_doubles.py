"""What the reader-side tests share (tests/p2p/test_p2p_directory.py, test_p2p_tier.py): engines that
joined a real controller by HTTP alone (a registration with a `p2p_url` and `stored` events, no engine
process: the directory test only needs the controller's index), a stand-in controller in a thread
(real HTTP, answers the test chooses: 500s, garbage, stalls), a stand-in peer endpoint (the kvtier
wire in a thread, serving corrupt records), a peer that never answers, a stand-in NIXL endpoint
(copies between two pools' arenas in this process), seeded records and pool-like slabs.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from fleet_processes import TOKEN, ControllerProcess

from kvtier.config import FleetConfig
from kvtier.fleet.http_client import JsonClient
from kvtier.keys import ChunkKey
from kvtier.memory import MemoryPool
from kvtier.record import encode_header
from kvtier.wire.decoder import FrameDecoder
from kvtier.wire.frames import PROTOCOL_VERSION, Frame, Op, Status, check_request, encode, reply


def key(ns: bytes, i: int) -> ChunkKey:
    return ChunkKey(ns, i.to_bytes(16, "little"))


def fleet_config(url: str, token: str | None = TOKEN, timeout_s: float = 5.0) -> FleetConfig:
    return FleetConfig(url=url, token=token, timeout_s=timeout_s)


def join(controller: ControllerProcess, instance_id: str, p2p_url: str | None,
         held: dict[str, list[ChunkKey]]) -> None:
    """Register an engine (tiers cpu, disk) at the controller and report `held` keys per tier."""
    client = JsonClient(controller.url, controller.token, 10.0)
    try:
        joined = client.post("/v1/instances/register", {
            "instance_id": instance_id, "kind": "engine", "command_url": "http://127.0.0.1:9",
            "command_token": "t" * 32, "model_id": "p2p-model", "namespace": "00" * 8, "chunk_size": 16,
            "tiers": [{"name": t, "chunks": 0, "bytes_used": 0, "capacity_bytes": 1 << 20}
                      for t in ("cpu", "disk")], "p2p_url": p2p_url})
        events = [{"op": "stored", "tier": tier, "keys": [k.hex() for k in keys]}
                  for tier, keys in held.items()]
        client.post(f"/v1/instances/{instance_id}/events", {"session": joined["session"], "seq": 0,
                                                            "events": events})
    finally:
        client.close()


def peers_requests(controller: ControllerProcess) -> int:
    """POST /v1/peers requests the controller answered so far."""
    requests = controller.client().get("/v1/stats")["requests"]
    return sum(n for endpoint, n in requests.items() if "peers" in endpoint)


class StandInController:
    """An HTTP server on 127.0.0.1 in a thread: `answer(body) -> (status, reply)` decides each
    POST's reply; `bodies` are the requests it got. Stands in for a controller that fails in ways
    the real one does not (a 500, garbage, a stall)."""

    def __init__(self, answer: Callable[[dict], tuple[int, object]]):
        self.answer = answer
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.bodies.append(body)
                status, reply = outer.answer(body)
                raw = json.dumps(reply).encode() if not isinstance(reply, bytes) else reply
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def record(ns: bytes, i: int, size: int = 4096) -> tuple[ChunkKey, bytes, torch.Tensor]:
    """A valid record: (key, header, seeded uint8 payload of `size` bytes, fp16 [2, 1, 1, size / 4])."""
    k = key(ns, i)
    payload = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
    return k, encode_header(k, (2, 1, 1, size // 4), torch.float16, payload.numpy()), payload


def slab(size: int) -> torch.Tensor:
    """A destination like the memory pool's: larger than the payload, garbage-filled."""
    return torch.full((size + 4096,), 0xAB, dtype=torch.uint8)


class StandInPeer:
    """A kvtier-wire endpoint in a thread that answers what the test says, unchecked: `served` maps
    a key to (header, payload) for GET; `answer(frame)`, when given, answers instead (a list of
    buffers, or None to fall back). `ops` are the requests it got. Stands in for a peer that
    misbehaves in ways the real PeerServer (tests/p2p/test_p2p_server*.py) never does."""

    def __init__(self, served: dict[bytes, tuple[bytes, bytes]] | None = None,
                 answer: Callable[[Frame], list | None] | None = None):
        self.served = served or {}
        self.answer = answer
        self.ops: list[Op] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"kvtier://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            decoder = FrameDecoder(1 << 30, check=check_request)
            try:
                while data := conn.recv(1 << 20):
                    decoder.feed(data)
                    while (frame := decoder.next_frame()) is not None:
                        self.ops.append(frame.op)
                        for buf in self._reply(frame):
                            conn.sendall(buf)
            except OSError:
                return

    def _reply(self, frame: Frame) -> list:
        custom = self.answer(frame) if self.answer is not None else None
        if custom is not None:
            return custom
        if frame.op is Op.HELLO:
            return encode(reply(frame, version=PROTOCOL_VERSION))
        if frame.op is Op.GET:
            found = [self.served.get(bytes(k)) for k in frame.keys]
            return encode(reply(frame, heads=[f[0] if f else None for f in found]),
                          [f[1] if f else None for f in found])
        return encode(reply(frame, Status.BAD_REQUEST, error="not here"))

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def silent_peer() -> socket.socket:
    """A listening socket that never accepts: connections complete in the kernel's backlog, and
    nothing ever answers (a peer stalled mid-transfer, as SIGSTOP would leave it)."""
    return socket.create_server(("127.0.0.1", 0), backlog=64)


class StandInEndpoint:
    """In-process stand-in for kvtier.p2p.nixl_transport.NixlEndpoint over a memory pool's arena:
    `metadata()` names it in ARENAS, and its NixlPeer "READs" by copying slots from the named
    arena. The real endpoint (NIXL with UCX, two processes) is tested in its own module and end to
    end; this one lets the reader's LEASE / READ / RELEASE logic run without NIXL."""

    def __init__(self, pool: MemoryPool, fail_reads: bool = False, corrupt_reads: bool = False,
                 slot_bytes: int | None = None):
        self.pool = pool
        self.name = f"stand-in-{id(self)}"
        ARENAS[self.name] = self
        self.fail_reads, self.corrupt_reads = fail_reads, corrupt_reads
        self.slot_bytes = pool.slab_bytes if slot_bytes is None else slot_bytes
        self.reads: list[list[tuple[int, int]]] = []
        self.connects = 0
        self.peers_closed = 0

    def metadata(self) -> bytes:
        return self.name.encode()

    def geometry(self) -> dict[str, int]:
        return {"base": self.pool.arena.data_ptr(), "stride": self.pool.slab_stride,
                "slot_bytes": self.slot_bytes, "slots": self.pool.num_slabs}

    def slot_of(self, dest: torch.Tensor) -> int | None:
        offset = dest.data_ptr() - self.pool.arena.data_ptr()
        if 0 <= offset < self.pool.capacity_bytes and offset % self.pool.slab_stride == 0:
            return offset // self.pool.slab_stride
        return None

    def connect(self, metadata: bytes, geometry: dict[str, int]) -> StandInNixlPeer:
        self.connects += 1
        return StandInNixlPeer(self, ARENAS[metadata.decode()])

    def close(self) -> None:
        ARENAS.pop(self.name, None)


ARENAS: dict[str, StandInEndpoint] = {}


class StandInNixlPeer:
    def __init__(self, local: StandInEndpoint, remote: StandInEndpoint):
        self.local, self.remote, self.name = local, remote, remote.name

    def read(self, pairs, deadline: float) -> bool:
        self.local.reads.append(list(pairs))
        if self.local.fail_reads:
            return False
        for mine, theirs in pairs:
            src = self.remote.pool.arena[theirs * self.remote.pool.slab_stride:][:self.local.slot_bytes]
            dest = self.local.pool.arena[mine * self.local.pool.slab_stride:][:self.local.slot_bytes]
            dest.copy_(src)
            if self.local.corrupt_reads:
                dest[100] ^= 0x10  # one flipped bit on the way
        return True

    def close(self) -> None:
        self.local.peers_closed += 1
