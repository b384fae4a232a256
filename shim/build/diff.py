"""A RUN step's filesystem changes → an OCI layer tar.

The step ran on an overlay whose upper directory collected every change: new and changed
files as themselves, deletions as overlayfs whiteouts (a character device 0/0 named like
the deleted entry), directories whose lower content was hidden as a whole (``rm -rf d;
mkdir d``) with the xattr ``trusted.overlay.opaque=y``. :func:`write_upper` walks that
directory and writes the OCI form: ``D/.wh.NAME`` for a whiteout, ``D/.wh..wh..opq`` inside
an opaque directory, everything else as is (hardlinks kept, ``security.capability`` and
``user.*`` xattrs kept, ``trusted.overlay.*`` dropped).

Where the upper directory lives:

- ``--isolation process``: on the host already (the placement's ``rw_dir``).
- ``--isolation vm``: on the VM's writable disk, a sparse ext4 file made here
  (:func:`make_disk`) and attached with ``WRITABLE_SERIAL``; the guest mounts it as its
  ``rw`` directory (``upper/`` and ``work/`` inside). After the VM has powered off, the
  host checks the file system with ``e2fsck -fn`` (user space: a disk the guest wrote is
  untrusted input) and only then loop-mounts it read-only with nodev,nosuid,noexec
  (:func:`mounted_disk`). A follow-up can let the agent stream this tar instead, so the
  host kernel never parses a guest-written file system.

Paths the runtime itself creates to mount on (``/proc``, ``/dev``, ``/sys``,
``/etc/hostname``, ``/etc/hosts``, ``/etc/resolv.conf``; ``/etc`` when it holds nothing
else) are left out when the image did not have them, as docker leaves them out.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path
from typing import Callable, Iterator

from shim.build.tree import LayerWriter, RootView
from shim.build.errors import BuildError

DISK_SIZE = 16 << 30
"""Apparent size of a RUN step's writable disk (sparse: only what is written is used)."""
DISK_INODES = 131072
RUNTIME_FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf")
RUNTIME_DIRS = ("proc", "sys", "dev")
_KEEP_XATTR_PREFIXES = ("user.", "security.capability")


class DiffError(BuildError):
    """The writable layer of a step could not be read back."""


def make_disk(path: Path, size: int = DISK_SIZE) -> None:
    """Create a sparse ext4 file for a RUN step's writable layer (no journal: the guest
    unmounts it before it powers off, and a step that crashes is thrown away; inode
    tables written now so the guest has no lazy-init work under TCG). Raises DiffError."""
    with open(path, "wb") as f:
        f.truncate(size)
    res = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-N", str(DISK_INODES), "-O", "^has_journal",
         "-L", "vmshim-build", "-E", "lazy_itable_init=0,nodiscard,root_owner=0:0", str(path)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        path.unlink(missing_ok=True)
        raise DiffError(f"cannot make the build step's writable disk {path}: "
                        f"{(res.stderr or res.stdout).strip() or 'mkfs.ext4 failed'}")


