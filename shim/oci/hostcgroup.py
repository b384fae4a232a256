"""The container's cgroup on the host: OCI ``linux.cgroupsPath`` with ``linux.resources``.

A VM container's processes live in its guest (with their own cgroup there), but engines
read and limit host cgroups: ``podman stats``, ``docker stats``, ``ctr task metrics`` and
the kubelet look at the cgroup named by ``cgroupsPath`` (or at the cgroup of the pid they
were given). So the host processes that make up the container go there, with the
configured limits:

- the stand-in (``create``; it is the pid the engine has) and, forked by it, the monitor;
- ``exec`` stand-ins;
- once libvirt has finished placing it (the domain is running), QEMU with all its threads,
  and its helpers: every process libvirt keeps a pid file for beside the domain's
  (``<n>-<domain>-*.pid``: virtiofsd), with their descendants. libvirtd spawns them in its
  own machine cgroup; ``start`` moves them while it waits for the process to start.

Where (:func:`parse_path`, the config is untrusted: ``..``, control characters, over-long
names and the root cgroup are refused with one error naming the field):

- cgroupfs (default): an absolute path is below each hierarchy's root (v1: every mounted
  controller hierarchy; v2: the unified one), a relative one below the runtime's own cgroup
  (runc's rule); none given → ``/vmshim-runtime/<id>-<hash of root and id>``.
- ``--systemd-cgroup``: ``slice:prefix:name`` → the transient scope ``prefix-name.scope``
  in that slice (``a-b.slice`` is ``a.slice/a-b.slice``), made through systemd's D-Bus
  API (``busctl``) with the stand-in's pid, then filled like a cgroupfs path; none given →
  ``system.slice:vmshim-runtime:<id>-<hash>``. Without systemd as init it is refused.

Limits (:func:`host_limits`): memory limit, reservation and swap exactly as given (so the
VM is sized to fit, see :func:`vm_sizing`), CPU quota/period and shares (v2: weight),
cpuset cpus and mems, blockIO weight, and ``unified`` keys on v2. ``pids.limit`` is the
container's in the guest; on the host the VM's own threads come on top of it
(:data:`HOST_TASKS`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from guest.runtime.cgroups import Cgroup, CgroupError, read_file, read_mounts, write_file
from guest.spec import Limits
from shim.errors import VmshimError

if TYPE_CHECKING:  # imported where used at run time
    from shim.containers.resources import Resources

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "vmshim-runtime"
DEFAULT_SLICE = "system.slice"
MAX_PATH = 4096
MAX_NAME = 255
V1_CONTROLLERS = frozenset(
    {
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "freezer",
        "blkio",
        "pids",
        "hugetlb",
        "net_cls",
        "net_prio",
        "perf_event",
        "rdma",
        "misc",
    }
)
V2_CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids")

HOST_OVERHEAD_MIB = 128
"""What a VM costs the host beyond its guest RAM, in the container's cgroup: QEMU itself
(~35 MiB), the TCG translation cache (32 MiB; none with KVM), virtiofsd, the stand-in and
the monitor (Python, ~20 MiB each). With a memory limit, the guest gets the limit minus
this (:func:`vm_sizing`)."""
MIN_CONTAINER_MIB = 32
"""The least memory left for the container's processes in the guest."""
HOST_TASKS = 256
"""Host tasks (threads) a VM needs besides the container's own: QEMU's threads, virtiofsd's
thread pool, the stand-in and the monitor. The host pids.max is the container's limit plus
this; the container's limit itself holds exactly in the guest."""
SETTLE_WAIT = 10.0
"""Seconds ``delete`` waits for the cgroup to empty before it kills what is left."""

_SAFE_NAME = re.compile(r"^[A-Za-z0-9:_.@\\-]+$")
_UNIFIED_KEY = re.compile(r"^(cpu|cpuset|io|memory|pids|hugetlb|rdma|misc)\.[a-z0-9_.]+$")


class CgroupPathError(VmshimError):
    """``linux.cgroupsPath`` (or its resources) cannot be honoured; the text says why."""


# ---- where ---------------------------------------------------------------------------------


