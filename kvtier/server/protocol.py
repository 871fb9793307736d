"""The kvtier_server wire protocol: one frame format, a sans-IO encoder and an incremental decoder,
shared by the asyncio server and the blocking client tier. Pure code over bytes and buffers; no I/O.

A frame, request or reply:

    offset   size      field
    0        4         H: header length (u32, little endian), 1 <= H <= MAX_HEADER_BYTES
    4        H         header: a msgpack map (fields below)
    4 + H    lens[0]   payload 0, raw bytes
    ...                payload 1, 2, ... back to back in `lens` order (a nil length carries no bytes)

Header fields (absent = empty / none):

    op      int         Op
    id      int         request id (u64) chosen by the client; a reply carries its request's id
    keys    [bin]       24-byte ChunkKeys (namespace digest + prefix hash)
    lens    [int|nil]   payload bytes per entry (u64); nil: no payload (a GET miss)
    heads   [bin|nil]   kvtier.record headers, one per payload (PUT requests, GET replies)
    ns      [bin]       8-byte namespace digests (CLEAR)
    token   str         the shared secret (requests, when the server has one)
    status  int         Status; present in replies only (its presence makes a frame a reply)
    error   str         what went wrong, in replies whose status is not OK
    count   int         EXISTS: leading keys present; DELETE, CLEAR: records removed
    flags   [int]       HAS: 1/0 per key; PUT: PutResult per key
    stats   {str: int}  STATS counters

Ops; every key-taking op is a batch:

    PING    -                       -> OK
    PUT     keys, heads, payloads   -> flags: PutResult per key
    GET     keys                    -> heads, payloads (nil / nil for a miss)
    EXISTS  keys                    -> count: how many leading keys are present (a prefix lookup)
    HAS     keys                    -> flags: 1/0 per key (the per-key form `Tier.has` needs)
    DELETE  keys                    -> count removed
    CLEAR   ns                      -> count removed (every record of those namespaces)
    STATS   -                       -> stats

A record travels as its header (68 bytes, in the msgpack header) plus its payload (the frame's
payload bytes), so a client receives a GET payload straight into its slab with nothing to split.

Decoding (`FrameDecoder`): the reader asks `get_buffer()` where the next bytes go, receives into it
(`recv_into`) and reports `advance(n)`; `next_frame()` then yields each complete frame. Headers are
staged in a small buffer; payloads land in buffers from `alloc` (the server: fresh record buffers;
the client: its destination slabs), directly from the socket once a payload is large, so a 32 MiB
payload is never copied through Python bytes. A header is consumed only when all of it is there, so
a half-received frame leaves the decoder as it was. A bad frame raises `ProtocolError` from
`next_frame()`: when its payload lengths are known and within bounds the decoder skips its payload
and the next frame decodes normally; when they are not (bad length prefix, not msgpack, bad `lens`,
over `max_frame_bytes`) the error is fatal and the decoder refuses further input.
"""

from __future__ import annotations

import mmap
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import msgpack

from kvtier.errors import ProtocolError
from kvtier.keys import KEY_BYTES, NAMESPACE_BYTES

PREFIX = struct.Struct("<I")
MAX_HEADER_BYTES = 16 << 20  # room for ~150k keys with record heads in one frame
MAX_HEAD_BYTES = 4096  # one record header (kvtier.record's is 68 bytes)
DIRECT_MIN = 64 << 10  # payload remainders at least this large are received straight into place
STAGING_BYTES = 256 << 10
MMAP_MIN = 1 << 20
U64_MAX = 2**64 - 1


class Op(IntEnum):
    PING = 0
    PUT = 1
    GET = 2
    EXISTS = 3
    HAS = 4
    DELETE = 5
    CLEAR = 6
    STATS = 7


class Status(IntEnum):
    OK = 0
    BAD_REQUEST = 1  # malformed or inconsistent frame; the connection stays open unless it was fatal
    UNAUTHORIZED = 2  # wrong or missing token; the server closes the connection after the reply
    BUSY = 3  # too many connections; the server closes the connection after the reply
    ERROR = 4  # the server failed to serve a well-formed request


class PutResult(IntEnum):
    STORED = 0
    INVALID = 1  # the record failed validation (header, key, length, checksum): not stored
    TOO_LARGE = 2  # the record is larger than the server's whole capacity


@dataclass(slots=True)
class Frame:
    """One decoded header, plus its payload buffers (`payloads[i]` None where `lengths[i]` is)."""

    op: Op
    request_id: int
    keys: list[bytes] = field(default_factory=list)
    lengths: list[int | None] = field(default_factory=list)
    heads: list[bytes | None] = field(default_factory=list)
    namespaces: list[bytes] = field(default_factory=list)
    token: str | None = None
    status: Status | None = None
    error: str | None = None
    count: int | None = None
    flags: list[int] = field(default_factory=list)
    stats: dict[str, int] | None = None
    payloads: list[memoryview | None] = field(default_factory=list)


