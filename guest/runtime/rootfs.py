"""The container's root filesystem: overlay of the image layers, the files the runtime
provides (/etc/hostname, /etc/hosts, /etc/resolv.conf), and the mounts made inside the
container's mount namespace (/proc, /dev, /sys, …) before pivot_root. Stdlib only.

Paths inside the rootfs always go through :func:`secure_join`, so a symlink in an image
(``/etc/hosts -> /etc/shadow`` or ``/proc -> /``) can never make us write or mount
outside the rootfs.
"""

from __future__ import annotations

import errno
import os
import stat

from guest.runtime import syscalls
from guest.runtime.syscalls import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SLAVE,
)

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Any

DEV_NODES = {
    # name: (major, minor)
    "null": (1, 3),
    "zero": (1, 5),
    "full": (1, 7),
    "random": (1, 8),
    "urandom": (1, 9),
    "tty": (5, 0),
}
DEV_SYMLINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
"""Docker's masked paths: /dev/null over files, an empty read-only tmpfs over directories."""
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
"""Re-mounted read-only inside the container, as docker does."""


OS_TMPFS_SIZE = "25%"
"""Size of an OS container's /run and /tmp tmpfs (of the VM's RAM, as systemd's own /tmp)."""


class RootfsError(Exception):
    """The container's root filesystem could not be assembled; text is for the user."""


# ---- paths inside the rootfs -------------------------------------------------------------


def secure_join(root: str, path: str) -> str:
    """Return ``root/path`` with every symlink resolved *as if root were /*.

    Missing components are kept literally (so the result may not exist yet). Raises
    OSError(ELOOP) after 40 symlinks.
    """
    root = os.path.abspath(root)
    pending = [p for p in path.split("/") if p]
    pending.reverse()  # a stack: next component at the end
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            resolved.append(part)
            continue
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        links += 1
        if links > 40:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.path.join(root, path))
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        pending.extend(reversed([p for p in target.split("/") if p]))
    return os.path.join(root, *resolved)


def ensure_dir(root: str, path: str, mode: int = 0o755) -> str:
    """Make directory *path* inside *root* (and its parents); return its host path."""
    full = secure_join(root, path)
    os.makedirs(full, mode=mode, exist_ok=True)
    return full


def ensure_file(root: str, path: str, mode: int = 0o644) -> str:
    """Make sure *path* inside *root* exists as a file to mount on; return its host path."""
    full = secure_join(root, path)
    if not os.path.lexists(full):
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        os.close(fd)
    return full


# ---- overlay ----------------------------------------------------------------------------


def mount_overlay(lowerdirs: list[str], upperdir: str, workdir: str, target: str, flags: int = 0) -> None:
    """Mount an overlay at *target*: *lowerdirs* topmost first, writes go to *upperdir*
    (with *workdir* on the same filesystem). An empty *upperdir* makes a read-only stack.
    *flags*: extra mount flags (MS_NOSUID | MS_NODEV on the host).

    Creates upperdir, workdir and target if missing. Raises RootfsError.
    """
    if not lowerdirs:
        raise RootfsError("an overlay needs at least one lower directory")
    for path in [*lowerdirs, upperdir, workdir]:
        if any(c in path for c in ":,\n"):
            raise RootfsError(f"overlay directory {path!r} contains ':' or ','")
    os.makedirs(target, exist_ok=True)
    if not upperdir and len(lowerdirs) == 1:
        # overlayfs refuses a single lower layer without an upper: a read-only bind does it.
        syscalls.mount(lowerdirs[0], target, None, MS_BIND, None)
        syscalls.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags, None)
        return
    options = "lowerdir=" + ":".join(lowerdirs)
    if upperdir:
        os.makedirs(upperdir, exist_ok=True)
        os.makedirs(workdir, exist_ok=True)
        options += f",upperdir={upperdir},workdir={workdir}"
    if len(options) >= 4096:
        raise RootfsError(
            f"too many layers for one overlay mount ({len(lowerdirs)}): "
            "the mount options exceed a page; flatten the image"
        )
    try:
        syscalls.mount("overlay", target, "overlay", flags, options)
    except OSError as exc:
        raise RootfsError(f"cannot mount the overlay on {target}: {exc.strerror}") from None


