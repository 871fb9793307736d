"""The kvtier_server wire protocol: one frame format, its encoder and its validation, shared by the
asyncio server and the blocking client tier (the incremental decoder is `kvtier.wire.decoder`).
Pure code over bytes and buffers; no I/O.

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
    version int         PROTOCOL_VERSION (HELLO request and reply)
    token   str         the shared secret (HELLO only, when the server has one)
    status  int         Status; present in replies only (its presence makes a frame a reply)
    error   str         what went wrong, in replies whose status is not OK
    count   int         EXISTS: leading keys present; DELETE, CLEAR, RELEASE: records removed
    slots   [int|nil]   LEASE replies: the holder's memory slot of each leased record (nil: not leased)
    lease   int         LEASE replies: the lease's id; RELEASE requests: the lease to end
    flags   [int]       HAS: 1/0 per key; PUT: PutResult per key
    stats   {str: int}  STATS counters

Ops; every key-taking op is a batch of at most MAX_KEYS keys:

    HELLO   version, token          -> version; the first frame on every connection (see below)
    PING    -                       -> OK
    PUT     keys, heads, payloads   -> flags: PutResult per key
    GET     keys                    -> heads, payloads (nil / nil for a miss)
    EXISTS  keys                    -> count: how many leading keys are present (a prefix lookup)
    HAS     keys                    -> flags: 1/0 per key (the per-key form `Tier.has` needs)
    DELETE  keys                    -> count removed
    CLEAR   ns                      -> count removed (every record of those namespaces)
    STATS   -                       -> stats
    LEASE   keys                    -> heads, slots, lease (P2P over NIXL: records to READ)
    RELEASE lease                   -> count (P2P: the reader is done with the lease)
    CONNECT -                       -> stats (slot geometry), heads [b""], payload: NIXL metadata

kvtier_server answers the first nine; an instance's P2P endpoint (kvtier.p2p.peer_server) answers
HELLO, PING, HAS, GET, STATS, LEASE, RELEASE and CONNECT; each answers BAD_REQUEST to the rest.

A connection starts with a HELLO and nothing else: until the server has answered it OK, the server
accepts one frame of at most HELLO_HEADER_BYTES with no payload (`check_hello`), so a peer without
the token never gets a payload buffer. A wrong token, another version or another first frame is
answered and the connection closed.

Bounds, derived from the ops that exist: a header is at most MAX_HEADER_BYTES (64 KiB plus
PER_KEY_BYTES for each of MAX_KEYS keys: room for the largest PUT or GET reply), msgpack maps have
at most MAX_FIELDS entries, arrays MAX_KEYS, binaries MAX_HEAD_BYTES and strings MAX_TEXT_BYTES, so
decoding a header costs bounded time and memory before any field is looked at; error messages are
cut to MAX_ERROR_CHARS.

A record travels as its header (68 bytes, in the msgpack header) plus its payload (the frame's
payload bytes), so a client receives a GET payload straight into its slab with nothing to split.

`read_header` and `to_frame` turn one header's bytes into a Frame, raising ProtocolError (fatal when
the payload lengths cannot be trusted); `kvtier.wire.decoder.FrameDecoder` runs them on a stream.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import msgpack

from kvtier.errors import ProtocolError
from kvtier.keys import KEY_BYTES, NAMESPACE_BYTES

PREFIX = struct.Struct("<I")
PROTOCOL_VERSION = 1
# Keys (or namespaces) per frame: 1024 chunks of 256 tokens is a 256K-token prompt, and a client
# pipelines more frames at no extra round trip. It sets MAX_HEADER_BYTES, hence the worst header
# decode: ~25 ms for 256 KiB of the costliest msgpack (empty maps), ~4 ms of empty arrays.
MAX_KEYS = 1024
MAX_HEAD_BYTES = 128  # one record header (kvtier.record's is 68 bytes)
MAX_TEXT_BYTES = 4096  # a token, an error message, a counter name
MAX_FIELDS = 64  # entries in a msgpack map: a header's fields (15 known), STATS counters
# A PUT entry is the largest per key: key (bin8: 2 + 24) + head (2 + 128) + length (u64: 9) = 165.
PER_KEY_BYTES = 192
MAX_HEADER_BYTES = (64 << 10) + MAX_KEYS * PER_KEY_BYTES  # 256 KiB
HELLO_HEADER_BYTES = 8 << 10  # the only frame accepted before the handshake: version and token
HELLO_READ = PREFIX.size + HELLO_HEADER_BYTES  # a server reads at most this much at once before the handshake
MAX_ERROR_CHARS = 200  # error messages in replies are cut to this
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
    HELLO = 8
    LEASE = 9
    RELEASE = 10
    CONNECT = 11


class Status(IntEnum):
    OK = 0
    BAD_REQUEST = 1  # malformed or inconsistent frame; the connection stays open unless it was fatal
    UNAUTHORIZED = 2  # wrong or missing token; the server closes the connection after the reply
    BUSY = 3  # too many authenticated connections; the server closes the connection after the reply
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
    version: int | None = None
    status: Status | None = None
    error: str | None = None
    count: int | None = None
    flags: list[int] = field(default_factory=list)
    stats: dict[str, int] | None = None
    slots: list[int | None] = field(default_factory=list)
    lease: int | None = None
    payloads: list[memoryview | None] = field(default_factory=list)


# attribute -> wire name, for everything but `lengths` (derived from the payloads) and `payloads`.
_WIRE = {"op": "op", "request_id": "id", "keys": "keys", "heads": "heads", "namespaces": "ns",
         "token": "token", "version": "version", "status": "status", "error": "error", "count": "count",
         "flags": "flags", "stats": "stats", "slots": "slots", "lease": "lease"}
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
    if fields.get("error") is not None:
        fields["error"] = short(fields["error"])
    return Frame(request.op, request.request_id, status=status, **fields)


def short(text: str) -> str:
    """`text` cut to MAX_ERROR_CHARS: an error reply never echoes a request's bulk back."""
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


