"""``vmshim system df`` (and ``system prune`` for images). Thin: gather, print."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from shim import paths
from shim.cli.images import do_prune, images_in_use
from shim.images.store import ImageStore, format_size


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


def disk_usage() -> list[dict]:
    """Rows of ``system df``: images (blobs), layer disks, containers."""
    store = ImageStore()
    usage = store.disk_usage()
    in_use = images_in_use()
    active = len({s.id for s in store.list_images() if s.id in in_use})
    layer_dir = paths.layer_disks_dir()
    disks = list(layer_dir.glob("*.sqfs")) if layer_dir.is_dir() else []
    disk_size = sum(p.stat().st_size for p in disks)
    unused_disks = sum(p.stat().st_size for p in disks
                       if p.name.removesuffix(".sqfs") not in usage.layer_digests)
    cdir = paths.containers_dir()
    containers = [p for p in cdir.iterdir() if p.is_dir()] if cdir.is_dir() else []
    return [
        {"Type": "Images", "TotalCount": usage.images, "Active": active,
         "Size": usage.blobs_size + usage.reclaimable, "Reclaimable": usage.reclaimable},
        {"Type": "Layer disks", "TotalCount": len(disks),
         "Active": len(disks) - sum(1 for p in disks
                                    if p.name.removesuffix(".sqfs") not in usage.layer_digests),
         "Size": disk_size, "Reclaimable": unused_disks},
        {"Type": "Containers", "TotalCount": len(containers), "Active": 0,
         "Size": sum(_tree_size(p) for p in containers), "Reclaimable": 0},
    ]


@click.group("system")
def system_group() -> None:
    """Manage vmshim's state."""


@system_group.command("df")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default=None,
              help="json: one JSON object per line.")
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
        table.append((r["Type"], str(r["TotalCount"]), str(r["Active"]),
                      format_size(r["Size"]), format_size(r["Reclaimable"]) + pct))
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    for r in table:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@system_group.command("prune")
@click.option("-a", "--all", "all_images", is_flag=True,
              help="Also remove every image no container uses.")
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
def system_prune(all_images: bool, force: bool) -> None:
    """Remove unused data (for now: images and their blobs, as 'image prune')."""
    do_prune(all_images, force)
