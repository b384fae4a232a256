"""``vmshim build --progress tty``: docker buildx's collapsing step view.

One line per step (``=> [3/7] RUN npm install  12.4s``, ``=> CACHED [2/7] …``) under a
``[+] Building 14.1s (3/7)`` header, redrawn in place. While a RUN step runs, its last
output lines show under it; they collapse when it ends. A failed step's output stays.
Independent stages run at once: each thread's step is tracked on its own.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from shim.build.builder import BuildOutput

SHOWN_LINES = 6
"""Output lines shown under a running step."""
KEPT_LINES = 200
"""Output lines kept per step (shown again when it fails)."""
TICK = 0.25
_ID_LINE = re.compile(r" ---> [0-9a-f]{12}$")


@dataclass
class _Step:
    number: int
    total: int
    text: str
    started: float
    ended: float | None = None
    cached: bool = False
    tail: deque = field(default_factory=lambda: deque(maxlen=KEPT_LINES))


class TtyOutput(BuildOutput):
    """Writes the step view to *stream* (a text stream on a terminal). ``run_fd`` is the
    write end of a pipe read by a thread of its own: RUN output becomes the running
    step's tail instead of scrolling by."""

    def __init__(self, stream, clock=time.monotonic, tick: float = TICK):
        self.stream = stream
        self.clock = clock
        self.started = clock()
        self.steps: list[_Step] = []
        self.warnings: list[str] = []
        self._lock = threading.RLock()
        self._local = threading.local()
        self._drawn = 0
        self._done = threading.Event()
        read_fd, self.run_fd = os.pipe()
        self._reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self._reader.start()
        self._ticker = None
        if tick:
            self._ticker = threading.Thread(target=self._tick, args=(tick,), daemon=True)
            self._ticker.start()

    # ---- BuildOutput ------------------------------------------------------------------------
    def step(self, number: int, total: int, text: str) -> None:
        with self._lock:
            self._end_current()
            step = _Step(number, total, text, self.clock())
            self.steps.append(step)
            self._local.step = step
            self._draw()

    def line(self, text: str) -> None:
        with self._lock:
            step = getattr(self._local, "step", None)
            if step is not None and text == " ---> Using cache":
                step.cached = True
            elif step is not None and _ID_LINE.match(text):
                self._end_current()
            self._draw()

    def status(self, text: str | None) -> None: ...

    def warn(self, text: str) -> None:
        with self._lock:
            self.warnings.append(text)
            self._draw()

    # ---- the view ---------------------------------------------------------------------------
    def close(self, failed: bool = False) -> None:
        """Draw the final view: every step collapsed, but a failed (unfinished) one keeps
        its output; then the warnings. Stops the threads."""
        if self.run_fd is not None:
            os.close(self.run_fd)
        self._reader.join(timeout=5)
        self._done.set()
        with self._lock:
            if not failed:
                for step in self.steps:
                    if step.ended is None:
                        step.ended = self.clock()
            self._draw(final=True)
            for text in self.warnings:
                self.stream.write(f"[Warning] {text}\n")
            self.stream.flush()

    def render(self, final: bool = False) -> list[str]:
        """The view's lines."""
        now = self.clock()
        done = sum(1 for s in self.steps if s.ended is not None)
        total = self.steps[-1].total if self.steps else 0
        lines = [
            f"[+] Building {now - self.started:.1f}s ({done}/{total})"
            + (" FINISHED" if final and done == len(self.steps) else "")
        ]
        for step in self.steps:
            label = f"[{step.number}/{step.total}] {step.text}"
            if step.cached:
                lines.append(f" => CACHED {label}")
                continue
            spent = (step.ended or now) - step.started
            lines.append(f" => {label}  {spent:.1f}s")
            if step.ended is None:
                shown = list(step.tail) if final else list(step.tail)[-SHOWN_LINES:]
                lines.extend(f" => => # {text}" for text in shown)
        return lines

    def _draw(self, final: bool = False) -> None:
        lines = self.render(final)
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")  # to the first line of the last drawing
        for text in lines:
            out.append(f"\x1b[2K{text}\n")
        if len(lines) < self._drawn:
            out.append("\x1b[J")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(lines)

    def _end_current(self) -> None:
        step = getattr(self._local, "step", None)
        if step is not None and step.ended is None:
            step.ended = self.clock()

    def _read(self, fd: int) -> None:
        pending = b""
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                with self._lock:
                    step = next((s for s in reversed(self.steps) if s.ended is None), None)
                    if step is not None:
                        for raw in complete:
                            text = raw.decode(errors="replace").split("\r")[-1]
                            step.tail.append("".join(c if c.isprintable() else "?" for c in text)[:200])
                        self._draw()

    def _tick(self, every: float) -> None:
        while not self._done.wait(every):
            with self._lock:
                if self.steps:
                    self._draw()