# attribute -> wire name, for everything but `lengths` (derived from the payloads) and `payloads`.
_WIRE = {"op": "op", "request_id": "id", "keys": "keys", "heads": "heads", "namespaces": "ns",
         "token": "token", "status": "status", "error": "error", "count": "count", "flags": "flags",
         "stats": "stats"}
_KNOWN = frozenset(_WIRE.values()) | {"lens"}
_OPS = frozenset(int(op) for op in Op)
_STATUSES = frozenset(int(status) for status in Status)


def encode(frame: Frame, payloads: Sequence[object | None] = ()) -> list:
    """`frame` as buffers for `sendmsg` / `writelines`: `[prefix + header, payload, ...]`. Payloads
    (any buffers; None for "no payload") are passed through as views, never copied or joined."""
    views = [None if p is None else memoryview(p).cast("B") for p in payloads]
    fields: dict[str, object] = {}
    for attr, wire in _WIRE.items():
        value = getattr(frame, attr)
        if value is not None and value != []:
            fields[wire] = int(value) if isinstance(value, IntEnum) else value
    if views:
        fields["lens"] = [None if v is None else v.nbytes for v in views]
    header = msgpack.packb(fields, use_bin_type=True)
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}; send fewer keys")
    return [PREFIX.pack(len(header)) + header, *(v for v in views if v is not None and v.nbytes)]


def reply(request: Frame, status: Status = Status.OK, **fields) -> Frame:
    return Frame(request.op, request.request_id, status=status, **fields)


# -- validation ----------------------------------------------------------------------------------


def _is_uint(value: object, limit: int = U64_MAX) -> bool:
    return type(value) is int and 0 <= value <= limit


def _list(fields: dict, name: str, ok: Callable[[object], bool], what: str) -> list:
    value = fields.get(name, [])
    if not isinstance(value, list) or not all(ok(v) for v in value):
        raise ProtocolError(f"header field {name!r} must be a list of {what}")
    return value


def _optional(fields: dict, name: str, ok: Callable[[object], bool], what: str):
    value = fields.get(name)
    if value is not None and not ok(value):
        raise ProtocolError(f"header field {name!r} must be {what}")
    return value


def _is_head(value: object) -> bool:
    return value is None or (isinstance(value, bytes) and len(value) <= MAX_HEAD_BYTES)


def _read_header(raw: bytes, budget: int) -> tuple[dict, list[int | None], int]:
    """The header map, its payload lengths and their total. Every failure here is fatal: without
    trustworthy lengths there is no telling where the next frame starts."""
    try:
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # untrusted bytes: msgpack raises a zoo of types (ValueError, TypeError, ...)
        raise ProtocolError(f"header is not msgpack: {exc}", fatal=True) from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"header is a msgpack {type(fields).__name__}, not a map", fatal=True)
    lens = fields.get("lens", [])
    if not isinstance(lens, list) or not all(n is None or _is_uint(n) for n in lens):
        raise ProtocolError("header field 'lens' must be a list of u64 or nil", fatal=True)
    total = sum(n for n in lens if n is not None)
    if total > budget:
        raise ProtocolError(f"payloads of {total} bytes exceed the frame limit ({budget} bytes left)",
                            fatal=True)
    return fields, lens, total


def _to_frame(fields: dict, lens: list[int | None]) -> Frame:
    unknown = set(fields) - _KNOWN
    if unknown:
        raise ProtocolError(f"unknown header fields {sorted(map(str, unknown))}")
    if not _is_uint(fields.get("id")):
        raise ProtocolError("header field 'id' must be a u64")
    op = fields.get("op")
    if type(op) is not int or op not in _OPS:
        raise ProtocolError(f"unknown op {op!r}")
    status = _optional(fields, "status", lambda s: type(s) is int and s in _STATUSES,
                       "a known status")
    return Frame(
        Op(op), fields["id"],
        keys=_list(fields, "keys", lambda k: isinstance(k, bytes) and len(k) == KEY_BYTES, "24-byte keys"),
        lengths=lens,
        heads=_list(fields, "heads", _is_head, "record headers or nil"),
        namespaces=_list(fields, "ns", lambda n: isinstance(n, bytes) and len(n) == NAMESPACE_BYTES,
                         "8-byte namespaces"),
        token=_optional(fields, "token", lambda t: isinstance(t, str) and len(t) <= 4096, "a string"),
        status=None if status is None else Status(status),
        error=_optional(fields, "error", lambda e: isinstance(e, str), "a string"),
        count=_optional(fields, "count", _is_uint, "a u64"),
        flags=_list(fields, "flags", lambda f: _is_uint(f, 255), "small ints"),
        stats=_optional(fields, "stats", lambda s: isinstance(s, dict) and all(
            isinstance(k, str) and type(v) is int for k, v in s.items()), "a map of str to int"))


