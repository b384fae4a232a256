"""The guest image: the kernel and the initramfs every microVM boots. Built once, cached.

What goes in (see images/guest/README.md):

- the kernel (see :func:`kernel_choice`): the minimal microVM kernel when it has been built
  (:mod:`shim.kernelbuild`, everything built in, no modules); else the Debian cloud kernel
  (``linux-image-cloud-amd64`` → its concrete package), fetched with ``apt-get download``
  into ``paths.cache_dir()/kernel`` and unpacked there, never installed on the host; or a
  kernel named by ``VMSHIM_KERNEL`` (+ ``VMSHIM_KERNEL_MODULES``, its
  ``/lib/modules/<release>`` directory);
- an initramfs (newc cpio written here, so device nodes need no root and the bytes are
  reproducible) holding ``/init``, the host's Debian python with the libraries it links and
  a trimmed, precompiled stdlib, ``guest/`` under ``/usr/lib/vmshim``, busybox-static and
  the kernel modules the agent loads (listed in load order in
  ``/lib/modules/vmshim-modules.txt``).

Builds live in ``paths.guest_dir()/<inputs-hash>/`` with ``vmlinuz``, ``initramfs.img`` and
``manifest.json``. The hash covers everything that goes in (builder version, kernel package
and version, python and busybox package versions, every file of ``guest/``), so a build is
reused until one of those changes. Older builds are removed by a later build once they
have been superseded for ten minutes (a VM may be starting from one).

Public API: :class:`GuestImage`, :func:`ensure_guest_image`, :func:`current_guest_image`,
:func:`boot_floor_command`. Every failure raises :class:`shim.errors.GuestImageError`.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping
from urllib.parse import quote

from shim import paths
from shim.errors import GuestImageError

BUILDER_VERSION = 2
"""Bump whenever what the builder puts into the image changes (it is part of the hash)."""

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
PYTHON = Path("/usr/bin/python3.11")
"""The host's Debian python, copied into the guest (never a pyenv or venv python)."""
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
                   "libc6", "libffi8", "libexpat1", "zlib1g")
"""Packages whose versions identify the python that goes in (binary, stdlib, libraries)."""
BUSYBOX = Path("/bin/busybox")
BUSYBOX_PACKAGE = "busybox-static"

CMDLINE = ("console=ttyS0 panic=-1 quiet loglevel=0 i8042.noaux i8042.nokbd 8250.nr_uarts=1 "
           "tsc=reliable no_timer_check noreplace-smp cryptomgr.notests random.trust_cpu=on")
"""Kernel command line from DESIGN's measured recipe."""

COMPRESSION = "lz4"
"""``"lz4"`` (legacy frame, ``lz4 -l``) or ``"none"``; see images/guest/README.md for the
measurement behind the choice."""

GUEST_MODULES = (
    "virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "virtio_console", "virtio_blk", "virtio_rng", "overlay", "squashfs", "isofs",
    "virtio_net", "vsock", "vmw_vsock_virtio_transport", "fuse", "virtiofs",
)
"""Kernel modules the agent loads, boot-critical first. Dependencies are added and the whole
list is written in load order; a module the kernel has built in is skipped."""

MODULE_LIST = "/lib/modules/vmshim-modules.txt"
GUEST_LIB = "/usr/lib/vmshim"

BUSYBOX_APPLETS = (
    "sh", "ash", "mount", "umount", "ls", "cat", "echo", "mkdir", "rmdir", "rm", "cp", "mv",
    "ln", "chmod", "chown", "touch", "insmod", "rmmod", "lsmod", "modprobe", "reboot",
    "poweroff", "halt", "ip", "ifconfig", "route", "ps", "kill", "sleep", "dmesg", "mknod",
    "grep", "sed", "awk", "head", "tail", "wc", "find", "xargs", "env", "uname", "hostname",
    "id", "df", "du", "free", "top", "stat", "sync", "tar", "gzip", "gunzip", "vi", "less",
    "true", "false", "test", "[", "printf", "readlink", "realpath", "chroot", "switch_root",
    "pivot_root", "losetup", "blkid", "mdev", "nc", "wget", "ping", "uptime", "date", "which",
)

