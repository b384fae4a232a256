"""An OCI bundle's config.json, read into what a vmshim VM runs.

:func:`load_bundle` validates the untrusted JSON and returns a :class:`Bundle`: the
process (guest.spec.ProcessSpec), hostname, mounts (shim.volumes.specs.MountRequest),
limits (shim.containers.resources.Resources), hooks and annotations, plus ``notes``:
every part of the config a VM does not honour, in words (the runtime writes them to its
``--log``; nothing is dropped silently).

How the config maps onto a VM:

- ``root.path`` is shared into the VM with virtiofs and becomes the rootfs as it is
  (no layers); ``root.readonly`` makes it read-only inside the container.
- ``mounts``: ``bind`` of a directory → a virtiofs share; of a single file → a share of
  a private directory holding only that file (shim.containers.mounts, never its parent:
  docker's hosts/resolv.conf sit beside config.v2.json); ``tmpfs`` → a tmpfs in the guest. ``proc``, ``sysfs``,
  ``devpts``, ``mqueue``, ``cgroup``/``cgroup2`` and the tmpfs on /dev and /dev/shm are
  made by the guest for every container, so these entries are already honoured. Other
  types are reported.
- ``process``: args, env, cwd, terminal, ``user`` (uid, gid, additionalGids, umask),
  rlimits, oomScoreAdj, consoleSize, capabilities (all five sets) and noNewPrivileges
  are applied by the guest. apparmor/selinux labels, ioPriority, scheduler are reported.
- ``linux.namespaces``: the VM gives the container new pid, mount, uts, ipc and cgroup
  namespaces and a guest kernel of its own; a ``path`` to join one of those cannot be
  honoured. The ``network`` namespace lives on the host (shim.oci.netns): a new one, or
  the ``path`` given, and the VM is plugged into the interfaces the engine puts there;
  without a ``network`` entry the VM has only ``lo``.
- ``linux.resources``: memory limit/reservation, CPU quota/period/shares, pids, blockIO
  weight become the guest cgroup's limits; ``linux.cgroupsPath`` and the raw resources
  are kept for the host cgroup (shim.oci.hostcgroup, which also sizes the VM). Device
  rules give the ``linux.devices`` their access; hugepages, rdma, network classes are
  reported.
- ``linux.devices`` are made by the guest (shim.oci.bundle._devices).
- ``linux.maskedPaths``/``readonlyPaths`` replace the guest's own lists; ``linux.sysctl``
  is set in the VM's kernel (any key: the kernel is the container's alone).
- ``linux.seccomp`` is compiled to a BPF filter and installed by the guest before the
  process runs (exec'ed processes get it too, as runc does); x86_64 only, and
  SCMP_ACT_NOTIFY / ``listenerPath`` are refused. Its ``flags`` are reported.
- a new ``user`` namespace with ``uidMappings``/``gidMappings`` becomes the process's
  ``id_mappings`` (the guest makes the namespace).
- intelRdt, personality, timeOffsets, mount propagation other than private are
  reported.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from guest.spec import CAP_SETS, CAPABILITIES, RLIMIT_NAMES, ProcessSpec
from shim.containers.resources import Resources
from shim.errors import VmshimError
from shim.files import read_json

MAX_CONFIG_BYTES = 4 << 20
"""A config.json larger than this is refused (engines write a few KiB)."""
ID_RE = re.compile(r"^[\w+.-]{1,1024}$")
"""runc's rule for container ids."""

GUEST_MADE_MOUNTS = {
    "/proc": "proc",
    "/dev": "tmpfs",
    "/dev/pts": "devpts",
    "/dev/shm": "tmpfs",
    "/dev/mqueue": "mqueue",
    "/sys": "sysfs",
    "/sys/fs/cgroup": "cgroup",
}
"""Mounts the guest makes for every container (guest.runtime.rootfs.setup_mounts)."""
HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
PROPAGATION = frozenset({"shared", "rshared", "slave", "rslave", "unbindable", "runbindable"})
"""Mount propagation options other than (r)private, the guest's only kind."""
SUPPORTED_NAMESPACES = ("pid", "network", "mount", "ipc", "uts", "cgroup", "user", "time")


