"""Which vmshim sandbox a new container joins (a pod's members share one VM, as Kata does).

A container joins a sandbox when the engine says so in its annotations (containerd's CRI
``io.kubernetes.cri.container-type: container`` with ``io.kubernetes.cri.sandbox-id``,
CRI-O's ``io.kubernetes.cri-o.ContainerType``/``SandboxID``), or when its ``network``
namespace ``path`` is the one a vmshim container's stand-in holds (podman ``--pod``,
``--network container:X``). The namespace is compared by device and inode, never by path.

Refusals: an annotation naming a sandbox this ``--root`` does not have, or one whose
stand-in has gone (the VM is dead). A path that no live vmshim stand-in holds is not a
join (the engine's own namespace, e.g. podman's default network).

A member that joins through the network namespace (podman ``--pod``, ``--network
container:X``) runs in the sandbox's VM (shim.oci.runtime, guest.runtime.member): its
rootfs is plugged in as a virtiofs share named :func:`member_tag`, the engine's
/etc/hosts, /etc/resolv.conf and /etc/hostname binds become the member's own files
(:func:`member_files`); other bind mounts and tmpfs mounts are refused with one line.
Members named by CRI annotations take the same path (tested with podman only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Protocol

from guest.protocol import MEMBER_TAG_PREFIX
from shim.errors import ContainerNotFound, VmshimError

from .state import OciInfo, alive, record_id

ANNOTATIONS = (
    # (type key, value meaning "member", sandbox id key)
    ("io.kubernetes.cri.container-type", "container", "io.kubernetes.cri.sandbox-id"),
    ("io.kubernetes.cri-o.ContainerType", "container", "io.kubernetes.cri-o.SandboxID"),
)
MAX_CANDIDATES = 4096
"""Bound on the containers scanned for the namespace's holder."""
ENGINE_FILES = {"/etc/hosts": "hosts", "/etc/resolv.conf": "resolv_conf", "/etc/hostname": "hostname"}
"""Single-file binds an engine gives every container: a member gets their contents."""
SKIPPED_BINDS = ("/dev/shm", "/run/.containerenv")
"""Binds a member goes without: the guest makes its /dev/shm; podman's marker file."""
MAX_ENGINE_FILE = 64 * 1024


class PodError(VmshimError):
    """The sandbox a container joins is missing or has stopped."""


class SandboxMissing(PodError):
    """An annotation names a sandbox this ``--root`` does not have."""


class _Store(Protocol):
    def ids(self) -> list[str]: ...
    def load(self, oci_id: str) -> tuple[object, OciInfo]: ...


@dataclass(frozen=True)
class Join:
    """The container joins the VM of *sandbox* (an OCI id in the same ``--root``)."""

    sandbox: str
    reason: str
    """"annotation" or "netns"."""


def netns_path(config: dict) -> str | None:
    """The ``path`` of the config's ``network`` namespace entry, if any."""
    linux = config.get("linux") if isinstance(config, dict) else None
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    for entry in namespaces if isinstance(namespaces, list) else []:
        if isinstance(entry, dict) and entry.get("type") == "network":
            path = entry.get("path")
            return path if isinstance(path, str) and path else None
    return None


def annotated_sandbox(annotations: dict, own_id: str) -> str | None:
    """The sandbox id a CRI member container names (None: not a member)."""
    for type_key, member, id_key in ANNOTATIONS:
        if annotations.get(type_key) == member:
            sandbox = annotations.get(id_key)
            if not isinstance(sandbox, str) or not sandbox or len(sandbox) > 1024:
                raise PodError(f"annotation {id_key} is missing or invalid")
            return None if sandbox == own_id else sandbox
    return None


