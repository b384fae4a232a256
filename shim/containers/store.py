"""The container state store: one directory per container, atomic writes, file locks.

On disk, under ``paths.containers_dir()`` (``$VMSHIM_ROOT/containers``)::

    .lock                 flock: held while a name is taken, changed or given back
                          (create, rename, delete), so two containers never share a name
    <id>/                 0711 (QEMU, as libvirt-qemu, must reach rw.img)
      state.json          the Container record (0600: it holds the agent token); replaced
                          atomically (write state.json.tmp-<pid>, fsync, rename)
      lock                flock: held by whoever reads-modifies-writes the record
      container.log       the container's output, json lines (see shim.containers.logs)
      rw.img              writable layer of a vm container (sparse ext4), kept until rm
      rw/upper, rw/work   writable layer of a process container, kept until rm

Runtime files live in ``paths.run_dir()/<short id>/`` (see :func:`run_dir_of`): the monitor's
socket ``monitor.sock``, the agent channel ``agent.sock``, the VM's ``console.log`` and
``config.iso``, ``monitor.log``. They exist while a monitor runs the container.

Readers never lock: a rename is atomic, so they see the old or the new record. Writers
use :meth:`ContainerStore.locked` (or :meth:`update`), which re-reads under the lock.
Lock order: the store's ``.lock`` before a container's ``lock``.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from guest.spec import ProcessSpec
from shim import paths
from shim.containers.logs import LogLimits
from shim.containers.netrequest import NetworkRequest
from shim.containers.resources import Resources
from shim.files import flocked
from shim.containers.state import Status
from shim.errors import ContainerNotFound, UsageError, VmshimError
from shim.volumes.specs import MountRequest

STATE_FILE = "state.json"
LOCK_FILE = "lock"
LOG_FILE = "container.log"
RW_DISK = "rw.img"
ZERO_TIME = "0001-01-01T00:00:00Z"
"""Docker's "never" for StartedAt/FinishedAt."""
SCHEMA_VERSION = 2
"""``schema`` in state.json. 1 (no ``schema`` field): written before the record was typed;
it also held ``memory_mib``, now derived from ``resources``. :meth:`Container.from_dict`
reads both."""


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float | None:
    """Seconds since the epoch, or None for ZERO_TIME / an unparseable text."""
    if not text or text == ZERO_TIME:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")


def check_name(name: str) -> None:
    """Raise UsageError unless *name* is a valid container name."""
    if not _NAME.match(name):
        raise UsageError(f"invalid container name {name!r}: use letters, digits, '_', '.', '-'")


SOCKET_PATH_MAX = 107
"""sun_path holds 108 bytes with the terminating NUL."""


def domain_name(container_id: str) -> str:
    """The libvirt domain of a VM container: ``vmshim-`` and the short id. Defined here, at
    the record, so that networking and the record need not import the VM isolation."""
    return f"vmshim-{container_id[:12]}"


def run_dir_of(container_id: str) -> Path:
    """The container's runtime directory: named by the short id (12 hex digits, as the
    domain is), so the unix sockets in it stay under SOCKET_PATH_MAX."""
    return paths.run_dir() / container_id[:12]


def check_socket_paths(container_id: str) -> None:
    """Raise VmshimError when the sockets of *container_id* would not fit a unix socket
    address (a very long VMSHIM_ROOT or VMSHIM_RUN)."""
    longest = run_dir_of(container_id) / "monitor.sock"
    if len(str(longest).encode()) > SOCKET_PATH_MAX:
        raise VmshimError(
            f"the run directory {paths.run_dir()} is too long for unix "
            f"sockets ({longest}); set VMSHIM_RUN to a shorter directory"
        )