def unmount(target: str, detach: bool = False) -> bool:
    """Unmount *target*; return False if it was not mounted. Raises OSError otherwise."""
    try:
        syscalls.umount2(target, MNT_DETACH if detach else 0)
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return False
        raise


def default_hosts(hostname: str) -> str:
    return f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"


def prepare_rootfs(
    rootfs: str, hostname: str, hosts: str, resolv_conf: str, files_dir: str, *, in_place: bool = False
) -> dict[str, str]:
    """Write the container's /etc/hostname, /etc/hosts and /etc/resolv.conf into
    *files_dir* (empty *hosts*: localhost plus the hostname; empty *resolv_conf*: the
    image's own file is left alone) and make sure the files to mount on exist in the rootfs.
    Each file is replaced whole, or with *in_place* rewritten in place where it exists: a
    held container process (guest.runtime.process.hold_container) has them mounted.

    Returns ``{path in container: file in files_dir}``, to be bind-mounted by
    :func:`setup_mounts` (as docker does, so the image itself is not modified).
    """
    os.makedirs(files_dir, exist_ok=True)
    contents = {
        "/etc/hostname": hostname + "\n",
        "/etc/hosts": hosts or default_hosts(hostname),
    }
    if resolv_conf:
        contents["/etc/resolv.conf"] = resolv_conf
    binds = {}
    for container_path, text in contents.items():
        source = os.path.join(files_dir, os.path.basename(container_path))
        if in_place and os.path.isfile(source):
            with open(source, "w") as f:  # the same inode, truncated
                f.write(text)
        else:
            tmp = source + ".tmp"
            with open(tmp, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, source)
        target = secure_join(rootfs, container_path)
        if os.path.isdir(target):
            continue  # the image has a directory there; leave it be
        ensure_file(rootfs, container_path)
        binds[container_path] = source
    return binds


# ---- inside the container's mount namespace -----------------------------------------------


def _mount_in(rootfs: str, path: str, source: str, fstype: str, flags: int, data: str | None = None) -> str:
    target = ensure_dir(rootfs, path)
    syscalls.mount(source, target, fstype, flags, data)
    return target


def _populate_dev(dev: str) -> None:
    """Device nodes (mknod, or a bind of the host's node where mknod is refused) and the
    usual /proc symlinks, in the fresh tmpfs at *dev*."""
    old_umask = os.umask(0)
    try:
        for name, (major, minor) in DEV_NODES.items():
            path = os.path.join(dev, name)
            try:
                os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
            except PermissionError:
                open(path, "w").close()
                syscalls.mount(f"/dev/{name}", path, None, MS_BIND, None)
        for name, target in DEV_SYMLINKS.items():
            os.symlink(target, os.path.join(dev, name))
    finally:
        os.umask(old_umask)


def _allow_suid_and_dev(rootfs: str) -> None:
    """Inside the container, its root is not ``nosuid,nodev`` (docker's is not), even
    where the host mounted the overlay so (process isolation): clear the two flags on the
    container's own bind of it, keeping read-only if it was."""
    flags = os.statvfs(rootfs).f_flag
    if not flags & (os.ST_NOSUID | os.ST_NODEV):
        return
    keep = MS_RDONLY if flags & os.ST_RDONLY else 0
    for bit, ms in ((os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, 1024), (os.ST_RELATIME, 1 << 21)):
        if flags & bit:
            keep |= ms
    try:
        syscalls.mount(None, rootfs, None, MS_BIND | MS_REMOUNT | keep, None)
    except PermissionError:
        pass  # in a user namespace of its own the flags are locked: they stay