STDLIB_MODULES = (
    "encodings", "encodings.aliases", "encodings.utf_8", "encodings.utf_8_sig",
    "encodings.ascii", "encodings.latin_1", "encodings.idna", "encodings.raw_unicode_escape",
    "encodings.unicode_escape", "json", "ctypes", "selectors", "select", "signal", "struct",
    "socket", "fcntl", "termios", "pty", "tty", "errno", "os", "stat", "shutil",
    "subprocess", "pathlib", "dataclasses", "secrets", "hashlib", "base64", "binascii",
    "time", "traceback", "typing", "enum", "functools", "re", "collections", "threading",
    "queue", "tempfile", "io", "contextlib", "itertools", "operator", "copy", "string",
    "textwrap", "weakref", "heapq", "bisect", "random", "datetime", "glob", "fnmatch",
    "posixpath", "codecs", "warnings", "abc", "types", "ipaddress", "resource", "mmap",
    "tarfile", "shlex", "logging", "argparse", "uuid", "zlib", "gzip", "array",
)
"""Stdlib modules the agent may use even if the guest code does not import them yet; the
guest code's own imports are added with modulefinder."""

STDLIB_EXCLUDE = (
    "test", "tkinter", "_tkinter", "idlelib", "ensurepip", "lib2to3", "pydoc_data",
    "distutils", "unittest", "pydoc", "doctest", "turtle", "turtledemo", "venv", "sqlite3",
    "_sqlite3", "curses", "_curses", "dbm", "xmlrpc", "wsgiref", "ssl", "_ssl", "_hashlib",
    "_bz2", "_lzma", "_decimal", "readline", "_dbm", "_gdbm", "email", "http", "urllib.request",
    "multiprocessing", "concurrent", "asyncio", "xml", "pyexpat", "html", "importlib.metadata",
    "importlib.resources", "pickle", "_pickle", "_pydecimal", "decimal", "statistics",
    "fractions", "zipfile", "csv", "pprint", "tracemalloc", "py_compile", "lib2to3",
    "_ctypes_test", "ctypes.test", "_uuid", "_testcapi", "_testinternalcapi", "_testbuffer",
)
"""Never shipped: test suites, GUI, network clients and modules that drag in big libraries
(libssl, libsqlite). The ones imported lazily (``hashlib`` → ``_hashlib``) degrade
gracefully; the build checks that every module above still imports without them."""

DEV_NODES = (
    ("dev/console", "c", 5, 1, 0o600), ("dev/null", "c", 1, 3, 0o666),
    ("dev/zero", "c", 1, 5, 0o666), ("dev/random", "c", 1, 8, 0o666),
    ("dev/urandom", "c", 1, 9, 0o666), ("dev/kmsg", "c", 1, 11, 0o644),
    ("dev/tty", "c", 5, 0, 0o666),
)
EMPTY_DIRS = (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755),
              ("tmp", 0o1777), ("mnt", 0o755), ("etc", 0o755), ("root", 0o700))

INIT_SCRIPT = f"""#!/usr/bin/python3 -S
# vmshim guest /init: PID 1. Everything else lives in guest.init (see {GUEST_LIB}/guest).
import sys
sys.path[0] = "{GUEST_LIB}"  # instead of the script's directory, /
sys.dont_write_bytecode = True
from guest.init import main
main()
"""

_HASH_LEN = 16
_SUPERSEDED = ".superseded"
RETIRE_GRACE = 600.0
"""Seconds a superseded build is kept before the next build removes it."""
_MANIFEST = "manifest.json"
_KERNEL = "vmlinuz"
_INITRAMFS = "initramfs.img"