@dataclass
class ContainerState:
    """What changes while the container lives. Written by the monitor and the verbs."""

    status: str = Status.CREATED.value
    exit_code: int = 0
    error: str = ""
    oom_killed: bool = False
    started_at: str = ZERO_TIME
    finished_at: str = ZERO_TIME
    pid: int = 0
    """The main process's pid inside the VM (or on the host, for process isolation)."""
    monitor_pid: int = 0
    monitor_start: int = 0
    """Start time (clock ticks since boot, /proc/<pid>/stat field 22) of the monitor, so a
    reused pid is not taken for it."""
    restart_count: int = 0
    restarting: bool = False
    """A restart policy is waiting to start it again (docker's ``restarting``); true only
    while its monitor lives."""
    stopped_by_user: bool = False
    """``stop``/``kill``/``rm -f`` ended it: restart policies do not bring it back."""
    health: dict = field(default_factory=dict)
    """docker's State.Health ({Status, FailingStreak, Log}) while a health check runs
    (shim.containers.health); empty without one."""


@dataclass
class Container:
    """One container's record (``state.json``): typed values, turned into JSON and back
    only by :meth:`to_dict` and :meth:`from_dict`."""

    id: str
    name: str
    image: str
    image_id: str
    isolation: str
    process: ProcessSpec
    """The main process."""
    hostname: str
    token: str
    layer_disks: list[str]
    created: str = field(default_factory=now_rfc3339)
    interactive: bool = False
    """The main process has a stdin (``-i``): attach can feed it."""
    tty: bool = False
    auto_remove: bool = False
    restart_policy: str = "no"
    restart_max: int = 0
    stop_signal: int = 15
    stop_timeout: int = 10
    writable: str = "disk"
    """``disk`` (kept across stop/start) or ``tmpfs`` (``--rm`` containers: faster)."""
    hosts: str = ""
    resolv_conf: str = ""
    network: NetworkRequest | None = None
    """Acted on at every start (the addresses are the start's). None: no networking
    (records from before it existed)."""
    engine_netns: dict | None = None
    """vmshim-runtime: ``{"netns": path, "host_netns": path}`` when an engine prepared the
    container's network namespace on the host (shim.containers.engine_network); None: not."""
    resources: Resources = field(default_factory=Resources)
    """The limits as given (``update`` changes them); they size the VM (:attr:`vm_memory_mib`,
    :attr:`vm_vcpus`)."""
    pod_vm_mib: int = 0
    pod_vcpus: int = 0
    """vmshim-runtime: a pod sandbox's VM size from the pod's own limits where larger than
    :attr:`resources`' (shim.oci.pod.vm_size); 0: none."""
    mounts: list[MountRequest] = field(default_factory=list)
    """In order."""
    read_only: bool = False
    rootfs: str = ""
    """A host directory that is the whole rootfs (an OCI bundle's, vmshim-runtime);
    "" for an image's layers. VM isolation only."""
    masked_paths: list | None = None
    readonly_paths: list | None = None
    """OCI's maskedPaths/readonlyPaths (vmshim-runtime); None: the guest's defaults."""
    sysctl: dict = field(default_factory=dict)
    """Set in the VM's kernel at boot (OCI linux.sysctl)."""
    log: LogLimits = field(default_factory=LogLimits)
    """``--log-opt``."""
    privileged: bool = False
    """--privileged: every device, no masked paths, no device rules (the process's
    capabilities and seccomp are in ``process``)."""
    devices: list = field(default_factory=list)
    """--device entries (shim.containers.security.parse_device)."""
    labels: dict = field(default_factory=dict)
    """The image's labels overridden by ``--label`` (compose: com.docker.compose.project/
    service/container-number …)."""
    healthcheck: dict | None = None
    """docker's Config.Healthcheck (Test, Interval, Timeout, Retries, StartPeriod in ns)
    from ``--health-*`` or the image; None: no check."""
    os_container: bool = False
    """``--os``: the process is the image's init (shim.containers.osmode)."""
    hypervisor: str = ""
    """The libvirt URI that runs its VM after ``vmshim migrate``; "": this host's."""
    state: ContainerState = field(default_factory=ContainerState)

    @property
    def status(self) -> Status:
        return Status(self.state.status)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def domain(self) -> str:
        return domain_name(self.id)

    @property
    def vm_memory_mib(self) -> int:
        """The VM's memory (VM isolation): from :attr:`resources` (or the pod's)."""
        return max(self.resources.vm_memory_mib(), self.pod_vm_mib)

    @property
    def vm_vcpus(self) -> int:
        """The VM's vCPUs (VM isolation): from :attr:`resources` (or the pod's)."""
        return max(self.resources.vm_vcpus(), self.pod_vcpus)

    def to_dict(self) -> dict:
        """The JSON of state.json (schema :data:`SCHEMA_VERSION`)."""
        data: dict = {"schema": SCHEMA_VERSION}
        for f in fields(self):
            data[f.name] = copy.deepcopy(getattr(self, f.name))
        data["process"] = self.process.to_dict()
        data["network"] = self.network.to_dict() if self.network is not None else None
        data["resources"] = self.resources.to_dict()
        data["mounts"] = [m.to_dict() for m in self.mounts]
        data["log"] = self.log.to_dict()
        data["state"] = asdict(self.state)
        for name in ("pod_vm_mib", "pod_vcpus"):  # only a pod sandbox's record has them
            if not data[name]:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Container":
        """Read a record of this schema or of schema 1 (see :data:`SCHEMA_VERSION`).
        Raises ValueError for a record that is not one."""
        if not isinstance(data, dict):
            raise ValueError("a container record must be a JSON object")
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or not 1 <= schema <= SCHEMA_VERSION:
            raise ValueError(
                f"container record schema {schema!r} is not one this version "
                f"reads (1 to {SCHEMA_VERSION}); upgrade vmshim"
            )
        try:
            return cls._from_dict(data)
        except (AttributeError, IndexError, KeyError, TypeError) as exc:  # a field's shape
            raise ValueError(f"malformed container record: {exc}") from None

    @classmethod
    def _from_dict(cls, data: dict) -> "Container":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        # schema 1 also held memory_mib: always resources' VM size, so it is dropped.
        values["process"] = ProcessSpec.from_dict(_object(data, "process"))
        network = data.get("network")
        values["network"] = None if network is None else NetworkRequest.from_dict(_object(data, "network"))
        values["resources"] = Resources.from_dict(_object(data, "resources"))
        mounts = data.get("mounts") or []
        if not isinstance(mounts, list) or not all(isinstance(m, dict) for m in mounts):
            raise ValueError("mounts must be a list of JSON objects")
        values["mounts"] = [MountRequest.from_dict(m) for m in mounts]
        values["log"] = LogLimits.from_dict(data.get("log"))
        state_known = {f.name for f in fields(ContainerState)}
        values["state"] = ContainerState(**{k: v for k, v in _object(data, "state").items() if k in state_known})
        return cls(**values)


