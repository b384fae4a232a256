"""Where vmshim keeps its state. One place decides every path.

``VMSHIM_ROOT`` (default /var/lib/vmshim) holds the image store, layer disks, the guest
image and containers; ``VMSHIM_RUN`` (default /run/vmshim) holds sockets and per-run files.
"""

from __future__ import annotations

import os
from pathlib import Path


def root() -> Path:
    return Path(os.environ.get("VMSHIM_ROOT", "/var/lib/vmshim"))


def run_dir() -> Path:
    return Path(os.environ.get("VMSHIM_RUN", str(root() / "run")))


def images_dir() -> Path:
    """OCI store: blobs/sha256/<hex>, index.json (refs), layer disks under layers/."""
    return root() / "images"


def layer_disks_dir() -> Path:
    return root() / "layers"


def guest_dir() -> Path:
    """Built guest images: guest/<input-hash>/{vmlinuz,initramfs,manifest.json}."""
    return root() / "guest"


def containers_dir() -> Path:
    return root() / "containers"


def volumes_dir() -> Path:
    """Named volumes: volumes/<name>/{volume.json,volume.img,lock} (see shim.volumes)."""
    return root() / "volumes"


def cache_dir() -> Path:
    """Downloads (kernel .deb) and other things that can be fetched again."""
    return root() / "cache"


ROOT_MODE = 0o711  # others may traverse (QEMU runs as libvirt-qemu) but not list
DIR_MODE = 0o711
FILE_MODE = 0o600


def private_dir(path: Path, mode: int = DIR_MODE) -> Path:
    """Create *path* (and missing parents) and give it *mode*: 0711 by default, which
    lets QEMU (libvirt-qemu) reach an image file below by name without letting local
    users list anything. Returns *path*."""
    path.mkdir(parents=True, exist_ok=True)
    if (os.stat(path).st_mode & 0o7777) != mode:
        os.chmod(path, mode)
    return path


def secure_root() -> None:
    """Make ``$VMSHIM_ROOT`` 0711 (creating it if needed). A root that other users could
    list was made by an older vmshim: the files under it that hold container and image
    data (rw.img, volume.img, layer disks, blobs, logs, config drives) lose their group
    and other permissions, once. Only a root owned by the caller is changed."""
    base = root()
    base.mkdir(parents=True, exist_ok=True)
    st = os.stat(base)
    if st.st_uid != os.geteuid():
        return
    if (st.st_mode & 0o7777) != ROOT_MODE:
        _tighten_older_root(base)
        os.chmod(base, ROOT_MODE)
    for path in (containers_dir(), volumes_dir(), layer_disks_dir(), run_dir()):
        if not path.exists():  # made here so that they are born unlistable
            private_dir(path)


def _tighten_older_root(base: Path) -> None:
    """Take group and other permissions off what an older vmshim left readable: blobs,
    layer disks, each container's files, volume images, config drives in run dirs. Only
    these two levels: the trees below (a process container's ``rw/``, mounted rootfs) are
    the container's own and keep their modes. Directories keep search for others."""
    globs = [
        ("images/blobs/sha256/*", 0o077),
        ("layers/*", 0o077),
        ("containers/*/*", 0o077),
        ("volumes/*/*", 0o077),
        ("run/*/*", 0o077),
    ]
    dirs = [
        "images",
        "images/blobs",
        "images/blobs/sha256",
        "layers",
        "containers",
        "containers/*",
        "volumes",
        "volumes/*",
        "run",
        "run/*",
    ]
    for pattern in dirs:
        for path in base.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                _chmod_without(str(path), 0o066, follow=False)
    for pattern, bits in globs:
        for path in base.glob(pattern):
            if path.is_symlink() or path.is_socket() or path.is_mount():
                continue
            _chmod_without(str(path), 0o066 if path.is_dir() else bits, follow=False)


def _chmod_without(path: str, bits: int, follow: bool) -> None:
    try:
        st = os.lstat(path)
    except OSError:
        return
    import stat as stat_mod

    if stat_mod.S_ISLNK(st.st_mode) or not (st.st_mode & bits):
        return
    try:
        os.chmod(path, st.st_mode & 0o7777 & ~bits, follow_symlinks=follow)
    except (OSError, NotImplementedError):
        pass


def libvirt_uri() -> str:
    return os.environ.get("VMSHIM_LIBVIRT_URI", "qemu:///system")