class BundleError(VmshimError):
    """The bundle or its config.json is unusable; the text names what is wrong."""


@dataclass
class Hook:
    path: str
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    timeout: int | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "args": self.args, "env": self.env, "timeout": self.timeout}

    @classmethod
    def from_dict(cls, data: dict) -> "Hook":
        return cls(
            path=data["path"],
            args=list(data.get("args") or []),
            env=list(data.get("env") or []),
            timeout=data.get("timeout"),
        )


@dataclass
class Bundle:
    """What vmshim takes from one bundle (see the module doc)."""

    path: Path
    rootfs: Path
    process: ProcessSpec
    hostname: str = ""
    read_only: bool = False
    mounts: list = field(default_factory=list)
    """shim.volumes.specs.MountRequest list."""
    resources: Resources = field(default_factory=Resources)
    hooks: dict = field(default_factory=dict)
    """kind (HOOK_KINDS) → list of Hook."""
    annotations: dict = field(default_factory=dict)
    oci_version: str = ""
    masked_paths: list | None = None
    readonly_paths: list | None = None
    sysctl: dict = field(default_factory=dict)
    console_size: tuple[int, int] | None = None
    """(rows, cols) from process.consoleSize."""
    notes: list[str] = field(default_factory=list)
    """What the VM does not honour, one sentence each."""
    os_container: bool = False
    """Annotation ``org.vmshim.os=true``: process is the image's init (an OS container,
    shim.containers.osmode)."""
    network_ns: str | None = None
    """The container's network namespace on the host (shim.oci.netns): ``""`` a new one,
    a path to join, None (no ``network`` entry) none: the VM has only ``lo``."""
    namespace_paths: dict = field(default_factory=dict)
    """type → path of the other namespaces the config joins (a pod member's uts and ipc:
    shim.oci.pod.shared_namespaces)."""
    cgroups_path: str | None = None
    """``linux.cgroupsPath`` as given (checked by shim.oci.hostcgroup.parse_path)."""
    linux_resources: dict = field(default_factory=dict)
    """``linux.resources`` as given, for the host cgroup (shim.oci.hostcgroup)."""
    devices: list = field(default_factory=list)
    """``linux.devices`` as the guest makes them (guest.spec.check_devices entries, with
    the access ``linux.resources.devices`` gives each)."""


OS_ANNOTATION = "org.vmshim.os"


def check_id(container_id: str) -> str:
    """Raise BundleError unless *container_id* is a valid container id (runc's rule)."""
    if not ID_RE.match(container_id or "") or container_id in (".", ".."):
        raise BundleError(f"invalid container id {container_id!r}: use letters, digits, '_', '+', '-', '.'")
    return container_id


def load_bundle(bundle_dir: str | os.PathLike) -> Bundle:
    """Read and check ``<bundle_dir>/config.json``. Raises BundleError naming the field."""
    bundle = Path(bundle_dir).absolute()
    if not bundle.is_dir():
        raise BundleError(f"the bundle {bundle} is not a directory")
    path = bundle / "config.json"
    config = read_json_object(path, str(path), missing=f"the bundle {bundle} has no config.json")
    try:
        return parse_config(config, bundle)
    except ValueError as exc:
        raise BundleError(f"{path}: {exc}") from None


def read_json_object(path: str | os.PathLike, name: str, missing: str = "") -> dict:
    """The JSON object in the file *path* (at most MAX_CONFIG_BYTES), called *name* in
    errors; *missing*: the error when there is no such file. Raises BundleError."""
    try:
        data = read_json(path, MAX_CONFIG_BYTES)
    except FileNotFoundError as exc:
        raise BundleError(missing or f"cannot read {name}: {exc.strerror}") from None
    except OSError as exc:
        raise BundleError(f"cannot read {name}: {exc.strerror}") from None
    except ValueError as exc:
        raise BundleError(f"{name} {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{name} must hold a JSON object")
    return data


