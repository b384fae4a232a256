"""The guest images on disk: ``paths.guest_dir()/<inputs-hash>/``, found or built under a
lock (:func:`ensure_guest_image`), older builds retired after a grace period."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from shim import paths
from shim.errors import GuestImageError
from shim.guestimage.image import GuestImage
from shim.guestimage.initramfs import _INITRAMFS, _KERNEL, _MANIFEST, _build
from shim.guestimage.inputs import CMDLINE, COMPRESSION, collect_inputs, guest_source_dir, inputs_hash

_SUPERSEDED = ".superseded"

RETIRE_GRACE = 600.0
"""Seconds a superseded build is kept before the next build removes it."""


def _image_from_dir(d: Path) -> GuestImage | None:
    try:
        manifest = json.loads((d / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    kernel, initramfs = d / _KERNEL, d / _INITRAMFS
    if not (kernel.is_file() and initramfs.is_file()):
        return None
    return GuestImage(
        kernel=kernel,
        initramfs=initramfs,
        kernel_release=manifest.get("kernel", {}).get("release", ""),
        manifest=manifest,
        cmdline=manifest.get("cmdline", CMDLINE),
    )


def current_guest_image(kernel: str | None = None) -> GuestImage | None:
    """The built image matching today's inputs (with *kernel* ``minimal``/``distro``, that
    kernel rather than :func:`kernel_choice`'s), or None if there is none (never builds).

    Cheap (a few ms) unless apt's lists or dpkg's status changed since the last look, in
    which case apt is asked again (about 1 s). Raises GuestImageError only when the inputs
    cannot be determined at all (busybox-static missing, no kernel known).
    """
    d = paths.guest_dir() / inputs_hash(collect_inputs(kernel_request=kernel))
    return _image_from_dir(d)


def ensure_guest_image(
    progress: Callable[[str], None] | None = None,
    force: bool = False,
    kernel: str | None = None,
    refresh_kernel: bool = False,
) -> GuestImage:
    """Return the guest image for today's inputs, building it first if it is missing or
    stale (or always, with *force*). *progress* receives one line per build step. *kernel*
    (``minimal``/``distro``) overrides :func:`kernel_choice`; the minimal kernel must be built.
    *refresh_kernel* asks apt for the newest cloud kernel first (``vmshim guest build``).

    Builds are serialised with a lock in ``guest_dir()``; the new build appears atomically
    and older builds are removed by a later build once superseded for RETIRE_GRACE. Raises
    GuestImageError with what to do on any failure.
    """
    return _ensure(progress or (lambda _msg: None), force, guest_source_dir(), COMPRESSION, kernel, refresh_kernel)


def _ensure(
    progress: Callable[[str], None],
    force: bool,
    guest_src: Path,
    compression: str,
    kernel: str | None = None,
    refresh_kernel: bool = False,
) -> GuestImage:
    inputs = collect_inputs(guest_src, kernel_request=kernel, refresh_kernel=refresh_kernel)
    inputs["compression"] = compression
    digest = inputs_hash(inputs)
    gdir = paths.guest_dir()
    if not force:
        image = _image_from_dir(gdir / digest)
        if image:
            _unretire(gdir / digest)
            return image
    try:
        gdir.mkdir(parents=True, exist_ok=True)
        lock = open(gdir / ".lock", "a+")
    except OSError as exc:
        raise GuestImageError(
            f"cannot write the guest image directory {gdir}: {exc.strerror} (run as root or set VMSHIM_ROOT)"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force:
            image = _image_from_dir(gdir / digest)
            if image:  # another process built it while we waited
                return image
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{digest}-", dir=gdir))
        try:
            _build(tmp, inputs, digest, guest_src, compression, progress)
            final = gdir / digest
            if final.exists():
                old = gdir / f".old-{digest}-{os.getpid()}"
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.chmod(tmp, 0o755)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if not os.environ.get("VMSHIM_GUEST_SOURCE"):
            # A variant (hostile-guest tests) never retires the normal image other runs
            # use; the next normal build retires the variant.
            _retire_old_builds(gdir, keep=digest)
        image = _image_from_dir(final)
        assert image is not None
        progress(f"guest image ready: {final}")
        return image


def _unretire(build: Path) -> None:
    """A superseded build that is current again (inputs went back) must not be removed."""
    try:
        (build / _SUPERSEDED).unlink()
    except OSError:
        pass


def _retire_old_builds(gdir: Path, keep: str, now: float | None = None) -> None:
    """Remove builds other than *keep*, each only once it has been superseded for
    RETIRE_GRACE seconds (a VM being started from it still needs its files): the first
    call marks a build superseded, a later one removes it. Half-built temp dirs go at once
    (the caller holds the build lock)."""
    now = time.time() if now is None else now
    for other in gdir.iterdir():
        if other.name in (keep, ".lock") or not other.is_dir():
            continue
        if other.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(other, ignore_errors=True)
            continue
        marker = other / _SUPERSEDED
        try:
            since = marker.stat().st_mtime
        except FileNotFoundError:
            try:
                marker.touch()
            except OSError:
                pass
            continue
        if now - since >= RETIRE_GRACE:
            shutil.rmtree(other, ignore_errors=True)
