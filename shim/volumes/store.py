"""Named volumes: sparse ext4 disk images under ``paths.volumes_dir()``.

On disk::

    volumes/.lock              flock: held while a volume is created or removed, so two
                               commands never make or delete the same name at once
    volumes/<name>/            0711 (QEMU, as libvirt-qemu, must reach the image)
      volume.json              the record (name, created, labels, options, size, anonymous);
                               replaced atomically (write a temp file, fsync, rename)
      volume.img               sparse raw file with ext4; the volume's content is its
                               ``data`` directory (the root holds lost+found)
      lock                     flock: a *lease* held by every container using the volume,
                               shared by read-only users, exclusive for a read-write one

An ext4 image can be mounted read-write by one kernel at a time, so a volume is used
read-write by one container at a time (docker shares a directory instead; this is the
price of block devices, which are fast in a VM). Several read-only users may share it.
Leases are flocks: the kernel drops them when their holder dies, so a crash never leaves
a volume locked. Two more checks catch a user whose lease was lost (a monitor that died
while its VM runs on): QEMU's own OFD locks on the image, and loop devices backed by it.

A volume left unclean (its VM was killed) has its journal replayed on the host
(``e2fsck -p``) when the next lease is taken, before anything mounts it; data that was
fsynced before the kill is there.

The record says whether a VM ever had the volume read-write (``written_by_vm``, set by
:meth:`VolumeStore.mark_written_by_vm` before the VM boots; a record from before this
field counts as written by a VM). ``--isolation process`` loop-mounts volumes in the host
kernel, which must never parse a file system a guest wrote (a crafted ext4 is an attack
on the host kernel, and ``e2fsck`` does not make it safe), so it refuses such a volume
(see shim.containers.mounts): its data can still be used through a VM, or moved out as a tar
(``vmshim run --rm -v NAME:/d busybox tar -C /d -c .``) into a fresh volume.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from shim import paths
from shim.files import flocked
from shim.errors import UsageError, VolumeError, VolumeInUse, VolumeNotFound

RECORD = "volume.json"
IMAGE = "volume.img"
LEASE = "lock"
DEFAULT_SIZE = 16 << 30
"""Apparent size of a new volume's image (sparse: only what is written takes space)."""
MIN_SIZE = 16 << 20
MAX_SIZE = 16 << 40
LEASE_TIMEOUT = float(os.environ.get("VMSHIM_VOLUME_LEASE_TIMEOUT", "10"))
"""Seconds to wait for a volume another container is still letting go of (a container
that exited holds it until its VM is gone, a second or two)."""
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,127}$")
EXT4_INCOMPAT_RECOVER = 0x4
EXT4_MAGIC = 0xEF53


def check_name(name: str) -> None:
    """Raise UsageError unless *name* is a valid volume name (docker's rule)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise UsageError(
            f"invalid volume name {name!r}: use 2-128 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class Volume:
    """One volume's record (``volume.json``) and where it lives."""

    name: str
    created: str = field(default_factory=now_rfc3339)
    size: int = DEFAULT_SIZE
    labels: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    anonymous: bool = False
    """Made for a container's ``-v /path`` (no name given); ``--rm`` removes it."""
    written_by_vm: bool | None = None
    """Whether a VM ever had it read-write (None: an older record, which cannot tell)."""
    directory: str = ""

    @property
    def image(self) -> Path:
        return Path(self.directory) / IMAGE

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["directory"]
        return data

    def inspect(self, in_use: list[str] | None = None) -> dict:
        """docker ``volume inspect``'s shape, plus the image's apparent and used bytes."""
        try:
            st = self.image.stat()
            used = st.st_blocks * 512
        except OSError:
            used = 0
        return {
            "CreatedAt": self.created,
            "Driver": "local",
            "Labels": dict(self.labels),
            "Mountpoint": str(self.image),
            "Name": self.name,
            "Options": dict(self.options),
            "Scope": "local",
            "Status": {
                "Size": self.size,
                "DiskUsage": used,
                "Anonymous": self.anonymous,
                "InUse": in_use if in_use is not None else [],
            },
        }


class Lease:
    """A container's hold on a volume (see the module doc); :meth:`release` exactly once
    (idempotent) when the container's VM or mounts are gone."""

    def __init__(self, volume: Volume, fd: int, readonly: bool):
        self.volume = volume
        self.fd: int | None = fd
        self.readonly = readonly

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None

    def __repr__(self) -> str:
        return f"Lease({self.volume.name!r}, {'ro' if self.readonly else 'rw'})"


