import json
import os
import struct

import pytest

from guest import protocol
from guest.protocol import FrameReader, Message, ProtocolError


def test_round_trip_in_pieces():
    frames = protocol.encode("stdout", b"abc", id=1) + protocol.encode("exit", id=1, code=7)
    reader = FrameReader()
    got = []
    for i in range(len(frames)):  # one byte at a time
        got += reader.feed(frames[i:i + 1])
    assert [(m.type, m.fields, m.payload) for m in got] == [
        ("stdout", {"id": 1}, b"abc"), ("exit", {"id": 1, "code": 7}, b"")]
    assert reader.pending == 0


def test_binary_payload_is_exact():
    data = os.urandom(protocol.CHUNK)
    (msg,) = FrameReader().feed(protocol.encode("stdin", data, id=3))
    assert msg.payload == data


def test_oversized_frames_are_refused():
    with pytest.raises(ProtocolError, match="too large"):
        FrameReader().feed(struct.pack(">II", protocol.MAX_HEADER + 1, 0))
    with pytest.raises(ProtocolError, match="too large"):
        FrameReader().feed(struct.pack(">II", 2, protocol.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError):
        protocol.encode("stdout", b"x" * (protocol.MAX_PAYLOAD + 1))


@pytest.mark.parametrize("header", [b"not json", b"[1]", b'{"t":"nope"}', b'{"x":1}', b"\xff"])
def test_bad_headers_are_refused(header):
    with pytest.raises(ProtocolError):
        FrameReader().feed(struct.pack(">II", len(header), 0) + header)


def test_unknown_type_cannot_be_sent():
    with pytest.raises(ValueError):
        protocol.encode("bogus")


def test_field_validation():
    msg = Message("exit", {"id": 1, "code": True, "name": "x"})
    assert msg.get("id", int) == 1
    with pytest.raises(ProtocolError):
        msg.get("code", int)  # bool is not an int here
    with pytest.raises(ProtocolError):
        msg.get("name", int)
    with pytest.raises(ProtocolError):
        msg.get("missing", int)
    assert msg.get("missing", int, 5) == 5


def test_header_is_json_object_with_type():
    frame = protocol.encode("hello", protocol=1)
    hlen, plen = struct.unpack(">II", frame[:8])
    assert json.loads(frame[8:8 + hlen]) == {"protocol": 1, "t": "hello"} and plen == 0


@pytest.mark.parametrize("status,code", [(0, 0), (7 << 8, 7), (9, 137), (15, 143)])
def test_exit_code_from_status(status, code):
    assert protocol.exit_code_from_status(status) == code
