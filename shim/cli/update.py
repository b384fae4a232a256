"""``vmshim update``: change the resource limits of containers (shim.containers.limits)."""

from __future__ import annotations

import click

from shim.containers.resources import resource_options


@click.command("update")
@(lambda func: resource_options(func, for_update=True))
@click.argument("containers", nargs=-1, required=True)
def update(containers, **flags):
    """Update the limits of one or more containers (at once when they run; a running VM
    cannot grow beyond its memory and vCPUs)."""
    from shim.containers.limits import update as update_limits
    from shim.containers.resources import from_flags
    from shim.errors import UsageError, VmshimError

    change = from_flags(**flags)
    if change.is_empty():
        raise UsageError("nothing to update: give at least one limit (see --help)")
    failed = []
    for ref in containers:
        try:
            update_limits(ref, change)
            click.echo(ref)
        except VmshimError as exc:
            failed.append(str(exc))
    if failed:
        raise VmshimError("; ".join(failed))
