"""A container's changes as an OCI layer tar, made where the writable layer lives (the
agent's ``diff`` message, see guest.protocol). Stdlib only.

The overlay's upper directory holds every change of the container: new and changed files
as themselves, deletions as overlayfs whiteouts (a character device 0/0 named like the
deleted entry), directories whose lower content is hidden as a whole with the xattr
``trusted.overlay.opaque=y``. :func:`write_tar` writes the OCI form of it to a stream:
``D/.wh.NAME`` for a whiteout, ``D/.wh..wh..opq`` after an opaque directory's own entry,
everything else as is, depth first with names sorted (a directory before what is in it),
hard links kept (later names of one inode become hard links to the first), the xattrs an
image layer carries kept (``user.*``, ``security.capability``), ``trusted.overlay.*`` never.
Device nodes and sockets are left out with a line on stderr.

The walk opens every directory relative to its parent's fd with ``O_NOFOLLOW``: it never
follows a symlink the container made, so in ``--isolation process`` (where this runs on the
host, as root) it reads nothing outside the upper directory. The host checks the stream as
it checks a registry layer anyway: it trusts nothing made here.
"""

from __future__ import annotations

import os
import stat
import tarfile

from guest.runtime.process import Spawned

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from typing import IO

_KEEP_XATTR_PREFIXES = ("user.", "security.capability")
_OPAQUE_XATTR = "trusted.overlay.opaque"
_WH = ".wh."
_WH_OPAQUE = ".wh..wh..opq"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CHUNK = 256 * 1024


def spawn(upperdir: str) -> Spawned:
    """Fork a child that writes the tar of *upperdir* to a pipe (stdout) and its
    complaints to another (stderr); exit code 0 when the tar is complete. The child
    does not enter the container: it reads the upper directory from where the caller
    mounted it."""
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(out_r)
            os.close(err_r)
            code = write_tar(upperdir, out_w, err_w)
        except BaseException as exc:  # noqa: BLE001 - report and exit, never return
            _say(err_w, f"cannot write the container's changes: {exc}")
        finally:
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    return Spawned(pid, tty=False, stdout=out_r, stderr=err_r)


def write_tar(upperdir: str, out_fd: int, err_fd: int) -> int:
    """Write the OCI layer tar of *upperdir* to *out_fd*; return an exit code (1 with a
    line on *err_fd* when something cannot be read)."""
    try:
        root = os.open(upperdir, _DIR_FLAGS)
    except FileNotFoundError:
        root = None  # nothing was ever written
    except OSError as exc:
        _say(err_fd, f"cannot open the writable layer {upperdir}: {exc.strerror}")
        return 1
    out = os.fdopen(out_fd, "wb", buffering=_CHUNK, closefd=False)
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            if root is not None:
                _Walker(tar, err_fd).walk(root, "")
        out.flush()
    except OSError as exc:
        _say(err_fd, f"cannot write the container's changes: {exc}")
        return 1
    finally:
        if root is not None:
            os.close(root)
    return 0


class _Walker:
    def __init__(self, tar: tarfile.TarFile, err_fd: int):
        self.tar = tar
        self.err_fd = err_fd
        self.inodes: dict[tuple[int, int], str] = {}

    def add(self, ti: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        self.tar.addfile(ti, data)
        self.tar.members.clear()  # type: ignore[attr-defined]  # real attribute, not in typeshed; a writer never needs them: keep memory flat

    def walk(self, dir_fd: int, rel_dir: str) -> None:
        for name in sorted(os.listdir(dir_fd)):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                try:
                    xattrs = _xattrs(fd)
                    opaque = xattrs.get(_OPAQUE_XATTR) == b"y"
                    self.add(_info(rel, tarfile.DIRTYPE, st, xattrs))
                    if opaque:
                        self.add(_empty(f"{rel}/{_WH_OPAQUE}"))
                    self.walk(fd, rel)
                finally:
                    os.close(fd)
            elif stat.S_ISCHR(mode) and st.st_rdev == 0:
                self.add(_empty(f"{rel_dir}/{_WH}{name}" if rel_dir else f"{_WH}{name}"))
            elif stat.S_ISREG(mode):
                self.add_file(dir_fd, name, rel, st)
            elif stat.S_ISLNK(mode):
                ti = _info(rel, tarfile.SYMTYPE, st, {})
                ti.linkname = os.readlink(name, dir_fd=dir_fd)
                self.add(ti)
            elif stat.S_ISFIFO(mode):
                self.add(_info(rel, tarfile.FIFOTYPE, st, {}))
            else:
                _say(self.err_fd, f"/{rel}: device nodes and sockets are not kept in image layers")

    def add_file(self, dir_fd: int, name: str, rel: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.inodes:
            ti = _info(rel, tarfile.LNKTYPE, st, {})
            ti.linkname = self.inodes[key]
            self.add(ti)
            return
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"/{rel} changed while it was read")
            ti = _info(rel, tarfile.REGTYPE, st, _xattrs(fd))
            ti.size = st.st_size
            with os.fdopen(fd, "rb", closefd=False) as f:
                self.add(ti, f)
        finally:
            os.close(fd)
        self.inodes[key] = rel


def _info(name: str, type_: bytes, st: os.stat_result, xattrs: dict[str, bytes]) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.mode = stat.S_IMODE(st.st_mode)
    ti.uid, ti.gid = st.st_uid, st.st_gid
    ti.uname = ti.gname = ""
    ti.mtime = max(0, int(st.st_mtime))
    kept = {
        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
        for k, v in xattrs.items()
        if k.startswith(_KEEP_XATTR_PREFIXES)
    }
    if kept:
        ti.pax_headers = kept
    return ti


def _empty(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644
    ti.uname = ti.gname = ""
    return ti


def _xattrs(fd: int) -> dict[str, bytes]:
    try:
        names = os.listxattr(fd)
    except OSError:
        return {}
    out = {}
    for name in names:
        try:
            out[name] = os.getxattr(fd, name)
        except OSError:
            pass
    return out


def _say(fd: int, text: str) -> None:
    try:
        os.write(fd, (text.rstrip("\n") + "\n").encode(errors="replace"))
    except OSError:
        pass
