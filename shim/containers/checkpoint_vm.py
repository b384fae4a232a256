"""The part of checkpointing that runs in the monitor, below it: what can be checkpointed,
where a checkpoint lives, which guest it needs, saving the VM and copying the writable
disk. The commands (checkpoint, restore, export, import, migrate) that drive the monitor
are shim.containers.checkpoint, above the monitor."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from shim.containers.netrequest import NetworkRequest
from shim.containers.store import Container, ContainerStore
from shim.errors import CheckpointError, UsageError

CHECKPOINTS = "checkpoints"
MEMORY_FILE = "memory.img"
RW_FILE = "rw.img"
META_FILE = "checkpoint.json"
RECORD_FILE = "record.json"
RW_DATA = "rw.data"
GUEST_FILE = "guest.json"
FORMAT_VERSION = 1
DEFAULT_NAME = "checkpoint"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ID = re.compile(r"^[0-9a-f]{64}$")

MAX_JSON = 1 << 20
"""checkpoint.json and record.json in an archive: at most this many bytes each."""
MAX_MEMORY_IMAGE = 64 << 30
MAX_RW_SIZE = 256 << 30
MAX_EXTENTS = 1 << 16
MAX_MEMBERS = 8
MAX_MEMORY_MIB = 1 << 16
SAVE_TIMEOUT = 600.0
"""Seconds the monitor may take to save (and, with --leave-running, restore) the VM."""


# ---- what can be checkpointed ----------------------------------------------------------------


def check_checkpointable(record: Container, verb: str = "checkpoint") -> None:
    """Raise CheckpointError (one line naming the reason) unless *record* can be saved
    (or, *verb* ``migrate``, moved)."""
    what = f"cannot {verb} container {record.name}"
    if record.isolation != "vm":
        raise CheckpointError(
            f"{what}: only --isolation vm containers can be moved or saved (this one runs as {record.isolation})"
        )
    if record.rootfs:
        raise CheckpointError(
            f"{what}: its rootfs {record.rootfs} is a virtiofs share, and "
            f"QEMU cannot save a VM with a vhost-user-fs device"
        )
    for mount in record.mounts:
        if mount.type == "bind":
            raise CheckpointError(
                f"{what}: its bind mount {mount.source} -> {mount.target} is a "
                f"virtiofs share, and QEMU cannot save a VM with a vhost-user-fs device; "
                f"use a volume instead"
            )
    mode = _network_mode(record.network)
    if mode != "none":
        raise CheckpointError(
            f"{what}: it is on network {mode}; this needs --network none "
            f"for now (a restored or moved NIC needs its old lease)"
        )
    if record.auto_remove:
        raise CheckpointError(f"{what}: it was started with --rm")


def _network_mode(request: NetworkRequest | None) -> str:
    if request is None:
        return "none"
    return str(request.networks[0]) if request.networks else "none"


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UsageError(f"invalid checkpoint name {name!r}: use letters, digits, '_', '.', '-' (at most 64)")
    return name


def checkpoint_dir(store: ContainerStore, container_id: str, name: str) -> Path:
    return store.dir(container_id) / CHECKPOINTS / check_name(name)


def list_checkpoints(store: ContainerStore, container_id: str) -> list[str]:
    base = store.dir(container_id) / CHECKPOINTS
    try:
        return sorted(p.name for p in base.iterdir() if _NAME.match(p.name) and (p / META_FILE).is_file())
    except FileNotFoundError:
        return []


def guest_identity() -> dict:
    """What restoring needs to be the same as at checkpoint time: the guest image (its
    build's inputs hash names it) and the accelerator."""
    from shim.guestimage import ensure_guest_image
    from shim.vm.accel import detect_accel

    guest = ensure_guest_image()
    return {
        "guest_image": guest.kernel.parent.name,
        "kernel_release": guest.kernel_release,
        "accel": detect_accel().kind,
    }


# ---- the writable disk ----------------------------------------------------------------------


def data_extents(path: Path) -> tuple[int, list[list[int]]]:
    """(size, [[offset, length], …]) of the parts of sparse file *path* that hold data."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        extents: list[list[int]] = []
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append([start, end - start])
            offset = end
        return size, extents
    finally:
        os.close(fd)


def copy_sparse(src: Path, dst: Path) -> None:
    """Copy *src* to a new *dst* (0600) keeping its holes; atomic (temp + rename)."""
    size, extents = data_extents(src)
    tmp = dst.with_name(dst.name + f".tmp-{os.getpid()}")
    fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    fd_out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd_out, size)
        for start, length in extents:
            done = 0
            while done < length:
                n = os.copy_file_range(fd_in, fd_out, length - done, start + done, start + done)
                if n <= 0:
                    raise OSError(f"short copy of {src}")
                done += n
        os.fsync(fd_out)
    except BaseException:
        os.close(fd_out)
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd_in)
    os.close(fd_out)
    os.replace(tmp, dst)


# ---- in the monitor ---------------------------------------------------------------------------


def save_vm(placement, record: Container, directory: Path) -> None:
    """The monitor's part: save *placement*'s VM to ``directory/memory.img`` (the VM
    ends) and copy the writable disk to ``directory/rw.img``. Raises VmshimError."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    image = directory / MEMORY_FILE
    image.unlink(missing_ok=True)
    guest = getattr(placement, "guest", None)
    if guest is not None:  # what the VM runs (the host's image may have changed since)
        accel = getattr(placement, "accel", None)
        _write_json(
            directory / GUEST_FILE,
            {
                "guest_image": guest.kernel.parent.name,
                "kernel_release": guest.kernel_release,
                **({"accel": accel.kind} if accel is not None else {}),
            },
        )
    placement.save(image)
    rw = getattr(placement, "rw_disk", None)
    if rw is not None:
        try:
            copy_sparse(Path(rw), directory / RW_FILE)
        except OSError as exc:
            raise CheckpointError(f"cannot copy the writable disk of {record.name}: {exc}") from None


def _write_json(path: Path, data: dict) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
