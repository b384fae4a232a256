"""Thin ctypes wrappers for the Linux syscalls Python 3.11's ``os`` lacks. Stdlib only.

Every wrapper raises :class:`OSError` with the real errno (and the path, where there is
one) on failure, exactly like the ``os`` functions do, so callers handle both alike.
"""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

# Namespace flags (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

NAMESPACE_FLAGS = {
    "mnt": CLONE_NEWNS,
    "cgroup": CLONE_NEWCGROUP,
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "pid": CLONE_NEWPID,
    "net": CLONE_NEWNET,
}
"""Namespace name (as in /proc/PID/ns/NAME) → its CLONE_NEW* flag."""

# mount(2) flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21

# umount2(2) flags.
MNT_FORCE = 1
MNT_DETACH = 2

# prctl(2) options.
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# reboot(2) commands.
RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC

_SYSCALL_NUMBERS = {
    # name: (x86_64, aarch64)
    "pivot_root": (155, 41),
    "init_module": (175, 105),
    "finit_module": (313, 273),
}


def _syscall_number(name: str) -> int:
    machine = os.uname().machine
    numbers = _SYSCALL_NUMBERS[name]
    if machine in ("x86_64", "amd64"):
        return numbers[0]
    if machine in ("aarch64", "arm64"):
        return numbers[1]
    raise OSError(f"no syscall number for {name} on {machine}")


def _check(result: int, *paths: str | bytes) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), *paths[:1])
    return result


def _b(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return os.fsencode(value)


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces (CLONE_NEW* flags)."""
    _check(_libc.unshare(ctypes.c_int(flags)))


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace *fd* refers to (an open /proc/PID/ns/* file)."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)))


def mount(source: str | None, target: str, fstype: str | None = None, flags: int = 0, data: str | None = None) -> None:
    """mount(2). Raises OSError naming *target*."""
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)), target)


def umount2(target: str, flags: int = 0) -> None:
    """umount2(2). Raises OSError naming *target*."""
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), target)


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2) (glibc has no wrapper)."""
    _check(_libc.syscall(ctypes.c_long(_syscall_number("pivot_root")), _b(new_root), _b(put_old)), new_root)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))))


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)
        )
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (bit masks of capability numbers, 64 bits)."""
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(
        effective & 0xFFFFFFFF,
        permitted & 0xFFFFFFFF,
        inheritable & 0xFFFFFFFF,
        effective >> 32,
        permitted >> 32,
        inheritable >> 32,
    )
    _check(_libc.capset(header, data))


def set_child_subreaper() -> None:
    """Make orphaned descendants of this process re-parent to it (so it can wait for them)."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_parent_death_signal(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def finit_module(fd: int, params: str = "") -> None:
    """Load the kernel module in open file *fd*. Raises OSError (EEXIST if loaded)."""
    _check(
        _libc.syscall(
            ctypes.c_long(_syscall_number("finit_module")), ctypes.c_int(fd), params.encode(), ctypes.c_int(0)
        )
    )


def init_module(image: bytes, params: str = "") -> None:
    """Load a kernel module from memory (used for modules we had to decompress)."""
    _check(
        _libc.syscall(ctypes.c_long(_syscall_number("init_module")), image, ctypes.c_ulong(len(image)), params.encode())
    )


def reboot(cmd: int) -> None:
    """reboot(2); only returns on failure (raises OSError)."""
    _check(_libc.reboot(ctypes.c_int(cmd)))


def sync() -> None:
    _libc.sync()
