"""docker compose's progress output: one line per resource (``✔ Container app-web-1
Started``), rewritten in place on a terminal, plain lines (each change) otherwise.
Written to stderr, like docker compose, so stdout stays for data."""

from __future__ import annotations

import sys
import threading
import time

DONE, FAILED, WORKING = "✔", "✘", "⠿"


class Line:
    def __init__(self, progress: "Progress", name: str, status: str):
        self.progress, self.name, self.status, self.mark = progress, name, status, WORKING
        self.started = time.monotonic()
        self.elapsed: float | None = None

    def update(self, status: str) -> None:
        self.status = status
        self.progress._changed(self)

    def done(self, status: str) -> None:
        self.mark, self.status = DONE, status
        self.elapsed = time.monotonic() - self.started
        self.progress._changed(self)

    def fail(self, status: str) -> None:
        self.mark, self.status = FAILED, status
        self.elapsed = time.monotonic() - self.started
        self.progress._changed(self)

    def text(self, width: int) -> str:
        elapsed = f"{self.elapsed:.1f}s" if self.elapsed is not None else ""
        return f" {self.mark} {self.name.ljust(width)}  {self.status:<10} {elapsed}".rstrip()


class Progress:
    """Progress lines on *stream* (default stderr); ``quiet`` prints nothing."""

    def __init__(self, stream=None, *, quiet: bool = False, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self.lines: list[Line] = []
        self.drawn = 0
        self.lock = threading.Lock()

    def line(self, name: str, status: str) -> Line:
        with self.lock:
            for existing in self.lines:
                if existing.name == name:
                    existing.mark, existing.status = WORKING, status
                    existing.started, existing.elapsed = time.monotonic(), None
                    line = existing
                    break
            else:
                line = Line(self, name, status)
                self.lines.append(line)
        self._changed(line)
        return line

    def warn(self, text: str) -> None:
        if not self.quiet:
            with self.lock:
                self._clear()
                self.stream.write(f"WARN[0000] {text}\n")
                self._draw()
                self.stream.flush()

    def _changed(self, line: Line) -> None:
        if self.quiet:
            return
        with self.lock:
            if self.tty:
                self._clear()
                self._draw()
            else:
                self.stream.write(line.text(0).replace("  ", " ", 1) + "\n")
            self.stream.flush()

    def _width(self) -> int:
        return max((len(x.name) for x in self.lines), default=0)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def _draw(self) -> None:
        if not self.tty:
            return
        width = self._width()
        for line in self.lines:
            self.stream.write(line.text(width) + "\n")
        self.drawn = len(self.lines)

    def close(self) -> None:
        """Stop redrawing: later output goes below the lines."""
        with self.lock:
            self.lines = []
            self.drawn = 0
