"""Two layer disks mounted as an overlay, as the guest stacks them (needs root and loop
devices): for tests that check what a container sees of an image's layers."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

from shim.images.layers import mount_layer, umount_layer


@contextlib.contextmanager
def overlay_of(lower: Path, upper: Path, scratch: Path) -> Iterator[Path]:
    """Mount the layer disks *lower* and *upper* on *scratch*/lo and *scratch*/up and an
    overlay of them (writable layer *scratch*/rw) on *scratch*/merged, which is yielded;
    everything is unmounted after."""
    lo, up, merged, rw, work = (scratch / n for n in ("lo", "up", "merged", "rw", "work"))
    for d in (merged, rw, work):
        d.mkdir(parents=True)
    mount_layer(lower, lo)
    try:
        mount_layer(upper, up)
        try:
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    f"lowerdir={up}:{lo},upperdir={rw},workdir={work}",
                    str(merged),
                ],
                check=True,
            )
            try:
                yield merged
            finally:
                subprocess.run(["umount", str(merged)], check=True)
        finally:
            umount_layer(up)
    finally:
        umount_layer(lo)
