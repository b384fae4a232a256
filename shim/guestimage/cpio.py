"""The newc ("070701") cpio archive the kernel unpacks as its initramfs: a writer whose
bytes are reproducible (root-owned, mtime 0, inodes in order) and a reader for tests."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shim.errors import GuestImageError


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
        return {
            stat.S_IFREG: "file",
            stat.S_IFDIR: "dir",
            stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "chr",
            stat.S_IFBLK: "blk",
        }.get(fmt, "other")


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

    def _header(self, name: str, mode: int, filesize: int, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        if name != _TRAILER:
            if name in self._names:
                raise ValueError(f"duplicate cpio member {name!r}")
            self._names.add(name)
            self._ino += 1
        fields = (
            self._ino if name != _TRAILER else 0,
            mode,
            0,
            0,
            nlink,
            0,
            filesize,
            0,
            0,
            rdev[0],
            rdev[1],
            len(raw),
            0,
        )
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
        self._header(self._clean(name), stat.S_IFREG | (stat.S_IMODE(st.st_mode) if mode is None else mode), st.st_size)
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
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if data[pos : pos + 6] != _NEWC_MAGIC:
            raise ValueError(f"bad cpio magic at offset {pos}")
        try:
            f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ValueError(f"bad cpio header at offset {pos}") from None
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = f
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        if len(body) != size:
            raise ValueError(f"cpio member {name!r} is truncated")
        pos += size + (-size % 4)
        if name == _TRAILER:
            return entries
        entries.append(CpioEntry(name, mode, body, uid, gid, nlink, mtime, rmaj, rmin, ino))
