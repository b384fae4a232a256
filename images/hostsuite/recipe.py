"""Recipe for ``hostsuite:bookworm``: Debian bookworm (debootstrap, minbase) with
``python3``, ``python3-pytest`` and ``busybox-static``: what the host-side
process-isolation tests (tests/integration) need to run on a cgroup **v2-only** Debian 12
host. tests/e2e/test_v2_only_host.py boots it with vmshim itself, as a privileged VM
container (the guest's only cgroup mount is cgroup2), with the project tree mounted
read-only at its own path, and runs those tests inside.

Made like the node image (images/node/recipe.py, whose helpers it uses): debootstrap
minbase, ``apt-get install --no-install-recommends`` of PACKAGES in a chroot, slimmed,
written as one sorted layer tar with numeric owners and mtimes clamped to python3's
changelog date, cached as ``$VMSHIM_ROOT/cache/hostsuite/rootfs-bookworm-<arch>.tar``
(about 3 min the first time) with a JSON note of the packages it holds: the cache is used
only when that list is PACKAGES. ``VMSHIM_HOSTSUITE_REBUILD=1`` throws the cache away.

Run with ``vmshim image bootstrap hostsuite`` (scripts/test does, before the suite).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from shim import paths  # noqa: E402
from shim.errors import ImageError  # noqa: E402
from shim.images.store import Image, ImageStore, host_arch, load_recipe, recipe_config  # noqa: E402

REFERENCE = "docker.io/library/hostsuite:bookworm"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-pytest", "busybox-static")
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cache_path() -> Path:
    return paths.cache_dir() / "hostsuite" / f"rootfs-{SUITE}-{host_arch()}.tar"


def _cached_meta(tar_path: Path, meta_path: Path) -> dict | None:
    """The cache note when the cached tar holds exactly PACKAGES, else None."""
    if not (tar_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("packages") != list(PACKAGES):
        return None
    return meta


def build(store: ImageStore | None = None, log=print) -> Image:
    """Build the hostsuite image into *store* (default: the local store) and return it.
    Raises ImageError (debootstrap missing or failing, not root)."""
    node = load_recipe("node")
    store = store or ImageStore()
    tar_path = cache_path()
    meta_path = tar_path.with_suffix(".json")
    node.forget_when_asked("VMSHIM_HOSTSUITE_REBUILD", tar_path, meta_path)
    meta = _cached_meta(tar_path, meta_path)
    if meta is None:

        def prepare(rootfs: Path):
            node.debootstrap(rootfs, log, packages=PACKAGES, recipe="hostsuite")
            return node.changelog_date(rootfs, "python3"), {"packages": list(PACKAGES)}

        node.write_rootfs_tar(store, "hostsuite", tar_path, meta_path, prepare)
        meta = _cached_meta(tar_path, meta_path)
        if meta is None:
            raise ImageError(f"the hostsuite rootfs cache {tar_path} was not written")
    config = recipe_config(
        meta["created"],
        {"Env": [PATH_ENV], "Cmd": ["python3"]},
        f"vmshim images/hostsuite/recipe.py (debootstrap {SUITE} minbase + {' '.join(PACKAGES)})",
    )
    return node.stored_or_imported(store, REFERENCE, tar_path, meta, config)


if __name__ == "__main__":
    image = build()
    print(f"{image.reference.familiar} {image.id}")
