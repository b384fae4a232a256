"""``vmshim logs``: read a container's json-lines log (no monitor needed), follow it."""

from __future__ import annotations

import os
import time

import click

FOLLOW_POLL = 0.1
STATE_POLL = 0.5


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BrokenPipeError:
            raise SystemExit(0)


def _emit(lines, timestamps: bool) -> None:
    from shim.containers.logs import render

    out, err = bytearray(), bytearray()
    for line in lines:
        (err if line[1] == "stderr" else out).extend(render(line, timestamps))
        if len(out) > 1 << 20 or len(err) > 1 << 20:
            _write(1, bytes(out))
            _write(2, bytes(err))
            out.clear()
            err.clear()
    if out:
        _write(1, bytes(out))
    if err:
        _write(2, bytes(err))


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the container stops.")
@click.option("-n", "--tail", default="all", show_default=True, metavar="N",
              help="Only the last N lines.")
@click.option("-t", "--timestamps", is_flag=True, help="Prefix each line with its time.")
@click.option("--since", metavar="TIME", help="Only lines since TIME (RFC 3339, unix time, or 10m).")
@click.option("--until", metavar="TIME", help="Only lines before TIME.")
@click.argument("container")
def logs(follow, tail, timestamps, since, until, container):
    """Print a container's output (stdout to stdout, stderr to stderr)."""
    from shim.containers import logs as logmod
    from shim.containers import manage
    from shim.containers import state as lifecycle
    from shim.containers.store import ContainerStore, monitor_alive
    from shim.errors import ContainerNotFound, UsageError

    if tail != "all" and not (tail.isdigit()):
        raise UsageError(f"invalid --tail {tail!r}: a number or 'all'")
    store = ContainerStore()
    record = store.find(container)
    path = store.log_path(record.id)
    since_t = logmod.parse_since(since) if since else None
    until_t = logmod.parse_since(until) if until else None
    # Streamed: the files are read one entry at a time, only the --tail window is kept.
    follower = logmod.Follower(path, from_start=True) if follow and until_t is None else None
    history = logmod.iter_entries(path) if follower is None else \
        _rotated_then(logmod, path, follower)
    _emit(logmod.iter_lines(history, tail=None if tail == "all" else int(tail),
                            since=since_t, until=until_t), timestamps)
    if follower is None:
        return
    record = manage.reconcile(store, record)
    next_check = time.monotonic() + STATE_POLL
    done = False
    while True:
        _emit(logmod.iter_lines(follower.entries(), since=since_t), timestamps)
        if done:
            follower.close()
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


def _rotated_then(logmod, path, follower):
    """The rotated files' entries, then the current file's through *follower* (which
    then goes on following it)."""
    for name in logmod.log_files(path)[:-1]:
        yield from logmod.iter_entries_of_file(name)
    yield from follower.entries()
