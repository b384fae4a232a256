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
        got += reader.feed(frames[i : i + 1])
    assert [(m.type, m.fields, m.payload) for m in got] == [
        ("stdout", {"id": 1}, b"abc"),
        ("exit", {"id": 1, "code": 7}, b""),
    ]
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
    assert json.loads(frame[8 : 8 + hlen]) == {"protocol": 1, "t": "hello"} and plen == 0


@pytest.mark.parametrize("status,code", [(0, 0), (7 << 8, 7), (9, 137), (15, 143)])
def test_exit_code_from_status(status, code):
    assert protocol.exit_code_from_status(status) == code


# ---- the guest is hostile (issue 12) ---------------------------------------------------------


def _frame(header: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">II", len(header), len(payload)) + header + payload


def test_deep_json_is_refused_before_parsing():
    deep = b'{"t":"stdout","id":' + b"[" * 30000 + b"]" * 30000 + b"}"
    with pytest.raises(ProtocolError, match="nests deeper"):
        FrameReader().feed(_frame(deep))
    # brackets inside strings do not count
    (msg,) = FrameReader().feed(_frame(b'{"t":"log","message":"' + b"[" * 100 + b'"}'))
    assert msg.fields["message"] == "[" * 100


def test_lenient_reader_skips_bad_headers_and_keeps_framing():
    reader = FrameReader(lenient=True)
    data = _frame(b"not json") + _frame(b'{"t":"nope"}') + _frame(b"[1]") + protocol.encode("stdout", b"ok", id=1)
    (msg,) = reader.feed(data)
    assert (msg.type, msg.payload) == ("stdout", b"ok")
    assert reader.dropped_count == 3 and len(reader.take_dropped()) == 3
    with pytest.raises(ProtocolError, match="too large"):  # framing itself: still fatal
        reader.feed(struct.pack(">II", protocol.MAX_HEADER + 1, 0))


@pytest.mark.parametrize(
    "header",
    [
        {"t": "stdout", "id": [1]},
        {"t": "stdout", "id": "1"},
        {"t": "stdout"},
        {"t": "stdout", "id": -1},
        {"t": "stdout", "id": 1 << 40},
        {"t": "stdout", "id": True},
        {"t": "exit", "id": 1, "code": "0"},
        {"t": "exit", "id": 1, "code": 1000},
        {"t": "started", "id": 2, "pid": 1.5},
        {"t": "stats", "id": 2, "usage": []},
        {"t": "hello", "protocol": "1"},
        {"t": "start", "id": 1},
        {"t": "stdin", "id": 1},
        {"t": "error", "message": 7},
    ],
)
def test_check_from_guest_refuses_wrong_fields(header):
    (msg,) = FrameReader().feed(_frame(json.dumps(header).encode()))
    with pytest.raises(ProtocolError):
        protocol.check_from_guest(msg)


def test_check_from_guest_accepts_what_the_agent_sends():
    for frame in (
        protocol.encode("hello", protocol=protocol.PROTOCOL_VERSION, agent="x", uptime=0.5),
        protocol.encode("started", id=1, pid=42),
        protocol.encode("stdout", b"a", id=1),
        protocol.encode("exit", id=1, code=137, signal=9, oom_killed=False),
        protocol.encode("error", id=3, message="no", code=127),
        protocol.encode("error", message="boot failed"),
        protocol.encode("stats", id=9, usage={"memory": 1}, extra="ignored"),
    ):
        (msg,) = FrameReader().feed(frame)
        assert protocol.check_from_guest(msg) is msg


def test_printable_escapes_terminal_controls():
    assert protocol.printable("a\x1b]0;pwned\x07b\n") == "a\\x1b]0;pwned\\x07b\\n"
    assert protocol.printable("x" * 600, 10) == "x" * 10 + "…"
