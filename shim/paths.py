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


def libvirt_uri() -> str:
    return os.environ.get("VMSHIM_LIBVIRT_URI", "qemu:///system")
