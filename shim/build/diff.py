"""A RUN step's changes, as the agent sent them, → the step's OCI layer tar.

The step ran on an overlay whose upper directory collected every change. The agent turns
that directory into an OCI layer tar where it lives (guest.runtime.diff: in the VM, or in
the host agent of ``--isolation process``) and streams it over the agent channel (the
``diff`` message). The host never mounts the step's writable disk and never walks a tree
the step wrote: the stream is spooled to a file (at most ``MAX_DIFF_BYTES``), checked
by the registry-layer converter's checks (:func:`shim.images.layers.check_layer`:
absolute names, ``..``, names through an earlier symlink or file, bad hardlinks, device
nodes, entry and size caps), and only then rewritten into the layer by
:func:`write_layer`, which reads the checked tar as data and touches no path it names.

The VM's writable layer is still a sparse ext4 file made here (:func:`make_disk`) and
attached with ``WRITABLE_SERIAL`` (the guest mounts it as its ``rw`` directory); the host
deletes it unread.

:func:`write_layer` leaves out what is not the step's own change: paths the runtime
created to mount on (``/proc``, ``/dev``, ``/sys`` when empty, ``/etc/hostname``,
``/etc/hosts``, ``/etc/resolv.conf`` when empty; ``/etc`` when it holds nothing else) when
the image did not have them, as docker leaves them out; and directories that overlayfs
only copied up on the way to something (same type, mode and owner as in the image,
nothing written below them).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import AbstractSet

from shim.build.errors import BuildError
from shim.build.tree import LayerWriter, RootView
from shim.errors import LayerError
from shim.images.layers import Limits, check_layer, read_members

DISK_SIZE = 16 << 30
"""Apparent size of a RUN step's writable disk (sparse: only what is written is used)."""
DISK_INODES = 131072
MAX_DIFF_BYTES = DISK_SIZE
"""Most bytes of tar a step's diff may be (the writable disk cannot hold more)."""
MAX_DIFF_ENTRIES = 1_000_000
RUNTIME_FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf")
RUNTIME_DIRS = ("proc", "sys", "dev")
_KEEP_XATTR_PREFIXES = ("user.", "security.capability")
_XATTR = "SCHILY.xattr."
_WH = ".wh."
_WH_OPAQUE = ".wh..wh..opq"


class DiffError(BuildError):
    """The writable layer of a step could not be read back."""


def make_disk(path: Path, size: int = DISK_SIZE) -> None:
    """Create a sparse ext4 file for a RUN step's writable layer (no journal: the guest
    unmounts it before it powers off, and a step that crashes is thrown away; inode
    tables written now so the guest has no lazy-init work under TCG). Raises DiffError."""
    with open(path, "wb") as f:
        f.truncate(size)
    res = subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-N",
            str(DISK_INODES),
            "-O",
            "^has_journal",
            "-L",
            "vmshim-build",
            "-E",
            "lazy_itable_init=0,nodiscard,root_owner=0:0",
            str(path),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        path.unlink(missing_ok=True)
        raise DiffError(
            f"cannot make the build step's writable disk {path}: "
            f"{(res.stderr or res.stdout).strip() or 'mkfs.ext4 failed'}"
        )


def check(spool: Path, limits: Limits | None = None) -> int:
    """Check the diff tar *spool* the agent sent as the converter checks a registry layer.
    Returns its entry count. Raises DiffError (one line naming the offending entry)."""
    limits = limits or Limits(max_entries=MAX_DIFF_ENTRIES, max_bytes=MAX_DIFF_BYTES)
    try:
        return check_layer(spool, limits)
    except LayerError as exc:
        raise DiffError(f"the RUN step's changes were refused: {_reason(exc, spool)}") from None


