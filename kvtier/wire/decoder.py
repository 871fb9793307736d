"""The kvtier_server frame decoder: incremental, sans-IO, shared by the server and its clients.

`FrameDecoder`: the reader asks `get_buffer()` where the next bytes go, receives into it
(`recv_into`) and reports `advance(n)`; `next_frame()` then yields each complete frame. Headers are
staged in a small buffer; payloads land in buffers from `alloc` (the server: fresh record buffers;
the client: its destination slabs), directly from the socket once a payload is large, so a 32 MiB
payload is never copied through Python bytes. A header is consumed only when all of it is there, so
a half-received frame leaves the decoder as it was. `admit(total)`, when given, is asked before a
frame's payload buffers are allocated; False holds the frame (nothing allocated) until `resume()`:
how the server bounds the bytes being received over all connections. A `one_frame` decoder stops
after one frame until `upgrade()` (the server's handshake: HELLO under small limits, then the rest).
A bad frame raises `ProtocolError` from `next_frame()`: when its payload lengths are known and
within bounds the decoder skips its payload and the next frame decodes normally; when they are not
(bad length prefix, not msgpack, bad `lens`, over `max_frame_bytes`) the error is fatal and the
decoder refuses further input.
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Callable

from kvtier.errors import ProtocolError
from kvtier.wire.frames import MAX_HEADER_BYTES, PREFIX, Frame, is_uint, read_header, to_frame

DIRECT_MIN = 64 << 10  # payload remainders at least this large are received straight into place
STAGING_BYTES = 256 << 10
MMAP_MIN = 1 << 20

Alloc = Callable[[Frame, int, int], memoryview]


def anonymous(size: int) -> mmap.mmap:
    """A private anonymous mapping: unlike `bytearray(n)` it is not zeroed up front (its pages fault
    in as data arrives, so a frame that lies about its length costs no memory), and its memory goes
    back to the OS when it is dropped instead of fragmenting the malloc heap."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def fresh_buffer(size: int) -> memoryview:
    """A writable buffer of `size` bytes: an anonymous mapping when large, so that a burst of
    large buffers gives its memory back to the OS once dropped (1 MiB bytearrays stay in the malloc
    heap: after a burst of spill reads the server kept 3x its capacity in RSS)."""
    return memoryview(anonymous(size) if size >= MMAP_MIN else bytearray(size))


def default_alloc(frame: Frame, index: int, size: int) -> memoryview:
    """A fresh writable buffer for payload `index` of `frame`."""
    return fresh_buffer(size)