@dataclass
class Target:
    """Where the container's cgroup goes (see the module doc)."""

    manager: str
    """``cgroupfs`` or ``systemd``."""
    path: str
    """cgroupfs: the cleaned path, absolute (from each hierarchy's root) or relative (from
    the runtime's own cgroup). systemd: the scope's path from the root."""
    slice: str = ""
    unit: str = ""


def default_name(oci_id: str, root: str = "") -> str:
    """The container's cgroup name when the config names none: its id (shortened) and a
    hash of the runtime's state root with the id, so two ``--root``s never share one."""
    import hashlib

    tag = hashlib.sha256(f"{root}\0{oci_id}".encode()).hexdigest()[:8]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", oci_id)[:200]
    return f"{safe}-{tag}"


def parse_path(value, oci_id: str, systemd: bool = False, root: str = "") -> Target:
    """Check ``linux.cgroupsPath`` (untrusted) and say where the cgroup goes (*root*: the
    runtime's state root, for the default name). Raises CgroupPathError naming the
    problem."""
    if value is None or value == "":
        name = default_name(oci_id, root)
        value = f"{DEFAULT_SLICE}:{DEFAULT_PARENT}:{name}" if systemd else f"/{DEFAULT_PARENT}/{name}"
    if not isinstance(value, str):
        raise CgroupPathError("linux.cgroupsPath must be a string")
    if len(value.encode()) > MAX_PATH:
        raise CgroupPathError(f"linux.cgroupsPath is longer than {MAX_PATH} bytes")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise CgroupPathError(f"linux.cgroupsPath {value!r} holds control characters")
    if systemd:
        return _systemd_target(value)
    parts = [p for p in value.split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise CgroupPathError(
                f"linux.cgroupsPath {value!r}: '.' and '..' are not allowed (the path must stay below the cgroup root)"
            )
        if len(part.encode()) > MAX_NAME:
            raise CgroupPathError(f"linux.cgroupsPath {value!r}: a name is longer than {MAX_NAME} bytes")
    if not parts:
        raise CgroupPathError(f"linux.cgroupsPath {value!r} names the root cgroup")
    path = "/".join(parts)
    return Target("cgroupfs", "/" + path if value.startswith("/") else path)


def _systemd_target(value: str) -> Target:
    pieces = value.split(":")
    if len(pieces) != 3:
        raise CgroupPathError(f"linux.cgroupsPath {value!r}: with --systemd-cgroup it must be slice:prefix:name")
    slice_name, prefix, name = pieces
    slice_name = slice_name or DEFAULT_SLICE
    for label, text in (("slice", slice_name), ("prefix", prefix), ("name", name)):
        if text and not _SAFE_NAME.match(text):
            raise CgroupPathError(f"linux.cgroupsPath {value!r}: the {label} {text!r} is not a systemd unit name")
    if not name:
        raise CgroupPathError(f"linux.cgroupsPath {value!r}: the name is empty")
    if name.endswith(".slice"):
        raise CgroupPathError(
            f"linux.cgroupsPath {value!r}: a slice as the container's unit is not supported; name a scope"
        )
    unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    if len(unit) > MAX_NAME:
        raise CgroupPathError(f"linux.cgroupsPath {value!r}: the unit name is too long")
    return Target("systemd", "/".join(expand_slice(slice_name, value) + [unit]), slice=slice_name, unit=unit)


def expand_slice(slice_name: str, value: str = "") -> list[str]:
    """``a-b-c.slice`` → ``["a.slice", "a-b.slice", "a-b-c.slice"]``; ``-.slice`` → [].
    Raises CgroupPathError."""
    if slice_name == "-.slice":
        return []
    stem = slice_name.removesuffix(".slice")
    if stem == slice_name or not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem or "/" in stem:
        raise CgroupPathError(f"linux.cgroupsPath {value or slice_name!r}: {slice_name!r} is not a slice name")
    words = stem.split("-")
    return ["-".join(words[: i + 1]) + ".slice" for i in range(len(words))]


# ---- the host's hierarchies ----------------------------------------------------------------


def read_own_cgroups(text: str | None = None) -> dict[str, str]:
    """This process's cgroup per controller from /proc/self/cgroup (v2: key ``""``)."""
    if text is None:
        with open("/proc/self/cgroup") as f:
            text = f.read()
    out = {}
    for line in text.splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        for controller in controllers.split(",") if controllers else [""]:
            out[controller.removeprefix("name=")] = path
    return out


@dataclass
class Hierarchies:
    """The cgroup hierarchies of this host (fakes in tests: any root, any mount table)."""

    version: int
    mounts: dict[str, frozenset] = field(default_factory=dict)
    """v1: mountpoint → controllers; v2: {root: frozenset()}."""
    own: dict[str, str] = field(default_factory=dict)

    @classmethod
    def detect(cls, root: str = CGROUP_ROOT, mounts=None, own=None) -> Hierarchies:
        """Raises CgroupPathError when no cgroup filesystem is mounted at *root*."""
        mounts = read_mounts() if mounts is None else mounts
        own = read_own_cgroups() if own is None else own
        on_root = [fstype for mountpoint, fstype, _ in mounts if mountpoint == root]
        if on_root and on_root[-1] == "cgroup2":
            return cls(2, {root: frozenset()}, own)
        seen: dict[str, frozenset] = {}
        prefix = root.rstrip("/") + "/"
        for mountpoint, fstype, options in mounts:
            if fstype != "cgroup" or not mountpoint.startswith(prefix):
                continue
            controllers = frozenset(options.split(",")) & V1_CONTROLLERS
            if controllers and controllers not in seen.values():
                seen[mountpoint] = controllers
        if not seen:
            raise CgroupPathError(
                f"no cgroup filesystem is mounted at {root}: the container's cgroupsPath cannot be made"
            )
        return cls(1, dict(sorted(seen.items())), own)

    def directories(self, target: Target) -> dict[str, str]:
        """mountpoint → the container's directory in that hierarchy."""
        out = {}
        for mountpoint, controllers in self.mounts.items():
            if target.path.startswith("/") or target.manager == "systemd":
                base = mountpoint
            else:
                own = (
                    self.own.get("")
                    if self.version == 2
                    else next((self.own[c] for c in sorted(controllers) if c in self.own), "/")
                )
                base = os.path.join(mountpoint, (own or "/").lstrip("/"))
            out[mountpoint] = os.path.join(base, target.path.lstrip("/"))
        return out


# ---- limits --------------------------------------------------------------------------------


@dataclass
class HostLimits:
    """What the host cgroup gets (from the config's ``linux.resources``)."""

    limits: Any = None
    """guest.spec.Limits (a record mypy cannot see into)."""
    cpuset_mems: str = ""
    unified: dict = field(default_factory=dict)


def host_limits(resources) -> HostLimits:
    """``linux.resources`` (untrusted, already checked by the bundle's parser for its own
    fields) → HostLimits. Raises CgroupPathError naming a bad field."""
    if not isinstance(resources, dict):
        resources = {}

    def number(obj: dict, key: str, where: str, allow_unlimited: bool = False) -> int:
        value = obj.get(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise CgroupPathError(f"linux.resources.{where}.{key} must be an integer")
        if value == -1 and allow_unlimited:
            return 0
        if value < 0 or value >= 1 << 62:
            raise CgroupPathError(f"linux.resources.{where}.{key} is out of range")
        return value

    def section(name: str) -> dict:
        value = resources.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise CgroupPathError(f"linux.resources.{name} must be an object")
        return value

    memory, cpu = section("memory"), section("cpu")
    pids, block = section("pids"), section("blockIO")
    cpus, mems = cpu.get("cpus") or "", cpu.get("mems") or ""
    for key, text in (("cpus", cpus), ("mems", mems)):
        if not isinstance(text, str) or not re.match(r"^[0-9,\- ]*$", text) or len(text) > 1024:
            raise CgroupPathError(f'linux.resources.cpu.{key} must be a list like "0-1,3"')
    pids_limit = number(pids, "limit", "pids", allow_unlimited=True)
    try:
        limits = Limits.from_dict(
            {
                "memory": number(memory, "limit", "memory", True),
                "memory_swap": number(memory, "swap", "memory", True),
                "memory_reservation": number(memory, "reservation", "memory", True),
                "cpu_quota": number(cpu, "quota", "cpu", True),
                "cpu_period": number(cpu, "period", "cpu"),
                "cpu_shares": number(cpu, "shares", "cpu"),
                "cpuset_cpus": cpus.replace(" ", ""),
                "pids": pids_limit + HOST_TASKS if pids_limit else 0,
                "blkio_weight": number(block, "weight", "blockIO"),
            }
        )
    except ValueError as exc:
        raise CgroupPathError(f"linux.resources: {exc}") from None
    unified = resources.get("unified") or {}
    if not isinstance(unified, dict) or len(unified) > 64:
        raise CgroupPathError("linux.resources.unified must map at most 64 cgroup files to values")
    for key, value in unified.items():
        if not isinstance(key, str) or not _UNIFIED_KEY.match(key):
            raise CgroupPathError(f"linux.resources.unified: {key!r} is not a controller's cgroup file")
        if not isinstance(value, str) or len(value) > 4096 or "\n" in value.rstrip("\n"):
            raise CgroupPathError(f"linux.resources.unified.{key} must be a one-line string")
    return HostLimits(limits, mems.replace(" ", ""), dict(unified))


def vm_sizing(memory_limit: int, guest_overhead_mib: int) -> tuple[int, int]:
    """With a host memory limit of *memory_limit* bytes (> 0): (the VM's RAM in MiB, the
    container's memory limit in the guest in bytes). The VM and everything beside it on the
    host fit in the limit. Raises CgroupPathError when the limit is too small for a VM."""
    mib = 1 << 20
    vm_mib = memory_limit // mib - HOST_OVERHEAD_MIB
    container_mib = vm_mib - guest_overhead_mib
    if container_mib < MIN_CONTAINER_MIB:
        least = HOST_OVERHEAD_MIB + guest_overhead_mib + MIN_CONTAINER_MIB
        raise CgroupPathError(
            f"linux.resources.memory.limit {memory_limit // mib} MiB is too small for a VM: "
            f"its host side takes {HOST_OVERHEAD_MIB} MiB and the guest kernel "
            f"{guest_overhead_mib} MiB; give at least {least} MiB"
        )
    return vm_mib, container_mib * mib


def size_vm(resources: Resources) -> tuple[int, Resources]:
    """The VM's RAM in MiB and the guest's limits (shim.containers.resources.Resources)
    for the config's *resources*: with a memory limit, the VM and its host side fit in it
    (:func:`vm_sizing`) and the container's limit in the guest is what is left; without
    one, the default VM. Raises CgroupPathError."""
    from dataclasses import replace

    from shim.containers.resources import DEFAULT_VM_MIB, GUEST_OVERHEAD_MIB

    if resources.memory <= 0:
        return resources.vm_memory_mib(DEFAULT_VM_MIB), resources
    vm_mib, inside = vm_sizing(resources.memory, GUEST_OVERHEAD_MIB)
    return vm_mib, replace(
        resources, memory=inside, memory_swap=0, memory_reservation=min(resources.memory_reservation, inside)
    )


# ---- the cgroup ------------------------------------------------------------------------------


@dataclass
class HostCgroup:
    """The container's cgroup on the host, once made. Stored in the runtime's state
    (``to_dict``), so ``start``, ``exec`` and ``delete`` find it again."""

    version: int
    paths: dict[str, str]
    """controller (v2: ``unified``) → directory."""
    manager: str = "cgroupfs"
    unit: str = ""
    made: list[str] = field(default_factory=list)
    """The leaf directories this runtime created (removed by :meth:`remove`)."""

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "paths": self.paths,
            "manager": self.manager,
            "unit": self.unit,
            "made": self.made,
        }

    @classmethod
    def from_dict(cls, data: dict) -> HostCgroup:
        return cls(
            int(data["version"]),
            dict(data["paths"]),
            data.get("manager", "cgroupfs"),
            data.get("unit", ""),
            list(data.get("made") or []),
        )

    @property
    def cgroup(self) -> Cgroup:
        return Cgroup("container", self.version, self.paths)

    @property
    def directories(self) -> list[str]:
        return sorted(set(self.paths.values()))

    def add(self, pid: int) -> None:
        """Move process *pid* with all its threads. Raises CgroupPathError."""
        try:
            self.cgroup.add(pid)
        except CgroupError as exc:
            raise CgroupPathError(str(exc)) from None
        if self.version == 1:
            # cgroup.procs moves the thread group; write each thread too, so that none
            # libvirt had pinned into a per-vCPU cgroup stays behind.
            for tid in _threads(pid):
                for directory in self.directories:
                    try:
                        write_file(os.path.join(directory, "tasks"), str(tid))
                    except OSError:
                        pass

    def holds(self, pid: int) -> bool:
        """Whether every thread of *pid* is in this cgroup (every hierarchy)."""
        wanted = {os.path.realpath(d) for d in self.directories}
        for tid in _threads(pid) or [pid]:
            try:
                with open(f"/proc/{pid}/task/{tid}/cgroup") as f:
                    lines = f.read().splitlines()
            except OSError:
                if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                    continue  # a thread that ended since the listing (QEMU's worker pool)
                return False
            places = _places(lines, self)
            if not wanted <= places:
                return False
        return True

    def procs(self) -> list[int]:
        return self.cgroup.procs()

    def remove(self, wait: float = SETTLE_WAIT, stop_unit=None) -> None:
        """After the container's processes ended: wait up to *wait* s for the cgroup to
        empty, kill what is left, remove the directories this runtime made (and the
        systemd scope). Raises CgroupPathError when they stay busy."""
        deadline = time.monotonic() + wait
        while self.procs() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.manager == "systemd" and self.unit:
            (stop_unit or systemd_stop_unit)(self.unit)
        made = [d for d in self.directories if d in self.made or self.manager == "systemd"]
        if not made:
            return
        try:
            Cgroup("container", self.version, {str(i): d for i, d in enumerate(made)}).remove(timeout=5.0)
        except CgroupError as exc:
            raise CgroupPathError(str(exc)) from None


def _places(lines: list[str], cgroup: HostCgroup) -> set[str]:
    """The directories (under cgroup's mountpoints) a /proc/…/cgroup listing names."""
    own = read_own_cgroups("\n".join(lines))
    out = set()
    for key, directory in cgroup.paths.items():
        controller = "" if cgroup.version == 2 else key
        if controller not in own:
            continue
        suffix = own[controller].strip("/")
        if suffix and directory.rstrip("/").endswith("/" + suffix):
            out.add(os.path.realpath(directory))
    return out


def _threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except (OSError, ValueError):
        return []


def create(
    target: Target,
    limits: HostLimits,
    *,
    hierarchies: Hierarchies | None = None,
    systemd_start=None,
    pid: int | None = None,
) -> HostCgroup:
    """Make (or take) the container's cgroup, apply *limits* and move *pid* (the
    stand-in) in; with systemd the scope is started holding *pid*. Refuses a cgroup that
    already holds processes or is frozen (runtime spec: "fit for purpose"). Raises
    CgroupPathError; nothing is left behind then."""
    hierarchies = hierarchies or Hierarchies.detect()
    if limits.unified and hierarchies.version != 2:
        raise CgroupPathError("linux.resources.unified needs cgroup v2; this host uses v1")
    if target.manager == "systemd":
        if not pid:
            raise CgroupPathError("--systemd-cgroup: a scope needs a process to hold")
        (systemd_start or systemd_start_scope)(target, pid, unit_properties(limits, hierarchies.version))
    directories = hierarchies.directories(target)
    made: list[str] = []
    paths: dict[str, str] = {}
    try:
        for mountpoint, directory in directories.items():
            if hierarchies.version == 2:
                _prepare_v2(mountpoint, directory)
            else:
                _prepare_v1(mountpoint, directory, hierarchies.mounts[mountpoint])
            try:
                os.mkdir(directory)
                made.append(directory)
            except FileExistsError:
                if not os.path.isdir(directory) or os.path.islink(directory):
                    raise CgroupPathError(f"linux.cgroupsPath: {directory} exists and is not a cgroup") from None
            if hierarchies.version == 2:
                paths["unified"] = directory
            else:
                if "cpuset" in hierarchies.mounts[mountpoint] and directory in made:
                    _inherit_cpuset(directory)
                for controller in hierarchies.mounts[mountpoint]:
                    paths[controller] = directory
        cgroup = HostCgroup(hierarchies.version, paths, target.manager, target.unit, made)
        _check_fit(cgroup, allow=pid if target.manager == "systemd" else None)
        _apply(cgroup, limits)
        if pid and target.manager == "cgroupfs":
            cgroup.add(pid)
    except OSError as exc:
        _undo(made)
        raise CgroupPathError(f"cannot make the container's cgroup {target.path}: {exc.strerror or exc}") from None
    except (CgroupPathError, CgroupError) as exc:
        _undo(made)
        raise CgroupPathError(str(exc)) from None
    return cgroup


def _prepare_v1(mountpoint: str, directory: str, controllers: frozenset) -> None:
    """Create the ancestors of *directory* (cpusets get their parent's cpus and mems)."""
    level = mountpoint
    for part in os.path.relpath(os.path.dirname(directory), mountpoint).split("/"):
        if part in ("", "."):
            continue
        level = os.path.join(level, part)
        try:
            os.mkdir(level)
        except FileExistsError:
            continue
        if "cpuset" in controllers:
            _inherit_cpuset(level)


def _inherit_cpuset(directory: str) -> None:
    for knob in ("cpuset.cpus", "cpuset.mems"):
        if not os.path.exists(os.path.join(directory, knob)) and not os.path.exists(
            os.path.join(os.path.dirname(directory), knob)
        ):
            continue
        try:
            value = read_file(os.path.join(os.path.dirname(directory), knob)).strip()
        except OSError:
            value = ""
        write_file(os.path.join(directory, knob), value or "\n")


def _prepare_v2(root: str, directory: str) -> None:
    """Create the ancestors of *directory*, enabling the controllers on the way down."""
    try:
        available = set(read_file(os.path.join(root, "cgroup.controllers")).split())
    except OSError:
        available = set()
    wanted = [c for c in V2_CONTROLLERS if c in available]
    level = root
    parts = [p for p in os.path.relpath(directory, root).split("/") if p not in ("", ".")]
    for part in parts:
        for controller in wanted:
            try:
                write_file(os.path.join(level, "cgroup.subtree_control"), f"+{controller}")
            except OSError:
                pass  # the limit write says what is missing
        level = os.path.join(level, part)
        if level != directory:
            os.makedirs(level, exist_ok=True)


def _check_fit(cgroup: HostCgroup, allow: int | None) -> None:
    others = [p for p in cgroup.procs() if p != allow]
    if others:
        raise CgroupPathError(
            f"the cgroup {cgroup.directories[0]} already holds processes "
            f"{others[:5]}: another container uses this cgroupsPath"
        )
    frozen = (
        os.path.join(cgroup.paths["unified"], "cgroup.freeze")
        if cgroup.version == 2
        else os.path.join(cgroup.paths.get("freezer", "/nonexistent"), "freezer.state")
    )
    try:
        state = read_file(frozen).strip()
    except OSError:
        return
    if state in ("1", "FROZEN"):
        raise CgroupPathError(f"the cgroup {os.path.dirname(frozen)} is frozen")


def _apply(cgroup: HostCgroup, limits: HostLimits) -> None:
    group = cgroup.cgroup
    if cgroup.version == 1 and "memory" in cgroup.paths:
        try:  # v1 only: charges follow QEMU when it moves in (v2 never moves charges)
            write_file(os.path.join(cgroup.paths["memory"], "memory.move_charge_at_immigrate"), "3")
        except OSError:
            pass
    if limits.limits is not None:
        group.apply(limits.limits)
    if limits.cpuset_mems:
        key = "unified" if cgroup.version == 2 else "cpuset"
        if key not in cgroup.paths:
            raise CgroupPathError("cannot set cpuset.mems: no cpuset controller")
        write_file(os.path.join(cgroup.paths[key], "cpuset.mems"), limits.cpuset_mems)
    for key, value in limits.unified.items():
        try:
            write_file(os.path.join(cgroup.paths["unified"], key), value)
        except OSError as exc:
            raise CgroupPathError(f"cannot set linux.resources.unified.{key}={value}: {exc.strerror}") from None


def _undo(made: list[str]) -> None:
    for directory in reversed(made):
        try:
            os.rmdir(directory)
        except OSError:
            pass


# ---- systemd -------------------------------------------------------------------------------


def systemd_running() -> bool:
    """systemd is this host's init (sd_booted's test)."""
    return os.path.isdir("/run/systemd/system")


def _busctl(*args: str) -> subprocess.CompletedProcess:
    busctl = shutil.which("busctl")
    if busctl is None:
        raise CgroupPathError("--systemd-cgroup needs busctl (systemd's D-Bus tool)")
    return subprocess.run(
        [
            busctl,
            "--system",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def unit_properties(limits: HostLimits | None, version: int) -> list[str]:
    """busctl arguments (name, signature, value) for the scope's resource properties, so
    that systemd itself keeps the limits (a daemon-reload re-applies unit properties)."""
    out: list[str] = []
    lim = limits.limits if limits is not None else None
    if lim is None:
        return out
    if lim.memory > 0:
        out += ["MemoryMax" if version == 2 else "MemoryLimit", "t", str(lim.memory)]
    if lim.pids > 0:
        out += ["TasksMax", "t", str(lim.pids)]
    if lim.cpu_quota > 0:
        period = lim.cpu_period or 100000
        out += ["CPUQuotaPerSecUSec", "t", str(lim.cpu_quota * 1_000_000 // period)]
    if lim.cpu_shares > 0:
        from guest.runtime.cgroups import shares_to_weight

        out += (
            ["CPUWeight", "t", str(shares_to_weight(lim.cpu_shares))]
            if version == 2
            else ["CPUShares", "t", str(lim.cpu_shares)]
        )
    return out


def systemd_start_scope(target: Target, pid: int, properties: list[str] | None = None) -> None:
    """Start the transient scope *target.unit* in *target.slice* holding *pid*, delegated
    (as runc does through D-Bus), with *properties* (:func:`unit_properties`). Raises
    CgroupPathError when systemd cannot."""
    if not systemd_running():
        raise CgroupPathError(
            f"--systemd-cgroup: systemd is not running on this host (no /run/systemd/system), "
            f"so the scope {target.unit} cannot be made; use the engine's cgroupfs manager "
            "(podman --cgroup-manager cgroupfs, containerd SystemdCgroup = false)"
        )
    properties = properties or []
    res = _busctl(
        "StartTransientUnit",
        "ssa(sv)a(sa(sv))",
        target.unit,
        "fail",
        str(4 + len(properties) // 3),
        "Slice",
        "s",
        target.slice,
        "Delegate",
        "b",
        "true",
        "PIDs",
        "au",
        "1",
        str(pid),
        "Description",
        "s",
        f"vmshim-runtime container {target.unit}",
        *properties,
        "0",
    )
    if res.returncode != 0:
        raise CgroupPathError(f"--systemd-cgroup: systemd did not start {target.unit}: {res.stderr.strip()[:300]}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _unit_active(target.unit):
            return
        time.sleep(0.05)
    raise CgroupPathError(f"--systemd-cgroup: {target.unit} did not become active")


def _unit_active(unit: str) -> bool:
    res = subprocess.run(["systemctl", "is-active", "--quiet", unit], timeout=10)
    return res.returncode == 0


def systemd_stop_unit(unit: str) -> None:
    """Stop the scope (never raises: an empty transient scope goes away by itself)."""
    try:
        _busctl("StopUnit", "ss", unit, "fail")
    except (CgroupPathError, OSError, subprocess.SubprocessError):
        pass


# ---- QEMU and its helpers --------------------------------------------------------------------

LIBVIRT_PID_DIR = "/run/libvirt/qemu"


def vm_processes(domain: str, qemu_pid: int, pid_dir: str = LIBVIRT_PID_DIR, proc: str = "/proc") -> list[int]:
    """QEMU, the helpers libvirt keeps pid files for beside the domain's
    (``<n>-<domain>-*.pid``: virtiofsd), and every descendant of them."""
    roots = {qemu_pid}
    pattern = re.compile(r"^\d+-" + re.escape(domain) + r"-.+\.pid$")
    try:
        names = sorted(os.listdir(pid_dir))[:4096]
    except OSError:
        names = []
    for name in names:
        if pattern.match(name):
            try:
                roots.add(int(read_file(os.path.join(pid_dir, name)).strip()))
            except (OSError, ValueError):
                pass
    return sorted(_with_descendants(roots, proc))


def _with_descendants(roots: set[int], proc: str = "/proc") -> set[int]:
    parents: dict[int, int] = {}
    try:
        entries = [e for e in os.listdir(proc) if e.isdigit()]
    except OSError:
        entries = []
    for entry in entries[: 1 << 20]:
        try:
            with open(os.path.join(proc, entry, "stat"), "rb") as f:
                parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return descendants(roots, parents)


def descendants(roots, parents: dict[int, int]) -> set[int]:
    """*roots* (those still alive in *parents*, pid → ppid) and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [p for p in roots if p in parents]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


PLACE_ATTEMPTS = 5
"""How often :meth:`VmPlacer.finish` moves a VM process that is not (yet) all in."""
PLACE_RETRY = 0.1
"""Seconds between those attempts."""


class VmPlacer:
    """Moves the VM's host processes into the container's cgroup once libvirt is done
    placing them (its domain runs), from ``start``'s wait loop (:meth:`tick`), and checks
    the result once the process runs (:meth:`finish`)."""

    def __init__(self, cgroup: HostCgroup, domain: str, probe=None):
        self.cgroup = cgroup
        self.domain = domain
        self.probe = probe or LibvirtProbe()
        self.moved: set[int] = set()

    def tick(self) -> bool:
        """Move what is there if the domain is running; True once QEMU is in."""
        pid = self.probe.running_qemu(self.domain)
        if not pid:
            return False
        for each in self.probe.processes(self.domain, pid):
            try:
                self.cgroup.add(each)
                self.moved.add(each)
            except CgroupPathError:
                if os.path.exists(f"/proc/{each}"):
                    raise
        return pid in self.moved

    def finish(self) -> list[int]:
        """Place what came since, and check every VM process is in; their pids. A VM that
        no longer runs (a process that ended at once) has nothing left to place. Raises
        CgroupPathError naming a process that could not be placed."""
        qemu = self.probe.running_qemu(self.domain)
        if not qemu:
            return sorted(self.moved)
        self.tick()
        pids = self.probe.processes(self.domain, qemu)
        for pid in pids:
            # A busy host: libvirt may still re-place a thread once after we moved it, so
            # move and look again a bounded number of times before calling it a failure.
            for attempt in range(PLACE_ATTEMPTS):
                if not os.path.exists(f"/proc/{pid}") or self.cgroup.holds(pid):
                    break
                if attempt:
                    time.sleep(PLACE_RETRY)
                self.cgroup.add(pid)
            else:
                if os.path.exists(f"/proc/{pid}") and not self.cgroup.holds(pid):
                    raise CgroupPathError(
                        f"process {pid} of VM {self.domain} did not stay in "
                        f"the container's cgroup {self.cgroup.directories[0]}"
                    )
        return pids


class LibvirtProbe:
    """What :class:`VmPlacer` asks libvirt (fakes in tests)."""

    def __init__(self):
        self._backend = None

    def running_qemu(self, domain: str) -> int | None:
        """QEMU's pid once the domain runs (libvirt resumes it only after it placed QEMU's
        threads in its own cgroups), else None."""
        import libvirt

        from shim.vm.libvirt_backend import LibvirtBackend

        if self._backend is None:
            self._backend = LibvirtBackend()
        try:
            dom = self._backend._lookup(domain)
            if dom is None or dom.state()[0] != libvirt.VIR_DOMAIN_RUNNING:
                return None
        except (libvirt.libvirtError, VmshimError):
            return None
        return self._backend.qemu_pid(domain)

    def processes(self, domain: str, qemu_pid: int | None) -> list[int]:
        return vm_processes(domain, qemu_pid) if qemu_pid else []