# -- validation ----------------------------------------------------------------------------------


def is_uint(value: object, limit: int = U64_MAX) -> bool:
    return type(value) is int and 0 <= value <= limit


def _list(fields: dict, name: str, ok: Callable[[object], bool], what: str) -> list:
    value = fields.get(name, ())
    if not isinstance(value, tuple) or not all(ok(v) for v in value):
        raise ProtocolError(f"header field {name!r} must be a list of {what}")
    return list(value)


def _optional(fields: dict, name: str, ok: Callable[[object], bool], what: str):
    value = fields.get(name)
    if value is not None and not ok(value):
        raise ProtocolError(f"header field {name!r} must be {what}")
    return value


def _is_head(value: object) -> bool:
    return value is None or (isinstance(value, bytes) and len(value) <= MAX_HEAD_BYTES)


def read_header(raw: bytes, budget: int) -> tuple[dict, list[int | None], int]:
    """The header map, its payload lengths and their total. Every failure here is fatal: without
    trustworthy lengths there is no telling where the next frame starts."""
    try:
        # The limits make msgpack refuse an oversized map, array or string from its length prefix,
        # before building it: a header of a million unknown fields costs nothing to refuse. Arrays
        # as tuples: a header of nested empty arrays decodes 25x faster (no list objects, no GC).
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=False, max_map_len=MAX_FIELDS,
                                 max_array_len=MAX_KEYS, max_bin_len=MAX_HEAD_BYTES,
                                 max_str_len=MAX_TEXT_BYTES, max_ext_len=0)
    except Exception as exc:  # untrusted bytes: msgpack raises a zoo of types (ValueError, TypeError, ...)
        raise ProtocolError(short(f"header is not msgpack (or over a limit): {exc}"), fatal=True) from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"header is a msgpack {type(fields).__name__}, not a map", fatal=True)
    lens = fields.get("lens", ())
    if not isinstance(lens, tuple) or not all(n is None or is_uint(n) for n in lens):
        raise ProtocolError("header field 'lens' must be a list of u64 or nil", fatal=True)
    lens = list(lens)
    total = sum(n for n in lens if n is not None)
    if total > budget:
        raise ProtocolError(f"payloads of {total} bytes exceed the frame limit ({budget} bytes left)",
                            fatal=True)
    return fields, lens, total