def parse_config(config: dict, bundle: Path) -> Bundle:
    """Translate a config.json object. Raises ValueError naming the bad field."""
    version = config.get("ociVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise ValueError("ociVersion must be a 1.x version string")
    root = _obj(config, "root")
    root_path = root.get("path")
    if not isinstance(root_path, str) or not root_path:
        raise ValueError("root.path must be a non-empty string")
    rootfs = Path(root_path) if os.path.isabs(root_path) else bundle / root_path
    if not rootfs.is_dir():
        raise ValueError(f"root.path {str(rootfs)!r} is not a directory")
    read_only = root.get("readonly", False)
    if not isinstance(read_only, bool):
        raise ValueError("root.readonly must be a boolean")
    notes: list[str] = []
    process, console_size = parse_process(_obj(config, "process", required=True), notes)
    linux = _obj(config, "linux")
    if linux.get("seccomp") is not None:
        process = process.replace(seccomp=_seccomp(linux["seccomp"], notes))
    hostname = config.get("hostname", "")
    if not isinstance(hostname, str) or len(hostname) > 64:
        raise ValueError("hostname must be a string of at most 64 characters")
    annotations = config.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ValueError("annotations must map strings to strings")
    os_flag = annotations.get(OS_ANNOTATION, "false")
    if os_flag not in ("true", "false"):
        raise ValueError(f'annotation {OS_ANNOTATION} must be "true" or "false"')
    out = Bundle(
        path=bundle,
        rootfs=rootfs.resolve(),
        process=process,
        hostname=hostname,
        read_only=read_only,
        annotations=dict(annotations),
        oci_version=version,
        console_size=console_size,
        notes=notes,
        os_container=os_flag == "true",
    )
    out.mounts = _mounts(config.get("mounts", []), bundle, notes)
    out.hooks = _hooks(config.get("hooks"))
    out.resources = _resources(linux.get("resources"), notes)
    out.cgroups_path = linux.get("cgroupsPath")
    out.linux_resources = dict(linux.get("resources") or {})
    out.devices = _devices(linux.get("devices"), out.linux_resources.get("devices"), notes)
    out.masked_paths = _paths(linux, "maskedPaths")
    out.readonly_paths = _paths(linux, "readonlyPaths")
    out.sysctl = _sysctl(linux)
    out.network_ns = _namespaces(linux.get("namespaces", []), notes)
    out.namespace_paths = {
        ns["type"]: ns["path"] for ns in linux.get("namespaces", []) if ns["type"] != "network" and ns.get("path")
    }
    maps = _id_mappings(linux)
    if maps is not None:
        out.process = out.process.replace(id_mappings=maps)
    _linux_rest(linux, notes)
    for key in ("solaris", "windows", "vm", "zos"):
        if key in config:
            notes.append(f"{key}: ignored (vmshim runs Linux containers in a Linux VM)")
    return out


# ---- parts --------------------------------------------------------------------------------


def _obj(parent: dict, name: str, required: bool = False) -> dict:
    value = parent.get(name)
    if value is None:
        if required:
            raise ValueError(f"{name} is required")
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object")
    return value


def _uint(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a non-negative integer")
    return value


def parse_process(process: dict, notes: list[str]) -> tuple[ProcessSpec, tuple[int, int] | None]:
    """An OCI process object (config.json's, or ``exec --process``) → (ProcessSpec,
    consoleSize as (rows, cols) or None); what is not applied is added to *notes*.
    Raises ValueError naming the bad field."""
    user = _obj(process, "user")
    uid = _uint(user.get("uid", 0), "process.user.uid")
    gid = _uint(user.get("gid", 0), "process.user.gid")
    extra = user.get("additionalGids") or []
    if not isinstance(extra, list):
        raise ValueError("process.user.additionalGids must be a list")
    extra = [_uint(g, "process.user.additionalGids[]") for g in extra]
    umask = user.get("umask")
    if umask is not None and (_uint(umask, "process.user.umask") > 0o777):
        raise ValueError("process.user.umask must be in 0..0o777")
    if user.get("username"):
        notes.append("process.user.username: ignored on Linux")
    rlimits = []
    for index, entry in enumerate(process.get("rlimits") or []):
        where = f"process.rlimits[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise ValueError(f"{where} must be an object with a type")
        name = entry["type"].lower().removeprefix("rlimit_")
        if name not in RLIMIT_NAMES:
            raise ValueError(f"{where}.type {entry['type']!r} is not an rlimit")
        hard = _rlimit_value(entry.get("hard"), f"{where}.hard")
        soft = _rlimit_value(entry.get("soft"), f"{where}.soft")
        rlimits.append([name, soft, hard])
    oom = process.get("oomScoreAdj")
    if oom is not None and (isinstance(oom, bool) or not isinstance(oom, int) or not -1000 <= oom <= 1000):
        raise ValueError("process.oomScoreAdj must be an integer in -1000..1000")
    caps = process.get("capabilities")
    if caps is not None:
        if not isinstance(caps, dict):
            raise ValueError("process.capabilities must be an object")
        unknown = set(caps) - set(CAP_SETS)
        if unknown:
            raise ValueError(f"process.capabilities has unknown set {sorted(unknown)[0]!r}")
        for name, values in caps.items():
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"process.capabilities.{name} must be a list of names")
            strange = [v for v in values if v not in CAPABILITIES]
            if strange:
                raise ValueError(f"process.capabilities.{name}: unknown capability {strange[0]!r}")
        # Every set explicit: a missing one is empty in OCI (a ProcessSpec with only
        # "bounding" means docker's rule instead, see guest.spec.ProcessSpec).
        caps = {k: list(caps.get(k, [])) for k in CAP_SETS}
    nnp = process.get("noNewPrivileges", False)
    if not isinstance(nnp, bool):
        raise ValueError("process.noNewPrivileges must be a boolean")
    spec = ProcessSpec.from_dict(
        {
            "args": process.get("args"),
            "env": process.get("env") or [],
            "cwd": process.get("cwd", "/"),
            "user": f"{uid}:{gid}",
            "tty": process.get("terminal", False),
            "rlimits": rlimits,
            "oom_score_adj": oom,
            "capabilities": caps,
            "no_new_privs": nnp,
            "additional_gids": [g for g in extra if g != gid],
            "umask": umask,
        }
    )
    console = None
    if process.get("consoleSize") is not None:
        size = _obj(process, "consoleSize")
        console = (
            _uint(size.get("height", 24), "process.consoleSize.height") or 24,
            _uint(size.get("width", 80), "process.consoleSize.width") or 80,
        )
    for key in ("apparmorProfile", "selinuxLabel", "ioPriority", "scheduler", "execCPUAffinity"):
        if process.get(key):
            notes.append(f"process.{key}: not applied inside the VM")
    return spec, console


def _objects(items: list, name: str):
    """(``name[i]``, item) for each item of the list *items*, in order; raises ValueError
    at the first that is not an object."""
    for index, item in enumerate(items):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object")
        yield where, item


def _rlimit_value(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a non-negative integer")
    return -1 if value >= (1 << 63) - 1 else value


def _mounts(mounts, bundle: Path, notes: list[str]) -> list:
    from shim.volumes.specs import MountRequest

    if not isinstance(mounts, list):
        raise ValueError("mounts must be a list")
    out = []
    for where, mount in _objects(mounts, "mounts"):
        target = mount.get("destination")
        if not isinstance(target, str) or not target.startswith("/"):
            raise ValueError(f"{where}.destination must be an absolute path")
        target = os.path.normpath(target)
        options = mount.get("options") or []
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{where}.options must be a list of strings")
        kind = mount.get("type") or ("bind" if {"bind", "rbind"} & set(options) else "")
        source = mount.get("source", "")
        if not isinstance(source, str):
            raise ValueError(f"{where}.source must be a string")
        readonly = "ro" in options
        moving = sorted(set(options) & PROPAGATION)
        if moving:
            notes.append(
                f"mount on {target}: propagation {','.join(moving)} is not applied "
                "(mounts stay private to the container: no mount event crosses "
                "the VM's wall)"
            )
        if target in GUEST_MADE_MOUNTS and kind != "bind":
            continue  # the guest makes it for every container
        if kind == "bind":
            if not os.path.isabs(source):
                source = str(bundle / source)
            if not os.path.exists(source):
                raise ValueError(f"{where}.source {source!r} does not exist")
            if not (os.path.isdir(source) or os.path.isfile(source)):
                notes.append(
                    f"mount on {target}: only directories and regular files can "
                    f"be shared into a VM; {source} is skipped"
                )
                continue
            out.append(MountRequest(type="bind", target=target, source=source, readonly=readonly))
        elif kind == "tmpfs":
            data = ",".join(
                o for o in options if "=" in o and o.split("=")[0] in ("size", "mode", "nr_inodes", "uid", "gid")
            )
            out.append(MountRequest(type="tmpfs", target=target, readonly=readonly, options=data))
        else:
            notes.append(f"mount on {target}: type {kind or '(none)'!r} is not supported in a VM; skipped")
    return out


def _hooks(hooks) -> dict:
    if hooks is None:
        return {}
    if not isinstance(hooks, dict):
        raise ValueError("hooks must be an object")
    out = {}
    for kind, entries in hooks.items():
        if kind not in HOOK_KINDS:
            raise ValueError(f"hooks.{kind} is not a hook kind")
        if not isinstance(entries, list):
            raise ValueError(f"hooks.{kind} must be a list")
        parsed = []
        for index, entry in enumerate(entries):
            where = f"hooks.{kind}[{index}]"
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("path"), str)
                or not os.path.isabs(entry["path"])
            ):
                raise ValueError(f"{where}.path must be an absolute path")
            for name in ("args", "env"):
                value = entry.get(name) or []
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{where}.{name} must be a list of strings")
            timeout = entry.get("timeout")
            if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0):
                raise ValueError(f"{where}.timeout must be a positive integer")
            parsed.append(Hook.from_dict(entry))
        out[kind] = parsed
    return out