@contextlib.contextmanager
def mounted_disk(image: Path, target: Path) -> Iterator[Path]:
    """Check the ext4 file *image* in user space, then mount it read-only on *target*
    for the duration. Raises DiffError when the check or the mount fails."""
    res = subprocess.run(["e2fsck", "-f", "-n", str(image)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True)
    if res.returncode != 0:
        lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
        raise DiffError("the build step's writable disk is damaged; refusing to read it "
                        f"(e2fsck exit {res.returncode}: {' | '.join(lines[-3:])})")
    target.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "ext4", "-o", "ro,loop,nodev,nosuid,noexec",
                          "--", str(image), str(target)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        raise DiffError(f"cannot mount the build step's writable disk: "
                        f"{(res.stderr or res.stdout).strip()}")
    try:
        yield target
    finally:
        res = subprocess.run(["umount", "--", str(target)], capture_output=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", "--", str(target)], capture_output=True)


def runtime_leftovers(upper: Path, base: RootView) -> set[str]:
    """The mount points the runtime created in *upper* that the image did not have."""
    out: set[str] = set()
    for rel in RUNTIME_FILES:
        try:
            st = os.lstat(upper / rel)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == 0 and base.nodes.get(rel) is None:
            out.add(rel)
    for rel in RUNTIME_DIRS:
        path = upper / rel
        if path.is_dir() and not path.is_symlink() and not os.listdir(path) \
                and base.nodes.get(rel) is None:
            out.add(rel)
    etc = upper / "etc"
    if etc.is_dir() and not etc.is_symlink() and base.nodes.get("etc") is None:
        if all(f"etc/{name}" in out for name in os.listdir(etc)):
            out.add("etc")
    return out


def write_upper(upper: Path, writer: LayerWriter, base: RootView | None = None, *,
                skip: set[str] = frozenset(), warn: Callable[[str], None] = lambda _: None) -> int:
    """Write the changes recorded in the overlay upper directory *upper* into *writer*
    (OCI whiteouts). Entries in *skip* (relative paths) are left out, and so are
    directories that overlayfs only copied up on the way to something left out (same
    type, mode and owner as in *base*, nothing written below them). Returns how many
    entries were written (0: the step changed nothing)."""
    seen_inodes: dict[tuple[int, int], str] = {}
    pending: list[tuple] = []  # unchanged directories, written once something below is
    count = 0

    def flush() -> None:
        nonlocal count
        for rel, mode, uid, gid, mtime, xattrs in pending:
            writer.add_dir(rel, mode, uid, gid, mtime, xattrs)
            count += 1
        pending.clear()

    def walk(rel_dir: str) -> None:
        nonlocal count
        full_dir = upper / rel_dir if rel_dir else upper
        for name in sorted(os.listdir(full_dir)):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if rel in skip:
                continue
            full = full_dir / name
            st = os.lstat(full)
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                xattrs = _xattrs(full)
                opaque = xattrs.pop("trusted.overlay.opaque", None) == b"y"
                kept = _kept(xattrs)
                entry = (rel, stat.S_IMODE(mode), st.st_uid, st.st_gid, int(st.st_mtime), kept)
                depth = len(pending)
                pending.append(entry)
                if opaque or not _same_dir(base, rel, st) or kept:
                    flush()
                    if opaque:
                        writer.add_opaque(rel)
                walk(rel)
                if len(pending) > depth:  # nothing below was written: leave it out
                    del pending[depth:]
                continue
            flush()
            if stat.S_ISCHR(mode) and st.st_rdev == 0:
                writer.add_whiteout(rel)
            elif stat.S_ISREG(mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen_inodes:
                    writer.add_hardlink(rel, seen_inodes[key], st.st_uid, st.st_gid)
                else:
                    seen_inodes[key] = rel
                    with open(full, "rb") as f:
                        writer.add_file(rel, f, st.st_size, stat.S_IMODE(mode), st.st_uid,
                                        st.st_gid, int(st.st_mtime), _kept(_xattrs(full)))
            elif stat.S_ISLNK(mode):
                writer.add_symlink(rel, os.readlink(full), st.st_uid, st.st_gid,
                                   int(st.st_mtime))
            elif stat.S_ISFIFO(mode):
                writer.add_fifo(rel, stat.S_IMODE(mode), st.st_uid, st.st_gid, int(st.st_mtime))
            else:
                warn(f"/{rel}: device nodes and sockets are not kept in image layers")
                continue
            count += 1

    walk("")
    return count


def _same_dir(base: RootView | None, rel: str, st: os.stat_result) -> bool:
    """Whether the image already has *rel* as a directory with this mode and owner."""
    if base is None:
        return False
    node = base.nodes.get(rel)
    return (node is not None and node.kind == "d" and node.mode == stat.S_IMODE(st.st_mode)
            and node.uid == st.st_uid and node.gid == st.st_gid)


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        with contextlib.suppress(OSError):
            out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _kept(xattrs: dict[str, bytes]) -> dict[str, str] | None:
    """The xattrs an image layer carries (as PAX strings); trusted.overlay.* never."""
    kept = {}
    for name, value in xattrs.items():
        if name.startswith(_KEEP_XATTR_PREFIXES):
            kept[name] = value.decode("utf-8", "surrogateescape")
    return kept or None
