"""Copying files between a container and the host (``vmshim cp``); a stopped container
gets a short-lived VM of its own for it (shim.containers.manage.run_builtin).

The container's side runs in the container as the agent's ``tar-out``/``tar-in``
helpers (guest.runtime.builtins), through the monitor. The host's side packs or unpacks
a tar here. What comes out of a container is untrusted: members may not leave the
destination (absolute names, ``..``, or a path through a symlink the archive made), and
device nodes are skipped.
"""

from __future__ import annotations

import os
import sys
import tarfile
import tempfile
from pathlib import Path

from shim.containers import manage
from shim.containers.store import ContainerStore
from shim.errors import UsageError, VmshimError

CHUNK = 256 * 1024


def _container_path(path: str) -> str:
    if not path:
        raise UsageError("a container path must not be empty")
    return path if path.startswith("/") else "/" + path


def copy_out(ref: str, src: str, dest: str) -> None:
    """Copy *src* from container *ref* to the host path *dest* (``-``: a tar on stdout).
    Raises VmshimError (no such path in the container, unsafe archive …)."""
    store = ContainerStore()
    record = store.find(ref)
    src = _container_path(src)
    with tempfile.TemporaryFile() as archive:
        code, err = manage.run_builtin(store, record, "tar-out", [src], out=archive,
                                       stopped_ok=True)
        if code != 0:
            raise VmshimError(f"cannot copy {src} from {record.name}: "
                              f"{err.decode(errors='replace').strip() or f'exit {code}'}")
        archive.seek(0)
        if dest == "-":
            while True:
                chunk = archive.read(CHUNK)
                if not chunk:
                    break
                sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            return
        name = "." if src.endswith("/.") else os.path.basename(os.path.normpath(src))
        extract(archive, Path(dest), name)


def extract(archive, dest: Path, src_name: str) -> None:
    """Unpack *archive* at *dest* (docker's rules: into an existing directory, else as
    *dest* itself in its parent directory)."""
    if src_name == ".":  # CONTAINER:DIR/. copies the contents
        dest.mkdir(parents=True, exist_ok=True)
        target, rename = dest, None
    elif dest.is_dir():
        target, rename = dest, None
    else:
        target, rename = dest.parent, dest.name
        if not target.is_dir():
            raise VmshimError(f"cannot copy to {dest}: {target} is not a directory")
    root = os.path.realpath(target)
    first = None
    with tarfile.open(fileobj=archive, mode="r|") as tar:
        for member in tar:
            parts = _safe_parts(member.name)
            if first is None:
                first = parts[0]
            if rename is not None and parts[0] == first:
                parts[0] = rename
            member.name = "/".join(parts)
            if member.isdev() or member.isfifo():
                continue
            if member.islnk():
                link = _safe_parts(member.linkname)
                if rename is not None and link[0] == first:
                    link[0] = rename
                member.linkname = "/".join(link)
            parent = os.path.realpath(os.path.join(root, os.path.dirname(member.name)))
            if parent != root and not parent.startswith(root + os.sep):
                raise VmshimError(f"refusing {member.name!r} from the container: it leads "
                                  f"outside {target}")
            tar.extract(member, root, set_attrs=True, numeric_owner=True)


def _safe_parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise VmshimError(f"refusing archive entry {name!r} from the container")
    return parts or ["."]


def copy_in(src: str, ref: str, dest: str) -> None:
    """Copy host path *src* (``-``: a tar on stdin) into container *ref* at *dest*."""
    store = ContainerStore()
    record = store.find(ref)
    dest = _container_path(dest)
    if src == "-":
        chunks = iter(lambda: sys.stdin.buffer.read(CHUNK), b"")
        code, err = manage.run_builtin(store, record, "tar-in", [dest], stdin_data=chunks,
                                       stopped_ok=True)
    else:
        path = Path(src)
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"cannot copy {src}: no such file or directory")
        with tempfile.TemporaryFile() as archive:
            with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
                if src.endswith("/.") and path.is_dir():
                    for child in sorted(path.iterdir()):
                        tar.add(str(child), arcname=child.name)
                else:
                    tar.add(str(path), arcname=path.resolve().name if src in (".", "..")
                            else os.path.basename(os.path.normpath(src)))
            archive.seek(0)
            chunks = iter(lambda: archive.read(CHUNK), b"")
            code, err = manage.run_builtin(store, record, "tar-in", [dest], stdin_data=chunks,
                                           stopped_ok=True)
    if code != 0:
        raise VmshimError(f"cannot copy into {record.name}:{dest}: "
                          f"{err.decode(errors='replace').strip() or f'exit {code}'}")