@dataclass(frozen=True)
class GuestImage:
    """A built guest image, ready to boot: ``-kernel kernel -initrd initramfs -append cmdline``."""

    kernel: Path
    initramfs: Path
    kernel_release: str
    manifest: dict
    cmdline: str = CMDLINE


# --------------------------------------------------------------------------------------
# newc cpio writer / reader


@dataclass
class CpioEntry:
    """One member of a newc archive. ``data`` is the file content or the symlink target."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0
    ino: int = 0

    @property
    def kind(self) -> str:
        fmt = stat.S_IFMT(self.mode)
        return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
                stat.S_IFCHR: "chr", stat.S_IFBLK: "blk"}.get(fmt, "other")


_NEWC_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Writes a newc ("070701") cpio archive, the format the kernel unpacks as initramfs.

    Every entry is owned by root with mtime 0 and inode numbers are given out in order, so
    the same calls produce the same bytes. Parents must be added before their children
    (the kernel creates members in archive order). Call :meth:`close` to write the trailer.
    """

    def __init__(self, out: BinaryIO):
        self._out = out
        self._ino = 0
        self._names: set[str] = set()
        self.size = 0

    def _header(self, name: str, mode: int, filesize: int, nlink: int = 1,
                rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        if name != _TRAILER:
            if name in self._names:
                raise ValueError(f"duplicate cpio member {name!r}")
            self._names.add(name)
            self._ino += 1
        fields = (self._ino if name != _TRAILER else 0, mode, 0, 0, nlink, 0, filesize,
                  0, 0, rdev[0], rdev[1], len(raw), 0)
        head = _NEWC_MAGIC + b"".join(b"%08X" % f for f in fields) + raw
        self._write(head + b"\0" * (-len(head) % 4))

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.size += len(data)

    @staticmethod
    def _clean(name: str) -> str:
        name = name.strip("/")
        if not name or name.startswith("..") or "/../" in f"/{name}/":
            raise ValueError(f"bad cpio member name {name!r}")
        return name

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._header(self._clean(name), stat.S_IFDIR | mode, 0, nlink=2)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._header(self._clean(name), stat.S_IFREG | mode, len(data))
        self._write(data + b"\0" * (-len(data) % 4))

    def add_file_from(self, name: str, src: Path, mode: int | None = None) -> None:
        """Add the content of host file *src* (streamed; symlinks followed)."""
        st = os.stat(src)
        self._header(self._clean(name), stat.S_IFREG | (stat.S_IMODE(st.st_mode) if mode is None
                                                         else mode), st.st_size)
        copied = 0
        with open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                self._write(chunk)
                copied += len(chunk)
        if copied != st.st_size:
            raise GuestImageError(f"{src} changed size while it was being packed; build again")
        self._write(b"\0" * (-copied % 4))

    def add_symlink(self, name: str, target: str) -> None:
        raw = target.encode()
        self._header(self._clean(name), stat.S_IFLNK | 0o777, len(raw))
        self._write(raw + b"\0" * (-len(raw) % 4))

    def add_device(self, name: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        self._header(self._clean(name), fmt | mode, 0, rdev=(major, minor))

    def close(self) -> None:
        self._header(_TRAILER, 0, 0)
        self._write(b"\0" * (-self.size % 512))


def read_cpio(data: bytes) -> list[CpioEntry]:
    """Parse a newc archive (up to its trailer). Raises ValueError on anything malformed."""
    entries, pos = [], 0
    while True:
        if data[pos:pos + 6] != _NEWC_MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        try:
            f = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ValueError(f"bad cpio header at offset {pos}") from None
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = f
        name_start = pos + 110
        name = data[name_start:name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos:pos + size]
        if len(body) != size:
            raise ValueError(f"cpio member {name!r} is truncated")
        pos += size + (-size % 4)
        if name == _TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, body, uid, gid, nlink, mtime, rmaj, rmin, ino))


# --------------------------------------------------------------------------------------
# kernel modules


