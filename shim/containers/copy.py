"""Copying files between a container and the host (``vmshim cp``); a stopped container
gets a short-lived VM of its own for it (shim.containers.manage.run_builtin).

The container's side runs in the container as the agent's ``tar-out``/``tar-in``
helpers (guest.runtime.builtins), through the monitor. The host's side packs or unpacks
a tar here. What comes out of a container is hostile: the host never follows a path or
symlink it chose. Entries are written by directory fd with ``O_NOFOLLOW``/``O_EXCL``,
members may not leave the destination (absolute names, ``..``, a path through a symlink,
a symlink target that climbs out), setuid/setgid/sticky bits are dropped, files belong to
the caller (docker's behaviour), hard links stay inside the copied tree, device nodes are
skipped, and the stream, its entries and headers are bounded (``CopyLimits``,
``shim.images.tarsafe``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shim.containers import manage
from shim.containers.store import ContainerStore
from shim.errors import UsageError, VmshimError
from shim.images.tarsafe import open_tar

CHUNK = 256 * 1024
MAX_COPY_BYTES = 64 << 30
MAX_COPY_ENTRIES = 1_000_000
MAX_COPY_NAME_BYTES = 256 << 20


def split_ref(arg: str) -> tuple[str | None, str]:
    """(container, path) for ``CONTAINER:PATH``; (None, path) for a local path."""
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None, arg
    container, _, path = arg.partition(":")
    if "/" in container:
        return None, arg
    return container, path


def _container_path(path: str) -> str:
    if not path:
        raise UsageError("a container path must not be empty")
    return path if path.startswith("/") else "/" + path


def copy_out(ref: str, src: str, dest: str, limits: CopyLimits | None = None) -> None:
    """Copy *src* from container *ref* to the host path *dest* (``-``: a tar on stdout).
    Raises VmshimError (no such path in the container, unsafe archive …)."""
    limits = limits or CopyLimits()
    store = ContainerStore()
    record = store.find(ref)
    src = _container_path(src)
    with tempfile.TemporaryFile() as archive:
        code, err = manage.run_builtin(
            store, record, "tar-out", [src], out=_CappedSpool(archive, limits.max_bytes), stopped_ok=True
        )
        if code != 0:
            raise VmshimError(
                f"cannot copy {src} from {record.name}: {err.decode(errors='replace').strip() or f'exit {code}'}"
            )
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
        extract(archive, Path(dest), name, limits)


def extract(archive, dest: Path, src_name: str, limits: CopyLimits | None = None) -> None:
    """Unpack *archive* (a tar from a container: hostile) at *dest* (docker's rules: into an
    existing directory, else as *dest* itself in its parent directory). Every entry is
    written relative to a directory fd, one component at a time with ``O_NOFOLLOW``, so
    nothing the archive wrote (a symlink, a path it named twice) is ever followed; see
    ``_Extractor`` for what is refused. Raises VmshimError naming the entry."""
    if src_name == ".":  # CONTAINER:DIR/. copies the contents
        dest.mkdir(parents=True, exist_ok=True)
        target, rename = dest, None
    elif dest.is_dir():
        target, rename = dest, None
    else:
        target, rename = dest.parent, dest.name
        if not target.is_dir():
            raise VmshimError(f"cannot copy to {dest}: {target} is not a directory")
    with _Extractor(target, limits or CopyLimits()) as out:
        try:
            with open_tar(archive, "r|") as tar:
                first = None
                for member in tar:
                    parts = _safe_parts(member.name)
                    if first is None:
                        first = parts[0]
                    if rename is not None and parts[0] == first:
                        parts[0] = rename
                    link = None
                    if member.islnk():
                        link = _safe_parts(member.linkname)
                        if rename is not None and link[0] == first:
                            link[0] = rename
                    try:
                        out.add(member, parts, link, tar)
                    except OSError as e:
                        raise VmshimError(
                            f"cannot write {'/'.join(parts)!r} under {target}: {e.strerror or e}"
                        ) from None
        except (tarfile.TarError, EOFError) as e:
            raise VmshimError(f"the archive from the container is unreadable: {e}") from None


@dataclass(frozen=True)
class CopyLimits:
    """Caps for one ``cp`` out of a container: the archive as spooled and the sum of its
    file sizes (``max_bytes``), its entries, and the sum of their names."""

    max_bytes: int = MAX_COPY_BYTES
    max_entries: int = MAX_COPY_ENTRIES
    max_name_bytes: int = MAX_COPY_NAME_BYTES


class _Extractor:
    """Writes tar members under the directory *root* without following anything.

    Each member's parent is reached from *root*'s fd by ``openat(..., O_NOFOLLOW |
    O_DIRECTORY)`` per component, so a symlink anywhere on the way (one the archive made,
    or one already there) stops it. Refused: a path named twice by the archive; a
    hard link to anything but a regular file this archive wrote earlier; a symlink
    whose target, read from the link's own directory (an absolute target counts from the
    link's directory too, as docker's untar does), climbs out of *root* with ``..``;
    empty or NUL-bearing targets; replacing an existing directory with a non-directory;
    more entries or bytes than the limits. Devices and fifos are skipped. Files get
    the caller as owner and their mode without setuid, setgid and sticky bits. An
    existing file or symlink at a member's path is replaced (unlinked, then created with
    ``O_EXCL``), as docker does; an existing directory is merged into."""

    def __init__(self, root: Path, limits: CopyLimits):
        self.root, self.limits = root, limits
        self.written: dict[tuple[str, ...], str] = {}  # path → kind ("f", "d", "l")
        self.dirs: list[tuple[tuple[str, ...], int, float]] = []
        self.entries = self.bytes = self.name_bytes = 0
        self.root_fd = -1

    def __enter__(self) -> "_Extractor":
        try:
            self.root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise VmshimError(f"cannot copy to {self.root}: {e.strerror}") from None
        return self

    def __exit__(self, exc_type, *rest) -> None:
        try:
            if exc_type is None:
                for parts, mode, mtime in reversed(self.dirs):  # children first
                    fd = self._open_dir(parts)
                    try:
                        os.fchmod(fd, mode)
                        os.utime(fd, (mtime, mtime))
                    finally:
                        os.close(fd)
        finally:
            os.close(self.root_fd)

    def _refuse(self, name, why: str) -> VmshimError:
        shown = "/".join(name) if isinstance(name, tuple) else name
        return VmshimError(f"refusing {shown!r} from the container: {why}")

    def _open_dir(self, parts) -> int:
        """An fd of the directory *parts* under root, reached without following links."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                except FileNotFoundError:
                    raise self._refuse(
                        tuple(parts),
                        f"its parent directory {'/'.join(parts[: i + 1])!r} was not in the archive before it",
                    ) from None
                except (NotADirectoryError, OSError) as e:
                    if isinstance(e, NotADirectoryError) or e.errno == errno.ELOOP:
                        raise self._refuse(
                            tuple(parts),
                            f"{'/'.join(parts[: i + 1])!r} "
                            "is not a directory (a symlink or file); "
                            "nothing is written through it",
                        ) from None
                    raise
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def add(self, member: tarfile.TarInfo, parts: list[str], link: list[str] | None, tar: tarfile.TarFile) -> None:
        key = tuple(parts)
        self.entries += 1
        self.name_bytes += sum(map(len, parts)) + len(member.linkname)
        if self.entries > self.limits.max_entries:
            raise VmshimError(
                f"the archive from the container has more than {self.limits.max_entries} entries; refused"
            )
        if self.name_bytes > self.limits.max_name_bytes:  # self.written keeps every name
            raise VmshimError(
                f"the names in the archive from the container add up to more "
                f"than {self.limits.max_name_bytes} bytes; refused"
            )
        if member.isdev() or member.isfifo():
            return
        if key == (".",) or parts == []:
            return  # the root itself ("./"): it exists already
        if key in self.written:
            raise self._refuse(key, "the archive names it twice")
        if member.issym():
            self._check_symlink(key, member.linkname)
        elif member.islnk():
            assert link is not None
            if self.written.get(tuple(link)) != "f":
                raise self._refuse(
                    key,
                    f"it is a hard link to {'/'.join(link)!r}, which is "
                    "not a regular file written earlier by this copy",
                )
        elif not (member.isreg() or member.isdir()):
            raise self._refuse(key, f"unsupported tar entry type {member.type!r}")
        mode = member.mode & 0o777  # no setuid, setgid or sticky bit from a guest
        parent_fd = self._open_dir(parts[:-1])
        name = parts[-1]
        try:
            if member.isdir():
                self._make_dir(parent_fd, key, name, mode, member.mtime)
                kind = "d"
            else:
                self._clear(parent_fd, key, name)
                if member.issym():
                    os.symlink(member.linkname, name, dir_fd=parent_fd)
                    _set_link_mtime(parent_fd, name, member.mtime)
                    kind = "l"
                elif member.islnk():
                    assert link is not None  # add() is given the link's parts for a hard link
                    src_fd = self._open_dir(link[:-1])
                    try:
                        os.link(link[-1], name, src_dir_fd=src_fd, dst_dir_fd=parent_fd, follow_symlinks=False)
                    finally:
                        os.close(src_fd)
                    kind = "h"
                else:
                    self._write_file(parent_fd, key, name, mode, member, tar)
                    kind = "f"
        finally:
            os.close(parent_fd)
        self.written[key] = kind

    def _check_symlink(self, key: tuple[str, ...], target: str) -> None:
        if not target or "\x00" in target or len(target) > 4095:
            raise self._refuse(key, "its symlink target is empty or invalid")
        depth = len(key) - 1  # the link's directory, counted from root
        for part in target.split("/"):
            if part in ("", "."):
                continue
            depth = depth - 1 if part == ".." else depth + 1
            if depth < 0:
                raise self._refuse(key, f"it is a symlink to {target!r}, which leads outside {self.root}")

    def _clear(self, parent_fd: int, key, name: str) -> None:
        """Remove a non-directory already at *name* (never a directory, never followed)."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise self._refuse(key, "a directory of that name exists at the destination")
        os.unlink(name, dir_fd=parent_fd)

    def _make_dir(self, parent_fd: int, key, name: str, mode: int, mtime: float) -> None:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):  # a file or a symlink: replace it, as docker
                os.unlink(name, dir_fd=parent_fd)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
        self.dirs.append((key, mode, mtime))

    def _write_file(
        self, parent_fd: int, key, name: str, mode: int, member: tarfile.TarInfo, tar: tarfile.TarFile
    ) -> None:
        self.bytes += member.size
        if self.bytes > self.limits.max_bytes:
            raise VmshimError(
                f"the files from the container add up to more than {self.limits.max_bytes} bytes; refused"
            )
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=parent_fd)
        try:
            src = tar.extractfile(member)
            assert src is not None  # a regular file's member always has data
            remaining = member.size
            while remaining:
                chunk = src.read(min(CHUNK, remaining))
                if not chunk:
                    raise VmshimError(f"the archive from the container ends inside {'/'.join(key)!r}")
                _write_all(fd, chunk)
                remaining -= len(chunk)
            os.fchmod(fd, mode)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _set_link_mtime(parent_fd: int, name: str, mtime: float) -> None:
    with contextlib.suppress(OSError, NotImplementedError):
        os.utime(name, (mtime, mtime), dir_fd=parent_fd, follow_symlinks=False)


def _safe_parts(name: str) -> list[str]:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or "\x00" in name:
        raise VmshimError(f"refusing archive entry {name[:200]!r} from the container")
    return parts or ["."]


class _CappedSpool:
    """A writable spool that refuses more than *limit* bytes (the container chooses how
    much it sends)."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.count = f, limit, 0

    def write(self, data) -> int:
        self.count += len(data)
        if self.count > self.limit:
            raise VmshimError(f"the container sent more than {self.limit} bytes for this copy; refused")
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_source_tar(src: str, out, stream: bool = False) -> None:
    """Write host path *src* to *out* as the tar ``cp SRC CTR:DEST`` sends (docker's
    naming: ``DIR/.`` sends the directory's contents). *stream*: a non-seekable *out*."""
    path = Path(src)
    with tarfile.open(fileobj=out, mode="w|" if stream else "w", format=tarfile.PAX_FORMAT) as tar:
        if src.endswith("/.") and path.is_dir():
            for child in sorted(path.iterdir()):
                tar.add(str(child), arcname=child.name)
        else:
            tar.add(
                str(path),
                arcname=path.resolve().name if src in (".", "..") else os.path.basename(os.path.normpath(src)),
            )


def copy_in(src: str, ref: str, dest: str) -> None:
    """Copy host path *src* (``-``: a tar on stdin) into container *ref* at *dest*."""
    store = ContainerStore()
    record = store.find(ref)
    dest = _container_path(dest)
    if src == "-":
        chunks = iter(lambda: sys.stdin.buffer.read(CHUNK), b"")
        code, err = manage.run_builtin(store, record, "tar-in", [dest], stdin_data=chunks, stopped_ok=True)
    else:
        path = Path(src)
        if not path.exists() and not path.is_symlink():
            raise UsageError(f"cannot copy {src}: no such file or directory")
        with tempfile.TemporaryFile() as archive:
            write_source_tar(src, archive)
            archive.seek(0)
            chunks = iter(lambda: archive.read(CHUNK), b"")
            code, err = manage.run_builtin(store, record, "tar-in", [dest], stdin_data=chunks, stopped_ok=True)
    if code != 0:
        raise VmshimError(
            f"cannot copy into {record.name}:{dest}: {err.decode(errors='replace').strip() or f'exit {code}'}"
        )