def _ns_key(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _live_info(store: _Store, oci_id: str) -> OciInfo | None:
    try:
        _, info = store.load(oci_id)
    except ContainerNotFound:
        return None
    return info if alive(info.standin_pid, info.standin_start) else None


def find_join(store: _Store, oci_id: str, config: dict, annotations: dict) -> Join | None:
    """The sandbox *oci_id* joins, or None (it gets its own VM). Raises PodError."""
    sandbox = annotated_sandbox(annotations, oci_id)
    if sandbox is not None:
        try:
            _, info = store.load(sandbox)
        except ContainerNotFound:
            raise SandboxMissing(f"sandbox {sandbox} is not a vmshim-runtime container here") from None
        if not alive(info.standin_pid, info.standin_start):
            raise PodError(f"sandbox {sandbox} has stopped; its members cannot start")
        return Join(sandbox, "annotation")
    path = netns_path(config)
    key = _ns_key(path) if path else None
    if key is None:
        return None
    candidates: Iterable[str] = store.ids()[:MAX_CANDIDATES]
    for other in candidates:
        if other == oci_id:
            continue
        held = _live_info(store, other)
        if held is not None and not held.sandbox and _ns_key(f"/proc/{held.standin_pid}/ns/net") == key:
            return Join(other, "netns")
    return None


def member_of(store: _Store, oci_id: str, network_ns: str | None, annotations: dict) -> Join | None:
    """In ``create``, before anything is kept: the sandbox whose VM *oci_id* runs in,
    or None (a VM of its own). Annotations naming a sandbox this ``--root`` does not have
    (another runtime's, or podman's pod id) leave the network namespace to decide.
    Raises PodError (a sandbox that has stopped)."""
    config = {"linux": {"namespaces": [{"type": "network", "path": network_ns or ""}]}}
    try:
        return find_join(store, oci_id, config, annotations)
    except SandboxMissing:
        return find_join(store, oci_id, config, {})


SHARED_NAMESPACES = ("uts", "ipc")
"""Namespaces a member can share with its sandbox's container (guest.spec.SANDBOX_NAMESPACES)."""


def shared_namespaces(namespace_paths: dict, sandbox_pid: int) -> list[str]:
    """Which of SHARED_NAMESPACES a member whose config joins *namespace_paths* (type →
    path) shares with its sandbox: those whose path is the namespace the sandbox's
    stand-in (*sandbox_pid*) is in (compared by device and inode, as podman's pod names
    its infra container's); any other path is left to the VM (the bundle's warning)."""
    out = []
    for name in SHARED_NAMESPACES:
        path = namespace_paths.get(name)
        key = _ns_key(path) if isinstance(path, str) and path else None
        if key is not None and key == _ns_key(f"/proc/{sandbox_pid}/ns/{name}"):
            out.append(name)
    return out


def member_tag(oci_id: str) -> str:
    """The virtiofs tag of member *oci_id*'s rootfs share (guest.runtime.member.TAG_RE)."""
    return MEMBER_TAG_PREFIX + record_id(oci_id)[:16]


def member_files(oci_id: str, mounts: list, notes: list[str]) -> dict[str, str]:
    """A member's /etc files from its *mounts* (shim.volumes.specs.MountRequest): the
    engine's single-file binds on ENGINE_FILES, read from the host paths the engine
    named (regular files, at most MAX_ENGINE_FILE bytes, never through a symlink).
    Returns {"hosts"|"resolv_conf"|"hostname": text}. Raises PodError for any other
    mount (not supported in a member yet)."""
    out: dict[str, str] = {}
    for mount in mounts:
        if mount.type == "bind" and mount.target in ENGINE_FILES:
            out[ENGINE_FILES[mount.target]] = _read_engine_file(oci_id, mount.source)
        elif mount.type == "bind" and mount.target in SKIPPED_BINDS:
            notes.append(f"pod member: the bind on {mount.target} is not made (the VM has its own)")
        else:
            raise PodError(
                f"container {oci_id} joins a vmshim pod: its mount on "
                f"{mount.target} ({mount.type}) is not supported in a pod "
                "member yet; run it without that mount"
            )
    if "hostname" in out:
        out["hostname"] = out["hostname"].strip()
        if not out["hostname"] or len(out["hostname"]) > 64:
            raise PodError(f"container {oci_id}: its /etc/hostname must hold a name of 1-64 characters")
    return out


def _read_engine_file(oci_id: str, path: str) -> str:
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PodError(f"container {oci_id}: cannot read {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PodError(f"container {oci_id}: {path} is not a regular file")
        data = os.read(fd, MAX_ENGINE_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_ENGINE_FILE:
        raise PodError(f"container {oci_id}: {path} is larger than {MAX_ENGINE_FILE} bytes")
    return data.decode(errors="replace")


# ---- pod-level resources size the sandbox's VM -----------------------------------------------

MAX_LIMIT = 1 << 50
"""Bytes: a pod memory limit above this (1 PiB; cgroup v1's "unlimited" is ~2⁶³) counts as none."""
MAX_QUOTA = 1 << 40
"""µs: a CPU quota above this counts as none."""
MIN_PERIOD, MAX_PERIOD = 1000, 1_000_000
"""µs: the kernel's bounds on a CFS period; outside them the quota counts as none."""
MAX_CONTROL_FILE = 64
"""Bytes read from a cgroup control file."""
SANDBOX_MEMORY = "io.kubernetes.cri.sandbox-memory"
SANDBOX_CPU_QUOTA = "io.kubernetes.cri.sandbox-cpu-quota"
SANDBOX_CPU_PERIOD = "io.kubernetes.cri.sandbox-cpu-period"


@dataclass(frozen=True)
class PodLimits:
    """A pod's own limits (0: none): its memory limit in bytes and its CPU quota per period."""

    memory: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    source: str = ""
    """Where they came from (for the log): the pod's cgroup or the CRI annotations."""

    def vcpus(self, host_cpus: int) -> int:
        """ceil(quota/period), at most *host_cpus* (≥ 1); 0 without a CPU limit."""
        if self.cpu_quota <= 0 or self.cpu_period <= 0:
            return 0
        return max(1, min(-(-self.cpu_quota // self.cpu_period), max(1, host_cpus)))


def _number(text: str | None, bound: int) -> int:
    """A decimal integer in (0, *bound*] from an untrusted control file or annotation;
    0 for "max", -1, garbage, or anything out of range."""
    if not isinstance(text, str):
        return 0
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        return 0
    value = int(text)
    return value if 0 < value <= bound else 0


def _period(text: str | None) -> int:
    value = _number(text, MAX_PERIOD)
    return value if value >= MIN_PERIOD else 0


def parse_v2(memory_max: str | None, cpu_max: str | None) -> PodLimits:
    """cgroup v2's ``memory.max`` (bytes or "max") and ``cpu.max`` ("QUOTA PERIOD", QUOTA
    may be "max") → PodLimits; unreadable or odd values count as no limit."""
    memory = _number(memory_max, MAX_LIMIT)
    quota = period = 0
    words = cpu_max.split() if isinstance(cpu_max, str) else []
    if len(words) == 2:
        quota, period = _number(words[0], MAX_QUOTA), _period(words[1])
    return PodLimits(memory, quota if period else 0, period if quota else 0, "cgroup")


def parse_v1(limit_in_bytes: str | None, cfs_quota_us: str | None, cfs_period_us: str | None) -> PodLimits:
    """cgroup v1's ``memory.limit_in_bytes``, ``cpu.cfs_quota_us`` (-1: none) and
    ``cpu.cfs_period_us`` → PodLimits; odd values count as no limit."""
    memory = _number(limit_in_bytes, MAX_LIMIT)
    quota, period = _number(cfs_quota_us, MAX_QUOTA), _period(cfs_period_us)
    return PodLimits(memory, quota if period else 0, period if quota else 0, "cgroup")


def parse_annotations(annotations: dict) -> PodLimits:
    """containerd's CRI sandbox annotations (Kata reads the same): the pod's memory in
    bytes, its CPU quota and period in µs; odd values count as none."""
    if not isinstance(annotations, dict):
        return PodLimits()
    memory = _number(annotations.get(SANDBOX_MEMORY), MAX_LIMIT)
    quota = _number(annotations.get(SANDBOX_CPU_QUOTA), MAX_QUOTA)
    period = _period(annotations.get(SANDBOX_CPU_PERIOD))
    return PodLimits(memory, quota if period else 0, period if quota else 0, "annotations")


def read_control(path: str) -> str | None:
    """At most MAX_CONTROL_FILE bytes of a cgroup control file, never through a symlink
    (None: absent, a symlink, unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, MAX_CONTROL_FILE).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _safe_dir(path: str) -> bool:
    """*path* is a directory, and neither it nor any of its parents is a symlink."""
    import stat

    path = os.path.normpath(path)
    while path not in ("/", ""):
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return False
        except OSError:
            return False
        path = os.path.dirname(path)
    return os.path.isdir(path or "/")


def cgroup_limits(version: int, parents: list[tuple[frozenset, str]]) -> PodLimits:
    """The limits of the pod's cgroup: *parents* holds, per hierarchy, its controllers (v2:
    empty) and the parent directory of the container's cgroup there."""

    def read(directory: str, name: str) -> str | None:
        return read_control(os.path.join(directory, name)) if directory and _safe_dir(directory) else None

    if version == 2:
        directory = parents[0][1] if parents else ""
        return parse_v2(read(directory, "memory.max"), read(directory, "cpu.max"))
    memory_dir = next((d for c, d in parents if "memory" in c), "")
    cpu_dir = next((d for c, d in parents if "cpu" in c), "")
    return parse_v1(
        read(memory_dir, "memory.limit_in_bytes"),
        read(cpu_dir, "cpu.cfs_quota_us"),
        read(cpu_dir, "cpu.cfs_period_us"),
    )


def vm_size(limits: PodLimits, own_mib: int, own_vcpus: int, host_cpus: int) -> tuple[int, int]:
    """The sandbox VM's (MiB, vCPUs) from the pod's *limits* where they are larger than the
    container's own (*own_mib*, *own_vcpus*); 0 where they are not. A pod cgroup's memory
    limit holds the whole VM on the host, so the VM fits in it as for a container's own
    limit (shim.oci.hostcgroup.vm_sizing); the CRI annotation is the containers' total
    (the kubelet adds the RuntimeClass overhead to the pod's cgroup), so the VM is that
    plus the guest's overhead, as Kata sizes it."""
    from shim.containers.resources import GUEST_OVERHEAD_MIB, MIB

    from .hostcgroup import CgroupPathError, vm_sizing

    mib = 0
    if limits.memory > 0:
        if limits.source == "annotations":
            mib = -(-limits.memory // MIB) + GUEST_OVERHEAD_MIB
        else:
            try:
                mib = vm_sizing(limits.memory, GUEST_OVERHEAD_MIB)[0]
            except CgroupPathError:
                mib = 0  # too small for a VM: the container's own size stands
    vcpus = limits.vcpus(host_cpus)
    return (mib if mib > own_mib else 0), (vcpus if vcpus > own_vcpus else 0)
