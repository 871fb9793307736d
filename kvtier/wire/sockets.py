"""Socket settings and the vectored send shared by `kvtier_server` and its client tier."""

from __future__ import annotations

import socket
from collections import deque
from itertools import islice

IOV_MAX = 1024  # buffers per sendmsg (Linux's limit)


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay: a reply is a small header then its payloads, and requests are pipelined.

    Socket buffer sizes are left to the kernel on purpose: setting SO_SNDBUF / SO_RCVBUF turns off
    TCP autotuning and caps them at net.core.[rw]mem_max (often 4 MiB or less), while autotuning
    grows them to tcp_[rw]mem's maximum (tens of MiB); 32 MiB records moved 25% slower with 4 MiB."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_some(sock: socket.socket, views: deque[memoryview]) -> int:
    """One `sendmsg` of the first IOV_MAX of `views` (byte views, sent in order, never joined);
    what the kernel took is dropped from the front of `views`. The bytes sent; raises what
    `sendmsg` raises (BlockingIOError on a full non-blocking socket, with `views` unchanged)."""
    sent = n = sock.sendmsg(list(islice(views, IOV_MAX)))
    while n:
        first = views[0]
        if n < first.nbytes:
            views[0] = first[n:]
            break
        n -= first.nbytes
        views.popleft()
    return sent
