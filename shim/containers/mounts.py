"""Making a container's mounts (shim.volumes.specs.MountRequest) for one boot, in either
placement, and letting go of them after.

VM (:meth:`Attachments.for_vm`)::

    bind    a virtiofs share of the host directory (libvirt starts QEMU's virtiofsd; the
            domain gets memfd shared memory), tag vmshim-b<i>; a single file (OCI bundles
            bind /etc/hosts and the like) by a share of a private directory under the
            run directory that holds nothing but that file (a read-only tmpfs with the
            file bound onto an empty file in it, :func:`_file_view`), never by a share of
            its parent: docker's hosts, resolv.conf and hostname sit next to the
            container's config.v2.json with its environment's secrets. For ``:ro`` the share is a
            read-only (private) bind mount of it under the run directory, so virtiofsd
            itself cannot write: the guest's root could remount its own view read-write
            (the container is root in the VM), the host's cannot be
    volume  the volume's image as a virtio disk (read-only for ``:ro``), serial vmshim-v<i>
    tmpfs   nothing on the host

Process isolation (:meth:`Attachments.for_process`)::

    bind    the host directory itself
    volume  the image loop-mounted under the run directory (``nodev,nosuid``), only until
            the runtime has bound its ``data`` directory into the rootfs: then the staging
            mount is detached (:meth:`unstage`), so nothing but the rootfs holds it and
            removing the run directory can never reach into a volume
    tmpfs   nothing on the host

Volumes are leased first (shim.volumes.store.VolumeStore.acquire): a volume is used
read-write by one container at a time. The same volume mounted at two places in one
container is attached once. :meth:`release` drops the leases; call it once the VM is gone
(or the rootfs unmounted), never before.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from guest.spec import SHARE_TAG_PREFIX, VOLUME_SERIAL_PREFIX, MountSpec
from shim.errors import VolumeError
from shim.volumes.specs import MountRequest
from shim.volumes.store import Lease, VolumeStore

if TYPE_CHECKING:  # imported where used at run time (CLI start-up)
    from shim.vm.domain import Disk, Filesystem


class Attachments:
    """The mounts of one container for one boot (see the module doc)."""

    def __init__(self, requests: list[MountRequest], *, store: VolumeStore | None = None):
        self.requests = list(requests)
        self.store = store
        self.leases: dict[str, Lease] = {}
        self.staged: list[Path] = []
        self.ro_shares: list[Path] = []

    def _store(self) -> VolumeStore:
        if self.store is None:
            self.store = VolumeStore()
        return self.store

    def _volume_names(self) -> dict[str, bool]:
        """Volume name → mounted read-only everywhere in this container."""
        names: dict[str, bool] = {}
        for r in self.requests:
            if r.type == "volume":
                if not r.source:
                    raise VolumeError(f"the anonymous volume for {r.target} has no name yet")
                names[r.source] = names.get(r.source, True) and r.readonly
        return names

    def acquire(self) -> None:
        """Lease every volume. Raises VolumeNotFound, VolumeInUse (nothing kept)."""
        try:
            for name, readonly in self._volume_names().items():
                if name not in self.leases:
                    self.leases[name] = self._store().acquire(name, readonly=readonly)
        except BaseException:
            self.release()
            raise

    # ---- VM ----------------------------------------------------------------------------

    def for_vm(
        self, first_disk: int, target_of, share_dir: Path | None = None
    ) -> tuple[list[MountSpec], list[Disk], list[Filesystem]]:
        """Lease the volumes and describe the mounts for a VM: (MountSpecs for the boot
        config, shim.vm.domain.Disk list, shim.vm.domain.Filesystem list). *first_disk* is
        the index the first volume disk gets; *target_of(index)* names it (vdX).
        *share_dir*: where the read-only views of ``:ro`` bind sources are mounted (None:
        share them as they are; the guest still mounts them read-only). Raises
        VolumeError, VolumeInUse (nothing kept)."""
        from shim.vm.domain import Disk, Filesystem

        self.acquire()
        specs: list[MountSpec] = []
        disks: list[Disk] = []
        shares: list[Filesystem] = []
        serial_of: dict[str, str] = {}
        try:
            for lease in self.leases.values():
                if not lease.readonly:  # from now on the host kernel must not mount it
                    self._store().mark_written_by_vm(lease)
            for request in self.requests:
                source, subpath = request.source, ""
                if request.type == "bind" and not os.path.isdir(source):
                    # virtiofs shares directories: a directory holding only this file
                    if share_dir is None:
                        raise VolumeError(
                            f"cannot share the single file {source}: no private directory to share it from"
                        )
                    view = Path(share_dir) / str(len(shares))
                    subpath = _file_view(os.path.realpath(source), view, request.readonly)
                    self.ro_shares.append(view)
                    source = str(view)
                elif request.type == "bind" and request.readonly and share_dir is not None:
                    view = Path(share_dir) / str(len(shares))
                    _readonly_view(source, view)
                    self.ro_shares.append(view)
                    source = str(view)
                if request.type == "bind":
                    tag = f"{SHARE_TAG_PREFIX}{len(shares)}"
                    shares.append(Filesystem(source_dir=source, tag=tag))
                    specs.append(
                        MountSpec(
                            type="bind", source=tag, target=request.target, readonly=request.readonly, subpath=subpath
                        )
                    )
                elif request.type == "volume":
                    lease = self.leases[request.source]
                    if request.source not in serial_of:
                        serial = f"{VOLUME_SERIAL_PREFIX}{len(serial_of)}"
                        serial_of[request.source] = serial
                        disks.append(
                            Disk(
                                source=str(lease.volume.image),
                                target=target_of(first_disk + len(disks)),
                                serial=serial,
                                readonly=lease.readonly,
                                discard=not lease.readonly,
                            )
                        )
                    specs.append(
                        MountSpec(
                            type="volume",
                            source=serial_of[request.source],
                            target=request.target,
                            readonly=request.readonly,
                            copy_up=not request.nocopy,
                        )
                    )
                else:
                    specs.append(
                        MountSpec(
                            type="tmpfs", target=request.target, readonly=request.readonly, options=request.options
                        )
                    )
        except BaseException:
            self.release()
            raise
        return specs, disks, shares

    # ---- process isolation -------------------------------------------------------------

    def for_process(self, stage_dir: Path) -> list[tuple[MountSpec, str | None]]:
        """Lease and loop-mount the volumes under *stage_dir*; return ``(MountSpec,
        source)`` pairs for guest.runtime.container.Container.create. Call
        :meth:`unstage` right after the rootfs was assembled (or failed). Raises
        VolumeError, VolumeInUse."""
        from guest.runtime.mounts import VOLUME_DATA

        self.acquire()
        out: list[tuple[MountSpec, str | None]] = []
        sources: dict[str, str] = {}
        try:
            for name, lease in self.leases.items():
                if lease.volume.written_by_vm is not False:
                    raise VolumeError(vm_written_message(name))
            for request in self.requests:
                if request.type == "bind":
                    out.append(
                        (
                            MountSpec(
                                type="bind", source=request.source, target=request.target, readonly=request.readonly
                            ),
                            os.path.realpath(request.source),
                        )
                    )
                elif request.type == "volume":
                    if request.source not in sources:
                        lease = self.leases[request.source]
                        stage = Path(stage_dir) / str(len(sources))
                        _loop_mount(lease.volume.image, stage, lease.readonly)
                        self.staged.append(stage)
                        data = stage / VOLUME_DATA
                        if not data.is_dir():
                            if lease.readonly:
                                data = Path(str(stage) + ".empty")
                            data.mkdir(mode=0o755, exist_ok=True)
                        sources[request.source] = str(data)
                    out.append(
                        (
                            MountSpec(
                                type="volume",
                                source=sources[request.source],
                                target=request.target,
                                readonly=request.readonly,
                                copy_up=not request.nocopy,
                            ),
                            sources[request.source],
                        )
                    )
                else:
                    out.append(
                        (
                            MountSpec(
                                type="tmpfs", target=request.target, readonly=request.readonly, options=request.options
                            ),
                            None,
                        )
                    )
        except BaseException:
            self.unstage()
            self.release()
            raise
        return out

    def unstage(self) -> None:
        """Detach the staging mounts (the rootfs keeps what it bound) and remove their
        directories. Idempotent."""
        from guest.runtime import rootfs as rootfs_mod

        for stage in reversed(self.staged):
            try:
                rootfs_mod.unmount(str(stage), detach=True)
            except OSError:
                pass
            for path in (stage, Path(str(stage) + ".empty")):
                try:
                    path.rmdir()  # never rmtree: it could still be a mount point
                except OSError:
                    pass
        self.staged = []

    # ---- after ---------------------------------------------------------------------------

    def release(self) -> None:
        """Drop the leases and the read-only share views (the VM is gone / the rootfs
        is unmounted). Idempotent."""
        from guest.runtime import rootfs as rootfs_mod

        for view in reversed(self.ro_shares):
            try:
                rootfs_mod.unmount(str(view), detach=True)
                view.rmdir()
            except OSError:
                pass
        self.ro_shares = []
        for lease in self.leases.values():
            lease.release()
        self.leases = {}


def vm_written_message(name: str) -> str:
    """Why a volume a VM wrote is refused in process isolation, and the ways out."""
    return (
        f"volume {name} was written by a VM (or by a vmshim too old to tell): "
        "--isolation process would mount that guest-written file system in the host "
        "kernel, which vmshim never does; use it with --isolation vm, or move its data "
        f"into a new volume as a tar: vmshim run --rm -v {name}:/d busybox tar -C /d -c . "
        "> data.tar"
    )


def _readonly_view(source: str, view: Path) -> None:
    """Bind *source* (recursively) at *view*, read-only and private (so unmounting it
    never propagates anywhere). Raises VolumeError."""
    from guest.runtime import syscalls as sc

    view.mkdir(parents=True, exist_ok=True)
    try:
        sc.mount(source, str(view), None, sc.MS_BIND | sc.MS_REC, None)
    except OSError as exc:
        view.rmdir()
        raise VolumeError(f"cannot share {source} read-only: {exc.strerror}") from None
    try:
        sc.mount(None, str(view), None, sc.MS_PRIVATE | sc.MS_REC, None)
        flags = os.statvfs(view).f_flag & (sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
        sc.mount(None, str(view), None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | flags, None)
    except OSError as exc:
        sc.umount2(str(view), sc.MNT_DETACH)
        view.rmdir()
        raise VolumeError(f"cannot share {source} read-only: {exc.strerror}") from None


FILE_VIEW_NAME = "file"
"""The one entry of a single file's share (the guest picks it as the subpath)."""


