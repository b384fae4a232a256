"""``vmshim logs`` as a library call: a container's log lines, and with ``follow`` the new
ones as they come, until the container stops (its monitor gone) or is removed. Reads the
json-lines files directly (shim.containers.logs), so no monitor is needed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Iterator

from shim.containers import logs as logmod
from shim.containers import manage
from shim.containers import state as lifecycle
from shim.containers.store import ContainerStore, monitor_alive
from shim.errors import ContainerNotFound, UsageError

FOLLOW_POLL = 0.1
STATE_POLL = 0.5

Line = tuple[str, str, bytes]


def container_log(
    ref: str,
    *,
    follow: bool = False,
    tail: str = "all",
    since: str | None = None,
    until: str | None = None,
    store: ContainerStore | None = None,
) -> Iterator[Iterable[Line]]:
    """Batches of log lines (time, stream, bytes) of the container *ref* names: first the
    history (the last *tail* lines, within *since*/*until*), then with *follow* (and no
    *until*) each poll's new lines until the container has stopped. Raises UsageError
    for a bad *tail*/*since*/*until*, ContainerNotFound."""
    if tail != "all" and not tail.isdigit():
        raise UsageError(f"invalid --tail {tail!r}: a number or 'all'")
    store = store if store is not None else ContainerStore()
    record = store.find(ref)
    path = store.log_path(record.id)
    since_t = logmod.parse_since(since) if since else None
    until_t = logmod.parse_since(until) if until else None
    # Streamed: the files are read one entry at a time, only the --tail window is kept.
    follower = logmod.Follower(path, from_start=True) if follow and until_t is None else None
    history = logmod.iter_entries(path) if follower is None else _rotated_then(path, follower)
    yield logmod.iter_lines(history, tail=None if tail == "all" else int(tail), since=since_t, until=until_t)
    if follower is None:
        return
    record = manage.reconcile(store, record)
    next_check = time.monotonic() + STATE_POLL
    done = False
    try:
        while True:
            yield logmod.iter_lines(follower.entries(), since=since_t)
            if done:
                return
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + STATE_POLL
                try:
                    record = store.load(record.id)
                except ContainerNotFound:
                    done = True
                    continue
                if lifecycle.is_active(record.status):
                    if not monitor_alive(record):
                        record = manage.reconcile(store, record)
                elif not monitor_alive(record):
                    done = True  # one more read for what the monitor wrote last
                    continue
            time.sleep(FOLLOW_POLL)
    finally:
        follower.close()


def _rotated_then(path: Path, follower: logmod.Follower) -> Iterator[Line]:
    """The rotated files' entries, then the current file's through *follower* (which
    then goes on following it)."""
    for name in logmod.log_files(path)[:-1]:
        yield from logmod.iter_entries_of_file(name)
    yield from follower.entries()
