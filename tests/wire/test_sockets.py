"""Tests for kvtier/wire/sockets.py: the vectored send shared by the server's connections and the
remote tier's client sockets."""

from __future__ import annotations

import socket
from collections import deque

from kvtier.wire.sockets import IOV_MAX, send_some, tune_socket


def test_send_some_drops_exactly_what_the_kernel_took_and_keeps_the_rest_in_order():
    # The one "consume n sent bytes" loop, shared by the server's connections and the remote tier:
    # a send the kernel cuts in the middle of a view keeps that view's tail first in line.
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096  # 1 MiB, far more than the socket buffers hold
        views = deque(memoryview(data)[i:i + 3001] for i in range(0, len(data), 3001))
        sent = send_some(ours, views)
        assert 0 < sent < len(data)
        assert sum(v.nbytes for v in views) == len(data) - sent
        assert bytes(views[0]) == data[sent:sent + views[0].nbytes]
        got = bytearray()
        while len(got) < sent:
            got += theirs.recv(1 << 20)
        while views:  # the rest, in order, as the reader drains
            try:
                sent += send_some(ours, views)
            except BlockingIOError:
                got += theirs.recv(1 << 20)
        while len(got) < len(data):
            got += theirs.recv(1 << 20)
        assert bytes(got) == data
    finally:
        ours.close()
        theirs.close()


def test_send_some_passes_at_most_iov_max_views_to_one_sendmsg():
    # sendmsg fails with EMSGSIZE past IOV_MAX buffers, so a batch of many small records must go
    # out over several calls, each taking only the first IOV_MAX views.
    class Recorder:
        def __init__(self):
            self.calls = []

        def sendmsg(self, buffers):
            self.calls.append(len(buffers))
            return sum(memoryview(b).nbytes for b in buffers)

    sock = Recorder()
    views = deque(memoryview(bytes([i % 256])) for i in range(IOV_MAX + 5))
    assert send_some(sock, views) == IOV_MAX
    assert sock.calls == [IOV_MAX] and len(views) == 5
    assert bytes(views[0]) == bytes([IOV_MAX % 256])


def test_tune_socket_turns_off_nagle_and_leaves_buffer_sizes_to_the_kernel():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        tune_socket(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == sndbuf
    finally:
        sock.close()
