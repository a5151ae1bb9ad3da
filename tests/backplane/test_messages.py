"""Message encoding and strict decoding, including fuzzing with hypothesis."""

from __future__ import annotations

import contextlib
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backplane.messages import (
    Ack,
    Command,
    CommandResult,
    Error,
    Events,
    FrameDecoder,
    Heartbeat,
    Hello,
    Policy,
    PolicyAck,
    ProtocolError,
    RenewRequest,
    RenewResponse,
    decode_body,
    encode,
)

SAMPLES = [
    Hello(1, "0.1", "h", "Debian", "6.18", {"process": "tracepoint"}, ["kill"], 3),
    Events(7, [{"a": 1, "b": {"c": [1, 2]}}], 5),
    Ack(7),
    Heartbeat({"cpu": 1.5}, {"file": "fallback"}, {"drops": 0}, 12),
    Command("c1", "kill", {"pid": 4}),
    CommandResult("c1", "ok", {"x": "y"}),
    Policy(2, {"rules": []}),
    PolicyAck(2),
    RenewRequest(b"csr"),
    RenewResponse(b"cert"),
    Error("code", "text"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.KIND)
def test_roundtrip_through_frames(msg) -> None:
    wire = encode(msg)
    dec = FrameDecoder()
    # Byte by byte: framing must not depend on how the stream was split.
    out = []
    for i in range(len(wire)):
        out += dec.feed(wire[i : i + 1])
    assert out == [msg]
    assert dec.buffered == 0


def body(**obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (body(k="nope"), "unknown message kind"),
        (body(seq=1), "no kind"),
        (body(k="ack"), "lacks field 'seq'"),
        (body(k="ack", seq="1"), "ack.seq must be a non-negative integer"),
        (body(k="ack", seq=-1), "non-negative"),
        (body(k="ack", seq=True), "ack.seq"),
        (body(k="ack", seq=1, extra=2), "unknown fields"),
        (body(k="events", seq=1, events=[1], dropped=0), "list of maps"),
        (body(k="events", seq=1, events=[{1: 2}], dropped=0), "undecodable"),
        (msgpack.packb([1, 2]), "not a map"),
        (b"\xc1", "undecodable"),
        (msgpack.packb(msgpack.ExtType(5, b"x")), "undecodable"),
        (b"", "undecodable"),
    ],
)
def test_strict_decoding_errors(raw: bytes, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        decode_body(raw)


def test_oversized_message_refused_before_buffering() -> None:
    dec = FrameDecoder(max_size=1000)
    with pytest.raises(ProtocolError, match="above the 1000-byte limit"):
        dec.feed(struct.pack(">I", 1001))
    with pytest.raises(ProtocolError, match="exceeds the 100-byte limit"):
        encode(Events(1, [{"x": "y" * 200}]), max_size=100)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_frame_decoder_raw(data: bytes) -> None:
    dec = FrameDecoder(max_size=4096)
    with contextlib.suppress(ProtocolError):
        dec.feed(data)
    assert dec.buffered <= 4096 + 4


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
    max_leaves=20,
)
kinds = st.sampled_from([m.KIND for m in SAMPLES] + ["x", ""])


@settings(max_examples=400, deadline=None)
@given(
    kinds,
    st.dictionaries(
        st.sampled_from(
            [
                "seq",
                "events",
                "dropped",
                "id",
                "action",
                "args",
                "version",
                "document",
                "csr",
                "metrics",
                "tiers",
                "protocol",
                "hostname",
                "code",
                "message",
                "status",
                "output",
            ]
        ),
        json_like,
        max_size=8,
    ),
)
def test_fuzz_structured_bodies(kind: str, fields: dict) -> None:
    raw = msgpack.packb({"k": kind, **fields}, use_bin_type=True)
    try:
        msg = decode_body(raw)
    except ProtocolError:
        return
    # Whatever decodes re-encodes to the same thing.
    assert decode_body(encode(msg)[4:]) == msg
