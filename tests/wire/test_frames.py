"""Tests for kvtier/wire/frames.py and decoder.py: the sans-IO frame codec, with no sockets at all.

Round trips of every op (requests and replies), incremental decoding (byte by byte, every split
point, many frames in random pieces), payloads received straight into their buffers, and bad input:
recoverable errors (the decoder skips the frame and the next one decodes) versus fatal ones (the
stream cannot be resynchronised: the decoder refuses further input).
"""

from __future__ import annotations

import random
import struct
import time

import msgpack
import pytest

from kvtier.errors import KvtierError, ProtocolError
from kvtier.record import HEADER_SIZE
from kvtier.wire.decoder import DIRECT_MIN, FrameDecoder
from kvtier.wire.frames import (
    MAX_ERROR_CHARS,
    MAX_HEAD_BYTES,
    MAX_HEADER_BYTES,
    MAX_KEYS,
    Frame,
    Op,
    PutResult,
    Status,
    check_hello,
    check_reply,
    check_request,
    encode,
    reply,
)

MAX_FRAME = 64 << 20
KEY_A, KEY_B = bytes(range(24)), bytes(range(100, 124))
NS = b"nsnsnsns"


def wire(frame: Frame, payloads=()) -> bytes:
    return b"".join(bytes(b) for b in encode(frame, payloads))


def raw_frame(fields: dict, payload: bytes = b"") -> bytes:
    """A frame from a hand-made header map (to send what `encode` would never produce)."""
    header = msgpack.packb(fields, use_bin_type=True)
    return struct.pack("<I", len(header)) + header + payload


def decode_all(data: bytes, check=check_request) -> list[Frame]:
    dec = FrameDecoder(MAX_FRAME, check=check)
    dec.feed(data)
    frames = []
    while (frame := dec.next_frame()) is not None:
        frames.append(frame)
    assert dec.idle
    return frames


def payload_bytes(frame: Frame) -> list[bytes | None]:
    return [None if p is None else bytes(p) for p in frame.payloads]


REQUESTS = {
    "hello": (Frame(Op.HELLO, 0, token="secret", version=1), []),
    "ping": (Frame(Op.PING, 1), []),
    "put": (Frame(Op.PUT, 2, keys=[KEY_A, KEY_B], heads=[b"h" * 68, b"i" * 68]),
            [b"payload-a", bytes(300_000)]),
    "get": (Frame(Op.GET, 3, keys=[KEY_A, KEY_B]), []),
    "exists": (Frame(Op.EXISTS, 4, keys=[KEY_A]), []),
    "has": (Frame(Op.HAS, 5, keys=[KEY_A, KEY_B]), []),
    "delete": (Frame(Op.DELETE, 6, keys=[KEY_B]), []),
    "clear": (Frame(Op.CLEAR, 7, namespaces=[NS]), []),
    "stats": (Frame(Op.STATS, 2**64 - 1), []),
}
REPLIES = {
    "hello": (reply(REQUESTS["hello"][0], version=1), []),
    "ping": (reply(REQUESTS["ping"][0]), []),
    "put": (reply(REQUESTS["put"][0], flags=[PutResult.STORED, PutResult.INVALID]), []),
    "get": (reply(REQUESTS["get"][0], heads=[b"h" * 68, None]), [b"payload-a", None]),
    "exists": (reply(REQUESTS["exists"][0], count=1), []),
    "has": (reply(REQUESTS["has"][0], flags=[1, 0]), []),
    "delete": (reply(REQUESTS["delete"][0], count=0), []),
    "clear": (reply(REQUESTS["clear"][0], count=12), []),
    "stats": (reply(REQUESTS["stats"][0], stats={"records": 3, "bytes": 2**40}), []),
    "error": (reply(REQUESTS["get"][0], Status.BAD_REQUEST, error="no"), []),
}


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUESTS)
def test_every_request_round_trips(name):
    frame, payloads = REQUESTS[name]
    (got,) = decode_all(wire(frame, payloads))

    assert (got.op, got.request_id, got.keys, got.heads, got.namespaces, got.token) == (
        frame.op, frame.request_id, frame.keys, frame.heads, frame.namespaces, frame.token)
    assert got.lengths == [len(p) for p in payloads]
    assert payload_bytes(got) == list(payloads)
    assert got.status is None


