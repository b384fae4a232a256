"""The container's own mounts: bind mounts, volumes and tmpfs, made into its rootfs
before its process starts, and the read-only root (``--read-only``). Stdlib only; used in
the guest and, for ``--isolation process``, on the host.

Each :class:`guest.spec.MountSpec` comes with a *source* that the placement already made
available in the runtime's own mount namespace:

- in the guest, :func:`mount_virtiofs` (a host directory shared by virtiofs) and
  :func:`mount_volume` (a volume's ext4 disk) mount them under ``/run/vmshim/mounts/<i>``;
- on the host, a bind source is the host directory itself and a volume is loop-mounted
  by shim.volumes.

:func:`assemble` then mounts every source onto its target inside the rootfs (resolved
with :func:`guest.runtime.rootfs.secure_join`, so a symlink in the image can never make a
target land outside it) and, last, makes the root read-only if asked. These mounts live
in the runtime's namespace under the rootfs; the container's new mount namespace gets
them through the recursive bind of the rootfs in :func:`rootfs.setup_mounts`, read-only
flags included.
"""

from __future__ import annotations

import errno
import os
import stat

from guest.runtime import rootfs as rootfs_mod
from guest.runtime import syscalls
from guest.runtime.syscalls import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
)

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time

if TYPE_CHECKING:
    from guest.spec import MountSpec

VOLUME_DATA = "data"
"""The directory inside a volume's filesystem that is mounted (its root holds lost+found)."""
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_SYNCHRONOUS = 16
TMPFS_FLAGS = {
    "ro": (MS_RDONLY, True),
    "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True),
    "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True),
    "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True),
    "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True),
    "async": (MS_SYNCHRONOUS, False),
    "noatime": (MS_NOATIME, True),
    "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True),
    "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True),
    "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True),
}
"""tmpfs option words that are mount flags: word → (flag, set it)."""
TMPFS_DATA = ("size", "mode", "uid", "gid", "nr_inodes", "nr_blocks")
"""tmpfs options passed to the kernel as mount data."""
TMPFS_DEFAULT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
"""docker's defaults for ``--tmpfs`` (``exec`` etc. turn them off)."""
STANDARD_MOUNT_POINTS = ("/proc", "/sys", "/dev")
"""Made in the rootfs before it turns read-only: the container's setup mounts there."""


class MountError(Exception):
    """A mount into the container could not be made; the text is for the user."""


# ---- sources in the guest -----------------------------------------------------------------


def mount_virtiofs(tag: str, target: str, readonly: bool) -> str:
    """Mount the virtiofs share *tag* at *target* (created); return *target*."""
    os.makedirs(target, exist_ok=True)
    flags = MS_NODEV | (MS_RDONLY if readonly else 0)
    try:
        syscalls.mount(tag, target, "virtiofs", flags, None)
    except OSError as exc:
        raise MountError(f"cannot mount the shared directory {tag!r}: {exc.strerror}") from None
    return target


def inside_share(share_dir: str, subpath: str) -> str:
    """The entry *subpath* of the mounted share *share_dir*, refusing a path that
    leaves it (through ``..`` or a symlink). Raises MountError."""
    path = os.path.realpath(os.path.join(share_dir, subpath))
    if os.path.commonpath([path, os.path.realpath(share_dir)]) != os.path.realpath(share_dir):
        raise MountError(f"{subpath!r} leaves the shared directory")
    if not os.path.lexists(path):
        raise MountError(f"{subpath!r} is not in the shared directory")
    return path


def mount_volume(device: str, target: str, readonly: bool) -> str:
    """Mount a volume's ext4 *device* at *target* (created); return the directory to
    bind into the container (``target/data``, made on first use). A read-only volume
    whose ``data`` directory does not exist yet shows up empty."""
    os.makedirs(target, exist_ok=True)
    flags = MS_NODEV | MS_NOSUID | (MS_RDONLY if readonly else 0)
    data = "noload" if readonly else None  # never write, not even a journal replay
    try:
        syscalls.mount(device, target, "ext4", flags, data)
    except OSError as exc:
        raise MountError(f"cannot mount the volume disk {device} (ext4): {exc.strerror}") from None
    data_dir = os.path.join(target, VOLUME_DATA)
    if not os.path.isdir(data_dir):
        if readonly:
            return _empty_dir(target + ".empty")
        os.mkdir(data_dir, 0o755)
    return data_dir


def _empty_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def sync_volumes(stage_dirs: list[str]) -> None:
    """Before the VM ends: make each mounted volume read-only (flushes its journal and
    marks it clean), best effort."""
    for target in stage_dirs:
        try:
            syscalls.mount(None, target, None, MS_REMOUNT | MS_RDONLY, None)
        except OSError:
            pass


# ---- into the rootfs ------------------------------------------------------------------------


def assemble(rootfs: str, mounts: list[tuple[MountSpec, str | None]], *, read_only: bool = False) -> None:
    """Make every ``(MountSpec, source)`` of *mounts*, then (with *read_only*) turn the
    rootfs itself read-only. *source* is a path in the caller's namespace (None for
    tmpfs). Parents go before what is mounted inside them, whatever order the flags came
    in (``--tmpfs /tmp -v /x:/tmp/x``, as docker sorts them); mounts of one depth keep
    their order. Raises MountError naming the mount that failed; what was mounted before
    stays (the caller unmounts the rootfs recursively)."""
    for spec, source in sorted(mounts, key=lambda mount: target_depth(mount[0].target)):
        try:
            mount_one(rootfs, spec, source)
        except MountError:
            raise
        except OSError as exc:
            raise MountError(f"cannot mount {spec.type} on {spec.target}: {_describe(exc)}") from None
    if read_only:
        make_readonly(rootfs)