def _object(data: dict, name: str) -> dict:
    """``data[name]`` when it is a JSON object; {} when it is absent or null."""
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value


class ContainerStore:
    """The records of every container on this host (see the module doc for the layout)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else paths.containers_dir()

    # ---- paths --------------------------------------------------------------------------

    def dir(self, container_id: str) -> Path:
        return self.root / container_id

    def log_path(self, container_id: str) -> Path:
        return self.dir(container_id) / LOG_FILE

    def rw_disk(self, container_id: str) -> Path:
        return self.dir(container_id) / RW_DISK

    # ---- reading --------------------------------------------------------------------------

    def ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir())
        except FileNotFoundError:
            return []

    def load(self, container_id: str) -> Container:
        """The record of *container_id*. Raises ContainerNotFound."""
        try:
            data = json.loads((self.dir(container_id) / STATE_FILE).read_text())
            return Container.from_dict(data)
        except FileNotFoundError:
            raise ContainerNotFound(f"no such container: {container_id}") from None
        except (OSError, ValueError) as exc:
            raise VmshimError(f"the record of container {container_id} is unreadable: {exc}") from None

    def list(self) -> list[Container]:
        """Every container, oldest first. Records vanishing meanwhile are skipped."""
        out = []
        for cid in self.ids():
            try:
                out.append(self.load(cid))
            except ContainerNotFound:
                continue
        out.sort(key=lambda c: c.created)
        return out

    def find(self, ref: str) -> Container:
        """Look *ref* up like docker: full id, then name, then a unique id prefix.
        Raises ContainerNotFound (also for an ambiguous prefix, saying so)."""
        if not ref:
            raise ContainerNotFound("no such container: ''")
        if "/" not in ref and ref not in (".", ".."):
            with contextlib.suppress(ContainerNotFound):
                return self.load(ref)
        everything = self.list()
        for rec in everything:
            if rec.name == ref:
                return rec
        matches = [rec for rec in everything if rec.id.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ContainerNotFound(f"container id prefix {ref} is ambiguous ({len(matches)} containers match)")
        raise ContainerNotFound(f"no such container: {ref}")

    # ---- writing --------------------------------------------------------------------------

    def create(self, record: Container) -> Container:
        """Store a new record. Raises UsageError when its name is taken."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._names_locked():
            for other in self.list():
                if other.name == record.name:
                    raise UsageError(
                        f'the container name "{record.name}" is already in use '
                        f"by container {other.short_id}; remove or rename it"
                    )
            directory = self.dir(record.id)
            directory.mkdir(mode=0o711)
            os.chmod(directory, 0o711)
            (directory / LOCK_FILE).touch(mode=0o600)
            self.save(record)
        return record

    def save(self, record: Container) -> None:
        """Write *record* atomically. Precondition: the caller holds its lock (or has
        just created it)."""
        directory = self.dir(record.id)
        tmp = directory / f"{STATE_FILE}.tmp-{os.getpid()}"
        data = json.dumps(record.to_dict(), indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, directory / STATE_FILE)

    @contextlib.contextmanager
    def locked(self, container_id: str) -> Iterator[Container]:
        """Hold *container_id*'s lock and yield its fresh record; the caller saves what it
        changes with :meth:`save`. Raises ContainerNotFound (also when it was removed
        while we waited for the lock)."""
        path = self.dir(container_id) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ContainerNotFound(f"no such container: {container_id}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self.load(container_id)
        finally:
            os.close(fd)

    def update(self, container_id: str, change) -> Container:
        """Lock, re-read, ``change(record)``, save; return the saved record."""
        with self.locked(container_id) as record:
            change(record)
            self.save(record)
            return record

    def rename(self, ref: str, new_name: str) -> Container:
        """Give the container *ref* the name *new_name*. Raises UsageError (taken or
        malformed), ContainerNotFound."""
        check_name(new_name)
        with self._names_locked():
            record = self.find(ref)
            for other in self.list():
                if other.name == new_name and other.id != record.id:
                    raise UsageError(f'the container name "{new_name}" is already in use by container {other.short_id}')
            with self.locked(record.id) as fresh:
                fresh.name = new_name
                self.save(fresh)
                return fresh

    def delete(self, container_id: str) -> None:
        """Remove the container's directory (record, log, writable layer). Idempotent.
        Precondition: nothing runs the container any more."""
        with self._names_locked():
            directory = self.dir(container_id)
            if directory.exists():
                # Rename first: a reader then never sees half a directory.
                doomed = self.root / f".removing-{container_id}-{os.getpid()}"
                try:
                    os.rename(directory, doomed)
                except FileNotFoundError:
                    return
                shutil.rmtree(doomed, ignore_errors=True)

    @contextlib.contextmanager
    def _names_locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with flocked(self.root / ".lock", mode=0o600):
            yield


# ---- the monitor process's identity ----------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), or None when
    there is no such (live, not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if rest[0] in (b"Z", b"X"):
        return None
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def monitor_alive(record: Container) -> bool:
    """Whether the monitor recorded for *record* is still running."""
    pid = record.state.monitor_pid
    if pid <= 0:
        return False
    start = process_start_time(pid)
    return start is not None and start == record.state.monitor_start