@pytest.mark.parametrize("name", REPLIES)
def test_every_reply_round_trips(name):
    frame, payloads = REPLIES[name]
    (got,) = decode_all(wire(frame, payloads), check=check_reply)

    assert (got.op, got.request_id, got.status, got.error, got.count, got.flags, got.stats, got.heads) == (
        frame.op, frame.request_id, frame.status, frame.error, frame.count, frame.flags, frame.stats,
        frame.heads)
    assert payload_bytes(got) == list(payloads)  # a GET miss is a nil length and no bytes


def test_encode_returns_header_then_the_payloads_themselves_never_a_concatenation():
    big, small = bytearray(b"x" * 100_000), b"abc"
    buffers = encode(Frame(Op.PUT, 1, keys=[KEY_A, KEY_B], heads=[b"h", b"i"]), [big, small])

    assert len(buffers) == 3
    assert buffers[1].obj is big and buffers[2].obj is small  # views of the callers' buffers
    (size,) = struct.unpack_from("<I", buffers[0])
    assert len(buffers[0]) == 4 + size


def test_lengths_are_u64():
    seen = []

    def check(frame: Frame) -> None:  # sees the header before any payload is allocated
        seen.append(frame.lengths)
        raise ProtocolError("no room for that, thanks")

    dec = FrameDecoder(2**50, check=check)
    dec.feed(raw_frame({"op": int(Op.PUT), "id": 1, "keys": [KEY_A], "heads": [b"h"], "lens": [2**40 + 5]}))
    with pytest.raises(ProtocolError, match="no room") as err:
        dec.next_frame()

    assert seen == [[2**40 + 5]] and not err.value.fatal
    assert not dec.idle  # now skipping that terabyte, not allocating it


# -- incremental decoding ------------------------------------------------------------------------


def test_decoder_fed_byte_by_byte():
    frames = [REQUESTS[name] for name in ("put", "get", "clear")]
    data = b"".join(wire(f, p) for f, p in frames)
    dec = FrameDecoder(MAX_FRAME, check=check_request)
    got = []
    for i in range(len(data)):
        dec.feed(data[i:i + 1])
        while (frame := dec.next_frame()) is not None:
            got.append(frame)

    assert [f.request_id for f in got] == [2, 3, 7]
    assert payload_bytes(got[0]) == frames[0][1]


def test_a_frame_split_anywhere_decodes_once_whole():
    frame, payloads = Frame(Op.PUT, 9, keys=[KEY_A], heads=[b"h" * 68]), [b"0123456789" * 7]
    data = wire(frame, payloads) + wire(*REQUESTS["ping"])
    for cut in range(1, len(data)):
        dec = FrameDecoder(MAX_FRAME, check=check_request)
        dec.feed(data[:cut])
        early = []
        while (f := dec.next_frame()) is not None:
            early.append(f.request_id)
        dec.feed(data[cut:])
        late = []
        while (f := dec.next_frame()) is not None:
            late.append(f.request_id)
        assert early + late == [9, 1], cut
        assert dec.idle


def test_many_frames_in_random_pieces():
    rng = random.Random(1)
    frames = []
    for i in range(300):
        n = rng.choice([0, 1, 100, 5000, DIRECT_MIN + 17])
        frames.append((Frame(Op.PUT, i, keys=[KEY_A], heads=[b"h"]), [rng.randbytes(n)]))
    data = b"".join(wire(f, p) for f, p in frames)
    dec = FrameDecoder(MAX_FRAME, check=check_request)
    got, pos = [], 0
    while pos < len(data):
        step = rng.choice([1, 3, 100, 4096, 70_000, 300_000])
        dec.feed(data[pos:pos + step])
        pos += step
        while (frame := dec.next_frame()) is not None:
            got.append(frame)

    assert [f.request_id for f in got] == list(range(300))
    assert all(payload_bytes(g) == p for g, (_, p) in zip(got, frames))


def test_half_received_header_consumes_nothing():
    data = wire(*REQUESTS["get"])
    dec = FrameDecoder(MAX_FRAME, check=check_request)
    dec.feed(data[:len(data) - 1])
    assert dec.next_frame() is None and not dec.idle
    dec.feed(data[-1:] + data)
    assert [dec.next_frame().request_id, dec.next_frame().request_id, dec.next_frame()] == [3, 3, None]