def _make_device(rootfs: str, device: dict[str, Any]) -> None:
    """mknod a BootConfig ``devices`` entry inside *rootfs* (replacing what is there).
    Where the filesystem refuses mknod (a rootfs shared by virtiofs), the node is made in
    /dev's tmpfs and bound onto an empty file at its path; where mknod is refused
    altogether (a user namespace), the guest's own node of that number is bound there, as
    runc binds the host's."""
    path = secure_join(rootfs, device["path"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    kind = stat.S_IFCHR if device["type"] == "c" else stat.S_IFBLK
    mode = kind | device.get("mode", 0o666)
    number = os.makedev(device["major"], device["minor"])
    old_umask = os.umask(0)
    try:
        try:
            os.mknod(path, mode, number)
        except PermissionError:
            hidden = secure_join(rootfs, "/dev/.devices")
            os.makedirs(hidden, mode=0o700, exist_ok=True)
            node = os.path.join(hidden, device["path"].strip("/").replace("/", "_"))
            if os.path.lexists(node):
                os.unlink(node)
            try:
                os.mknod(node, mode, number)
            except PermissionError:
                node = _guest_node(kind, number)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            syscalls.mount(node, path, None, MS_BIND, None)
    finally:
        os.umask(old_umask)
    if device.get("uid") or device.get("gid"):
        os.chown(path, device.get("uid", 0), device.get("gid", 0))


def _guest_node(kind: int, number: int) -> str:
    """A node of type *kind* and device *number* in the guest's own /dev or one level
    below (bounded). Raises PermissionError when there is none."""

    def candidates() -> Iterator[str]:
        for top in sorted(os.listdir("/dev"))[:4096]:
            path = os.path.join("/dev", top)
            yield path
            if os.path.isdir(path) and not os.path.islink(path):
                for name in sorted(os.listdir(path))[:1024]:
                    yield os.path.join(path, name)

    for path in candidates():
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_IFMT(st.st_mode) == kind and st.st_rdev == number:
            return path
    raise PermissionError(
        errno.EPERM,
        "no such device in the VM to bind, and mknod is not allowed here",
        f"{os.major(number)}:{os.minor(number)}",
    )


def setup_mounts(
    rootfs: str,
    *,
    bind_files: dict[str, str] | None = None,
    cgroup2: bool = False,
    masked_paths: Iterable[str] | None = None,
    readonly_paths: Iterable[str] | None = None,
    privileged: bool = False,
    devices: Iterable[dict[str, Any]] = (),
    os_init: bool = False,
) -> None:
    """Assemble the container's filesystem view in the *current* mount namespace, which
    must be a new one (CLONE_NEWNS) and, for /proc, a process in the container's new pid
    namespace. Raises OSError naming the mount that failed. Follow with :func:`pivot_to`.

    *privileged* (docker's --privileged): /dev is the caller's whole /dev (every device)
    and /sys is writable. *devices* (BootConfig ``devices``) are made as nodes.
    *os_init* (an OS container, see guest.runtime.osinit): the container's cgroup v2
    subtree is mounted writable (delegated to its init) and /run and /tmp are tmpfs.
    """
    syscalls.mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    syscalls.mount(rootfs, rootfs, None, MS_BIND | MS_REC, None)
    _allow_suid_and_dev(rootfs)

    _mount_in(rootfs, "/proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)

    if privileged:
        dev = ensure_dir(rootfs, "/dev")
        syscalls.mount("/dev", dev, None, MS_BIND | MS_REC, None)
    else:
        dev = _mount_in(rootfs, "/dev", "tmpfs", "tmpfs", MS_NOSUID, "mode=755,size=65536k")
        _populate_dev(dev)
    for device in devices:
        _make_device(rootfs, device)
    _mount_in(
        rootfs, "/dev/pts", "devpts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"
    )
    _mount_in(rootfs, "/dev/shm", "shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k")
    try:
        _mount_in(rootfs, "/dev/mqueue", "mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass  # optional: kernels without POSIX message queues

    ro_flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if privileged:
        ro_flags &= ~MS_RDONLY
    try:
        _mount_in(rootfs, "/sys", "sysfs", "sysfs", ro_flags)
    except OSError:
        # A sysfs mount needs a net namespace of our own; without one, bind the current /sys.
        sys_dir = ensure_dir(rootfs, "/sys")
        syscalls.mount("/sys", sys_dir, None, MS_BIND | MS_REC, None)
        syscalls.mount(None, sys_dir, None, MS_BIND | MS_REMOUNT | ro_flags, None)
    if cgroup2:
        cg_flags = ro_flags & ~MS_RDONLY if os_init else ro_flags
        try:
            _mount_in(rootfs, "/sys/fs/cgroup", "cgroup2", "cgroup2", cg_flags)
        except OSError:
            if os_init:
                raise  # systemd cannot run without its cgroup
            # not fatal otherwise: the container just cannot see its cgroup
    if os_init:
        for path, mode in (("/run", "755"), ("/tmp", "1777")):
            _mount_in(rootfs, path, "tmpfs", "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size={OS_TMPFS_SIZE}")

    for container_path, source in (bind_files or {}).items():
        target = ensure_file(rootfs, container_path)
        syscalls.mount(source, target, None, MS_BIND, None)

    _restrict_proc(
        rootfs,
        MASKED_PATHS if masked_paths is None else masked_paths,
        READONLY_PATHS if readonly_paths is None else readonly_paths,
    )


def bind_console(pty_slave: str) -> None:
    """Make the container's /dev/console the pty *pty_slave* (a path in its own
    /dev/pts), as systemd-nspawn does: an init writes its status there, and with the pty's
    master read by the agent that is the container's log. Call after :func:`pivot_to`."""
    prefix, _, number = pty_slave.rpartition("/")
    if prefix != "/dev/pts" or not number.isdigit():
        raise OSError(errno.EINVAL, "not a pty of the container's /dev/pts", pty_slave)
    ensure_file("/", "/dev/console", 0o600)
    syscalls.mount(pty_slave, "/dev/console", None, MS_BIND, None)


def _restrict_proc(rootfs: str, masked: Iterable[str], readonly: Iterable[str]) -> None:
    """Mask *masked* (files: /dev/null on them; directories: an empty read-only tmpfs)
    and make *readonly* read-only, as runc does with OCI's maskedPaths/readonlyPaths.
    Paths are resolved inside *rootfs* (symlinks cannot lead out of it)."""
    null = os.path.join(rootfs, "dev/null")
    for path in masked:
        target = secure_join(rootfs, path)
        if os.path.isdir(target) and not os.path.islink(target):
            syscalls.mount("tmpfs", target, "tmpfs", MS_RDONLY, None)
        elif os.path.isfile(target):
            syscalls.mount(null, target, None, MS_BIND, None)
    for path in readonly:
        target = secure_join(rootfs, path)
        if os.path.exists(target):
            syscalls.mount(target, target, None, MS_BIND | MS_REC, None)
            syscalls.mount(
                None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, None
            )


def pivot_to(rootfs: str) -> None:
    """Make *rootfs* (a mount point, see :func:`setup_mounts`) the root and detach the old
    root, the way runc does: pivot_root(".", ".") stacks the old root on the new one, and
    unmounting "." then removes it."""
    old_root = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new_root = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new_root)
        syscalls.pivot_root(".", ".")
        os.fchdir(old_root)
        syscalls.mount(None, ".", None, MS_SLAVE | MS_REC, None)
        syscalls.umount2(".", MNT_DETACH)
        os.chdir("/")
    finally:
        os.close(old_root)
        os.close(new_root)
