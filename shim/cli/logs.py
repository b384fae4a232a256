"""``vmshim logs``: print a container's log (shim.containers.logfollow reads and follows it)."""

from __future__ import annotations

import click

from shim.containers.logfollow import container_log
from shim.containers.logs import render
from shim.files import write_all


def _write(fd: int, data: bytes) -> None:
    """Print *data*; a reader that went away (``| head``) ends the command quietly."""
    try:
        write_all(fd, data)
    except BrokenPipeError:
        raise SystemExit(0) from None


def _emit(lines, timestamps: bool) -> None:
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
@click.option("-n", "--tail", default="all", show_default=True, metavar="N", help="Only the last N lines.")
@click.option("-t", "--timestamps", is_flag=True, help="Prefix each line with its time.")
@click.option("--since", metavar="TIME", help="Only lines since TIME (RFC 3339, unix time, or 10m).")
@click.option("--until", metavar="TIME", help="Only lines before TIME.")
@click.argument("container")
def logs(follow, tail, timestamps, since, until, container):
    """Print a container's output (stdout to stdout, stderr to stderr)."""
    for batch in container_log(container, follow=follow, tail=tail, since=since, until=until):
        _emit(batch, timestamps)