def test_large_payload_is_received_straight_into_its_buffer():
    buffers = []

    def alloc(frame: Frame, index: int, size: int) -> memoryview:
        buffers.append(bytearray(size))
        return memoryview(buffers[-1])

    payload = random.Random(2).randbytes(1 << 20)
    data = wire(Frame(Op.PUT, 1, keys=[KEY_A], heads=[b"h"]), [payload])
    dec = FrameDecoder(MAX_FRAME, check=check_request, alloc=alloc)
    head = len(data) - len(payload)
    dec.feed(data[:head + 10])  # the header and the payload's first bytes: staged
    view = dec.get_buffer()  # now the rest of the payload buffer itself
    assert view.obj is buffers[0] and len(view) == len(payload) - 10

    view[:] = payload[10:]
    dec.advance(len(view))
    frame = dec.next_frame()
    assert frame.payloads[0].obj is buffers[0] and bytes(buffers[0]) == payload


def test_advance_more_than_given_is_an_error():
    dec = FrameDecoder(MAX_FRAME)
    n = len(dec.get_buffer())
    with pytest.raises(ValueError):
        dec.advance(n + 1)


# -- bad input -----------------------------------------------------------------------------------

RECOVERABLE = {
    "unknown op": {"op": 99, "id": 5},
    "op not an int": {"op": "GET", "id": 5},
    "key of 23 bytes": {"op": int(Op.GET), "id": 5, "keys": [b"k" * 23]},
    "keys not a list": {"op": int(Op.GET), "id": 5, "keys": b"k" * 24},
    "token not a string": {"op": int(Op.HELLO), "id": 5, "token": 7, "version": 1},
    "token outside HELLO": {"op": int(Op.PING), "id": 5, "token": "s3cret"},
    "HELLO without a version": {"op": int(Op.HELLO), "id": 5, "token": "s3cret"},
    "unknown field": {"op": int(Op.PING), "id": 5, "extra": 1},
    "put lengths not matching keys": {"op": int(Op.PUT), "id": 5, "keys": [KEY_A, KEY_B], "heads": [b"h"],
                                      "lens": [3]},
    "put without heads": {"op": int(Op.PUT), "id": 5, "keys": [KEY_A], "lens": [3]},
    "get with payload": {"op": int(Op.GET), "id": 5, "keys": [KEY_A], "lens": [3]},
    "request with reply fields": {"op": int(Op.PING), "id": 5, "status": 0},
    "clear with keys": {"op": int(Op.CLEAR), "id": 5, "keys": [KEY_A]},
    "namespace of 9 bytes": {"op": int(Op.CLEAR), "id": 5, "ns": [b"n" * 9]},
}


@pytest.mark.parametrize("name", RECOVERABLE)
def test_bad_frame_is_skipped_and_the_next_decodes(name):
    fields = RECOVERABLE[name]
    payload = b"xyz" if fields.get("lens") else b""
    dec = FrameDecoder(MAX_FRAME, check=check_request)
    dec.feed(raw_frame(fields, payload) + wire(*REQUESTS["has"]))

    with pytest.raises(ProtocolError) as err:
        dec.next_frame()
    assert isinstance(err.value, KvtierError) and not err.value.fatal
    assert err.value.request_id == 5
    assert dec.next_frame().request_id == 5 and dec.idle  # the HAS after it


def test_bad_id_is_reported_without_one():
    dec = FrameDecoder(MAX_FRAME, check=check_request)
    dec.feed(raw_frame({"op": int(Op.PING), "id": -1}) + wire(*REQUESTS["ping"]))
    with pytest.raises(ProtocolError) as err:
        dec.next_frame()
    assert err.value.request_id is None and not err.value.fatal
    assert dec.next_frame().op is Op.PING


FATAL = {
    "zero header length": struct.pack("<I", 0),
    "header over the limit": struct.pack("<I", MAX_HEADER_BYTES + 1),
    "header over the frame limit": struct.pack("<I", MAX_FRAME),
    "not msgpack": struct.pack("<I", 3) + b"\xc1\xc1\xc1",
    "truncated msgpack": struct.pack("<I", 2) + b"\x92\x01",
    "not a map": raw_frame([1, 2, 3]),
    "lens not a list": raw_frame({"op": 1, "id": 1, "lens": 5}),
    "negative length": raw_frame({"op": 1, "id": 1, "lens": [-1]}),
    "float length": raw_frame({"op": 1, "id": 1, "lens": [1.5]}),
    "payloads over the frame limit": raw_frame({"op": 1, "id": 1, "keys": [KEY_A], "heads": [b"h"],
                                                "lens": [MAX_FRAME]}),
    "integer map keys": raw_frame({1: 2}),
}


