"""Tar archives for tests: layers, build contexts and hostile tars, made in memory."""

from __future__ import annotations

import io
import tarfile


def add_entries(tar: tarfile.TarFile, entries, mode: int | None = None) -> None:
    """entries: (name, kind, data_or_link) with kind d (directory), f (file: data),
    l (symlink) or h (hard link); *mode* for every entry, else 0o755 for directories
    and 0o644 for the rest. Names and link targets go in as given."""
    for name, kind, extra in entries:
        ti = tarfile.TarInfo(name)
        ti.mode = mode if mode is not None else 0o755 if kind == "d" else 0o644
        data = None
        if kind == "d":
            ti.type = tarfile.DIRTYPE
        elif kind == "l":
            ti.type, ti.linkname = tarfile.SYMTYPE, extra
        elif kind == "h":
            ti.type, ti.linkname = tarfile.LNKTYPE, extra
        else:
            data = extra
            ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data) if data is not None else None)


def tar_of(files: dict[str, bytes]) -> bytes:
    """A PAX tar of regular files: name → content."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_entries(tar, [(name, "f", data) for name, data in files.items()])
    return buf.getvalue()


def write_tar(path, entries):
    """A PAX tar at *path* of (name, bytes) files and (name, None) directories; *path*."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add_entries(tar, [(name, "d" if data is None else "f", data) for name, data in entries])
    return path