def module_name(filename: str) -> str:
    """``kernel/drivers/char/hw_random/virtio-rng.ko.xz`` → ``virtio_rng``."""
    base = filename.rsplit("/", 1)[-1]
    base = re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base)
    return base.replace("-", "_")


def read_modinfo(data: bytes) -> dict[str, list[str]]:
    """Return the ``.modinfo`` key/values of an ELF64 little-endian kernel module."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 little-endian file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, strsize = section(shstrndx)
    strtab = data[stroff:stroff + strsize]
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = section(i)
        if strtab[name:strtab.index(b"\0", name)] == b".modinfo":
            for item in data[off:off + size].split(b"\0"):
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


def module_load_order(wanted: Iterable[str], depends: Callable[[str], list[str] | None],
                      builtin: Iterable[str] = ()) -> tuple[list[str], list[str]]:
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


# --------------------------------------------------------------------------------------
# inputs and their hash


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


def _stat_sig(path: Path) -> list | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size, st.st_ino]


def _apt_sig() -> list:
    """Cheap fingerprint of apt's package lists: the kernel candidate changes only with them."""
    lists = Path("/var/lib/apt/lists")
    try:
        names = sorted(os.listdir(lists))
    except OSError:
        return []
    return [[n] + (_stat_sig(lists / n) or []) for n in names if n not in ("lock", "partial", "auxfiles")]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, **kw)
    except FileNotFoundError:
        raise GuestImageError(f"{cmd[0]} is not installed; run scripts/setup") from None


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
    cached = sorted((paths.cache_dir() / "kernel").glob("linux-image-*-cloud-amd64_*.deb"),
                    key=lambda p: p.stat().st_mtime)
    if cached:
        pkg, ver, _ = cached[-1].name.split("_", 2)
        from urllib.parse import unquote
        return {"package": pkg, "version": unquote(ver)}
    raise GuestImageError(
        f"apt knows no {KERNEL_META_PACKAGE} and none is cached; run apt-get update "
        "(or set VMSHIM_KERNEL and VMSHIM_KERNEL_MODULES to a kernel you built)")


def _package_versions(names: Iterable[str]) -> dict[str, str]:
    names = list(names)
    out = _run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Status}\n", *names])
    found = {}
    for line in out.stdout.splitlines():
        pkg, ver, status = (line.split("\t") + ["", ""])[:3]
        if status == "installed":
            found[pkg.split(":")[0]] = ver
    return {n: found.get(n, "") for n in names}


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
        if not mpath.is_dir():
            raise GuestImageError(f"VMSHIM_KERNEL_MODULES={modules} is not a directory (want /lib/modules/<release>)")
        out.update(modules=str(mpath), modules_mtime_ns=_stat_sig(mpath)[0])
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
            raise GuestImageError(f"unknown guest kernel {requested!r} ({source}); "
                                  f"choose one of {', '.join(KERNEL_CHOICES)}")
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
        raise GuestImageError("the minimal guest kernel is not built; run `vmshim guest kernel build` "
                              "(minutes), or use the distro kernel (`vmshim guest build --kernel distro`)")
    r = built.record
    return {"source": "minimal", "key": built.key, "kernel": str(built.boot_image),
            "release": r.get("release", ""), "source_package": r.get("source_package", ""),
            "source_version": r.get("source_version", ""), "fragment_sha256": r.get("fragment_sha256", "")}


def _fingerprint_file() -> Path:
    return paths.cache_dir() / "guest-inputs.json"


def collect_inputs(guest_src: Path | None = None, kernel_request: str | None = None,
                   refresh_kernel: bool = False) -> dict:
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
    sigs = {"apt": _apt_sig() if override is None else None,
            "dpkg": _stat_sig(Path("/var/lib/dpkg/status")),
            "python": _stat_sig(PYTHON), "busybox": _stat_sig(BUSYBOX)}
    try:
        cached = json.loads(_fingerprint_file().read_text())
    except (OSError, ValueError):
        cached = {}
    fresh = dict(cached)
    if override is not None:
        kernel = override
    elif (isinstance(cached.get("kernel"), dict) and cached["kernel"].get("source") == "debian"
          and (not refresh_kernel or cached.get("apt_sig") == sigs["apt"])):
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


