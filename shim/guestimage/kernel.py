"""The guest kernel: which one (:func:`kernel_choice`: the minimal build, Debian's cloud
kernel, or ``VMSHIM_KERNEL``), and fetching and unpacking the Debian package once."""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from shim import paths
from shim.errors import GuestImageError
from shim.guestimage.tools import _run, _stat_sig

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"


def _resolve_kernel_package() -> dict:
    """Ask apt which package ``linux-image-cloud-amd64`` stands for and its candidate version.
    Falls back to the newest .deb already in the cache when apt knows nothing."""
    dep = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    name = None
    for line in dep.stdout.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            name = m.group(1)
            break
    version = None
    if name:
        pol = _run(["apt-cache", "policy", name])
        m = re.search(r"Candidate:\s*(\S+)", pol.stdout)
        if m and m.group(1) != "(none)":
            version = m.group(1)
    if name and version:
        return {"package": name, "version": version}
    cached = sorted(
        (paths.cache_dir() / "kernel").glob("linux-image-*-cloud-amd64_*.deb"), key=lambda p: p.stat().st_mtime
    )
    if cached:
        pkg, ver, _ = cached[-1].name.split("_", 2)
        from urllib.parse import unquote

        return {"package": pkg, "version": unquote(ver)}
    raise GuestImageError(
        f"apt knows no {KERNEL_META_PACKAGE} and none is cached; run apt-get update "
        "(or set VMSHIM_KERNEL and VMSHIM_KERNEL_MODULES to a kernel you built)"
    )


def _kernel_override() -> dict | None:
    """Inputs for ``VMSHIM_KERNEL`` (+ ``VMSHIM_KERNEL_MODULES``), or None when unset."""
    kernel = os.environ.get("VMSHIM_KERNEL")
    modules = os.environ.get("VMSHIM_KERNEL_MODULES")
    if not kernel:
        if modules:
            raise GuestImageError("VMSHIM_KERNEL_MODULES is set without VMSHIM_KERNEL; set both or neither")
        return None
    kpath = Path(kernel).resolve()
    ksig = _stat_sig(kpath)
    if ksig is None or not kpath.is_file():
        raise GuestImageError(f"VMSHIM_KERNEL={kernel} is not a file")
    out = {"source": "override", "kernel": str(kpath), "kernel_mtime_ns": ksig[0], "kernel_size": ksig[1]}
    if modules:
        mpath = Path(modules).resolve()
        msig = _stat_sig(mpath)
        if msig is None or not mpath.is_dir():
            raise GuestImageError(f"VMSHIM_KERNEL_MODULES={modules} is not a directory (want /lib/modules/<release>)")
        out.update(modules=str(mpath), modules_mtime_ns=msig[0])
    return out


KERNEL_CHOICES = ("minimal", "distro")

KERNEL_ENV = "VMSHIM_GUEST_KERNEL"
"""Environment override of the kernel choice (``minimal`` or ``distro``), e.g. for a bench or
a test run on the other kernel."""


def _choice_file() -> Path:
    return paths.guest_dir() / "kernel-choice"