def _file_view(source: str, view: Path, readonly: bool) -> str:
    """Make *view* a directory that holds only the regular file *source*: a small tmpfs,
    read-only (the guest cannot add entries), with *source* bound (read-only when
    *readonly*) onto an empty file FILE_VIEW_NAME in it; return that name. Writes to the
    file reach *source* as with runc; nothing else of *source*'s directory is shared.
    Undone by unmounting *view* (detached, recursive). Raises VolumeError."""
    from guest.runtime import syscalls as sc

    view.mkdir(parents=True, exist_ok=True)
    target = view / FILE_VIEW_NAME
    try:
        sc.mount(
            "tmpfs", str(view), "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "size=4k,nr_inodes=4,mode=0755"
        )
    except OSError as exc:
        view.rmdir()
        raise VolumeError(f"cannot share the file {source}: {exc.strerror}") from None
    try:
        sc.mount(None, str(view), None, sc.MS_PRIVATE, None)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.close(fd)
        sc.mount(source, str(target), None, sc.MS_BIND, None)
        if readonly:
            sc.mount(None, str(target), None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY, None)
        sc.mount(
            None,
            str(view),
            None,
            sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
            "size=4k,nr_inodes=4,mode=0755",
        )
    except OSError as exc:
        sc.umount2(str(view), sc.MNT_DETACH)
        view.rmdir()
        raise VolumeError(f"cannot share the file {source}: {exc.strerror}") from None
    return FILE_VIEW_NAME