def _write_json_quietly(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # only a cache of look-ups; a read-only state dir must not break anything


# --------------------------------------------------------------------------------------
# public API


def _image_from_dir(d: Path) -> GuestImage | None:
    try:
        manifest = json.loads((d / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    kernel, initramfs = d / _KERNEL, d / _INITRAMFS
    if not (kernel.is_file() and initramfs.is_file()):
        return None
    return GuestImage(kernel=kernel, initramfs=initramfs,
                      kernel_release=manifest.get("kernel", {}).get("release", ""),
                      manifest=manifest, cmdline=manifest.get("cmdline", CMDLINE))


def current_guest_image(kernel: str | None = None) -> GuestImage | None:
    """The built image matching today's inputs (with *kernel* ``minimal``/``distro``, that
    kernel rather than :func:`kernel_choice`'s), or None if there is none (never builds).

    Cheap (a few ms) unless apt's lists or dpkg's status changed since the last look, in
    which case apt is asked again (about 1 s). Raises GuestImageError only when the inputs
    cannot be determined at all (busybox-static missing, no kernel known).
    """
    d = paths.guest_dir() / inputs_hash(collect_inputs(kernel_request=kernel))
    return _image_from_dir(d)


def ensure_guest_image(progress: Callable[[str], None] | None = None, force: bool = False,
                       kernel: str | None = None, refresh_kernel: bool = False) -> GuestImage:
    """Return the guest image for today's inputs, building it first if it is missing or
    stale (or always, with *force*). *progress* receives one line per build step. *kernel*
    (``minimal``/``distro``) overrides :func:`kernel_choice`; the minimal kernel must be built.
    *refresh_kernel* asks apt for the newest cloud kernel first (``vmshim guest build``).

    Builds are serialised with a lock in ``guest_dir()``; the new build appears atomically
    and older builds are removed by a later build once superseded for RETIRE_GRACE. Raises
    GuestImageError with what to do on any failure.
    """
    return _ensure(progress or (lambda _msg: None), force, guest_source_dir(), COMPRESSION, kernel,
                   refresh_kernel)


def _ensure(progress: Callable[[str], None], force: bool, guest_src: Path, compression: str,
            kernel: str | None = None, refresh_kernel: bool = False) -> GuestImage:
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
        raise GuestImageError(f"cannot write the guest image directory {gdir}: {exc.strerror} "
                              "(run as root or set VMSHIM_ROOT)") from None
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


def boot_floor_command(image: GuestImage, sock: str, serial_log: str,
                       config_drive: str | None = None, accel_kind: str = "tcg") -> list[str]:
    """The bare QEMU command that boots *image* with the agent port on unix socket *sock*
    (QEMU listens; connect after starting) and the console written to *serial_log*.

    Same kernel, initramfs, cmdline and CPU model as the libvirt domains, none of libvirt:
    the floor that every vmshim boot is measured against. QEMU exits when the guest reboots.
    *accel_kind* (``tcg`` or ``kvm``) picks the accelerator and the kernel arguments that go
    with it (:func:`shim.vm.accel.guest_cmdline`), as for the containers' domains.
    *config_drive* (an ISO from ``shim.vm.configdrive``) is attached read-only as a virtio
    disk with serial ``vmshim-config``; the agent waits for it before saying hello.
    """
    from shim.vm.accel import guest_cmdline

    accel = "kvm" if accel_kind == "kvm" else "tcg,tb-size=32"
    cmd = [
        "qemu-system-x86_64", "-accel", accel, "-M", "pc", "-cpu", "qemu64,+rdrand",
        "-smp", "1", "-m", "256", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", guest_cmdline(image.cmdline, accel_kind),
        "-serial", f"file:{serial_log}",
        "-chardev", f"socket,id=agent,path={sock},server=on,wait=off",
        "-device", "virtio-serial-pci", "-device", "virtserialport,chardev=agent,name=org.vmshim.agent",
    ]
    if config_drive:
        from guest.spec import CONFIG_DRIVE_SERIAL

        cmd += ["-drive", f"file={config_drive},if=none,id=config,format=raw,readonly=on",
                "-device", f"virtio-blk-pci,drive=config,serial={CONFIG_DRIVE_SERIAL}"]
    return cmd


# --------------------------------------------------------------------------------------
# the build


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


def _build(out: Path, inputs: dict, digest: str, guest_src: Path, compression: str,
           progress: Callable[[str], None]) -> None:
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
    modules, missing = [], []
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
        "kernel": {**kernel, "release": release, "deb": str(deb) if deb else None,
                   "size": (out / _KERNEL).stat().st_size},
        "modules": listed,
        "modules_missing": missing,
        "python": {"version": py["version"], "stdlib_files": len(py["stdlib_files"]),
                   "extensions": [Path(e).name for e in py["extensions"]],
                   "libraries": sorted(libs)},
        "initramfs": {"compression": compression, "size": target.stat().st_size,
                      "uncompressed_size": raw_size,
                      "sha256": hashlib.sha256(target.read_bytes()).hexdigest()},
        "cmdline": CMDLINE,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.monotonic() - started, 2),
    }
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.chmod(out / _MANIFEST, 0o644)


def bzimage_release(path: Path) -> str:
    """Kernel release string from a bzImage's setup header (``6.1.0-56-cloud-amd64``)."""
    with open(path, "rb") as f:
        head = f.read(0x10000)
    if head[0x202:0x206] != b"HdrS":
        raise GuestImageError(f"{path} is not a bzImage (set VMSHIM_KERNEL_MODULES too, to name its release)")
    off, = struct.unpack_from("<H", head, 0x20E)
    raw = head[off + 0x200:off + 0x200 + 256]
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
    unpacked = kdir / deb.name[:-len(".deb")]
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
    release = vmlinuzes[0].name[len("vmlinuz-"):]
    for base in ("lib/modules", "usr/lib/modules"):
        mdir = unpacked / base / release
        if mdir.is_dir():
            return vmlinuzes[0], mdir, release, deb
    raise GuestImageError(f"{deb.name} holds no modules for {release}")


_LDD_LINE = re.compile(r"^\s*(?:(\S+)\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)")


def _shared_libraries(binaries: Iterable[Path]) -> dict[str, Path]:
    """Guest path → host file for every shared library (and the loader) the binaries need."""
    out: dict[str, Path] = {}
    for binary in binaries:
        res = _run(["ldd", str(binary)])
        if res.returncode != 0:
            raise GuestImageError(f"ldd {binary} failed: {res.stderr.strip() or res.stdout.strip()}")
        for line in res.stdout.splitlines():
            m = _LDD_LINE.match(line)
            if not m:
                continue
            path = Path(m.group(2))
            guest = str(path.parent.resolve() / path.name)
            out[guest] = path.resolve()
    return out


_STAGE_SCRIPT = r"""
import importlib.util, json, modulefinder, os, py_compile, sys, sysconfig
args = json.loads(sys.argv[1])
stage, guest_src = args["stage"], args["guest_src"]
stdlib = sysconfig.get_path("stdlib")
dynload = next(p for p in sys.path if p.endswith("lib-dynload"))
guest_parent, pkg = os.path.split(guest_src.rstrip("/"))
mf = modulefinder.ModuleFinder(path=[guest_parent, stdlib, dynload], excludes=args["exclude"])
guest_files, guest_mods = [], []
for dirpath, dirs, files in os.walk(guest_src):
    dirs[:] = sorted(d for d in dirs if d != "__pycache__")
    for f in sorted(files):
        if f.endswith((".pyc", ".pyo")):
            continue
        rel = os.path.relpath(os.path.join(dirpath, f), guest_parent)
        guest_files.append(rel)
        if f.endswith(".py"):
            mod = rel[:-3].replace("/", ".")
            guest_mods.append(mod[:-len(".__init__")] if mod.endswith(".__init__") else mod)
for mod in guest_mods:
    mf.import_hook(mod)
for mod in args["fixed"]:
    try:
        mf.import_hook(mod)
    except ImportError:
        pass
stdlib_files, extensions = [], []
for name, m in sorted(mf.modules.items()):
    f = m.__file__
    if not f:
        continue
    if f.startswith(dynload + "/"):
        extensions.append(f)
    elif f.startswith(stdlib + "/") and f.endswith(".py"):
        rel = os.path.relpath(f, stdlib) + "c"
        py_compile.compile(f, cfile=os.path.join(stage, "stdlib", rel), dfile=f, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        stdlib_files.append(rel)
out_guest = []
for rel in guest_files:
    src = os.path.join(guest_parent, rel)
    dst = os.path.join(stage, "vmshim", rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as i, open(dst, "wb") as o:
        o.write(i.read())
    out_guest.append(rel)
    if rel.endswith(".py"):
        pyc = importlib.util.cache_from_source(dst)
        py_compile.compile(src, cfile=pyc, dfile=args["guest_lib"] + "/" + rel, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        out_guest.append(os.path.relpath(pyc, os.path.join(stage, "vmshim")))
print(json.dumps({"version": sys.version.split()[0], "stdlib": stdlib, "dynload": dynload,
                  "stdlib_files": stdlib_files, "extensions": extensions,
                  "guest_files": out_guest, "guest_modules": guest_mods}))
"""

_CHECK_SCRIPT = r"""
import importlib, json, sys
args = json.loads(sys.argv[1])
sys.path[:] = args["path"]
bad = []
for mod in args["modules"]:
    try:
        importlib.import_module(mod)
    except Exception as exc:
        bad.append(f"{mod}: {type(exc).__name__}: {exc}")
print(json.dumps(bad))
"""


def _stage_python(stage: Path, guest_src: Path) -> dict:
    """Pick the stdlib modules (fixed list + what guest/ imports), compile them to sourceless
    .pyc under *stage*/stdlib, copy guest/ with .pyc under *stage*/vmshim, and check that
    everything imports from the trimmed stdlib alone. Runs in the target python so the
    bytecode matches it."""
    if not PYTHON.is_file():
        raise GuestImageError(f"{PYTHON} is missing; apt-get install python3.11-minimal (run scripts/setup)")
    fixed = [m for m in STDLIB_MODULES if m not in STDLIB_EXCLUDE]
    args = {"stage": str(stage), "guest_src": str(guest_src), "fixed": fixed,
            "exclude": list(STDLIB_EXCLUDE), "guest_lib": GUEST_LIB}
    res = _run([str(PYTHON), "-S", "-c", _STAGE_SCRIPT, json.dumps(args)])
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise GuestImageError(f"compiling the guest's python failed: {tail}")
    info = json.loads(res.stdout)
    dyn_stage = stage / "dynload"
    dyn_stage.mkdir()
    for ext in info["extensions"]:
        shutil.copyfile(ext, dyn_stage / Path(ext).name)
    check = {"path": [str(stage / "vmshim"), str(stage / "stdlib"), str(dyn_stage)],
             "modules": info["guest_modules"] + fixed}
    res = _run([str(PYTHON), "-S", "-c", _CHECK_SCRIPT, json.dumps(check)])
    bad = json.loads(res.stdout) if res.returncode == 0 else [res.stderr.strip()]
    if bad:
        raise GuestImageError(f"the trimmed guest stdlib cannot import {bad[0]} "
                              "(add it to STDLIB_MODULES or drop it from STDLIB_EXCLUDE in shim/guestimage.py)")
    shutil.rmtree(dyn_stage)
    return info