@pytest.mark.parametrize("name", FATAL)
def test_unsyncable_input_is_fatal_and_the_decoder_refuses_more(name):
    dec = FrameDecoder(MAX_FRAME, check=check_request)
    dec.feed(wire(*REQUESTS["ping"]) + FATAL[name] + wire(*REQUESTS["ping"]))

    assert dec.next_frame().op is Op.PING  # what came before is intact
    with pytest.raises(ProtocolError) as err:
        dec.next_frame()
    assert err.value.fatal
    assert dec.next_frame() is None
    with pytest.raises(ProtocolError):
        dec.get_buffer()
    dec.feed(b"more")  # ignored, not raised


def test_random_garbage_never_escapes_as_another_exception():
    rng = random.Random(3)
    for _ in range(2000):
        dec = FrameDecoder(1 << 20, check=check_request)
        dec.feed(rng.randbytes(rng.randrange(1, 200)))
        try:
            while dec.next_frame() is not None:
                pass
        except ProtocolError:
            pass


def test_check_reply_wants_a_reply_with_one_head_per_payload():
    with pytest.raises(ProtocolError, match="expected a reply"):
        check_reply(Frame(Op.PING, 1))
    with pytest.raises(ProtocolError, match="one record head"):
        check_reply(Frame(Op.GET, 1, status=Status.OK, heads=[b"h", None], lengths=[3, 4]))


def test_encode_refuses_a_header_over_the_limit():
    with pytest.raises(ProtocolError, match="header"):
        encode(Frame(Op.HAS, 1, keys=[KEY_A] * (MAX_HEADER_BYTES // 24)))


# -- bounds (issue 8, item 12) ---------------------------------------------------------------------


def test_a_header_of_many_unknown_fields_is_refused_at_once_with_a_short_error():
    data = raw_frame({f"f{i}": 0 for i in range(25_000)})  # ~220 KiB, inside MAX_HEADER_BYTES
    assert len(data) < MAX_HEADER_BYTES
    dec = FrameDecoder(MAX_FRAME, check=check_request)
    started = time.perf_counter()

    dec.feed(data)
    with pytest.raises(ProtocolError) as err:
        dec.next_frame()

    assert time.perf_counter() - started < 0.5  # refused from the map's length, nothing built
    assert len(str(err.value)) <= MAX_ERROR_CHARS


def test_the_header_limit_fits_the_largest_put_of_max_keys_and_nothing_much_larger():
    largest = {"op": int(Op.PUT), "id": 2**64 - 1, "keys": [bytes(24)] * MAX_KEYS,
               "heads": [bytes(MAX_HEAD_BYTES)] * MAX_KEYS, "lens": [2**64 - 1] * MAX_KEYS}
    assert len(msgpack.packb(largest, use_bin_type=True)) <= MAX_HEADER_BYTES
    assert HEADER_SIZE <= MAX_HEAD_BYTES  # a kvtier.record header fits as a head

    for name, value in [("keys", [bytes(24)] * (MAX_KEYS + 1)), ("heads", [bytes(MAX_HEAD_BYTES + 1)])]:
        dec = FrameDecoder(MAX_FRAME, check=check_request)
        dec.feed(raw_frame({"op": int(Op.GET), "id": 1, name: value}))
        with pytest.raises(ProtocolError):
            dec.next_frame()


def test_a_one_frame_decoder_stops_after_the_hello_until_upgraded():
    hello = wire(*REQUESTS["hello"])
    put = wire(*REQUESTS["put"])  # 300 kB of payload: over the pre-handshake limit
    dec = FrameDecoder(len(hello), check=check_hello, one_frame=True)
    dec.feed(hello + put[:1000])

    assert dec.next_frame().op is Op.HELLO and dec.next_frame() is None

    dec.upgrade(MAX_FRAME, check_request)
    dec.feed(put[1000:])
    assert payload_bytes(dec.next_frame()) == REQUESTS["put"][1] and dec.idle


def test_admit_holds_a_frame_without_allocating_until_resumed():
    allocated, room = [], [0]
    dec = FrameDecoder(MAX_FRAME, check=check_request, admit=lambda n: n <= room[0],
                       alloc=lambda f, i, n: allocated.append(n) or memoryview(bytearray(n)))
    dec.feed(wire(*REQUESTS["put"]))

    assert dec.next_frame() is None and dec.holding and allocated == []
    room[0] = 1 << 20
    dec.resume()
    assert payload_bytes(dec.next_frame()) == REQUESTS["put"][1] and dec.idle
