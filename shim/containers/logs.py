"""A container's output log: json lines, docker's json-file format.

One entry per line of output::

    {"log":"hello\\n","stream":"stdout","time":"2024-05-01T12:00:00.123456Z"}

A line longer than MAX_ENTRY, or the tail of a chunk that did not end in a newline, is
an entry without a trailing newline (docker does the same with partial lines). A chunk
holding very many short lines is written as fewer entries holding several whole lines
each (at most MAX_ENTRY bytes), so a flood of output costs the monitor little; readers
split entries into lines, so ``--tail`` and ``-t`` still work per line.

Bytes that are not UTF-8 survive: they are decoded with ``surrogateescape`` and written
as ``\\udcXX`` escapes, which :func:`decode` turns back into the same bytes.

The monitor appends; ``vmshim logs`` reads the file directly (no monitor needed), so
logs are there after the container exited, across stop and start, until ``rm``.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from shim.errors import UsageError

MAX_ENTRY = 16 * 1024
GROUP_LINES_OVER = 64
"""A chunk with more lines than this is written as grouped entries."""


def _timestamp(now: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def encode_entries(stream: str, data: bytes, now: float | None = None) -> bytes:
    """The json lines for one chunk of *data* from *stream* (stdout or stderr)."""
    stamp = _timestamp(now)
    lines = data.splitlines(keepends=True)
    pieces: list[bytes] = []
    for line in lines:
        while len(line) > MAX_ENTRY:
            pieces.append(line[:MAX_ENTRY])
            line = line[MAX_ENTRY:]
        pieces.append(line)
    if len(pieces) > GROUP_LINES_OVER:
        grouped, current = [], b""
        for piece in pieces:
            if current and len(current) + len(piece) > MAX_ENTRY:
                grouped.append(current)
                current = b""
            current += piece
        if current:
            grouped.append(current)
        pieces = grouped
    out = []
    for piece in pieces:
        text = piece.decode("utf-8", "surrogateescape")
        out.append(json.dumps({"log": text, "stream": stream, "time": stamp}))
    return ("\n".join(out) + "\n").encode() if out else b""


def decode(line: bytes) -> tuple[str, str, bytes] | None:
    """(time, stream, data) of one json line, or None when it is not a valid entry."""
    try:
        entry = json.loads(line)
        return (entry["time"], entry["stream"],
                entry["log"].encode("utf-8", "surrogateescape"))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeEncodeError):
        return None


class LogWriter:
    """Appends entries to a container's log (the monitor holds one)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        payload = encode_entries(stream, data)
        view = memoryview(payload)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except InterruptedError:
                continue
            except OSError:
                return  # the container was removed under us, or the disk is full: drop

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


# ---- reading ---------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: an RFC 3339 time, a unix timestamp, or a duration back from now
    (``10s``, ``5m``, ``1.5h``). Returns seconds since the epoch. Raises UsageError."""
    now = time.time() if now is None else now
    text = text.strip()
    match = _DURATION.match(text)
    if match:
        value, unit = float(match.group(1)), match.group(2)
        return now - value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"invalid --since {text!r}: use an RFC 3339 time, a unix "
                         "timestamp or a duration like 10m") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _entry_time(stamp: str) -> float:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def split_lines(entries) -> Iterator[tuple[str, str, bytes]]:
    """Entries → one item per line of output (a grouped entry yields several)."""
    for stamp, stream, data in entries:
        if data.count(b"\n") <= 1:
            yield stamp, stream, data
        else:
            for line in data.splitlines(keepends=True):
                yield stamp, stream, line


def read_entries(path: Path, offset: int = 0) -> tuple[list[tuple[str, str, bytes]], int]:
    """The complete entries from byte *offset* on, and the offset after the last one (a
    line still being written is left for the next call)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    entries = []
    for raw in data[:end].split(b"\n"):
        if raw:
            entry = decode(raw)
            if entry is not None:
                entries.append(entry)
    return entries, offset + end


def select_lines(entries, *, tail: int | None = None, since: float | None = None,
                 until: float | None = None) -> list[tuple[str, str, bytes]]:
    """The lines of *entries* that ``--since``/``--until``/``--tail`` keep."""
    lines = list(split_lines(entries))
    if since is not None or until is not None:
        lines = [ln for ln in lines
                 if (since is None or _entry_time(ln[0]) >= since)
                 and (until is None or _entry_time(ln[0]) <= until)]
    if tail is not None and tail >= 0:
        lines = lines[-tail:] if tail else []
    return lines


def render(line: tuple[str, str, bytes], timestamps: bool) -> bytes:
    stamp, _stream, data = line
    return (stamp.encode() + b" " + data) if timestamps else data
