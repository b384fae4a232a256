"""Checkpoint and restore a VM container: its memory, its writable layer, its record.

A checkpoint lives in the container's directory::

    <container dir>/checkpoints/<name>/
      memory.img        libvirt's save image (virDomainSaveFlags): RAM and device state
      rw.img            a sparse copy of the writable disk taken while the VM was stopped
      checkpoint.json   what it was made with (guest image, accelerator, memory) and when

``checkpoint`` asks the agent to sync the guest's file systems (volumes, writable layer),
then the monitor (shim.containers.monitor, ``checkpoint`` request) lets go of the agent
channel, saves the VM (which ends it), copies the writable disk, and either records the
container ``checkpointed`` or, with ``--leave-running``, restores it from the image at
once. ``restore`` puts the copy of the writable disk back and has a new monitor restore
the VM from the image with freshly made domain XML (run directory, config drive, volume
leases); the agent greets it and the main process carries on where it was.

Volumes are not in a checkpoint (like docker's): a write synced before the checkpoint is on
the volume's disk, and the restored guest sees that disk again.

What cannot be checkpointed, with one line saying why: process isolation, bind mounts and
bundle rootfs directories (virtiofs: QEMU's vhost-user-fs device blocks saving and
migration), networks other than ``none`` (the restored NIC would need the same address
lease), ``--rm`` containers.

``--export FILE`` writes one tar (atomically): checkpoint.json (with the writable disk's
data extents), record.json, memory.img, rw.data (only the disk's data extents, so an 8 GiB
sparse disk costs what it holds). ``restore --import FILE`` reads it as untrusted input:
fixed member names, regular files only, every size bounded, extents checked, the record
checked field by field (:func:`_checked_record`); nothing of a refused archive stays.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

from shim import paths
from shim.containers import state as lifecycle
from shim.containers.checkpoint_vm import (  # noqa: F401  (re-exported)
    CHECKPOINTS,
    DEFAULT_NAME,
    FORMAT_VERSION,
    GUEST_FILE,
    MAX_EXTENTS,
    MAX_JSON,
    MAX_MEMBERS,
    MAX_MEMORY_IMAGE,
    MAX_MEMORY_MIB,
    MAX_RW_SIZE,
    MEMORY_FILE,
    META_FILE,
    RECORD_FILE,
    RW_DATA,
    RW_FILE,
    SAVE_TIMEOUT,
    _ID,
    _NAME,
    _network_mode,
    check_checkpointable,
    check_name,
    checkpoint_dir,
    copy_sparse,
    data_extents,
    guest_identity,
    list_checkpoints,
    save_vm,
    _write_json,
)
from shim.containers.store import Container, ContainerStore, monitor_alive, now_rfc3339
from shim.errors import CheckpointError, ContainerNotFound, UsageError, VmshimError

# ---- checkpoint ------------------------------------------------------------------------------


def checkpoint(
    ref: str,
    *,
    name: str = DEFAULT_NAME,
    leave_running: bool = False,
    export: str | None = None,
    store: ContainerStore | None = None,
) -> Path:
    """Checkpoint the running container *ref* as *name* (replacing an older one of that
    name); with *export*, also write it as one archive. Returns the checkpoint's
    directory. Raises CheckpointError, ContainerStateError, ContainerNotFound."""
    from shim.containers import manage

    store = store or ContainerStore()
    check_name(name)
    record = store.find(ref)
    check_checkpointable(record)
    lifecycle.check("checkpoint", record.status, record.name)
    code, err = manage.run_builtin(store, record, "sync", [])
    if code != 0:
        raise CheckpointError(
            f"cannot checkpoint container {record.name}: the guest could "
            f"not sync its file systems "
            f"({err.decode(errors='replace').strip() or f'exit {code}'})"
        )
    final = checkpoint_dir(store, record.id, name)
    work = final.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        manage._request(store, record, "checkpoint", SAVE_TIMEOUT, dir=str(work), leave_running=leave_running)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    fresh = store.load(record.id)
    try:  # the guest image the VM booted, as its monitor knew it
        identity = json.loads((work / GUEST_FILE).read_text())
        (work / GUEST_FILE).unlink()
    except (OSError, ValueError):
        identity = {}
    if set(identity) != {"guest_image", "kernel_release", "accel"}:
        identity = {**guest_identity(), **identity}  # a recovered monitor: this host's
    meta = {
        "version": FORMAT_VERSION,
        "name": name,
        "container_id": record.id,
        "created": now_rfc3339(),
        "memory_mib": record.vm_memory_mib,
        "rw": (work / RW_FILE).exists(),
        **identity,
    }
    _write_json(work / META_FILE, meta)
    _write_json(work / RECORD_FILE, _portable(fresh))
    old = final.with_name(f".{name}.old-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    os.rename(work, final)
    shutil.rmtree(old, ignore_errors=True)
    if export:
        export_checkpoint(store, record.id, name, Path(export))
    return final


def _portable(record: Container) -> dict:
    """The record as a checkpoint keeps it: checkpointed, no monitor."""
    data = record.to_dict()
    state = dict(data.get("state") or {})
    state.update(
        status=lifecycle.Status.CHECKPOINTED.value, monitor_pid=0, monitor_start=0, restarting=False, health={}
    )
    data["state"] = state
    return data


# ---- migrate -----------------------------------------------------------------------------------


def migrate(ref: str, uri: str, store: ContainerStore | None = None) -> Container:
    """Live-migrate running container *ref*'s VM to the libvirt at *uri*
    (``qemu+tcp://HOST/system``); its disks must be reachable there at the same paths.
    The container keeps running, its monitor stays here. Raises CheckpointError,
    ContainerStateError, HypervisorError."""
    from shim.containers import manage

    store = store or ContainerStore()
    record = store.find(ref)
    check_checkpointable(record, "migrate")
    lifecycle.check("migrate", record.status, record.name)
    if not uri.startswith(("qemu+", "qemu://")):
        raise UsageError(f"invalid libvirt URI {uri!r}: use qemu+tcp://HOST/system or qemu+ssh://USER@HOST/system")
    manage._request(store, record, "migrate", SAVE_TIMEOUT, uri=uri)
    return store.load(record.id)


# ---- restore -----------------------------------------------------------------------------------


def restore(
    ref: str | None = None,
    *,
    name: str = DEFAULT_NAME,
    import_file: str | None = None,
    new_name: str | None = None,
    store: ContainerStore | None = None,
) -> Container:
    """Bring container *ref* back from its checkpoint *name*; or, with *import_file*,
    make the container an exported checkpoint holds (optionally as *new_name*) and bring
    it back. Returns the running container's record. A restore that fails leaves no
    domain, and an imported container that failed leaves no record. Raises
    CheckpointError, ContainerStateError, ContainerNotFound, HypervisorError."""
    store = store or ContainerStore()
    check_name(name)
    imported = None
    if import_file is not None:
        imported = import_checkpoint(store, Path(import_file), name=name, new_name=new_name)
        ref = imported.id
    elif ref is None:
        raise UsageError("restore needs a container (or --import FILE)")
    try:
        return _restore(store, ref, name)
    except BaseException:
        if imported is not None:
            _discard(store, imported.id)
        raise


def _discard(store: ContainerStore, container_id: str) -> None:
    try:
        from shim.containers.manage import _cleanup_leftovers

        _cleanup_leftovers(store, store.load(container_id))
    except VmshimError:
        pass
    store.delete(container_id)


def _restore(store: ContainerStore, ref: str, name: str) -> Container:
    from shim.containers import manage, monitor
    from shim.containers.monitor_api import raise_for_error

    record = manage.wait_monitor_gone(store, store.find(ref))
    directory = checkpoint_dir(store, record.id, name)
    lifecycle.check("restore", record.status, record.name)
    meta = _read_meta(directory, record)
    _check_same_guest(meta, record.name)
    for disk in record.layer_disks:
        if not Path(disk).is_file():
            raise CheckpointError(
                f"cannot restore {record.name}: its image layer disk {disk} is gone (was the image removed?)"
            )
    with store.locked(record.id) as fresh:
        lifecycle.check("restore", fresh.status, fresh.name)
        if monitor_alive(fresh):
            raise CheckpointError(f"cannot restore {fresh.name}: a monitor runs it already")
        if fresh.writable == "disk":
            if not (directory / RW_FILE).is_file():
                raise CheckpointError(
                    f"cannot restore {fresh.name}: checkpoint {name} has no copy of the writable disk"
                )
            copy_sparse(directory / RW_FILE, store.rw_disk(fresh.id))
        client, pid, start_time = monitor.spawn(store, fresh.id)
        fresh.state.monitor_pid = pid
        fresh.state.monitor_start = start_time
        store.save(fresh)
    with client:
        raise_for_error(client.request("restore", SAVE_TIMEOUT, image=str(directory / MEMORY_FILE)))
    return store.load(record.id)


def _read_meta(directory: Path, record: Container) -> dict:
    path = directory / META_FILE
    try:
        if path.stat().st_size > MAX_JSON:
            raise ValueError("too large")
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"container {record.name} has no checkpoint {directory.name}") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory.name} of {record.name} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {directory.name} of {record.name} has an unknown format")
    if not (directory / MEMORY_FILE).is_file():
        raise CheckpointError(f"checkpoint {directory.name} of {record.name} has no memory image")
    return meta


def _check_same_guest(meta: dict, name: str) -> None:
    here = guest_identity()
    if meta.get("guest_image") != here["guest_image"]:
        raise CheckpointError(
            f"cannot restore {name}: the checkpoint was made with guest image "
            f"{meta.get('guest_image')} (kernel {meta.get('kernel_release')}), this host boots "
            f"{here['guest_image']} (kernel {here['kernel_release']}); a saved VM only "
            f"resumes on the kernel and agent it was saved with"
        )
    if meta.get("accel") != here["accel"]:
        raise CheckpointError(
            f"cannot restore {name}: the checkpoint was made under "
            f"{meta.get('accel')}, this host runs VMs under {here['accel']}"
        )


# ---- export / import ---------------------------------------------------------------------------


def export_checkpoint(store: ContainerStore, container_id: str, name: str, path: Path) -> None:
    """Write checkpoint *name* of the container as one tar at *path* (temp + fsync +
    rename: a reader never sees half an archive)."""
    directory = checkpoint_dir(store, container_id, name)
    meta = json.loads((directory / META_FILE).read_text())
    rw = directory / RW_FILE
    if rw.exists():
        size, extents = data_extents(rw)
        meta["rw"] = {"size": size, "extents": extents}
    else:
        meta["rw"] = None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            _add(tar, META_FILE, json.dumps(meta).encode())
            _add(tar, RECORD_FILE, (directory / RECORD_FILE).read_bytes())
            with open(directory / MEMORY_FILE, "rb") as f:
                _add(tar, MEMORY_FILE, f, os.fstat(f.fileno()).st_size)
            if meta["rw"] is not None:
                total = sum(length for _, length in meta["rw"]["extents"])
                with open(rw, "rb") as f:
                    _add(tar, RW_DATA, _ExtentReader(f, meta["rw"]["extents"]), total)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _ExtentReader:
    """A file-like that reads the given extents of *f* one after the other."""

    def __init__(self, f, extents):
        self.f = f
        self.extents = list(extents)
        self.left = 0

    def read(self, n: int = -1) -> bytes:
        out = bytearray()
        while n < 0 or len(out) < n:
            if self.left == 0:
                if not self.extents:
                    break
                start, self.left = self.extents.pop(0)
                self.f.seek(start)
            want = self.left if n < 0 else min(self.left, n - len(out))
            data = self.f.read(min(want, 1 << 20))
            if not data:
                raise OSError("the writable disk changed while it was exported")
            self.left -= len(data)
            out += data
        return bytes(out)


def _add(tar: tarfile.TarFile, name: str, content, size: int | None = None) -> None:
    """Append the regular file *name* (mode 0600, mtime now) to *tar*: *content* is its
    bytes, or a file-like to read its *size* bytes from."""
    if isinstance(content, bytes):
        content, size = io.BytesIO(content), len(content)
    info = tarfile.TarInfo(name)
    info.size = size or 0
    info.mode = 0o600
    info.mtime = int(time.time())
    tar.addfile(info, content)


def import_checkpoint(
    store: ContainerStore, path: Path, *, name: str = DEFAULT_NAME, new_name: str | None = None
) -> Container:
    """Make the container an exported checkpoint holds, ``checkpointed``, with the
    checkpoint as *name*. The archive is untrusted (see the module doc). Raises
    CheckpointError (one line); nothing is left behind then."""
    work = store.root / f".import-{os.getpid()}-{time.monotonic_ns()}"
    store.root.mkdir(parents=True, exist_ok=True)
    work.mkdir(mode=0o700)
    created: Container | None = None
    try:
        meta, data = read_archive(path, work)
        record = _checked_record(data, meta)
        if new_name is not None:
            from shim.containers.store import check_name as check_container_name

            check_container_name(new_name)
            record.name = new_name
        try:
            store.load(record.id)
            raise CheckpointError(
                f"cannot import {path}: container {record.id[:12]} exists here already; remove it first"
            )
        except ContainerNotFound:
            pass
        created = store.create(record)
        directory = checkpoint_dir(store, record.id, name)
        directory.parent.mkdir(mode=0o700, exist_ok=True)
        meta_kept = {k: v for k, v in meta.items() if k != "rw"}
        meta_kept["rw"] = meta.get("rw") is not None
        _write_json(work / META_FILE, meta_kept)
        (work / RECORD_FILE).unlink(missing_ok=True)
        os.rename(work, directory)
        return created
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created is not None:
            store.delete(created.id)
        raise


def read_archive(path: Path, work: Path) -> tuple[dict, dict]:
    """Read an exported checkpoint into *work*: ``memory.img`` and ``rw.img`` (rebuilt
    from its extents) land there under our names. Returns (meta, record dict). Raises
    CheckpointError for anything that is not exactly what export writes."""
    bad = f"cannot import {path}"
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CheckpointError(f"{bad}: {exc.strerror or exc}") from None
    seen: dict[str, object] = {}
    meta: dict | None = None
    try:
        with f, tarfile.open(fileobj=f, mode="r|") as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise CheckpointError(f"{bad}: more than {MAX_MEMBERS} entries")
                if member.name in seen:
                    raise CheckpointError(f"{bad}: entry {member.name!r} appears twice")
                if member.name not in (META_FILE, RECORD_FILE, MEMORY_FILE, RW_DATA):
                    raise CheckpointError(f"{bad}: unexpected entry {_show(member.name)}")
                if not member.isreg():
                    raise CheckpointError(f"{bad}: entry {member.name} is not a regular file")
                src = tar.extractfile(member)
                if src is None:
                    raise CheckpointError(f"{bad}: entry {member.name} has no data")
                if member.name in (META_FILE, RECORD_FILE):
                    if member.size > MAX_JSON:
                        raise CheckpointError(f"{bad}: {member.name} is larger than {MAX_JSON} bytes")
                    raw = src.read()
                    seen[member.name] = raw
                    if member.name == META_FILE:
                        meta = _parse_meta(raw, bad)
                elif member.name == MEMORY_FILE:
                    if member.size > MAX_MEMORY_IMAGE:
                        raise CheckpointError(f"{bad}: the memory image is larger than {MAX_MEMORY_IMAGE >> 30} GiB")
                    _write_extents(src, MEMORY_FILE, work / MEMORY_FILE, member.size, [[0, member.size]])
                    seen[member.name] = work / MEMORY_FILE
                else:  # RW_DATA: needs the extents, so checkpoint.json comes first
                    if meta is None:
                        raise CheckpointError(f"{bad}: {RW_DATA} comes before {META_FILE}")
                    rw = meta.get("rw")
                    if rw is None:
                        raise CheckpointError(f"{bad}: {RW_DATA} without a writable disk")
                    if member.size != sum(length for _, length in rw["extents"]):
                        raise CheckpointError(f"{bad}: {RW_DATA} does not match its extents")
                    _write_extents(src, RW_DATA, work / RW_FILE, rw["size"], rw["extents"])
                    seen[member.name] = work / RW_FILE
    except tarfile.TarError as exc:
        raise CheckpointError(f"{bad}: not a checkpoint archive ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{bad}: {exc.strerror or exc}") from None
    for needed in (META_FILE, RECORD_FILE, MEMORY_FILE):
        if needed not in seen:
            raise CheckpointError(f"{bad}: it has no {needed} (truncated, or not a checkpoint)")
    assert meta is not None
    if meta.get("rw") is not None and RW_DATA not in seen:
        raise CheckpointError(f"{bad}: it has no {RW_DATA} (truncated?)")
    try:
        record = json.loads(seen[RECORD_FILE])  # type: ignore[arg-type]
    except ValueError:
        raise CheckpointError(f"{bad}: {RECORD_FILE} is not JSON") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{bad}: {RECORD_FILE} is not an object")
    return meta, record


def _show(name: str) -> str:
    return repr(name[:80])


def _parse_meta(raw: bytes, bad: str) -> dict:
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{bad}: {META_FILE} is not JSON") from None
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{bad}: unknown checkpoint format")
    for key in ("guest_image", "kernel_release", "accel", "container_id"):
        if not isinstance(meta.get(key), str) or len(meta[key]) > 256:
            raise CheckpointError(f"{bad}: {META_FILE} has no valid {key}")
    rw = meta.get("rw")
    if rw is not None:
        if not isinstance(rw, dict):
            raise CheckpointError(f"{bad}: {META_FILE} has a bad rw entry")
        size, extents = rw.get("size"), rw.get("extents")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_RW_SIZE:
            raise CheckpointError(f"{bad}: the writable disk size is out of bounds")
        if not isinstance(extents, list) or len(extents) > MAX_EXTENTS:
            raise CheckpointError(f"{bad}: too many writable disk extents")
        end = 0
        for ext in extents:
            if (
                not isinstance(ext, list)
                or len(ext) != 2
                or not all(map(_is_int, ext))
                or ext[0] < end
                or ext[1] <= 0
                or ext[0] + ext[1] > size
            ):
                raise CheckpointError(
                    f"{bad}: the writable disk extents are malformed (overlapping, unsorted or past the end)"
                )
            end = ext[0] + ext[1]
    return meta


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _write_extents(src, member: str, dst: Path, size: int, extents: list) -> None:
    """Make *dst*, a new file of *size* bytes, from the archive member *member* read from
    *src*: it holds the ``[start, length]`` *extents* of *dst* one after the other (holes
    stay holes). Raises CheckpointError when the member ends early."""
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.truncate(size)
        for start, length in extents:
            out.seek(start)
            left = length
            while left:
                data = src.read(min(left, 1 << 20))
                if not data:
                    raise CheckpointError(f"cannot import: the archive ends inside {member} (truncated)")
                out.write(data)
                left -= len(data)


def _checked_record(data: dict, meta: dict) -> Container:
    """The container record of an archive, if every field that reaches the host is one
    vmshim could have written: a VM container, no virtiofs, no network, layer disks
    inside this host's layer store. Raises CheckpointError."""
    bad = "cannot import the checkpoint"
    try:
        record = Container.from_dict(data)
        memory_mib = record.vm_memory_mib
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{bad}: its container record is malformed ({exc})") from None
    if not isinstance(record.id, str) or not _ID.match(record.id) or record.id != meta.get("container_id"):
        raise CheckpointError(f"{bad}: its container id is malformed")
    if not isinstance(record.name, str):
        raise CheckpointError(f"{bad}: its container name is malformed")
    from shim.containers.store import check_name as check_container_name

    try:
        check_container_name(record.name)
    except UsageError as exc:
        raise CheckpointError(f"{bad}: {exc}") from None
    if not _is_int(memory_mib) or not 16 <= memory_mib <= MAX_MEMORY_MIB:
        raise CheckpointError(f"{bad}: its memory size is out of bounds")
    if record.writable not in ("disk", "tmpfs") or (record.writable == "disk") != (meta.get("rw") is not None):
        raise CheckpointError(f"{bad}: its writable layer does not match the archive")
    if not isinstance(record.mounts, list) or not isinstance(record.layer_disks, list):
        raise CheckpointError(f"{bad}: its container record is malformed")
    for mount in record.mounts:
        if mount.type not in ("volume", "tmpfs"):
            raise CheckpointError(f"{bad}: it has a mount other than a volume or tmpfs")
        if mount.type == "volume":
            from shim.volumes.store import check_name as check_volume_name

            try:
                check_volume_name(str(mount.source))
            except UsageError as exc:
                raise CheckpointError(f"{bad}: {exc}") from None
    layers = paths.layer_disks_dir().resolve()
    for disk in record.layer_disks:
        real = Path(str(disk)).resolve()
        if not isinstance(disk, str) or real.parent != layers or not real.is_file():
            raise CheckpointError(
                f"{bad}: its image layer {str(disk)[:120]} is not in this "
                f"host's layer store (pull or load the image first)"
            )
    try:
        check_checkpointable(record)
    except CheckpointError as exc:
        raise CheckpointError(f"{bad}: {exc}") from None
    if not isinstance(record.token, str) or not re.fullmatch(r"[0-9A-Za-z_-]{16,128}", record.token):
        raise CheckpointError(f"{bad}: its agent token is malformed")
    state = record.state
    state.status = lifecycle.Status.CHECKPOINTED.value
    state.monitor_pid = 0
    state.monitor_start = 0
    state.restarting = False
    if not isinstance(state.pid, int):
        state.pid = 0
    return record