def _resources(resources, notes: list[str]) -> Resources:
    out = Resources()
    if resources is None:
        return out
    if not isinstance(resources, dict):
        raise ValueError("linux.resources must be an object")
    memory = _obj(resources, "memory")
    if memory.get("limit") is not None and memory["limit"] > 0:
        out.memory = _uint(memory["limit"], "linux.resources.memory.limit")
    if memory.get("reservation") is not None and memory["reservation"] > 0:
        out.memory_reservation = _uint(memory["reservation"], "linux.resources.memory.reservation")
    if memory.get("swap") is not None and memory["swap"] > 0:
        out.memory_swap = _uint(memory["swap"], "linux.resources.memory.swap")
    cpu = _obj(resources, "cpu")
    quota, period = cpu.get("quota"), cpu.get("period")
    if isinstance(quota, int) and quota > 0:
        period = period if isinstance(period, int) and period > 0 else 100000
        out.nano_cpus = quota * 1_000_000_000 // period
    if isinstance(cpu.get("shares"), int) and cpu["shares"] > 0:
        out.cpu_shares = max(2, min(262144, cpu["shares"]))
    pids = _obj(resources, "pids")
    if isinstance(pids.get("limit"), int) and pids["limit"] > 0:
        out.pids_limit = pids["limit"]
    block = _obj(resources, "blockIO")
    if isinstance(block.get("weight"), int) and block["weight"] > 0:
        out.blkio_weight = max(10, min(1000, block["weight"]))
    for key in ("hugepageLimits", "network", "rdma"):
        if resources.get(key):
            notes.append(f"linux.resources.{key}: not applied in the VM")
    return out


