"""Building one guest image into a directory: the kernel copied, the initramfs assembled
(modules, python, guest/, busybox, /init, device nodes), compressed, and a manifest."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from shim.errors import GuestImageError
from shim.guestimage.cpio import CpioWriter
from shim.guestimage.inputs import BUILDER_VERSION, BUSYBOX, CMDLINE
from shim.guestimage.kernel import _debian_kernel, bzimage_release
from shim.guestimage.modules import GUEST_MODULES, MODULE_LIST, ModuleTree, _module_bytes
from shim.guestimage.python import GUEST_LIB, PYTHON, _shared_libraries, _stage_python
from shim.guestimage.tools import _run

BUSYBOX_APPLETS = (
    "sh",
    "ash",
    "mount",
    "umount",
    "ls",
    "cat",
    "echo",
    "mkdir",
    "rmdir",
    "rm",
    "cp",
    "mv",
    "ln",
    "chmod",
    "chown",
    "touch",
    "insmod",
    "rmmod",
    "lsmod",
    "modprobe",
    "reboot",
    "poweroff",
    "halt",
    "ip",
    "ifconfig",
    "route",
    "ps",
    "kill",
    "sleep",
    "dmesg",
    "mknod",
    "grep",
    "sed",
    "awk",
    "head",
    "tail",
    "wc",
    "find",
    "xargs",
    "env",
    "uname",
    "hostname",
    "id",
    "df",
    "du",
    "free",
    "top",
    "stat",
    "sync",
    "tar",
    "gzip",
    "gunzip",
    "vi",
    "less",
    "true",
    "false",
    "test",
    "[",
    "printf",
    "readlink",
    "realpath",
    "chroot",
    "switch_root",
    "pivot_root",
    "losetup",
    "blkid",
    "mdev",
    "nc",
    "wget",
    "ping",
    "uptime",
    "date",
    "which",
)

DEV_NODES = (
    ("dev/console", "c", 5, 1, 0o600),
    ("dev/null", "c", 1, 3, 0o666),
    ("dev/zero", "c", 1, 5, 0o666),
    ("dev/random", "c", 1, 8, 0o666),
    ("dev/urandom", "c", 1, 9, 0o666),
    ("dev/kmsg", "c", 1, 11, 0o644),
    ("dev/tty", "c", 5, 0, 0o666),
)

EMPTY_DIRS = (
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("mnt", 0o755),
    ("etc", 0o755),
    ("root", 0o700),
)

INIT_SCRIPT = f"""#!/usr/bin/python3 -S
# vmshim guest /init: PID 1. Everything else lives in guest.init (see {GUEST_LIB}/guest).
import sys
sys.path[0] = "{GUEST_LIB}"  # instead of the script's directory, /
sys.dont_write_bytecode = True
from guest.init import main
main()
"""

_MANIFEST = "manifest.json"

_KERNEL = "vmlinuz"

_INITRAMFS = "initramfs.img"


@dataclass
class _Tree:
    """The initramfs being assembled: guest path → what to put there."""

    dirs: dict[str, int] = field(default_factory=dict)
    files: dict[str, tuple[Path | bytes, int]] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    devices: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)
    layout: dict[str, str] = field(default_factory=dict)
    """Top-level symlinks mirrored from the host (``/lib`` → ``usr/lib`` on merged-/usr)."""

    def canon(self, guest_path: str) -> str:
        """Guest path with mirrored top-level symlinks resolved, relative, no leading /."""
        p = guest_path.strip("/")
        top, _, rest = p.partition("/")
        if top in self.layout:
            p = self.layout[top] + ("/" + rest if rest else "")
        return p

    def _parents(self, p: str) -> None:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dirs.setdefault("/".join(parts[:i]), 0o755)

    def dir(self, guest_path: str, mode: int = 0o755) -> None:
        p = self.canon(guest_path)
        self._parents(p)
        self.dirs[p] = mode

    def file(self, guest_path: str, src: Path | bytes, mode: int = 0o644) -> str:
        p = self.canon(guest_path)
        self._parents(p)
        self.files[p] = (src, mode)
        return p

    def symlink(self, guest_path: str, target: str) -> None:
        p = self.canon(guest_path)
        self._parents(p)
        self.symlinks[p] = target

    def device(self, guest_path: str, kind: str, major: int, minor: int, mode: int) -> None:
        p = self.canon(guest_path)
        self._parents(p)
        self.devices[p] = (kind, major, minor, mode)

    def write(self, out: BinaryIO) -> int:
        w = CpioWriter(out)
        for top, target in sorted(self.layout.items()):
            w.add_symlink(top, target)
        entries: list[tuple[str, str]] = [(p, "d") for p in self.dirs]
        entries += [(p, "f") for p in self.files] + [(p, "l") for p in self.symlinks]
        entries += [(p, "c") for p in self.devices]
        for p, kind in sorted(entries, key=lambda e: e[0].split("/")):
            if kind == "d":
                w.add_dir(p, self.dirs[p])
            elif kind == "l":
                w.add_symlink(p, self.symlinks[p])
            elif kind == "c":
                k, major, minor, mode = self.devices[p]
                w.add_device(p, k, major, minor, mode)
            else:
                src, mode = self.files[p]
                if isinstance(src, bytes):
                    w.add_file(p, src, mode)
                else:
                    w.add_file_from(p, src, mode)
        w.close()
        return w.size


def _build(
    out: Path, inputs: dict, digest: str, guest_src: Path, compression: str, progress: Callable[[str], None]
) -> None:
    started = time.monotonic()
    tree = _Tree()
    for top in ("bin", "sbin", "lib", "lib64"):
        host = Path("/", top)
        if host.is_symlink():
            tree.layout[top] = os.readlink(host).strip("/")
            tree.dirs[tree.layout[top]] = 0o755

    kernel = inputs["kernel"]
    if kernel["source"] == "debian":
        vmlinuz, modules_dir, release, deb = _debian_kernel(kernel["package"], kernel["version"], progress)
    elif kernel["source"] == "minimal":  # everything built in: no modules to carry or load
        vmlinuz, modules_dir, release, deb = Path(kernel["kernel"]), None, kernel["release"], None
    else:
        vmlinuz = Path(kernel["kernel"])
        modules_dir = Path(kernel["modules"]) if kernel.get("modules") else None
        release = modules_dir.name if modules_dir else bzimage_release(vmlinuz)
        deb = None
    shutil.copyfile(vmlinuz, out / _KERNEL)
    os.chmod(out / _KERNEL, 0o644)

    progress("resolving kernel modules")
    modules: list[str] = []
    missing: list[str] = []
    if modules_dir is not None:
        mtree = ModuleTree(modules_dir)
        modules, missing = mtree.resolve(GUEST_MODULES)
        listed = []
        for name in modules:
            rel = re.sub(r"\.ko\.(xz|gz|zst)$", ".ko", mtree.files[name])
            guest_path = f"/lib/modules/{release}/{rel}"
            tree.file(guest_path, _module_bytes(modules_dir / mtree.files[name]))
            listed.append(guest_path)
        for m in missing:
            progress(f"warning: kernel module {m} not found (and not listed as built in); skipped")
    else:
        listed = []
    tree.file(MODULE_LIST, "".join(p + "\n" for p in listed).encode())

    progress("selecting and compiling python and its stdlib")
    with tempfile.TemporaryDirectory(prefix="pystage-", dir=out) as stage:
        py = _stage_python(Path(stage), guest_src)
        tree.file(str(PYTHON), PYTHON.resolve(), 0o755)
        tree.symlink("/usr/bin/python3", PYTHON.name)
        stdlib = py["stdlib"].strip("/")
        tree.dir(stdlib)
        tree.dir(py["dynload"])
        for rel in py["stdlib_files"]:
            tree.file(f"/{stdlib}/{rel}", Path(stage, "stdlib", rel))
        for ext in py["extensions"]:
            tree.file(ext, Path(ext))
        for rel in py["guest_files"]:
            tree.file(f"{GUEST_LIB}/{rel}", Path(stage, "vmshim", rel))
        libs = _shared_libraries([PYTHON, *map(Path, py["extensions"])])
        for guest_path, src in libs.items():
            tree.file(guest_path, src, 0o755)

        if not BUSYBOX.is_file():
            raise GuestImageError("busybox-static is not installed; run scripts/setup")
        bb = tree.file(str(BUSYBOX), BUSYBOX.resolve(), 0o755)
        bb_dir = bb.rsplit("/", 1)[0]
        for applet in BUSYBOX_APPLETS:
            if f"{bb_dir}/{applet}" not in tree.files:
                tree.symlink(f"/{bb_dir}/{applet}", "busybox")

        tree.file("/init", INIT_SCRIPT.encode(), 0o755)
        tree.file("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        tree.file("/etc/group", b"root:x:0:\n")
        for name, mode in EMPTY_DIRS:
            tree.dir(name, mode)
        for name, kind, major, minor, mode in DEV_NODES:
            tree.device(name, kind, major, minor, mode)

        progress(f"writing initramfs ({compression})")
        cpio_path = out / "initramfs.cpio"
        with open(cpio_path, "wb") as f:
            raw_size = tree.write(f)
    target = out / _INITRAMFS
    if compression == "lz4":
        if not shutil.which("lz4"):
            raise GuestImageError("lz4 is not installed; run scripts/setup")
        res = _run(["lz4", "-l", "-9", "-q", "-f", str(cpio_path), str(target)])
        if res.returncode != 0:
            raise GuestImageError(f"lz4 failed: {res.stderr.strip()}")
        cpio_path.unlink()
    elif compression == "none":
        os.rename(cpio_path, target)
    else:
        raise GuestImageError(f"unknown initramfs compression {compression!r}")
    os.chmod(target, 0o644)

    manifest = {
        "builder": BUILDER_VERSION,
        "inputs_hash": digest,
        "inputs": inputs,
        "kernel": {
            **kernel,
            "release": release,
            "deb": str(deb) if deb else None,
            "size": (out / _KERNEL).stat().st_size,
        },
        "modules": listed,
        "modules_missing": missing,
        "python": {
            "version": py["version"],
            "stdlib_files": len(py["stdlib_files"]),
            "extensions": [Path(e).name for e in py["extensions"]],
            "libraries": sorted(libs),
        },
        "initramfs": {
            "compression": compression,
            "size": target.stat().st_size,
            "uncompressed_size": raw_size,
            "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        },
        "cmdline": CMDLINE,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 2),
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.chmod(out / _MANIFEST, 0o644)
