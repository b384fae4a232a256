"""The runtime's containers under ``--root`` and the OCI ``state`` of each.

Layout: ``<root>/<record id>/`` is a vmshim container directory (shim.containers.store:
``state.json``, lock, monitor log) plus ``oci.json`` (:class:`OciInfo`), ``exec.fifo``
(created → start) and ``execs/<pid>`` (the stand-ins of exec'd processes). The record id
is the SHA-256 of the OCI id, so an id is found without a scan and never by prefix.

OCI status from the vmshim lifecycle (shim.containers.state)::

    created  + no stand-in yet → creating
    created  + stand-in alive  → created      running → running    paused → paused
    created  + stand-in gone   → stopped      exited  → stopped    removing → stopped

A pod member (``OciInfo.sandbox``, shim.oci.pod) has no VM or monitor of its own: its
stand-in alive → created, or running once ``start`` saw it run; gone → stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from shim.containers.state import Status
from shim.containers.store import Container, ContainerStore, process_start_time
from shim.records import JsonRecord
from shim.errors import ContainerNotFound, VmshimError

DEFAULT_ROOT = "/run/vmshim-runtime"
OCI_VERSION = "1.1.0"
INFO_FILE = "oci.json"
FIFO = "exec.fifo"


def record_id(oci_id: str) -> str:
    return hashlib.sha256(oci_id.encode()).hexdigest()


@dataclass
class OciInfo(JsonRecord):
    """What the runtime keeps about one container beyond the vmshim record."""

    id: str
    bundle: str
    rootfs: str
    created: str
    annotations: dict = field(default_factory=dict)
    hooks: dict = field(default_factory=dict)
    """kind → [shim.oci.bundle.Hook.to_dict()]."""
    standin_pid: int = 0
    standin_start: int = 0
    console_size: list | None = None
    cgroup: dict | None = None
    """The host cgroup (shim.oci.hostcgroup.HostCgroup.to_dict()), once made."""
    sandbox: str = ""
    """A pod member (shim.oci.pod): the OCI id of the container whose VM runs it."""
    member_tag: str = ""
    """A pod member: the virtiofs tag its rootfs is plugged into the sandbox's VM as."""
    member_started: bool = False
    """A pod member: ``start`` saw its process run (its record stays ``created``: it has
    no VM or monitor of its own; its stand-in's life is its state)."""
    member_namespaces: list = field(default_factory=list)
    """A pod member: the namespaces it shares with its sandbox's container (uts, ipc)."""
    member_paused: bool = False
    """A pod member: ``pause`` froze its cgroup in the sandbox's VM (``resume`` thaws it)."""


def alive(pid: int, start: int) -> bool:
    """Whether *pid* is still the live (not zombie) process that started at *start*."""
    return pid > 0 and process_start_time(pid) == start


class RuntimeStore:
    """The containers of one ``--root``."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT):
        self.root = Path(root)
        self.containers = ContainerStore(self.root)

    def dir(self, oci_id: str) -> Path:
        return self.containers.dir(record_id(oci_id))

    def exists(self, oci_id: str) -> bool:
        return (self.dir(oci_id) / INFO_FILE).exists()

    def load(self, oci_id: str) -> tuple[Container, OciInfo]:
        """The record and info of *oci_id*. Raises ContainerNotFound."""
        try:
            record = self.containers.load(record_id(oci_id))
            info = OciInfo.from_dict(json.loads((self.dir(oci_id) / INFO_FILE).read_text()))
        except (ContainerNotFound, FileNotFoundError):
            raise ContainerNotFound(f"container {oci_id} does not exist") from None
        except (OSError, ValueError) as exc:
            raise VmshimError(f"the state of container {oci_id} is unreadable: {exc}") from None
        return record, info

    def save_info(self, info: OciInfo) -> None:
        """Write ``oci.json`` atomically."""
        path = self.dir(info.id) / INFO_FILE
        tmp = path.with_name(f"{INFO_FILE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(info.to_dict(), indent=1))
        os.replace(tmp, path)

    def ids(self) -> list[str]:
        out = []
        for rid in self.containers.ids():
            with contextlib.suppress(OSError, ValueError, KeyError):
                out.append(json.loads((self.containers.dir(rid) / INFO_FILE).read_text())["id"])
        return sorted(out)

    # ---- exec stand-ins -------------------------------------------------------------------

    def add_exec(self, oci_id: str, pid: int) -> None:
        directory = self.dir(oci_id) / "execs"
        directory.mkdir(exist_ok=True)
        (directory / str(pid)).write_text(str(process_start_time(pid) or 0))

    def exec_pids(self, oci_id: str) -> list[int]:
        """The exec stand-ins still alive (stale entries are removed)."""
        out = []
        directory = self.dir(oci_id) / "execs"
        for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
            with contextlib.suppress(ValueError, OSError):
                if alive(int(entry.name), int(entry.read_text() or 0)):
                    out.append(int(entry.name))
                    continue
                entry.unlink()
        return out


def oci_status(record: Container, info: OciInfo) -> str:
    """creating, created, running, paused or stopped (see the module doc)."""
    if info.sandbox:  # a pod member
        if info.standin_pid == 0:
            return "creating"
        if not alive(info.standin_pid, info.standin_start):
            return "stopped"
        if not info.member_started:
            return "created"
        return "paused" if info.member_paused else "running"
    status = record.status
    if status == Status.CREATED:
        if info.standin_pid == 0:
            return "creating"  # create has recorded it and not forked the stand-in yet
        return "created" if alive(info.standin_pid, info.standin_start) else "stopped"
    if status in (Status.RUNNING, Status.PAUSED):
        return status.value
    return "stopped"


def state_of(record: Container, info: OciInfo) -> dict:
    """The ``state`` JSON (runtime spec, plus runc's rootfs/created/owner fields)."""
    status = oci_status(record, info)
    return {
        "ociVersion": OCI_VERSION,
        "id": info.id,
        "status": status,
        "pid": info.standin_pid if status != "stopped" else 0,
        "bundle": info.bundle,
        "rootfs": info.rootfs,
        "created": info.created,
        "owner": "",
        "annotations": info.annotations,
    }