def _loop_mount(image: Path, target: Path, readonly: bool) -> None:
    """Loop-mount a volume image (the loop device is freed with the last unmount)."""
    target.mkdir(parents=True, exist_ok=True)
    options = "loop,nodev,nosuid" + (",ro,noload" if readonly else "")
    res = subprocess.run(
        ["mount", "-t", "ext4", "-o", options, "--", str(image), str(target)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        try:
            target.rmdir()
        except OSError:
            pass
        raise VolumeError(f"cannot mount the volume image {image}: {(res.stderr or res.stdout).strip()}")


def resolve_volumes(requests: list[MountRequest], store: VolumeStore | None = None) -> None:
    """Give each anonymous volume request a new volume and make the named ones that do not
    exist yet (``-v name:/path`` does). Changes *requests* in place. Raises VolumeError."""
    store = store or VolumeStore()
    for request in requests:
        if request.type != "volume":
            continue
        if request.anonymous and not request.source:
            volume = store.create(None, size=request.volume_size or None, anonymous=True)
            request.source = volume.name
        elif not store.exists(request.source):
            store.create(request.source, size=request.volume_size or None)


def remove_anonymous(requests: list[MountRequest], store: VolumeStore | None = None) -> None:
    """``--rm``: remove the anonymous volumes this container made. Best effort."""
    store = store or VolumeStore()
    for request in requests:
        if request.type == "volume" and request.anonymous and request.source:
            try:
                store.remove(request.source)
            except Exception:  # noqa: BLE001 - still in use, or gone already
                pass


def prepare_mounts(
    requests: list[MountRequest],
    volumes_from: list[str],
    isolation: str,
    *,
    containers=None,
    store: VolumeStore | None = None,
) -> list[MountRequest]:
    """The mounts of a new container: *requests* (-v/--mount/--tmpfs) after the ones
    ``--volumes-from`` copies (a flag given here wins over a copied mount on the same
    path, as in docker), checked, with bind directories made and volumes created (named
    ones if missing, anonymous ones new). *containers*: a shim.containers.store
    ContainerStore (default: the real one). Raises UsageError, ContainerNotFound,
    VolumeError."""
    from shim.volumes.specs import check_duplicates, prepare_binds, volumes_from as copy_from

    copied: list[MountRequest] = []
    if volumes_from:
        if containers is None:
            from shim.containers.store import ContainerStore

            containers = ContainerStore()
        stored = [containers.find(ref.partition(":")[0]).mounts for ref in volumes_from]
        copied = copy_from(stored, list(volumes_from))
    own = {r.target for r in requests}
    merged = [r for r in copied if r.target not in own] + list(requests)
    check_duplicates(merged)
    prepare_binds(merged, isolation)
    resolve_volumes(merged, store)
    return merged
