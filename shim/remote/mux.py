"""Frames between the CLI and the control process on its unix socket.

A frame is one type byte, a 4-byte big-endian length and that many bytes (at most
MAX_FRAME). The CLI sends HELLO (JSON: args, env, pty) first; the control process answers
ACCEPT once the SSH channel runs, or FAIL (a message) — then the two exchange:

CLI → control: STDIN data, EOF (stdin closed), RESIZE (JSON cols/rows), SIGNAL (name).
control → CLI: STDOUT data, STDERR data, EXIT (decimal status), FAIL (message).
"""

from __future__ import annotations

import socket
import struct

HELLO, ACCEPT, FAIL = b"H", b"A", b"F"
STDIN, EOF, RESIZE, SIGNAL = b"I", b"E", b"W", b"S"
STDOUT, STDERR, EXIT = b"O", b"R", b"X"
MAX_FRAME = 1 << 20
_HEADER = struct.Struct(">cI")


class FrameError(Exception):
    """The peer sent something that is not a frame (or hung up mid-frame)."""


def send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    if len(payload) > MAX_FRAME:
        raise ValueError("frame too large")
    sock.sendall(_HEADER.pack(kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks: list[bytes] = []
    need = size
    while need:
        chunk = sock.recv(need)
        if not chunk:
            if need == size and not chunks:
                return None
            raise FrameError("connection closed in the middle of a frame")
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The next (kind, payload), or None at a clean end of stream."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    kind, size = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes is larger than {MAX_FRAME}")
    payload = _recv_exact(sock, size) if size else b""
    if payload is None:
        raise FrameError("connection closed in the middle of a frame")
    return kind, payload