def target_depth(target: str) -> int:
    """How many directories deep *target* (absolute, inside the container) is."""
    return len([part for part in os.path.normpath(target).split("/") if part])


def mount_one(rootfs: str, spec: MountSpec, source: str | None) -> str:
    """Mount one MountSpec into *rootfs*; return the host path of its target."""
    if spec.type == "tmpfs":
        target = rootfs_mod.ensure_dir(rootfs, spec.target)
        flags, data = tmpfs_options(spec.options)
        if spec.readonly:
            flags |= MS_RDONLY
        syscalls.mount("tmpfs", target, "tmpfs", flags, data or None)
        return target
    if source is None:
        raise MountError(f"no source for the {spec.type} mount on {spec.target}")
    try:
        st = os.stat(source)
    except OSError as exc:
        raise MountError(f"the source of {spec.target} is not there: {exc.strerror}") from None
    is_dir = stat.S_ISDIR(st.st_mode)
    target = rootfs_mod.secure_join(rootfs, spec.target)
    if os.path.lexists(target) and os.path.isdir(target) != is_dir:
        raise MountError(
            f"cannot mount a {'directory' if is_dir else 'file'} on "
            f"{spec.target}: the image has a {'file' if is_dir else 'directory'} there"
        )
    if spec.type == "volume" and spec.copy_up and is_dir and os.path.isdir(target):
        copy_up(target, source)
    if is_dir:
        target = rootfs_mod.ensure_dir(rootfs, spec.target)
    else:
        target = rootfs_mod.ensure_file(rootfs, spec.target)
    syscalls.mount(source, target, None, MS_BIND | MS_REC, None)
    if spec.readonly:
        # A bind remount sets every per-mount flag: keep nosuid/nodev/noexec as they are.
        kept = os.statvfs(target).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        syscalls.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | kept, None)
    return target


def tmpfs_options(options: str) -> tuple[int, str]:
    """Split docker's tmpfs options (``size=64m,mode=1777,exec``) into mount flags (from
    TMPFS_DEFAULT_FLAGS) and kernel data. Raises MountError for an unknown option."""
    flags = TMPFS_DEFAULT_FLAGS
    data = []
    for word in (w.strip() for w in options.split(",")):
        if not word:
            continue
        if word in TMPFS_FLAGS:
            flag, on = TMPFS_FLAGS[word]
            flags = (flags | flag) if on else (flags & ~flag)
            continue
        key, sep, value = word.partition("=")
        if key in TMPFS_DATA and sep and value and all(c.isalnum() for c in value):
            data.append(f"{key}={value}")
            continue
        raise MountError(f"unknown tmpfs option {word!r}")
    return flags, ",".join(data)


def make_readonly(rootfs: str) -> None:
    """Turn the rootfs mount read-only (its per-mount flag: the overlay itself and the
    mounts on it are untouched), after making the mount points the container's setup
    needs."""
    for path in STANDARD_MOUNT_POINTS:
        rootfs_mod.ensure_dir(rootfs, path)
    try:
        syscalls.mount(None, rootfs, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
    except OSError as exc:
        raise MountError(f"cannot make the root filesystem read-only: {exc.strerror}") from None


# ---- docker's copy of the image's files into a new volume -------------------------------------


def copy_up(source_dir: str, volume_dir: str) -> None:
    """Copy the image's *source_dir* into the empty *volume_dir* (files, directories,
    symlinks, with owners, modes and times; device nodes, fifos and sockets are skipped),
    and give *volume_dir* the mode and owner of *source_dir*. Does nothing if
    *volume_dir* is not empty. Never follows a symlink."""
    if os.listdir(volume_dir):
        return
    _copy_meta(source_dir, volume_dir, os.lstat(source_dir))
    for dirpath, dirnames, filenames in os.walk(source_dir):
        rel = os.path.relpath(dirpath, source_dir)
        out_dir = volume_dir if rel == "." else os.path.join(volume_dir, rel)
        for name in dirnames + filenames:
            src = os.path.join(dirpath, name)
            dst = os.path.join(out_dir, name)
            st = os.lstat(src)
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(dst, 0o700)
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISREG(st.st_mode):
                _copy_file(src, dst)
            else:
                continue
            _copy_meta(src, dst, st)
        # os.walk does not descend into symlinked directories: nothing else to prune.
    # Directory times were changed by the entries created in them; set them again.
    for dirpath, dirnames, _ in os.walk(source_dir):
        rel = os.path.relpath(dirpath, source_dir)
        out_dir = volume_dir if rel == "." else os.path.join(volume_dir, rel)
        st = os.lstat(dirpath)
        os.utime(out_dir, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_file(src: str, dst: str) -> None:
    fd_in = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            while True:
                try:
                    if os.copy_file_range(fd_in, fd_out, 1 << 30) == 0:
                        break
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    while True:
                        chunk = os.read(fd_in, 1 << 20)
                        if not chunk:
                            break
                        os.write(fd_out, chunk)
                    break
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _copy_meta(src: str, dst: str, st: os.stat_result) -> None:
    os.lchown(dst, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _describe(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()
