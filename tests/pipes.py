"""Reading what a forked child wrote, for tests."""

from __future__ import annotations

import os


def read_to_end(fd: int) -> bytes:
    """Everything readable from *fd* until end of file (or EIO, as a pty master gives
    once the other side is closed)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO on a pty master
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
