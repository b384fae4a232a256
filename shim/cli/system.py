"""``vmshim system df`` (and ``system prune`` for images). Thin: call
shim.containers.housekeeping, print."""

from __future__ import annotations

import json

import click

from shim.cli.images import do_prune
from shim.cli.table import print_table
from shim.containers.housekeeping import disk_usage
from shim.images.store import format_size


@click.group("system")
def system_group() -> None:
    """Manage vmshim's state."""


@system_group.command("df")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json"]), default=None, help="json: one JSON object per line."
)
def system_df(fmt: str | None) -> None:
    """Show the disk space used by images, layer disks and containers.

    Images: every blob of the store (RECLAIMABLE: what 'image prune' frees). Layer disks:
    squashfs conversions (ACTIVE: of a layer some image still has)."""
    rows = disk_usage()
    if fmt == "json":
        for row in rows:
            click.echo(json.dumps(row))
        return
    table = [("TYPE", "TOTAL", "ACTIVE", "SIZE", "RECLAIMABLE")]
    for r in rows:
        pct = f" ({100 * r['Reclaimable'] // r['Size']}%)" if r["Size"] else ""
        table.append(
            (
                r["Type"],
                str(r["TotalCount"]),
                str(r["Active"]),
                format_size(r["Size"]),
                format_size(r["Reclaimable"]) + pct,
            )
        )
    print_table(table)


@system_group.command("prune")
@click.option("-a", "--all", "all_images", is_flag=True, help="Also remove every image no container uses.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def system_prune(all_images: bool, force: bool) -> None:
    """Remove unused data (for now: images and their blobs, as 'image prune')."""
    do_prune(all_images, force)
