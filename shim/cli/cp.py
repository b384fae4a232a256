"""``vmshim cp``: copy files between a container (running or not) and the host, both ways.

``CONTAINER:PATH`` names a path in the container (docker's syntax; a local path with a
colon must start with ``/`` or ``./``). ``-`` as the host side is a tar stream on
stdin/stdout. The agent's ``tar-out``/``tar-in`` helpers do the container's side."""

from __future__ import annotations

import click


@click.command()
@click.argument("src")
@click.argument("dest")
def cp(src, dest):
    """Copy SRC to DEST; one of them is CONTAINER:PATH."""
    from shim.containers import copy
    from shim.errors import UsageError

    from shim.containers.copy import split_ref

    src_ctr, src_path = split_ref(src)
    dest_ctr, dest_path = split_ref(dest)
    if (src_ctr is None) == (dest_ctr is None):
        raise UsageError(
            "cp copies between a container and the host: exactly one of SRC and DEST must be CONTAINER:PATH"
        )
    if src_ctr is not None:
        copy.copy_out(src_ctr, src_path, dest_path)
    else:
        copy.copy_in(src_path, dest_ctr, dest_path)