def to_frame(fields: dict, lens: list[int | None]) -> Frame:
    unknown = sorted(map(str, set(fields) - _KNOWN))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ProtocolError(short(f"unknown header field {unknown[0]!r}{more}"))
    if not is_uint(fields.get("id")):
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
        token=_optional(fields, "token", lambda t: isinstance(t, str), "a string"),
        version=_optional(fields, "version", is_uint, "a u64"),
        status=None if status is None else Status(status),
        error=_optional(fields, "error", lambda e: isinstance(e, str), "a string"),
        count=_optional(fields, "count", is_uint, "a u64"),
        flags=_list(fields, "flags", lambda f: is_uint(f, 255), "small ints"),
        stats=_optional(fields, "stats", lambda s: isinstance(s, dict) and all(
            isinstance(k, str) and type(v) is int for k, v in s.items()), "a map of str to int"),
        slots=_list(fields, "slots", lambda v: v is None or is_uint(v), "u64 or nil"),
        lease=_optional(fields, "lease", is_uint, "a u64"))


def check_request(frame: Frame) -> None:
    """What the server accepts: a request whose fields fit its op. Raises ProtocolError."""
    if frame.status is not None or frame.error is not None or frame.count is not None or frame.flags \
            or frame.stats is not None or frame.slots:
        raise ProtocolError("a request carries reply fields", request_id=frame.request_id)
    op, n = frame.op, len(frame.keys)
    if (op is Op.RELEASE) != (frame.lease is not None):
        raise ProtocolError("RELEASE carries a lease id, and only RELEASE", request_id=frame.request_id)
    if op is Op.HELLO and frame.version is None:
        raise ProtocolError("HELLO carries the protocol version", request_id=frame.request_id)
    if op is not Op.HELLO and (frame.version is not None or frame.token is not None):
        raise ProtocolError("version and token belong in HELLO", request_id=frame.request_id)
    if op is Op.PUT:
        if len(frame.lengths) != n or len(frame.heads) != n or None in frame.lengths or None in frame.heads:
            raise ProtocolError(f"PUT of {n} keys needs {n} heads and {n} payloads, got "
                                f"{len(frame.heads)} and {len(frame.lengths)}", request_id=frame.request_id)
    elif frame.lengths or frame.heads:
        raise ProtocolError(f"{op.name} carries no records", request_id=frame.request_id)
    keyless = (Op.HELLO, Op.PING, Op.STATS, Op.CLEAR, Op.RELEASE, Op.CONNECT)
    if (n and op in keyless) or (frame.namespaces and op is not Op.CLEAR):
        raise ProtocolError(f"{op.name} takes {'namespaces' if op is Op.CLEAR else 'keys'} only",
                            request_id=frame.request_id)


def check_hello(frame: Frame) -> None:
    """What the server accepts before the handshake: a HELLO request. Raises ProtocolError."""
    check_request(frame)
    if frame.op is not Op.HELLO:
        raise ProtocolError(f"the first frame must be HELLO, not {frame.op.name}",
                            request_id=frame.request_id)


def check_reply(frame: Frame) -> None:
    """What a client accepts: a reply, with one head per payload. Raises ProtocolError."""
    if frame.status is None:
        raise ProtocolError("expected a reply, got a request", request_id=frame.request_id)
    # A LEASE reply's heads pair with its slots (the records stay in the holder's memory).
    pairs = frame.slots if frame.op is Op.LEASE else frame.lengths
    if frame.op is Op.LEASE and frame.lengths:
        raise ProtocolError("a LEASE reply carries no payloads", request_id=frame.request_id)
    if len(frame.heads) != len(pairs) or any((h is None) != (n is None) for h, n in zip(frame.heads, pairs)):
        what = "slot" if frame.op is Op.LEASE else "payload"
        raise ProtocolError(f"a reply needs one record head per {what}", request_id=frame.request_id)