class VolumeStore:
    """Every volume on this host (see the module doc for the layout)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.volumes_dir()

    # ---- paths and locks ----------------------------------------------------------------

    def dir(self, name: str) -> Path:
        check_name(name)
        return self.root / name

    @contextlib.contextmanager
    def _names_locked(self):
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        with flocked(self.root / ".lock", mode=0o600):
            yield

    # ---- reading --------------------------------------------------------------------------

    def get(self, name: str) -> Volume:
        """The volume *name*. Raises VolumeNotFound (UsageError for a malformed name)."""
        directory = self.dir(name)
        try:
            data = json.loads((directory / RECORD).read_text())
        except FileNotFoundError:
            raise VolumeNotFound(f"no such volume: {name}") from None
        except (OSError, ValueError) as exc:
            raise VolumeError(f"the record of volume {name} is unreadable: {exc}") from None
        known = {"name", "created", "size", "labels", "options", "anonymous", "written_by_vm"}
        volume = Volume(**{k: v for k, v in data.items() if k in known})
        volume.directory = str(directory)
        return volume

    def exists(self, name: str) -> bool:
        return (self.dir(name) / RECORD).exists()

    def list(self) -> list[Volume]:
        """Every volume, by name. Volumes half made or half removed are skipped."""
        out = []
        try:
            names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            return []
        for name in names:
            try:
                out.append(self.get(name))
            except (VolumeNotFound, UsageError, VolumeError):
                continue
        return out

    # ---- creating -------------------------------------------------------------------------

    def create(
        self,
        name: str | None = None,
        *,
        size: int | None = None,
        labels: dict | None = None,
        options: dict | None = None,
        anonymous: bool = False,
    ) -> Volume:
        """Make the volume *name* (a random 64-hex name when None) and return it;
        *anonymous* marks one made for a container's ``-v /path``. Like
        docker, creating a name that exists returns the existing volume (unless it was
        asked for with a different size). Raises UsageError, VolumeError (mkfs failed:
        nothing is left behind)."""
        if name is None:
            name = secrets.token_hex(32)
        check_name(name)
        size = DEFAULT_SIZE if size is None else size
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise UsageError(f"volume size must be between {MIN_SIZE >> 20} MiB and {MAX_SIZE >> 40} TiB")
        with self._names_locked():
            if self.exists(name):
                volume = self.get(name)
                if options and "size" in options and volume.size != size:
                    raise VolumeError(f"volume {name} exists with another size ({volume.size} bytes)")
                return volume
            directory = self.dir(name)
            staging = Path(tempfile.mkdtemp(prefix=f".new-{name[:32]}-", dir=self.root))
            try:
                os.chmod(staging, 0o711)
                _make_image(staging / IMAGE, size, label=name)
                volume = Volume(
                    name=name,
                    size=size,
                    labels=dict(labels or {}),
                    options=dict(options or {}),
                    anonymous=anonymous,
                    written_by_vm=False,
                )
                _write_json(staging / RECORD, volume.to_dict())
                (staging / LEASE).touch(0o600)
                os.rename(staging, directory)
                _fsync_dir(self.root)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            volume.directory = str(directory)
            return volume

    def ensure(self, name: str) -> Volume:
        """The volume *name*, made first if it does not exist (``-v name:/path``)."""
        try:
            return self.get(name)
        except VolumeNotFound:
            return self.create(name)

    # ---- removing -------------------------------------------------------------------------

    def remove(
        self,
        name: str,
        *,
        referenced_by: builtins.list[str] | None = None,
        force: bool = False,
        wait: float = LEASE_TIMEOUT,
    ) -> None:
        """Delete the volume. Raises VolumeNotFound, or VolumeInUse when a container holds
        it (after waiting *wait* s for one that is just letting go: a container that
        exited is still being torn down for a moment) or, without *force*, when
        *referenced_by* names containers that would use it again (docker's rule)."""
        with self._names_locked():
            volume = self.get(name)
            if referenced_by and not force:
                raise VolumeInUse(f"volume {name} is in use by container {', '.join(referenced_by)}: remove it first")
            fd = os.open(Path(volume.directory) / LEASE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                deadline = time.monotonic() + wait
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise VolumeInUse(f"volume {name} is in use by a running container") from None
                        time.sleep(0.1)
                holder = user_of_image(volume.image)
                if holder:
                    raise VolumeInUse(f"volume {name} is in use ({holder})")
                # Rename first: a crash midway leaves a .gone-* directory, never a half
                # volume under the real name.
                gone = self.root / f".gone-{name}-{secrets.token_hex(4)}"
                os.rename(volume.directory, gone)
                _fsync_dir(self.root)
            finally:
                os.close(fd)
            shutil.rmtree(gone, ignore_errors=True)

    def prune(self, *, referenced: set[str], all_volumes: bool = False) -> builtins.list[str]:
        """Remove volumes no container references and none uses: anonymous ones only
        (docker 23's default) unless *all_volumes*. Returns the names removed."""
        removed = []
        for volume in self.list():
            if volume.name in referenced or not (all_volumes or volume.anonymous):
                continue
            try:
                self.remove(volume.name, wait=0)
            except (VolumeInUse, VolumeNotFound):
                continue
            removed.append(volume.name)
        for leftover in self.root.glob(".gone-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        return removed

    # ---- using ----------------------------------------------------------------------------

    def mark_written_by_vm(self, lease: "Lease") -> None:
        """Record that a VM gets *lease*'s volume read-write (before it boots; the record
        is replaced atomically). Precondition: *lease* is read-write (exclusive)."""
        volume = lease.volume
        if volume.written_by_vm:
            return
        volume.written_by_vm = True
        _write_json(Path(volume.directory) / RECORD, volume.to_dict())

    def acquire(self, name: str, *, readonly: bool, timeout: float = LEASE_TIMEOUT) -> Lease:
        """Take a lease on *name* for one container (see the module doc): exclusive for
        read-write use, shared for read-only. An unclean filesystem is repaired first.
        Waits up to *timeout* s for a previous user to let go. Raises VolumeNotFound,
        VolumeInUse, VolumeError (repair failed)."""
        volume = self.get(name)
        fd = os.open(Path(volume.directory) / LEASE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + timeout
            holder = ""
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    # A user without a lease (a loop device that is still being let go
                    # of, a VM whose monitor died) counts as busy too.
                    holder = user_of_image(volume.image)
                    if not holder:
                        exclusive = True
                        break
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    pass
                if readonly:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        exclusive = False  # other read-only users: it is clean already
                        break
                    except BlockingIOError:
                        pass
                if time.monotonic() > deadline:
                    if holder:
                        raise VolumeInUse(f"volume {name} is in use ({holder})")
                    raise VolumeInUse(
                        f"volume {name} is in use by another container"
                        + (
                            ""
                            if readonly
                            else " (a volume is used read-write by one container at a time; "
                            "mount it with :ro to share it)"
                        )
                    )
                time.sleep(0.1)
            if exclusive:
                if needs_recovery(volume.image):
                    repair(volume.image)
                if readonly:
                    fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        return Lease(volume, fd, readonly)


# ---- the image ----------------------------------------------------------------------------


def _make_image(path: Path, size: int, label: str) -> None:
    """A sparse raw file with ext4 and an empty ``data`` directory (~4 MiB written).
    Inode tables are "zeroed" by punching holes (discard) and the journal of a fresh
    sparse file reads as zeros anyway, so nothing is written for them and the guest
    kernel has no lazy-init work. Raises VolumeError."""
    template = Path(tempfile.mkdtemp(prefix=".template-", dir=path.parent))
    try:
        (template / "data").mkdir(mode=0o755)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # container data: libvirt chowns it to QEMU's user
            f.truncate(size)
        res = subprocess.run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-m",
                "0",
                "-L",
                label[:16],
                "-d",
                str(template),
                "-E",
                "lazy_itable_init=0,lazy_journal_init=1",
                str(path),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        raise VolumeError("mkfs.ext4 is missing: install e2fsprogs") from None
    finally:
        shutil.rmtree(template, ignore_errors=True)
    if res.returncode != 0:
        raise VolumeError(
            f"cannot make the volume's filesystem: {(res.stderr or res.stdout).strip() or 'mkfs.ext4 failed'}"
        )


def needs_recovery(image: Path) -> bool:
    """Whether the ext4 journal of *image* has to be replayed (its last user did not
    unmount it: a killed VM). Raises VolumeError when the image holds no ext4."""
    try:
        with open(image, "rb") as f:
            f.seek(1024)
            sb = f.read(1024)
    except OSError as exc:
        raise VolumeError(f"cannot read the volume image {image}: {exc.strerror}") from None
    if len(sb) < 0x64 or struct.unpack_from("<H", sb, 0x38)[0] != EXT4_MAGIC:
        raise VolumeError(f"the volume image {image} holds no ext4 filesystem")
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    state = struct.unpack_from("<H", sb, 0x3A)[0]
    return bool(incompat & EXT4_INCOMPAT_RECOVER) or not state & 0x1


def repair(image: Path) -> None:
    """Replay the journal and fix what ``e2fsck -p`` fixes safely. Raises VolumeError."""
    res = subprocess.run(["e2fsck", "-p", str(image)], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode not in (0, 1, 2):
        raise VolumeError(
            f"the volume's filesystem {image} is damaged and e2fsck could not "
            f"fix it alone (run e2fsck -f on it): "
            f"{(res.stderr or res.stdout).strip()[-300:]}"
        )


_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock on 64-bit Linux


def user_of_image(image: Path) -> str:
    """Who uses *image* besides our leases: a QEMU (it holds OFD locks on the images it
    opened) or a loop device backed by it. "" when nobody."""
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        probe = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        result = fcntl.fcntl(fd, _OFD_GETLK, probe)
        if _FLOCK.unpack(result)[0] != fcntl.F_UNLCK:
            return "a VM has its disk image open"
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
    real = os.path.realpath(image)
    try:
        for name in os.listdir("/sys/block"):
            if not name.startswith("loop"):
                continue
            try:
                backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            except OSError:
                continue
            if backing == real:
                return f"/dev/{name} is backed by it"
    except OSError:
        pass
    return ""


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