def save_kernel_choice(choice: str | None) -> None:
    """Remember *choice* (``minimal``/``distro``) for every later VM; None goes back to auto."""
    path = _choice_file()
    if choice is None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return
    if choice not in KERNEL_CHOICES:
        raise GuestImageError(f"unknown guest kernel {choice!r}; choose one of {', '.join(KERNEL_CHOICES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(choice + "\n")
    os.replace(tmp, path)


def kernel_choice(requested: str | None = None) -> tuple[str, str]:
    """Which kernel the guest boots, and why: ``(choice, reason)`` with choice ``override``
    (VMSHIM_KERNEL), ``minimal`` or ``distro``. In order: VMSHIM_KERNEL, *requested*,
    $VMSHIM_GUEST_KERNEL, the choice saved by ``vmshim guest build --kernel``, else the
    minimal kernel if it is built, else the distro kernel. Raises GuestImageError for an
    unknown name."""
    if os.environ.get("VMSHIM_KERNEL"):
        return "override", f"VMSHIM_KERNEL={os.environ['VMSHIM_KERNEL']}"
    if requested:
        source = "asked for"
    elif os.environ.get(KERNEL_ENV):
        requested, source = os.environ[KERNEL_ENV], f"{KERNEL_ENV} is set"
    else:
        try:
            requested = _choice_file().read_text().strip() or None
        except OSError:
            requested = None
        source = f"chosen with `vmshim guest build --kernel {requested}`"
    if requested:
        if requested not in KERNEL_CHOICES:
            raise GuestImageError(
                f"unknown guest kernel {requested!r} ({source}); choose one of {', '.join(KERNEL_CHOICES)}"
            )
        return requested, source
    from shim import kernelbuild

    built = kernelbuild.cached_kernel()
    if built is not None:
        return "minimal", f"the minimal kernel is built ({built.dir})"
    return "distro", "no minimal kernel is built (`vmshim guest kernel build` makes one)"


def _minimal_kernel_inputs() -> dict:
    from shim import kernelbuild

    built = kernelbuild.cached_kernel()
    if built is None:
        raise GuestImageError(
            "the minimal guest kernel is not built; run `vmshim guest kernel build` "
            "(minutes), or use the distro kernel (`vmshim guest build --kernel distro`)"
        )
    r = built.record
    return {
        "source": "minimal",
        "key": built.key,
        "kernel": str(built.boot_image),
        "release": r.get("release", ""),
        "source_package": r.get("source_package", ""),
        "source_version": r.get("source_version", ""),
        "fragment_sha256": r.get("fragment_sha256", ""),
    }


def bzimage_release(path: Path) -> str:
    """Kernel release string from a bzImage's setup header (``6.1.0-56-cloud-amd64``)."""
    with open(path, "rb") as f:
        head = f.read(0x10000)
    if head[0x202:0x206] != b"HdrS":
        raise GuestImageError(f"{path} is not a bzImage (set VMSHIM_KERNEL_MODULES too, to name its release)")
    (off,) = struct.unpack_from("<H", head, 0x20E)
    raw = head[off + 0x200 : off + 0x200 + 256]
    return raw.split(b"\0", 1)[0].split(b" ", 1)[0].decode(errors="replace")


def _debian_kernel(package: str, version: str, progress: Callable[[str], None]) -> tuple[Path, Path, str, Path]:
    """Download (once) and unpack (once) the kernel package; return vmlinuz, the modules
    directory, the release and the .deb."""
    kdir = paths.cache_dir() / "kernel"
    kdir.mkdir(parents=True, exist_ok=True)
    debname = f"{package}_{quote(version, safe='.+~-')}_amd64.deb"
    deb = kdir / debname
    if not deb.is_file():
        progress(f"downloading {package} {version}")
        res = _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=kdir)
        if res.returncode != 0 or not deb.is_file():
            progress("apt-get download failed; running apt-get update")
            _run(["apt-get", "update", "-q"])
            res = _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=kdir)
        if res.returncode != 0 or not deb.is_file():
            err = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise GuestImageError(f"cannot download {package} {version}: {err}")
    unpacked = kdir / deb.name[: -len(".deb")]
    if not unpacked.is_dir():
        progress(f"unpacking {deb.name}")
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=kdir))
        res = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise GuestImageError(f"cannot unpack {deb}: {res.stderr.strip()} (delete it and build again)")
        os.rename(tmp, unpacked)
    vmlinuzes = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not vmlinuzes:
        raise GuestImageError(f"{deb.name} holds no boot/vmlinuz-*; delete {unpacked} and build again")
    release = vmlinuzes[0].name[len("vmlinuz-") :]
    for base in ("lib/modules", "usr/lib/modules"):
        mdir = unpacked / base / release
        if mdir.is_dir():
            return vmlinuzes[0], mdir, release, deb
    raise GuestImageError(f"{deb.name} holds no modules for {release}")
