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

Rotation (docker's json-file ``max-size``/``max-file``, :class:`LogLimits`): when the
log would grow past *max_size*, it is renamed ``<log>.1`` (older ones shift to ``.2`` …,
the oldest beyond *max_files* is deleted) and a new one starts, so a container's logs
take at most about ``max_size × max_files`` on disk (a file may exceed *max_size* by one
chunk of output, at most a few hundred KiB). The default caps at 10 MiB × 3 files (docker's
json-file default is unbounded; a guest must not be able to fill the host's disk).
Readers stream: :func:`iter_lines` and :class:`Follower` never hold more than one entry
(plus the ``--tail`` window) in memory.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from shim.errors import UsageError

MAX_ENTRY = 16 * 1024
GROUP_LINES_OVER = 64
"""A chunk with more lines than this is written as grouped entries."""
MAX_LINE = 1 << 20
"""Readers skip a log line longer than this (the writer never makes one)."""


@dataclass
class LogLimits:
    """``--log-opt max-size=…,max-file=…``: rotate at *max_size* bytes, keep *max_files*
    files in all (the one written to included)."""

    max_size: int = 10 * 1024 * 1024
    max_files: int = 3

    OPTIONS = ("max-size", "max-file")

    @classmethod
    def parse(cls, items) -> "LogLimits":
        """From ``--log-opt`` values (each ``KEY=VALUE``, or several joined by commas).
        Raises UsageError naming the bad option."""
        limits = cls()
        for item in items:
            for part in filter(None, (p.strip() for p in item.split(","))):
                key, eq, value = part.partition("=")
                if not eq or key not in cls.OPTIONS:
                    raise UsageError(f"invalid --log-opt {part!r}: use max-size=SIZE (e.g. 10m) or max-file=N")
                if key == "max-size":
                    limits.max_size = _parse_size(value, part)
                else:
                    if not value.isdigit() or not 1 <= int(value) <= 100:
                        raise UsageError(f"invalid --log-opt {part!r}: max-file is a number from 1 to 100")
                    limits.max_files = int(value)
        return limits

    def to_dict(self) -> dict:
        return {"max_size": self.max_size, "max_files": self.max_files}

    @classmethod
    def from_dict(cls, data) -> "LogLimits":
        """From a record (anything unusable gives the defaults)."""
        limits = cls()
        if isinstance(data, dict):
            size, files = data.get("max_size"), data.get("max_files")
            if isinstance(size, int) and size >= 4096:
                limits.max_size = size
            if isinstance(files, int) and 1 <= files <= 100:
                limits.max_files = files
        return limits


def _parse_size(text: str, part: str) -> int:
    match = re.fullmatch(r"(\d+)([kmg]?)b?", text.strip().lower())
    if not match:
        raise UsageError(f"invalid --log-opt {part!r}: max-size is a size like 512k, 10m or 1g")
    size = int(match.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match.group(2)]
    if size < 4096:
        raise UsageError(f"invalid --log-opt {part!r}: max-size must be at least 4k")
    return size


def log_files(path: Path) -> list[Path]:
    """The log's files, oldest first: the rotated ones (``.N`` … ``.1``), then *path*."""
    path = Path(path)
    rotated = []
    for n in range(1, 101):
        older = path.with_name(f"{path.name}.{n}")
        if not older.exists():
            break
        rotated.append(older)
    return list(reversed(rotated)) + [path]


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
        return (entry["time"], entry["stream"], entry["log"].encode("utf-8", "surrogateescape"))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeEncodeError):
        return None


class LogWriter:
    """Appends entries to a container's log (the monitor holds one), rotating it by
    *limits* (default: LogLimits())."""

    def __init__(self, path: Path, limits: LogLimits | None = None):
        self.path = Path(path)
        self.limits = limits or LogLimits()
        self.fd = self._open()
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError:
            self.size = 0

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _rotate(self) -> None:
        """``log`` → ``log.1`` → … ; the file beyond max_files goes."""
        keep = self.limits.max_files - 1
        try:
            os.close(self.fd)
            if keep == 0:
                os.unlink(self.path)
            else:
                for n in range(keep, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{n}")
                    if n == keep:
                        try:
                            os.unlink(older)
                        except FileNotFoundError:
                            pass
                    newer = self.path if n == 1 else self.path.with_name(f"{self.path.name}.{n - 1}")
                    try:
                        os.rename(newer, older)
                    except FileNotFoundError:
                        pass
        except OSError:
            pass  # the container was removed under us: the open below says so
        self.fd = self._open()
        self.size = 0

    def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        payload = encode_entries(stream, data)
        if self.size and self.size + len(payload) > self.limits.max_size:
            try:
                self._rotate()
            except OSError:
                return
        self.size += len(payload)
        view = memoryview(payload)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
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
        raise UsageError(
            f"invalid --since {text!r}: use an RFC 3339 time, a unix timestamp or a duration like 10m"
        ) from None
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


def iter_entries(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """Every entry of the log at *path*, rotated files first, one line read at a time."""
    for name in log_files(path):
        yield from iter_entries_of_file(name)


def iter_entries_of_file(name: Path) -> Iterator[tuple[str, str, bytes]]:
    """The entries of one log file (none if it was rotated away meanwhile)."""
    try:
        f = open(name, "rb")
    except FileNotFoundError:
        return
    with f:
        yield from _entries_of(f)


def _entries_of(f) -> Iterator[tuple[str, str, bytes]]:
    """Complete entries from *f*'s position on; stops before a line still being written
    (the position is then at its start)."""
    while True:
        start = f.tell()
        raw = f.readline(MAX_LINE)
        if not raw:
            return
        if not raw.endswith(b"\n"):
            if len(raw) >= MAX_LINE:  # not ours: skip to the end of it
                while raw and not raw.endswith(b"\n"):
                    raw = f.readline(MAX_LINE)
                continue
            f.seek(start)
            return
        entry = decode(raw)
        if entry is not None:
            yield entry


class Follower:
    """``logs -f``: the entries of the current log file from its start (*from_start*) or
    from its end, then whatever is appended, across rotations: the file it reads stays
    open; once it was renamed away and is read to its end, the new file is opened."""

    def __init__(self, path: Path, from_start: bool = False):
        self.path = Path(path)
        self.f = None
        try:
            self.f = open(self.path, "rb")
            if not from_start:
                self.f.seek(0, os.SEEK_END)
        except FileNotFoundError:
            pass

    def entries(self) -> Iterator[tuple[str, str, bytes]]:
        """What is there to read now (ends when it caught up with the writer)."""
        while True:
            if self.f is None:
                try:
                    self.f = open(self.path, "rb")
                except FileNotFoundError:
                    return
            yield from _entries_of(self.f)
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                return
            if current == os.fstat(self.f.fileno()).st_ino:
                return
            self.f.close()  # rotated, and read to its end: go on with the new file
            self.f = None

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def read_entries(path: Path, offset: int = 0) -> tuple[list[tuple[str, str, bytes]], int]:
    """The complete entries of the current log file (not the rotated ones) from byte
    *offset* on, and the offset after the last one (a line still being written is left
    for the next call). Reads the file whole: for tests and small logs; ``vmshim logs``
    streams with :func:`iter_entries` and :class:`Follower`."""
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


def select_lines(
    entries, *, tail: int | None = None, since: float | None = None, until: float | None = None
) -> list[tuple[str, str, bytes]]:
    """The lines of *entries* that ``--since``/``--until``/``--tail`` keep."""
    return list(iter_lines(entries, tail=tail, since=since, until=until))


def iter_lines(
    entries, *, tail: int | None = None, since: float | None = None, until: float | None = None
) -> Iterator[tuple[str, str, bytes]]:
    """:func:`select_lines`, streaming: only the ``--tail`` window is held in memory."""
    lines = split_lines(entries)
    if since is not None or until is not None:
        lines = (
            ln
            for ln in lines
            if (since is None or _entry_time(ln[0]) >= since) and (until is None or _entry_time(ln[0]) <= until)
        )
    if tail is not None and tail >= 0:
        lines = iter(deque(lines, maxlen=tail)) if tail else iter(())
    return lines


def render(line: tuple[str, str, bytes], timestamps: bool) -> bytes:
    stamp, _stream, data = line
    return (stamp.encode() + b" " + data) if timestamps else data