class FrameDecoder:
    """Incremental frame decoder: `get_buffer()` / `advance(n)` (or `feed(data)`), then
    `next_frame()` until None. `check` vets each header before its payloads are allocated (the
    server passes `check_request`, clients `check_reply`); `alloc` gives each payload's buffer."""

    def __init__(self, max_frame_bytes: int, check: Callable[[Frame], None] | None = None,
                 alloc: Alloc = default_alloc, admit: Callable[[int], bool] | None = None,
                 one_frame: bool = False):
        self._set_limits(max_frame_bytes, check)
        self._alloc = alloc
        self._admit = admit
        self._frames_left = 1 if one_frame else None  # one_frame: decode one, then wait for upgrade()
        self._held: tuple[Frame, list[int | None], int] | None = None  # a frame admit() refused
        self._buf = anonymous(STAGING_BYTES)  # staged bytes are _buf[_rpos:_wpos]
        self._view = memoryview(self._buf)
        self._rpos = self._wpos = 0
        self._need = PREFIX.size  # staged bytes the frame header in progress needs
        self._frame: Frame | None = None  # the frame whose payloads are arriving
        self._sinks: deque[memoryview] = deque()  # the unfilled rest of its payload buffers
        self._skip = 0  # payload bytes of a rejected frame still to discard
        self._given = 0  # size of the buffer get_buffer() last handed out
        self._direct = False  # ... and whether it was a payload buffer rather than staging
        self._ready: deque[Frame | ProtocolError] = deque()
        self._dead: ProtocolError | None = None

    @property
    def idle(self) -> bool:
        """True between frames: nothing staged, no frame half received, nothing left to pull."""
        return (self._wpos == self._rpos and self._frame is None and not self._skip and not self._ready
                and self._held is None)

    def upgrade(self, max_frame_bytes: int, check: Callable[[Frame], None] | None) -> None:
        """New limits and check (the server's, once a handshake succeeded); decoding goes on
        past the one frame a `one_frame` decoder stopped after."""
        self._set_limits(max_frame_bytes, check)
        self._frames_left = None
        self._process()

    def resume(self) -> None:
        """Ask `admit` again for the held frame (the caller has freed room) and decode on."""
        if self._dead is None:
            self._process()

    @property
    def holding(self) -> bool:
        """True while a frame waits for `admit`; the reader should stop reading until `resume()`."""
        return self._held is not None

    def _set_limits(self, max_frame_bytes: int, check: Callable[[Frame], None] | None) -> None:
        if max_frame_bytes <= PREFIX.size:
            raise ValueError(f"max_frame_bytes must exceed {PREFIX.size}, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._max_header = min(MAX_HEADER_BYTES, max_frame_bytes - PREFIX.size)
        self._check = check

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (write at most its length, then call `advance`)."""
        if self._dead is not None:
            raise self._dead
        if self._sinks and self._rpos == self._wpos and len(self._sinks[0]) >= DIRECT_MIN:
            self._direct, buf = True, self._sinks[0]
        else:
            self._direct = False
            self._make_room()
            buf = self._view[self._wpos:]
        self._given = len(buf)
        return buf

    def advance(self, n: int) -> None:
        """`n` bytes were written at the start of the last `get_buffer()`; decode what is complete."""
        if self._dead is not None:
            raise self._dead
        if not 0 <= n <= self._given:
            raise ValueError(f"advance({n}) after get_buffer() of {self._given} bytes")
        self._given = 0
        if self._direct:
            self._sinks[0] = self._sinks[0][n:]
            if not self._sinks[0]:
                self._sinks.popleft()
        else:
            self._wpos += n
        self._process()

    def feed(self, data) -> None:
        """Copy `data` in (tests and small callers; sockets should use get_buffer/advance)."""
        view = memoryview(data).cast("B")
        while view and self._dead is None:
            buf = self.get_buffer()
            k = min(len(buf), len(view))
            buf[:k] = view[:k]
            self.advance(k)
            view = view[k:]

    def close(self) -> None:
        """Drop every buffer now: the staging buffer, a half-received frame's payload buffers and
        decoded frames not yet taken; the decoder is dead afterwards. For owners that end a stream
        early: the decoder and its owner usually reference each other (`admit` is the owner's
        method), so without this the buffers of a connection closed mid-frame wait for the cyclic
        garbage collector, which may not run for a long time (8 peers dropping 60 MiB PUTs
        half-way left the server 480 MiB larger)."""
        self._dead = ProtocolError("the decoder is closed", fatal=True)
        self._frame = self._held = None
        self._sinks.clear()
        self._ready.clear()
        self._alloc = self._admit = self._check = None
        self._buf = self._view = None
        self._rpos = self._wpos = self._skip = 0

    def next_frame(self) -> Frame | None:
        """The next complete frame, None when more bytes are needed. Raises the ProtocolError of a
        bad frame in its place (fatal ones: the decoder is dead; others: decoding goes on after)."""
        if not self._ready:
            return None
        item = self._ready.popleft()
        if isinstance(item, ProtocolError):
            raise item
        return item

    # -- internals -----------------------------------------------------------------------------

    def _make_room(self) -> None:
        staged = self._wpos - self._rpos
        if not staged:
            self._rpos = self._wpos = 0
            if len(self._buf) > STAGING_BYTES:  # a big header grew it: give the memory back
                self._set_buffer(anonymous(STAGING_BYTES))
        want = max(self._need, staged + 4096)
        if len(self._buf) - self._rpos >= want:
            return
        if len(self._buf) >= want:  # compact in place
            self._view[:staged] = self._view[self._rpos:self._wpos]
        else:
            new = anonymous(want)
            new[:staged] = self._view[self._rpos:self._wpos]
            self._set_buffer(new)
        self._rpos, self._wpos = 0, staged

    def _set_buffer(self, buf: mmap.mmap) -> None:
        self._buf, self._view = buf, memoryview(buf)

    def _process(self) -> None:
        while True:
            staged = self._wpos - self._rpos
            if self._skip:
                k = min(self._skip, staged)
                self._rpos += k
                self._skip -= k
                if self._skip:
                    return
            elif self._frame is not None:
                while self._sinks and staged:
                    sink = self._sinks[0]
                    k = min(len(sink), staged)
                    sink[:k] = self._view[self._rpos:self._rpos + k]
                    self._rpos += k
                    staged -= k
                    self._sinks[0] = sink[k:]
                    if not self._sinks[0]:
                        self._sinks.popleft()
                if self._sinks:
                    return
                self._queue(self._frame)
                self._frame = None
            elif self._held is not None:
                if not self._admit(self._held[2]):
                    return
                self._begin(*self._held[:2])
                self._held = None
            elif self._frames_left == 0 or not self._start_frame(staged):
                return

    def _queue(self, item: Frame | ProtocolError) -> None:
        self._ready.append(item)
        if self._frames_left is not None:
            self._frames_left -= 1

    def _start_frame(self, staged: int) -> bool:
        """Decode the next header if it is all staged; False when more bytes are needed or dead."""
        if staged < PREFIX.size:
            return False
        (size,) = PREFIX.unpack_from(self._buf, self._rpos)
        if not 0 < size <= self._max_header:
            bad = ProtocolError(f"header length {size} outside 1..{self._max_header}", fatal=True)
            return self._fail(bad)
        self._need = PREFIX.size + size
        if staged < self._need:
            return False
        raw = bytes(self._view[self._rpos + PREFIX.size:self._rpos + self._need])
        self._rpos += self._need
        self._need = PREFIX.size
        try:
            fields, lens, total = read_header(raw, self.max_frame_bytes - PREFIX.size - size)
        except ProtocolError as exc:
            return self._fail(exc)
        try:
            frame = to_frame(fields, lens)
            if self._check is not None:
                self._check(frame)
        except ProtocolError as exc:
            rid = fields.get("id")
            exc.request_id = rid if is_uint(rid) else None
            self._skip = total
            self._queue(exc)
            return True
        if total and self._admit is not None and not self._admit(total):
            self._held = (frame, lens, total)
            return False
        self._begin(frame, lens)
        return True

    def _begin(self, frame: Frame, lens: list[int | None]) -> None:
        """Allocate the payload buffers of an accepted frame; its bytes go there next."""
        self._frame = frame
        frame.payloads = [None if n is None else self._payload(frame, i, n) for i, n in enumerate(lens)]
        self._sinks = deque(p for p in frame.payloads if p is not None and len(p))

    def _payload(self, frame: Frame, index: int, size: int) -> memoryview:
        buf = memoryview(self._alloc(frame, index, size)).cast("B")
        if len(buf) != size:
            raise ValueError(f"alloc gave {len(buf)} bytes for a payload of {size}")
        return buf

    def _fail(self, exc: ProtocolError) -> bool:
        self._dead = exc
        self._ready.append(exc)
        return False