def check_request(frame: Frame) -> None:
    """What the server accepts: a request whose fields fit its op. Raises ProtocolError."""
    if frame.status is not None or frame.error is not None or frame.count is not None or frame.flags \
            or frame.stats is not None:
        raise ProtocolError("a request carries reply fields", request_id=frame.request_id)
    op, n = frame.op, len(frame.keys)
    if op is Op.PUT:
        if len(frame.lengths) != n or len(frame.heads) != n or None in frame.lengths or None in frame.heads:
            raise ProtocolError(f"PUT of {n} keys needs {n} heads and {n} payloads, got "
                                f"{len(frame.heads)} and {len(frame.lengths)}", request_id=frame.request_id)
    elif frame.lengths or frame.heads:
        raise ProtocolError(f"{op.name} carries no records", request_id=frame.request_id)
    if (n and op in (Op.PING, Op.STATS, Op.CLEAR)) or (frame.namespaces and op is not Op.CLEAR):
        raise ProtocolError(f"{op.name} takes {'namespaces' if op is Op.CLEAR else 'keys'} only",
                            request_id=frame.request_id)


def check_reply(frame: Frame) -> None:
    """What a client accepts: a reply, with one head per payload. Raises ProtocolError."""
    if frame.status is None:
        raise ProtocolError("expected a reply, got a request", request_id=frame.request_id)
    if len(frame.heads) != len(frame.lengths) or any(
            (h is None) != (n is None) for h, n in zip(frame.heads, frame.lengths)):
        raise ProtocolError("a reply needs one record head per payload", request_id=frame.request_id)


# -- decoding ------------------------------------------------------------------------------------

Alloc = Callable[[Frame, int, int], memoryview]


def anonymous(size: int) -> mmap.mmap:
    """A private anonymous mapping: unlike `bytearray(n)` it is not zeroed up front (its pages fault
    in as data arrives, so a frame that lies about its length costs no memory), and its memory goes
    back to the OS when it is dropped instead of fragmenting the malloc heap."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def default_alloc(frame: Frame, index: int, size: int) -> memoryview:
    """A fresh writable buffer for payload `index` of `frame`: an anonymous mapping when large."""
    return memoryview(anonymous(size) if size >= MMAP_MIN else bytearray(size))


class FrameDecoder:
    """Incremental frame decoder: `get_buffer()` / `advance(n)` (or `feed(data)`), then
    `next_frame()` until None. `check` vets each header before its payloads are allocated (the
    server passes `check_request`, clients `check_reply`); `alloc` gives each payload's buffer."""

    def __init__(self, max_frame_bytes: int, check: Callable[[Frame], None] | None = None,
                 alloc: Alloc = default_alloc):
        if max_frame_bytes <= PREFIX.size:
            raise ValueError(f"max_frame_bytes must exceed {PREFIX.size}, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self._max_header = min(MAX_HEADER_BYTES, max_frame_bytes - PREFIX.size)
        self._check = check
        self._alloc = alloc
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
        return self._wpos == self._rpos and self._frame is None and not self._skip and not self._ready

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
                self._ready.append(self._frame)
                self._frame = None
            elif not self._start_frame(staged):
                return

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
            fields, lens, total = _read_header(raw, self.max_frame_bytes - PREFIX.size - size)
        except ProtocolError as exc:
            return self._fail(exc)
        try:
            frame = _to_frame(fields, lens)
            if self._check is not None:
                self._check(frame)
        except ProtocolError as exc:
            rid = fields.get("id")
            exc.request_id = rid if _is_uint(rid) else None
            self._skip = total
            self._ready.append(exc)
            return True
        self._frame = frame
        frame.payloads = [None if n is None else self._payload(frame, i, n) for i, n in enumerate(lens)]
        self._sinks = deque(p for p in frame.payloads if p is not None and len(p))
        return True

    def _payload(self, frame: Frame, index: int, size: int) -> memoryview:
        buf = memoryview(self._alloc(frame, index, size)).cast("B")
        if len(buf) != size:
            raise ValueError(f"alloc gave {len(buf)} bytes for a payload of {size}")
        return buf

    def _fail(self, exc: ProtocolError) -> bool:
        self._dead = exc
        self._ready.append(exc)
        return False
