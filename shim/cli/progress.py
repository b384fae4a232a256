"""Progress bars for pull, push and load (rich, on stderr); ``-q`` uses none."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

from shim.images import distribution
from shim.images.distribution import NoProgress


class RichProgress:
    """One bar per blob: ``<short digest>  <status>  [bar]  done/total  speed``."""

    def __init__(self, verb: str, console: Console | None = None):
        self.verb = verb
        self.console = console or Console(stderr=True)
        self.bars = Progress(
            TextColumn("{task.description:<12}"),
            TextColumn("{task.fields[status]:<20}"),
            BarColumn(bar_width=30),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            console=self.console,
            transient=False,
        )
        self.started = False
        self.tasks: dict[str, TaskID] = {}
        self.totals: dict[str, int | None] = {}
        self.lock = threading.Lock()

    def start(self, key: str, description: str, total: int | None) -> None:
        with self.lock:
            if not self.started:  # no display at all until there is something to show
                self.bars.start()
                self.started = True
            self.totals[key] = total
            if key in self.tasks:
                self.bars.reset(self.tasks[key], total=total, status=self.verb)
            else:
                self.tasks[key] = self.bars.add_task(description, total=total, status=self.verb)

    def advance(self, key: str, n: int) -> None:
        task = self.tasks.get(key)
        if task is not None:
            self.bars.advance(task, n)

    def finish(self, key: str, status: str) -> None:
        task = self.tasks.get(key)
        if task is not None:
            total = self.totals.get(key)
            if total is not None:
                self.bars.update(task, status=status, completed=total)
            else:
                self.bars.update(task, status=status)


@contextlib.contextmanager
def progress_for(verb: str, quiet: bool) -> Iterator[distribution.Progress]:
    """A Progress for the library: rich bars on stderr, or nothing when ``quiet``."""
    if quiet:
        yield NoProgress()
        return
    p = RichProgress(verb)
    try:
        yield p
    finally:
        if p.started:
            p.bars.stop()
