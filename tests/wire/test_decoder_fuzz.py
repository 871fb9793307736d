"""Property-based fuzzing of the frame decoder (kvtier/wire/decoder.py) with hypothesis.

Streams are valid frames, hand-made headers of arbitrary msgpack, and raw bytes, concatenated and
cut into arbitrary receive sizes. Properties: only ProtocolError ever escapes; every valid frame
before the first invalid piece decodes exactly as encoded; at most one fatal error, and nothing
after it; before the handshake at most one frame, a HELLO, is decoded and no payload buffer is
ever allocated. Bounded:
300 examples per property, no deadline (the box is shared).
"""

from __future__ import annotations

import struct

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.errors import ProtocolError
from kvtier.wire.decoder import FrameDecoder
from kvtier.wire.frames import HELLO_HEADER_BYTES, PREFIX, Frame, Op, check_hello, check_request, encode

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_FRAME = 1 << 20

keys = st.lists(st.binary(min_size=24, max_size=24), max_size=4)


@st.composite
def valid_requests(draw) -> tuple[Frame, list[bytes]]:
    op = draw(st.sampled_from([Op.PING, Op.GET, Op.HAS, Op.EXISTS, Op.DELETE, Op.STATS, Op.PUT, Op.CLEAR]))
    rid = draw(st.integers(0, 2**64 - 1))
    if op is Op.PUT:
        ks = draw(keys)
        heads = [draw(st.binary(max_size=128)) for _ in ks]
        payloads = [draw(st.binary(max_size=3000)) for _ in ks]
        return Frame(op, rid, keys=ks, heads=heads), payloads
    if op is Op.CLEAR:
        return Frame(op, rid, namespaces=draw(st.lists(st.binary(min_size=8, max_size=8), max_size=3))), []
    if op in (Op.PING, Op.STATS):
        return Frame(op, rid), []
    return Frame(op, rid, keys=draw(keys)), []


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20)
field_names = st.sampled_from(["op", "id", "keys", "lens", "heads", "ns", "token", "version", "status",
                               "error", "count", "flags", "stats", "junk"])


@st.composite
def hand_made(draw) -> bytes:
    """A frame with an arbitrary header map (often almost right) and some payload bytes."""
    fields = draw(st.dictionaries(field_names, msgpack_values, max_size=6))
    if draw(st.booleans()):
        fields.setdefault("op", draw(st.integers(0, 9)))
        fields.setdefault("id", draw(st.integers(0, 100)))
    header = msgpack.packb(fields, use_bin_type=True)
    return PREFIX.pack(len(header)) + header + draw(st.binary(max_size=64))


hellos = st.builds(lambda token, version: (Frame(Op.HELLO, 0, token=token, version=version), []),
                   st.none() | st.text(max_size=40), st.integers(0, 3))
pieces = st.one_of(
    valid_requests().map(lambda fp: ("valid", fp)),
    hellos.map(lambda fp: ("valid", fp)),
    hand_made().map(lambda b: ("bytes", b)),
    st.binary(min_size=1, max_size=64).map(lambda b: ("bytes", b)),
    st.integers(0, 2**32 - 1).map(lambda n: ("bytes", struct.pack("<I", n))),
)


def wire(frame: Frame, payloads) -> bytes:
    return b"".join(bytes(b) for b in encode(frame, payloads))


def receive(decoder: FrameDecoder, data: bytes, sizes: list[int]) -> list[Frame | ProtocolError]:
    """Feed `data` as a socket would, in receives of `sizes` (cycled); everything it yields."""
    out: list[Frame | ProtocolError] = []
    view, i = memoryview(data), 0
    while view:
        try:
            buf = decoder.get_buffer()
        except ProtocolError:
            break  # dead: a reader closes here
        k = min(len(buf), len(view), sizes[i % len(sizes)])
        i += 1
        buf[:k] = view[:k]
        decoder.advance(k)
        view = view[k:]
        while True:
            try:
                frame = decoder.next_frame()
            except ProtocolError as exc:
                out.append(exc)
                continue
            if frame is None:
                break
            out.append(frame)
    return out


@FUZZ
@given(st.lists(pieces, min_size=1, max_size=8), st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_any_stream_yields_frames_or_protocol_errors_and_valid_frames_decode_exactly(parts, sizes):
    data = b"".join(wire(*p) if kind == "valid" else p for kind, p in parts)
    results = receive(FrameDecoder(MAX_FRAME, check=check_request), data, sizes)

    # Up to the first piece that is not a valid frame, the stream is exactly those frames.
    expected = []
    for kind, piece in parts:
        if kind != "valid":
            break
        expected.append(piece)
    for (frame, payloads), got in zip(expected, results):
        assert isinstance(got, Frame)
        fields = ("op", "request_id", "keys", "heads", "namespaces", "token", "version")
        assert [getattr(got, f) for f in fields] == [getattr(frame, f) for f in fields]
        assert [bytes(p) for p in got.payloads] == [bytes(p) for p in payloads]
    fatal = [r for r in results if isinstance(r, ProtocolError) and r.fatal]
    assert len(fatal) <= 1 and (not fatal or results[-1] is fatal[0])


@FUZZ
@given(st.lists(pieces, min_size=1, max_size=6), st.lists(st.integers(1, 5000), min_size=1, max_size=6))
def test_before_the_handshake_only_one_hello_is_decoded_and_no_payload_is_allocated(parts, sizes):
    allocated = []

    def alloc(frame, index, size):
        allocated.append(size)
        return memoryview(bytearray(size))

    decoder = FrameDecoder(PREFIX.size + HELLO_HEADER_BYTES, check=check_hello, alloc=alloc, one_frame=True)
    data = b"".join(wire(*p) if kind == "valid" else p for kind, p in parts)
    results = receive(decoder, data[:PREFIX.size + HELLO_HEADER_BYTES], sizes)

    assert len(results) <= 1 and allocated == []
    assert all(r.op is Op.HELLO for r in results if isinstance(r, Frame))