def write_layer(
    spool: Path,
    writer: LayerWriter,
    base: RootView | None = None,
    *,
    limits: Limits | None = None,
    mount_points: AbstractSet[str] = frozenset(),
) -> int:
    """Rewrite the diff tar *spool* into *writer*, leaving out runtime leftovers and
    directories only copied up (see the module), and *mount_points* (relative paths the
    step's ``--mount`` targets needed) when they are empty and new. Precondition:
    :func:`check` accepted *spool*. Returns how many entries were written (0: the step
    changed nothing). Raises DiffError."""
    limits = limits or Limits(max_entries=MAX_DIFF_ENTRIES, max_bytes=MAX_DIFF_BYTES)
    pending: list[tuple] = []  # held directories, each inside the one before
    written: set[str] = set()
    count = 0

    def flush() -> None:
        nonlocal count
        for rel, mode, uid, gid, mtime, xattrs in pending:
            writer.add_dir(rel, mode, uid, gid, mtime, xattrs)
            written.add(rel)
            count += 1
        pending.clear()

    try:
        with read_members(spool, limits) as (tar, members):
            for ti in members:
                rel = _norm(ti.name)
                if not rel:
                    continue  # the root itself: the image's root stays as it is
                while pending and not rel.startswith(pending[-1][0] + "/"):
                    pending.pop()  # nothing below it was written: leave it out
                parent, _, name = rel.rpartition("/")
                if name == _WH_OPAQUE:
                    flush()
                    writer.add_opaque(parent)
                    count += 1
                    continue
                if name.startswith(_WH):
                    flush()
                    writer.add_whiteout(f"{parent}/{name[len(_WH) :]}" if parent else name[len(_WH) :])
                    count += 1
                    continue
                kept = _kept(ti)
                mode, mtime = ti.mode & 0o7777, int(ti.mtime)
                if ti.isdir():
                    pending.append((rel, mode, ti.uid, ti.gid, mtime, kept))
                    if not kept and (
                        _same_dir(base, rel, mode, ti.uid, ti.gid)
                        or _runtime_dir(base, rel)
                        or _new(base, rel, mount_points)
                    ):
                        continue  # held until something below it is written
                    flush()
                    continue
                if ti.isreg() and ti.size == 0 and (_runtime_file(base, rel) or _new(base, rel, mount_points)):
                    continue
                flush()
                if ti.isreg():
                    data = tar.extractfile(ti)
                    assert data is not None  # a regular file's member always has data
                    writer.add_file(rel, data, ti.size, mode, ti.uid, ti.gid, mtime, kept)
                elif ti.islnk():
                    target = _norm(ti.linkname)
                    if target in written:
                        writer.add_hardlink(rel, target, ti.uid, ti.gid)
                    else:  # its first name was a runtime leftover (empty): left out
                        writer.add_file(rel, b"", 0, mode, ti.uid, ti.gid, mtime, None)
                elif ti.issym():
                    writer.add_symlink(rel, ti.linkname, ti.uid, ti.gid, mtime)
                elif ti.isfifo():
                    writer.add_fifo(rel, mode, ti.uid, ti.gid, mtime)
                else:  # check() refuses every other type
                    raise DiffError(f"the RUN step's changes hold {rel!r} of an unsupported type; refused")
                written.add(rel)
                count += 1
    except LayerError as exc:
        raise DiffError(f"the RUN step's changes were refused: {_reason(exc, spool)}") from None
    return count


def _norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _reason(exc: LayerError, spool: Path) -> str:
    text = str(exc).replace(f"layer sha256:{spool.name}", "the tar stream")
    return text[len("layer ") :] if text.startswith("layer ") else text


def _runtime_file(base: RootView | None, rel: str) -> bool:
    return rel in RUNTIME_FILES and (base is None or base.nodes.get(rel) is None)


def _new(base: RootView | None, rel: str, mount_points: AbstractSet[str]) -> bool:
    return rel in mount_points and (base is None or base.nodes.get(rel) is None)


def _runtime_dir(base: RootView | None, rel: str) -> bool:
    return (rel in RUNTIME_DIRS or rel == "etc") and (base is None or base.nodes.get(rel) is None)


def _same_dir(base: RootView | None, rel: str, mode: int, uid: int, gid: int) -> bool:
    """Whether the image already has *rel* as a directory with this mode and owner."""
    if base is None:
        return False
    node = base.nodes.get(rel)
    return node is not None and node.kind == "d" and node.mode == mode and node.uid == uid and node.gid == gid


def _kept(ti) -> dict[str, str] | None:
    """The xattrs an image layer carries (trusted.overlay.* never)."""
    kept = {}
    for key, value in ti.pax_headers.items():
        if key.startswith(_XATTR) and key[len(_XATTR) :].startswith(_KEEP_XATTR_PREFIXES):
            kept[key[len(_XATTR) :]] = value
    return kept or None
