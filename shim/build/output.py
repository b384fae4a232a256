"""``vmshim build --output``: the built image somewhere else than (besides) the store.

- ``type=oci,dest=FILE``: the image as an OCI image-layout tar (``vmshim save
  --format oci-archive``).
- ``type=tar,dest=FILE``: the image's merged filesystem as one tar (whiteouts applied,
  hard links written as files), like docker's.
- ``type=local,dest=DIR``: that filesystem written into DIR (new or empty). The image
  is untrusted: every entry is created relative to its parent's directory fd with
  ``O_NOFOLLOW``/``O_EXCL`` (never through a symlink the image made), owned by the
  caller, setuid/setgid/sticky bits dropped, device nodes and fifos left out.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shim.build.errors import BuildError
from shim.build.tree import RootView
from shim.files import replaced

TYPES = ("local", "tar", "oci")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class OutputError(BuildError):
    """``--output`` is malformed or cannot be written."""


@dataclass(frozen=True)
class Output:
    type: str
    dest: str


def parse_output(spec: str) -> Output:
    """``type=local|tar|oci,dest=PATH`` (docker's shorthand ``PATH`` means local).
    Raises OutputError."""
    if "=" not in spec:
        return Output("local", spec)
    fields = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise OutputError(f"invalid --output {spec!r}: expected type=TYPE,dest=PATH")
        fields[key.strip().lower()] = value
    kind = fields.pop("type", "local")
    dest = fields.pop("dest", "")
    if kind not in TYPES:
        raise OutputError(f"invalid --output type {kind!r}: use {', '.join(TYPES)}")
    if not dest or dest == "-":
        raise OutputError(
            f"--output type={kind} needs dest=PATH (a file or directory; stdout carries the build's own output)"
        )
    if fields:
        raise OutputError(f"--output does not take {sorted(fields)[0]!r}")
    return Output(kind, dest)


def write(store, image_id: str, output: Output) -> None:
    """Write the stored image *image_id* as *output* says. Raises OutputError."""
    if output.type == "oci":
        from shim.images.archive import save_to_file

        save_to_file(store, [image_id], Path(output.dest), "oci-archive")
        return
    image = store.resolve(image_id)
    view = RootView.of(store, [{"digest": layer.digest} for layer in image.layers])
    if output.type == "tar":
        with replaced(Path(output.dest), sync=False) as f:
            write_tar(view, f)
        return
    write_local(view, Path(output.dest))


def write_tar(view: RootView, out: BinaryIO) -> None:
    """The merged filesystem of *view* as a tar on *out* (directories, links and fifos in
    path order, then the files as their layers yield them)."""
    files = []
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in view.walk(""):
            node = view.nodes[path]
            if node.kind in ("f", "h"):
                files.append(path)
                continue
            ti = _info(path, node)
            if node.kind == "d":
                ti.type = tarfile.DIRTYPE
            elif node.kind == "l":
                ti.type, ti.linkname = tarfile.SYMTYPE, node.linkname
            elif node.kind == "p":
                ti.type = tarfile.FIFOTYPE
            else:
                continue
            tar.addfile(ti)
        for path, f in view.open_many(files):
            node = view.nodes[path]
            ti = _info(path, node)
            if node.kind == "f":
                ti.size = node.size
            else:  # a hard link's own entry has no size: take the data (rare, small)
                f = io.BytesIO(f.read())
                ti.size = len(f.getvalue())
            tar.addfile(ti, f)


def write_local(view: RootView, dest: Path) -> None:
    """Write the merged filesystem of *view* into the new or empty directory *dest*.
    Raises OutputError."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        root = os.open(dest, _DIR_FLAGS)
    except OSError as exc:
        raise OutputError(f"cannot write --output to {dest}: {exc.strerror}") from None
    try:
        if os.listdir(root):
            raise OutputError(f"--output type=local needs a new or empty directory; {dest} is not empty")
        files = []
        for path in view.walk(""):
            node = view.nodes[path]
            parent, name = _parent_fd(root, path)
            try:
                if node.kind == "d":
                    os.mkdir(name, 0o700, dir_fd=parent)
                    fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
                    os.chmod(fd, node.mode & 0o777)
                    os.close(fd)
                elif node.kind == "l":
                    os.symlink(node.linkname, name, dir_fd=parent)
                elif node.kind in ("f", "h"):
                    files.append(path)
            finally:
                os.close(parent)
        for path, f in view.open_many(files):
            parent, name = _parent_fd(root, path)
            try:
                fd = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent
                )
            finally:
                os.close(parent)
            with os.fdopen(fd, "wb") as out:
                while chunk := f.read(1 << 20):
                    out.write(chunk)
                os.chmod(out.fileno(), view.nodes[path].mode & 0o777)
    except OSError as exc:
        raise OutputError(f"cannot write --output to {dest}: {exc.strerror or exc}") from None
    finally:
        os.close(root)


def _parent_fd(root: int, path: str) -> tuple[int, str]:
    """An fd of *path*'s parent, opened component by component from *root* without
    following any symlink; (fd, last component). Raises OSError (ELOOP, ENOTDIR)."""
    *parents, name = path.split("/")
    fd = os.dup(root)
    try:
        for part in parents:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd, name


def _info(path: str, node) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(path)
    ti.mode = node.mode & 0o7777
    ti.uid, ti.gid = node.uid, node.gid
    ti.mtime = max(0, node.mtime)
    ti.uname = ti.gname = ""
    return ti
