"""Everything a guest image is built from (:func:`collect_inputs`) and its hash, which
names the build: builder version, kernel, python and busybox packages, every file of
``guest/``. The slow look-ups are cached in ``cache_dir()/guest-inputs.json``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Mapping

from shim import paths
from shim.errors import GuestImageError
from shim.guestimage.kernel import _kernel_override, _minimal_kernel_inputs, _resolve_kernel_package, kernel_choice
from shim.guestimage.python import PYTHON, PYTHON_PACKAGES
from shim.guestimage.tools import _package_versions, _stat_sig, _write_json_quietly

BUILDER_VERSION = 2
"""Bump whenever what the builder puts into the image changes (it is part of the hash)."""

BUSYBOX = Path("/bin/busybox")

BUSYBOX_PACKAGE = "busybox-static"

CMDLINE = (
    "console=ttyS0 panic=-1 quiet loglevel=0 i8042.noaux i8042.nokbd 8250.nr_uarts=1 "
    "tsc=reliable no_timer_check noreplace-smp cryptomgr.notests random.trust_cpu=on"
)
"""Kernel command line from DESIGN's measured recipe."""

COMPRESSION = "lz4"
"""``"lz4"`` (legacy frame, ``lz4 -l``) or ``"none"``; see images/guest/README.md for the
measurement behind the choice."""

_HASH_LEN = 16


def guest_source_dir() -> Path:
    """The ``guest`` package that goes into the image: $VMSHIM_GUEST_SOURCE when set (the
    malicious-guest tests build a hostile variant this way), else this checkout's."""
    override = os.environ.get("VMSHIM_GUEST_SOURCE")
    if override:
        return Path(override).resolve()
    import guest

    return Path(guest.__file__).resolve().parent


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under *root* (relative path → hex), skipping bytecode caches."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith((".pyc", ".pyo")) or f.startswith(".#") or f.endswith("~"):
                continue
            p = Path(dirpath, f)
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def inputs_hash(inputs: Mapping) -> str:
    raw = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:_HASH_LEN]


def _apt_sig() -> list:
    """Cheap fingerprint of apt's package lists: the kernel candidate changes only with them."""
    lists = Path("/var/lib/apt/lists")
    try:
        names = sorted(os.listdir(lists))
    except OSError:
        return []
    return [[n] + (_stat_sig(lists / n) or []) for n in names if n not in ("lock", "partial", "auxfiles")]


def _fingerprint_file() -> Path:
    return paths.cache_dir() / "guest-inputs.json"


def collect_inputs(
    guest_src: Path | None = None, kernel_request: str | None = None, refresh_kernel: bool = False
) -> dict:
    """Everything the image is built from, as a JSON-able dict (its hash names the build).

    Slow look-ups (apt-cache ~1 s, dpkg-query) are cached in ``cache_dir()/guest-inputs.json``
    and redone only when dpkg's status or the binaries change, so this usually costs a few
    stats and hashing ``guest/``. The kernel package stays the one resolved last time until
    *refresh_kernel* (``vmshim guest build``) asks apt again: an ``apt-get update`` on the
    host must not make the next ``run`` download a new kernel (it may have no network).
    """
    guest_src = guest_src or guest_source_dir()
    override = _kernel_override()
    choice, _why = kernel_choice(kernel_request)
    if choice == "minimal":
        override = _minimal_kernel_inputs()
    sigs = {
        "apt": _apt_sig() if override is None else None,
        "dpkg": _stat_sig(Path("/var/lib/dpkg/status")),
        "python": _stat_sig(PYTHON),
        "busybox": _stat_sig(BUSYBOX),
    }
    try:
        cached = json.loads(_fingerprint_file().read_text())
    except (OSError, ValueError):
        cached = {}
    fresh = dict(cached)
    if override is not None:
        kernel = override
    elif (
        isinstance(cached.get("kernel"), dict)
        and cached["kernel"].get("source") == "debian"
        and (not refresh_kernel or cached.get("apt_sig") == sigs["apt"])
    ):
        kernel = cached["kernel"]
    else:
        kernel = {"source": "debian", **_resolve_kernel_package()}
        fresh.update(apt_sig=sigs["apt"], kernel=kernel)
    pkg_sig = [sigs["dpkg"], sigs["python"], sigs["busybox"]]
    if cached.get("pkg_sig") == pkg_sig and isinstance(cached.get("packages"), dict):
        packages = cached["packages"]
    else:
        if sigs["python"] is None:
            raise GuestImageError(f"{PYTHON} is missing; apt-get install python3.11-minimal (run scripts/setup)")
        if sigs["busybox"] is None:
            raise GuestImageError(f"{BUSYBOX} is missing: busybox-static is not installed; run scripts/setup")
        packages = _package_versions((*PYTHON_PACKAGES, BUSYBOX_PACKAGE))
        if not packages.get(BUSYBOX_PACKAGE):
            raise GuestImageError("busybox-static is not installed; run scripts/setup")
        fresh.update(pkg_sig=pkg_sig, packages=packages)
    if fresh != cached:
        _write_json_quietly(_fingerprint_file(), fresh)
    return {
        "builder": BUILDER_VERSION,
        "kernel": kernel,
        "python": {"path": str(PYTHON), **{p: packages.get(p, "") for p in PYTHON_PACKAGES}},
        "busybox": {"path": str(BUSYBOX), "package": BUSYBOX_PACKAGE, "version": packages[BUSYBOX_PACKAGE]},
        "guest": hash_tree(guest_src),
        "compression": COMPRESSION,
        "cmdline": CMDLINE,
    }