MAX_DEVICES = 64


def _devices(devices, rules, notes: list[str]) -> list[dict]:
    """``linux.devices`` → guest.spec.check_devices entries: the guest makes each node
    (its kernel's device of that number) with its mode and owner, and lets the container
    use it as ``linux.resources.devices`` allows (in order, the last match wins; ``m``
    at least, the node exists). Raises ValueError naming the bad entry."""
    from guest.spec import check_devices

    if devices is None:
        devices = []
    if not isinstance(devices, list) or len(devices) > MAX_DEVICES:
        raise ValueError(f"linux.devices must be a list of at most {MAX_DEVICES}")
    rules = rules or []
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ValueError("linux.resources.devices must be a list of objects")
    out = []
    for where, device in _objects(devices, "linux.devices"):
        kind = device.get("type")
        if kind == "p":
            notes.append(f"{where}: FIFOs are not made in the VM; {device.get('path')} skipped")
            continue
        if kind not in ("c", "u", "b"):
            raise ValueError(f"{where}.type must be c, u, b or p")
        kind = "c" if kind == "u" else kind
        entry = {
            "path": device.get("path"),
            "type": kind,
            "major": device.get("major"),
            "minor": device.get("minor"),
            "permissions": _access(rules, kind, device.get("major"), device.get("minor")),
        }
        for key, name in (("fileMode", "mode"), ("uid", "uid"), ("gid", "gid")):
            if device.get(key) is not None:
                entry[name] = device[key]
        if "mode" in entry and isinstance(entry["mode"], int):
            entry["mode"] &= 0o7777
        try:
            out += check_devices([entry])
        except ValueError:
            raise ValueError(
                f"{where} must have an absolute path, type c|u|b|p, major and "
                "minor below 2^20, fileMode, uid and gid in range"
            ) from None
    allowed = [r for r in rules if r.get("allow")]
    listed = {(d["type"], d["major"], d["minor"]) for d in out}
    extra = [r for r in allowed if (r.get("type"), r.get("major"), r.get("minor")) not in listed]
    if extra:
        notes.append(
            "linux.resources.devices: allow rules for devices not in linux.devices "
            "are not applied; the guest's default devices plus linux.devices are "
            "the container's"
        )
    return out


