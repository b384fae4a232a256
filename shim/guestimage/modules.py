"""Kernel modules: their names and modinfo, and the closure of the modules the agent loads
under their dependencies, in load order (:class:`ModuleTree`)."""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Callable, Iterable

from shim.errors import GuestImageError

GUEST_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_console",
    "virtio_blk",
    "virtio_rng",
    "overlay",
    "squashfs",
    "isofs",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport",
    "fuse",
    "virtiofs",
)
"""Kernel modules the agent loads, boot-critical first. Dependencies are added and the whole
list is written in load order; a module the kernel has built in is skipped."""

MODULE_LIST = "/lib/modules/vmshim-modules.txt"


def module_name(filename: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko.xz`` → ``virtio_rng``."""
    base = filename.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """Return the ``.modinfo`` key/values of an ELF64 little-endian kernel module."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 little-endian file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, strsize = section(shstrndx)
    strtab = data[stroff : stroff + strsize]
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = section(i)
        if strtab[name : strtab.index(b"\0", name)] == b".modinfo":
            for item in data[off : off + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            break
    return info


def _module_bytes(path: Path) -> bytes:
    """Content of a module file, decompressed (the agent loads plain .ko with finit_module)."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        if not shutil.which("zstd"):
            raise GuestImageError(f"{path} is zstd-compressed and zstd is not installed; apt-get install zstd")
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    raise GuestImageError(f"{path} is not a kernel module")


def module_load_order(
    wanted: Iterable[str], depends: Callable[[str], list[str] | None], builtin: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """Order *wanted* modules and everything they depend on so each comes after its
    dependencies, keeping *wanted*'s order otherwise.

    *depends(name)* returns a module's dependencies, or None if there is no such module.
    Returns ``(order, missing)``: *missing* are modules that are neither available nor
    built in. Raises GuestImageError on a dependency cycle.
    """
    builtin = {b.replace("-", "_") for b in builtin}
    order: list[str] = []
    missing: list[str] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in active:
            raise GuestImageError(f"kernel modules depend on each other in a cycle: {' -> '.join(active + [name])}")
        deps = depends(name)
        if deps is None:
            if name not in missing:
                missing.append(name)
            return
        active.append(name)
        for dep in deps:
            visit(dep)
        active.pop()
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order, missing


class ModuleTree:
    """The modules of one kernel release: ``<modules_dir>/kernel/...``, with
    ``modules.dep`` when depmod made one, else dependencies read from each ``.modinfo``."""

    def __init__(self, modules_dir: Path):
        self.dir = modules_dir
        self.files: dict[str, str] = {}
        for dirpath, _dirs, files in os.walk(modules_dir):
            for f in files:
                if re.search(r"\.ko(\.(xz|gz|zst))?$", f):
                    rel = os.path.relpath(os.path.join(dirpath, f), modules_dir)
                    self.files.setdefault(module_name(f), rel)
        self._dep: dict[str, list[str]] | None = None
        dep_file = modules_dir / "modules.dep"
        if dep_file.is_file():
            self._dep = {}
            for line in dep_file.read_text().splitlines():
                mod, _, deps = line.partition(":")
                self._dep[module_name(mod)] = [module_name(d) for d in deps.split()]
        self.builtin: set[str] = set()
        builtin_file = modules_dir / "modules.builtin"
        if builtin_file.is_file():
            self.builtin = {module_name(l) for l in builtin_file.read_text().split()}

    def depends(self, name: str) -> list[str] | None:
        if name not in self.files:
            return None
        if self._dep is not None and name in self._dep:
            return self._dep[name]
        info = read_modinfo(_module_bytes(self.dir / self.files[name]))
        return [d for v in info.get("depends", []) for d in v.split(",") if d]

    def resolve(self, wanted: Iterable[str]) -> tuple[list[str], list[str]]:
        return module_load_order(wanted, self.depends, self.builtin)
