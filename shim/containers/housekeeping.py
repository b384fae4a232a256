"""What vmshim's state takes on disk (``system df``) and pruning the images no container
uses (``image prune``, ``system prune``): the image store knows blobs and names, only
this floor knows which images containers still use."""

from __future__ import annotations

import os
from pathlib import Path

from shim import paths
from shim.containers.store import ContainerStore
from shim.images.store import ImageStore, PruneReport


def images_in_use() -> set[str]:
    """Image IDs (config digests) that containers use, which ``prune -a`` keeps."""
    return {c.image_id for c in ContainerStore().list() if c.image_id}


def prune_images(all_images: bool) -> PruneReport:
    """Remove blobs no image name reaches and interrupted downloads; with *all_images*
    also every image no container uses."""
    return ImageStore().prune(all_images=all_images, keep=images_in_use())


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
    unused_disks = sum(p.stat().st_size for p in disks if p.name.removesuffix(".sqfs") not in usage.layer_digests)
    cdir = paths.containers_dir()
    containers = [p for p in cdir.iterdir() if p.is_dir()] if cdir.is_dir() else []
    return [
        {
            "Type": "Images",
            "TotalCount": usage.images,
            "Active": active,
            "Size": usage.blobs_size + usage.reclaimable,
            "Reclaimable": usage.reclaimable,
        },
        {
            "Type": "Layer disks",
            "TotalCount": len(disks),
            "Active": len(disks) - sum(1 for p in disks if p.name.removesuffix(".sqfs") not in usage.layer_digests),
            "Size": disk_size,
            "Reclaimable": unused_disks,
        },
        {
            "Type": "Containers",
            "TotalCount": len(containers),
            "Active": 0,
            "Size": sum(_tree_size(p) for p in containers),
            "Reclaimable": 0,
        },
    ]