def _access(rules: list, kind: str, major, minor) -> str:
    """What the device cgroup rules (in order) allow on one device; at least ``m``."""
    access: set[str] = set()
    for rule in rules:
        if rule.get("type", "a") not in ("a", kind):
            continue
        if rule.get("major") not in (None, -1, major) or rule.get("minor") not in (None, -1, minor):
            continue
        letters = set(str(rule.get("access") or "rwm")) & set("rwm")
        access = access | letters if rule.get("allow") else access - letters
    return "".join(c for c in "rwm" if c in access) or "m"


def _namespaces(namespaces, notes: list[str]) -> str | None:
    """Check linux.namespaces; return the network namespace (Bundle.network_ns)."""
    if not isinstance(namespaces, list):
        raise ValueError("linux.namespaces must be a list")
    network = None
    for index, ns in enumerate(namespaces):
        if not isinstance(ns, dict) or ns.get("type") not in SUPPORTED_NAMESPACES:
            raise ValueError(f"linux.namespaces[{index}].type must be one of {', '.join(SUPPORTED_NAMESPACES)}")
        path = ns.get("path") or ""
        if not isinstance(path, str) or (path and not os.path.isabs(path)) or "\0" in path:
            raise ValueError(f"linux.namespaces[{index}].path must be an absolute path")
        if ns["type"] == "network":
            if network is not None:
                raise ValueError("linux.namespaces: the network namespace is named twice")
            network = path
        elif path:
            notes.append(
                f"linux.namespaces: joining the {ns['type']} namespace "
                f"{path} is not possible from a VM; the VM has its own"
            )
    return network  # None: the engine's own network, which a VM cannot share: only lo


def _id_mappings(linux: dict) -> dict | None:
    """A new ``user`` namespace with ``uidMappings``/``gidMappings`` → the process's
    ``id_mappings`` (the guest makes the namespace); None without one. Raises ValueError
    for maps without the namespace or the other way round, as runc does."""
    from guest.spec import check_id_mappings

    user_ns = any(
        isinstance(ns, dict) and ns.get("type") == "user" and not ns.get("path") for ns in linux.get("namespaces") or []
    )
    given = {kind: linux.get(f"{kind}Mappings") for kind in ("uid", "gid")}
    if not user_ns:
        if any(given.values()):
            raise ValueError("linux.uidMappings/gidMappings need a new user namespace in linux.namespaces")
        return None
    if not all(given.values()):
        raise ValueError("linux.namespaces has a user namespace: uidMappings and gidMappings are needed")
    maps = {}
    for kind, entries in given.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"linux.{kind}Mappings must be a list of objects")
        maps[kind] = [[e.get("containerID"), e.get("hostID"), e.get("size")] for e in entries]
    try:
        return check_id_mappings(maps)
    except ValueError as exc:
        raise ValueError(f"linux.uidMappings/gidMappings: {exc}") from None


def _paths(linux: dict, name: str) -> list | None:
    value = linux.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > 256
        or not all(isinstance(p, str) and p.startswith("/") and ".." not in p.split("/") for p in value)
    ):
        raise ValueError(f"linux.{name} must be a list of absolute paths")
    return list(value)


def _sysctl(linux: dict) -> dict:
    value = linux.get("sysctl") or {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and re.match(r"^[a-z0-9_.-]+$", k) for k, v in value.items()
    ):
        raise ValueError("linux.sysctl must map sysctl names to string values")
    return dict(value)


def _seccomp(value, notes: list[str]) -> dict:
    """OCI ``linux.seccomp`` → the object guest.runtime.seccomp compiles (only the fields
    it reads). Raises ValueError naming what is wrong."""
    from guest.runtime.seccomp import SeccompError, check

    if not isinstance(value, dict):
        raise ValueError("linux.seccomp must be an object")
    if value.get("listenerPath") or value.get("defaultAction") == "SCMP_ACT_NOTIFY":
        raise ValueError("linux.seccomp: user notification (SCMP_ACT_NOTIFY) is not supported")
    if value.get("flags"):
        notes.append(f"linux.seccomp.flags {value['flags']}: not applied")
    out = {k: value[k] for k in ("defaultAction", "defaultErrnoRet", "architectures") if value.get(k) is not None}
    rules = value.get("syscalls") or []
    if not isinstance(rules, list):
        raise ValueError("linux.seccomp.syscalls must be a list")
    out["syscalls"] = []
    for rule in rules:
        if not isinstance(rule, dict):
            raise ValueError("linux.seccomp.syscalls entries must be objects")
        if rule.get("action") == "SCMP_ACT_NOTIFY":
            raise ValueError("linux.seccomp: user notification (SCMP_ACT_NOTIFY) is not supported")
        kept = {k: rule[k] for k in ("names", "action", "errnoRet") if rule.get(k) is not None}
        if rule.get("args"):
            kept["args"] = [
                {k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a} if isinstance(a, dict) else a
                for a in rule["args"]
            ]
        out["syscalls"].append(kept)
    try:
        return check(out)
    except SeccompError as exc:
        raise ValueError(f"linux.{exc}") from None


def _linux_rest(linux: dict, notes: list[str]) -> None:
    for key in ("intelRdt", "personality", "mountLabel", "timeOffsets"):
        if linux.get(key):
            notes.append(f"linux.{key}: not applied in the VM")
    if linux.get("rootfsPropagation") not in (None, "", "private", "rprivate"):
        notes.append(
            f"linux.rootfsPropagation {linux['rootfsPropagation']}: not applied (the container's mounts are private)"
        )


def default_config(args: list[str] | None = None, terminal: bool = True) -> dict:
    """A starting config.json (``vmshim-runtime spec``), like ``runc spec``'s: root
    ``rootfs`` read-only, a shell as root with three capabilities, no new privileges."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.1.0",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": list(args or ["sh"]),
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "vmshim",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
