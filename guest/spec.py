"""What a container is, as both placements of the runtime see it. Stdlib only.

Plain classes, not dataclasses: importing ``dataclasses`` costs ~100 ms of the guest's
boot under TCG, on the path to the agent's hello.

The host fills a :class:`BootConfig` and writes it as ``config.json`` on the config drive
(VM isolation) or hands it to the runtime directly (process isolation). The agent reads it
at boot, before the host has said anything, so it can mount the rootfs straight away.
"""

from __future__ import annotations

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from typing import Any, TypeVar

    _R = TypeVar("_R", bound="_Record")


CONFIG_DRIVE_SERIAL = "vmshim-config"
POOL_CMDLINE_FLAG = "vmshim.pool"
"""On a guest's kernel command line: a pooled VM, which boots without a config drive and
waits for the host's ``spec`` message (guest.protocol) to become one container."""
"""``<serial>`` of the config-drive disk; the agent finds it in /sys/block/*/serial."""
WRITABLE_SERIAL = "vmshim-rw"
"""``<serial>`` of the writable-layer disk (ext4), when the container has one."""
LAYER_SERIAL_PREFIX = "vmshim-l"
"""Layer disks are ``vmshim-l0`` (lowest) … ``vmshim-lN`` (topmost)."""
VOLUME_SERIAL_PREFIX = "vmshim-v"
"""Volume disks are ``vmshim-v0`` … (a MountSpec of type volume names its serial)."""
SHARE_TAG_PREFIX = "vmshim-b"
"""virtiofs tags of bind mounts are ``vmshim-b0`` … (a bind MountSpec names its tag)."""
ROOTFS_SHARE_TAG = "vmshim-root"
"""virtiofs tag of a host directory used as the whole rootfs (an OCI bundle's root.path:
vmshim-runtime); BootConfig ``rootfs_share`` names it."""
AGENT_PORT_NAME = "org.vmshim.agent"
"""virtio-serial port name the agent opens (/sys/class/virtio-ports/*/name)."""


class _Record:
    """Keyword construction, equality and repr from ``_fields`` (name → default)."""

    _fields: dict[str, object] = {}

    def __init__(self, **values: object) -> None:
        unknown = set(values) - set(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        for name, default in self._fields.items():
            if name in values:
                value = values[name]
            elif default is _REQUIRED:
                raise TypeError(f"{type(self).__name__} needs {name!r}")
            else:
                value = default() if callable(default) else default
            setattr(self, name, value)

    def replace(self: _R, **changes: object) -> _R:
        """A copy with *changes* applied (like dataclasses.replace)."""
        values = {n: getattr(self, n) for n in self._fields}
        values.update(changes)
        return type(self)(**values)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, n) == getattr(other, n) for n in self._fields)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields)
        return f"{type(self).__name__}({inner})"


_REQUIRED = object()


class ProcessSpec(_Record):
    """One process to run in the container.

    ``user`` is ``uid[:gid]`` or a name from the image's /etc/passwd (resolved inside the
    rootfs, never on the host). ``env`` is a list of ``K=V`` strings, OCI style.
    ``rlimits`` is a list of ``[name, soft, hard]`` (``name`` one of :data:`RLIMIT_NAMES`,
    -1 = unlimited), set before the exec (docker's ``--ulimit``, OCI ``process.rlimits``);
    ``oom_score_adj`` (-1000..1000 or None: inherited) is written to
    /proc/self/oom_score_adj (OCI ``process.oomScoreAdj``).

    Set by vmshim-runtime from an OCI process (None / empty: as before, root's full set):
    ``capabilities`` maps ``bounding``/``effective``/``permitted``/``inheritable``/
    ``ambient`` to lists of names (``CAP_CHOWN`` …, see :data:`CAPABILITIES`);
    ``no_new_privs`` sets PR_SET_NO_NEW_PRIVS; ``additional_gids`` are added to the
    supplementary groups; ``umask`` (0..0o777) is set before the exec.
    ``capabilities`` with only ``bounding`` (what ``vmshim run`` sends: docker's rule) gives
    a root process that set as effective and permitted, and any other user none.

    ``seccomp`` (None: no filter) is ``"default"`` (guest.runtime.seccomp_default,
    resolved against the bounding set) or an OCI ``linux.seccomp`` object (checked by
    guest.runtime.seccomp.check).

    ``id_mappings`` (None: no user namespace) is ``{"uid": [[container, host, size], …],
    "gid": […]}`` (OCI ``linux.uidMappings``/``gidMappings``): the container gets a new
    user namespace with these maps ("host" ids are the guest kernel's, which are the ids
    files carry through virtiofs). Only for a container's first process.
    """

    args: list[str]
    env: list[str]
    cwd: str
    user: str
    tty: bool
    rlimits: list[list[Any]]
    oom_score_adj: int | None
    capabilities: dict[str, list[str]] | None
    no_new_privs: bool
    additional_gids: list[int]
    umask: int | None
    seccomp: object
    id_mappings: dict[str, list[list[int]]] | None
    """Declared for the type checker (the values come from ``_fields``)."""

    _fields = {
        "args": _REQUIRED,
        "env": list,
        "cwd": "/",
        "user": "",
        "tty": False,
        "rlimits": list,
        "oom_score_adj": None,
        "capabilities": None,
        "no_new_privs": False,
        "additional_gids": list,
        "umask": None,
        "seccomp": None,
        "id_mappings": None,
    }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProcessSpec":
        """Build from untrusted JSON; raises ValueError naming the bad field."""
        args = data.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise ValueError("process.args must be a non-empty list of strings")
        env = data.get("env", [])
        if not isinstance(env, list) or not all(isinstance(e, str) and "=" in e for e in env):
            raise ValueError("process.env must be a list of K=V strings")
        cwd = data.get("cwd", "/")
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise ValueError("process.cwd must be an absolute path")
        user = data.get("user", "")
        if not isinstance(user, str):
            raise ValueError("process.user must be a string")
        tty = data.get("tty", False)
        if not isinstance(tty, bool):
            raise ValueError("process.tty must be a boolean")
        rlimits = data.get("rlimits", [])
        if (
            not isinstance(rlimits, list)
            or len(rlimits) > len(RLIMIT_NAMES)
            or not all(
                isinstance(r, list)
                and len(r) == 3
                and r[0] in RLIMIT_NAMES
                and all(_is_int(v) and v >= -1 for v in r[1:])
                for r in rlimits
            )
        ):
            raise ValueError("process.rlimits must be a list of [name, soft, hard]")
        oom = data.get("oom_score_adj")
        if oom is not None and not (_is_int(oom) and -1000 <= oom <= 1000):
            raise ValueError("process.oom_score_adj must be an integer in -1000..1000")
        caps = data.get("capabilities")
        if caps is not None and (
            not isinstance(caps, dict)
            or not set(caps) <= set(CAP_SETS)
            or not all(isinstance(v, list) and all(c in CAPABILITIES for c in v) for v in caps.values())
        ):
            raise ValueError("process.capabilities must map capability sets to known capability names")
        nnp = data.get("no_new_privs", False)
        if not isinstance(nnp, bool):
            raise ValueError("process.no_new_privs must be a boolean")
        gids = data.get("additional_gids", [])
        if not isinstance(gids, list) or len(gids) > 256 or not all(_is_int(g) and 0 <= g < 1 << 32 for g in gids):
            raise ValueError("process.additional_gids must be a list of gids")
        umask = data.get("umask")
        if umask is not None and not (_is_int(umask) and 0 <= umask <= 0o777):
            raise ValueError("process.umask must be an integer in 0..0o777")
        seccomp = data.get("seccomp")
        if seccomp is not None and seccomp != "default":
            from guest.runtime.seccomp import SeccompError, check

            try:
                check(seccomp)
            except SeccompError as exc:
                raise ValueError(f"process.seccomp: {exc}") from None
        maps = data.get("id_mappings")
        if maps is not None:
            maps = check_id_mappings(maps)
        return cls(
            args=list(args),
            env=list(env),
            cwd=cwd,
            user=user,
            tty=tty,
            rlimits=[list(r) for r in rlimits],
            oom_score_adj=oom,
            capabilities={k: list(v) for k, v in caps.items()} if caps is not None else None,
            no_new_privs=nnp,
            additional_gids=list(gids),
            umask=umask,
            seccomp=seccomp,
            id_mappings=maps,
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "args": list(self.args),
            "env": list(self.env),
            "cwd": self.cwd,
            "user": self.user,
            "tty": self.tty,
        }
        if self.rlimits:  # only when set: older readers never see them
            data["rlimits"] = [list(r) for r in self.rlimits]
        if self.oom_score_adj is not None:
            data["oom_score_adj"] = self.oom_score_adj
        if self.capabilities is not None:
            data["capabilities"] = {k: list(v) for k, v in self.capabilities.items()}
        if self.no_new_privs:
            data["no_new_privs"] = True
        if self.additional_gids:
            data["additional_gids"] = list(self.additional_gids)
        if self.umask is not None:
            data["umask"] = self.umask
        if self.seccomp is not None:
            data["seccomp"] = self.seccomp
        if self.id_mappings is not None:
            data["id_mappings"] = {k: [list(m) for m in v] for k, v in self.id_mappings.items()}
        return data


MAX_ID_MAPPINGS = 340
"""The kernel's limit of lines in a uid_map or gid_map."""


def check_id_mappings(maps: object) -> dict[str, list[list[int]]]:
    """Validate ``id_mappings`` (untrusted JSON, see ProcessSpec); return a copy. Raises
    ValueError."""
    if not isinstance(maps, dict) or set(maps) != {"uid", "gid"}:
        raise ValueError("process.id_mappings must have uid and gid lists")
    out = {}
    for kind in ("uid", "gid"):
        entries = maps[kind]
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_ID_MAPPINGS:
            raise ValueError(f"process.id_mappings.{kind} must list 1 to {MAX_ID_MAPPINGS} mappings")
        for entry in entries:
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and all(_is_int(v) and 0 <= v < 1 << 32 for v in entry)
                and entry[2] > 0
                and entry[0] + entry[2] <= 1 << 32
                and entry[1] + entry[2] <= 1 << 32
            ):
                raise ValueError(f"process.id_mappings.{kind}: each mapping is [container, host, size] within 0..2^32")
        out[kind] = [list(e) for e in entries]
    return out


RLIMIT_NAMES = (
    "core",
    "cpu",
    "data",
    "fsize",
    "locks",
    "memlock",
    "msgqueue",
    "nice",
    "nofile",
    "nproc",
    "rss",
    "rtprio",
    "rttime",
    "sigpending",
    "stack",
    "as",
)
"""``--ulimit`` names (docker's, plus ``as``); ``RLIMIT_<NAME>`` in the resource module."""

CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
"""Linux capability names; the index is the capability's number."""
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)
"""Docker's default capability set (CapEff 00000000a80425fb for root)."""
CAP_SETS = ("bounding", "effective", "permitted", "inheritable", "ambient")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Limits(_Record):
    """Limits of the container's cgroup, as both placements apply them (see
    guest.runtime.cgroups.Cgroup.set_limits). In every field 0 (or "" or []) means "not
    given": on creation no limit, on update "leave as it is"; -1 means "no limit" where
    a field allows it (memory, memory_swap, cpu_quota, pids).

    - ``memory``: bytes (memory.max; v1 memory.limit_in_bytes)
    - ``memory_swap``: bytes of memory + swap (docker's ``--memory-swap``); 0 with a memory
      limit means no swap at all
    - ``memory_reservation``: bytes (memory.low; v1 memory.soft_limit_in_bytes)
    - ``cpu_quota`` / ``cpu_period``: µs of CPU time per period (cpu.max; v1 cfs_quota_us);
      period 0 means 100000
    - ``cpu_shares``: docker's relative weight 2..262144 (v2 cpu.weight, converted)
    - ``cpuset_cpus``: ``"0-1,3"``
    - ``pids``: pids.max
    - ``blkio_weight``: 10..1000 (v2 io.weight, converted; v1 blkio.weight)
    - ``device_read_bps`` / ``device_write_bps``: ``[[device, bytes per second]]`` where
      device is ``"MAJ:MIN"``, an absolute path of a block device, or ``"*"`` (every
      virtio disk: the container's own disks in a VM)
    """

    memory: int
    memory_swap: int
    memory_reservation: int
    cpu_quota: int
    cpu_period: int
    cpu_shares: int
    cpuset_cpus: str
    pids: int
    blkio_weight: int
    device_read_bps: list[list[Any]]
    device_write_bps: list[list[Any]]
    """Declared for the type checker (the values come from ``_fields``)."""

    _fields = {
        "memory": 0,
        "memory_swap": 0,
        "memory_reservation": 0,
        "cpu_quota": 0,
        "cpu_period": 0,
        "cpu_shares": 0,
        "cpuset_cpus": "",
        "pids": 0,
        "blkio_weight": 0,
        "device_read_bps": list,
        "device_write_bps": list,
    }

    _INTS = (
        "memory",
        "memory_swap",
        "memory_reservation",
        "cpu_quota",
        "cpu_period",
        "cpu_shares",
        "pids",
        "blkio_weight",
    )

    def is_empty(self) -> bool:
        return self == Limits()

    def to_dict(self) -> dict[str, Any]:
        """Only the fields that are set."""
        empty = Limits()
        return {n: getattr(self, n) for n in self._fields if getattr(self, n) != getattr(empty, n)}

    @classmethod
    def from_dict(cls, data: object) -> "Limits":
        """Build from untrusted JSON; raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError("limits must be a JSON object")
        unknown = set(data) - set(cls._fields)
        if unknown:
            raise ValueError(f"unknown limit {sorted(unknown)[0]!r}")
        out = {}
        for name in cls._INTS:
            if name in data:
                value = data[name]
                if not _is_int(value) or value < -1:
                    raise ValueError(f"limit {name!r} must be an integer >= -1")
                out[name] = value
        if "cpuset_cpus" in data:
            value = data["cpuset_cpus"]
            if not isinstance(value, str) or len(value) > 256 or any(c not in "0123456789,-" for c in value):
                raise ValueError("limit 'cpuset_cpus' must look like 0-1,3")
            out["cpuset_cpus"] = value
        for name in ("device_read_bps", "device_write_bps"):
            if name in data:
                value = data[name]
                if (
                    not isinstance(value, list)
                    or len(value) > 64
                    or not all(
                        isinstance(e, list)
                        and len(e) == 2
                        and isinstance(e[0], str)
                        and 0 < len(e[0]) < 256
                        and _is_int(e[1])
                        and e[1] >= 0
                        for e in value
                    )
                ):
                    raise ValueError(f"limit {name!r} must be a list of [device, rate]")
                out[name] = [list(e) for e in value]
        return cls(**out)


class MountSpec(_Record):
    """One mount into the container's rootfs, made before the process starts.

    ``type``: ``bind`` (a host directory), ``volume`` (a named volume: an ext4 disk image
    whose ``data`` directory is mounted) or ``tmpfs``. ``source`` is where the runtime
    finds it, which depends on the placement: in a VM the virtiofs tag (bind) or the disk
    serial (volume); on the host a path (bind) or the already mounted volume's directory;
    empty for tmpfs. ``target`` is absolute, inside the container. ``options`` is the
    tmpfs mount data (``size=…,mode=…``). ``copy_up``: the volume is new, fill it with
    what the image has at ``target`` (docker's behaviour). ``subpath`` (bind, VM only):
    mount this entry of the shared directory instead of all of it (a single-file bind:
    the host shares the file's directory).
    """

    type: str
    source: str
    target: str
    readonly: bool
    options: str
    copy_up: bool
    subpath: str
    """Declared for the type checker (the values come from ``_fields``)."""

    _fields = {
        "type": _REQUIRED,
        "source": "",
        "target": _REQUIRED,
        "readonly": False,
        "options": "",
        "copy_up": False,
        "subpath": "",
    }

    TYPES = ("bind", "volume", "tmpfs")

    def to_dict(self) -> dict[str, Any]:
        data = {n: getattr(self, n) for n in self._fields}
        if not self.subpath:
            del data["subpath"]  # an older agent never sees a field it does not know
        return data

    @classmethod
    def from_dict(cls, data: object) -> "MountSpec":
        """Build from untrusted JSON; raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError("a mount must be a JSON object")
        kind = data.get("type")
        if kind not in cls.TYPES:
            raise ValueError(f"mount type must be one of {', '.join(cls.TYPES)}")
        out = {"type": kind}
        for name in ("source", "target", "options", "subpath"):
            value = data.get(name, "")
            if not isinstance(value, str) or len(value) > 4096 or "\0" in value:
                raise ValueError(f"mount field {name!r} must be a string")
            out[name] = value
        if not out["target"].startswith("/"):
            raise ValueError("mount target must be an absolute path")
        if out["subpath"] and (out["subpath"].startswith("/") or ".." in out["subpath"].split("/")):
            raise ValueError("mount subpath must be relative and stay inside the share")
        for name in ("readonly", "copy_up"):
            value = data.get(name, False)
            if not isinstance(value, bool):
                raise ValueError(f"mount field {name!r} must be a boolean")
            out[name] = value
        return cls(**out)


SANDBOX_NAMESPACES = ("uts", "ipc")
"""Namespaces a pod member may share with its sandbox's container (BootConfig
``sandbox_namespaces``; guest.runtime.member)."""


class BootConfig(_Record):
    """Everything the agent needs at boot; serialised to the config drive.

    ``writable`` is ``"tmpfs"`` (a throw-away upper layer in guest RAM) or ``"disk"``
    (the disk with WRITABLE_SERIAL); ``memory_limit`` is bytes for the container's cgroup
    memory.max (0: no limit); ``pids_limit`` likewise for pids.max.

    ``network`` (VM isolation) says how the agent configures the VM's NICs before the
    container starts; ``{}`` (the default, and ``--network none``) leaves only ``lo``::

        {"interfaces": [{"mac": "02:42:0a:58:00:02", "address": "10.88.0.2/16",
                         "gateway": "10.88.0.1", "mtu": 1500}]}

    Each interface is found by its MAC; ``gateway`` (at most one interface) becomes the
    default route; ``mtu`` is optional. ``dns_relay`` (optional, loopback addresses such
    as docker's ``127.0.0.11``) are nameservers that exist only in the container's network
    namespace on the host: the agent relays queries to them (guest.runtime.dnsrelay).
    Checked by :func:`check_network`.

    ``limits`` (a :class:`Limits`, optional) carries every cgroup limit; when given it is
    used instead of ``memory_limit``/``pids_limit`` (see :meth:`cgroup_limits`).
    ``mounts`` are :class:`MountSpec` s, made in list order; ``read_only`` makes the
    container's rootfs read-only (docker's ``--read-only``). ``rootfs_share`` (a virtiofs
    tag, :data:`ROOTFS_SHARE_TAG`) makes a shared host directory the rootfs instead of
    layers + overlay (``layer_count`` is then 0). ``masked_paths`` / ``readonly_paths``
    (OCI's, from vmshim-runtime) replace the guest's default lists (guest.runtime.rootfs);
    None keeps them. ``sysctl`` (``{"net.ipv4.ip_forward": "1"}``) is written to
    /proc/sys at boot: the VM's kernel is the container's alone, so any key may be set.
    ``os`` makes it an OS container: ``process`` is the image's init (systemd), run as
    PID 1 of the container with what an init needs (guest.runtime.osinit).
    ``sandbox_namespaces`` (a pod member only): of :data:`SANDBOX_NAMESPACES`, those it
    shares with the sandbox's container instead of having its own.
    """

    container_id: str
    token: str
    hostname: str
    process: ProcessSpec
    layer_count: int
    writable: str
    hosts: str
    resolv_conf: str
    memory_limit: int
    pids_limit: int
    network: dict[str, Any]
    limits: Limits | None
    mounts: list[MountSpec]
    read_only: bool
    rootfs_share: str
    masked_paths: list[str] | None
    readonly_paths: list[str] | None
    sysctl: dict[str, str]
    privileged: bool
    devices: list[dict[str, Any]]
    os: bool
    sandbox_namespaces: list[str]
    """Declared for the type checker (the values come from ``_fields``)."""

    _fields = {
        "container_id": _REQUIRED,
        "token": _REQUIRED,
        "hostname": _REQUIRED,
        "process": _REQUIRED,
        "layer_count": _REQUIRED,
        "writable": "tmpfs",
        "hosts": "",
        "resolv_conf": "",
        "memory_limit": 0,
        "pids_limit": 0,
        "network": dict,
        "limits": None,
        "mounts": list,
        "read_only": False,
        "rootfs_share": "",
        "masked_paths": None,
        "readonly_paths": None,
        "sysctl": dict,
        "privileged": False,
        "devices": list,
        "os": False,
        "sandbox_namespaces": list,
    }

    def cgroup_limits(self) -> Limits:
        """The limits to apply: ``limits``, or else the two shorthand fields."""
        if self.limits is not None:
            return self.limits
        return Limits(memory=self.memory_limit, pids=self.pids_limit)

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self._fields}
        data["process"] = self.process.to_dict()
        if not self.network:
            del data["network"]  # an older agent never sees a field it does not know
        for name in (
            "limits",
            "mounts",
            "read_only",
            "rootfs_share",
            "sysctl",
            "privileged",
            "devices",
            "os",
            "sandbox_namespaces",
        ):  # likewise
            if not data[name]:
                del data[name]
        for name in ("masked_paths", "readonly_paths"):
            if data[name] is None:
                del data[name]
        if self.limits is not None:
            data["limits"] = self.limits.to_dict()
        if self.mounts:
            data["mounts"] = [m.to_dict() for m in self.mounts]
        return data

    @classmethod
    def from_dict(cls, data: object) -> "BootConfig":
        """Build from the config drive's JSON; raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError("boot config must be a JSON object")
        out = {}
        for name, kind in (
            ("container_id", str),
            ("token", str),
            ("hostname", str),
            ("layer_count", int),
            ("writable", str),
            ("hosts", str),
            ("resolv_conf", str),
            ("memory_limit", int),
            ("pids_limit", int),
            ("rootfs_share", str),
        ):
            if name in data:
                if not isinstance(data[name], kind) or isinstance(data[name], bool):
                    raise ValueError(f"boot config field {name!r} has the wrong type")
                out[name] = data[name]
        for name in ("container_id", "token", "hostname", "layer_count"):
            if name not in out:
                raise ValueError(f"boot config lacks {name!r}")
        if out.get("writable", "tmpfs") not in ("tmpfs", "disk"):
            raise ValueError("boot config field 'writable' must be 'tmpfs' or 'disk'")
        out["process"] = ProcessSpec.from_dict(data.get("process") or {})
        if "network" in data:
            out["network"] = check_network(data["network"])
        if data.get("limits") is not None:
            out["limits"] = Limits.from_dict(data["limits"])
        mounts = data.get("mounts", [])
        if not isinstance(mounts, list) or len(mounts) > 256:
            raise ValueError("boot config field 'mounts' must be a list")
        out["mounts"] = [MountSpec.from_dict(m) for m in mounts]
        if not isinstance(data.get("read_only", False), bool):
            raise ValueError("boot config field 'read_only' must be a boolean")
        out["read_only"] = data.get("read_only", False)
        for name in ("masked_paths", "readonly_paths"):
            value = data.get(name)
            if value is None:
                continue
            if (
                not isinstance(value, list)
                or len(value) > 256
                or not all(
                    isinstance(p, str) and p.startswith("/") and "\0" not in p and ".." not in p.split("/")
                    for p in value
                )
            ):
                raise ValueError(f"boot config field {name!r} must be a list of absolute paths")
            out[name] = list(value)
        sysctl = data.get("sysctl", {})
        if (
            not isinstance(sysctl, dict)
            or len(sysctl) > 256
            or not all(
                isinstance(k, str) and isinstance(v, str) and k and "/" not in k and ".." not in k and "\0" not in k + v
                for k, v in sysctl.items()
            )
        ):
            raise ValueError("boot config field 'sysctl' must map sysctl names to strings")
        out["sysctl"] = dict(sysctl)
        if not isinstance(data.get("privileged", False), bool):
            raise ValueError("boot config field 'privileged' must be a boolean")
        out["privileged"] = data.get("privileged", False)
        if not isinstance(data.get("os", False), bool):
            raise ValueError("boot config field 'os' must be a boolean")
        out["os"] = data.get("os", False)
        out["devices"] = check_devices(data.get("devices", []))
        shared = data.get("sandbox_namespaces", [])
        if (
            not isinstance(shared, list)
            or not all(name in SANDBOX_NAMESPACES for name in shared)
            or len(set(shared)) != len(shared)
        ):
            raise ValueError(
                f"boot config field 'sandbox_namespaces' must list some of {', '.join(SANDBOX_NAMESPACES)}"
            )
        out["sandbox_namespaces"] = list(shared)
        return cls(**out)


def check_devices(devices: object) -> list[dict[str, Any]]:
    """Validate BootConfig ``devices`` (untrusted JSON): ``[{"path", "type" (c|b),
    "major", "minor", "permissions" (some of rwm)}]``, optionally with ``mode`` (the
    node's permission bits, default 0666), ``uid`` and ``gid`` (default 0; OCI
    ``linux.devices``); return them. Raises ValueError."""
    if not isinstance(devices, list) or len(devices) > 64:
        raise ValueError("boot config field 'devices' must be a list of at most 64")
    required = {"path", "type", "major", "minor", "permissions"}
    for device in devices:
        if not (
            isinstance(device, dict)
            and required <= set(device) <= required | {"mode", "uid", "gid"}
            and all(
                _is_int(device[k]) and 0 <= device[k] < (0o7777 + 1 if k == "mode" else 1 << 32)
                for k in ("mode", "uid", "gid")
                if k in device
            )
            and isinstance(device["path"], str)
            and device["path"].startswith("/")
            and ".." not in device["path"].split("/")
            and "\0" not in device["path"]
            and device["type"] in ("c", "b")
            and all(_is_int(device[k]) and 0 <= device[k] < 1 << 20 for k in ("major", "minor"))
            and isinstance(device["permissions"], str)
            and device["permissions"]
            and set(device["permissions"]) <= set("rwm")
        ):
            raise ValueError(
                "boot config field 'devices': each must be {path, type c|b, major, minor, permissions rwm}"
            )
    return [dict(d) for d in devices]


MAX_INTERFACES = 8


def check_network(network: object) -> dict[str, Any]:
    """Validate a BootConfig ``network`` (untrusted JSON); return it. Raises ValueError
    naming the bad field. No imports: this runs on the guest's boot path."""
    if not isinstance(network, dict):
        raise ValueError("boot config field 'network' must be an object")
    unknown = set(network) - {"interfaces", "dns_relay"}
    if unknown:
        raise ValueError(f"boot config field 'network' has unknown key {sorted(unknown)[0]!r}")
    interfaces = network.get("interfaces", [])
    if not isinstance(interfaces, list) or len(interfaces) > MAX_INTERFACES:
        raise ValueError(f"network.interfaces must be a list of at most {MAX_INTERFACES}")
    gateways = 0
    for index, iface in enumerate(interfaces):
        where = f"network.interfaces[{index}]"
        if not isinstance(iface, dict):
            raise ValueError(f"{where} must be an object")
        unknown = set(iface) - {"mac", "address", "gateway", "mtu", "address6"}
        if unknown:
            raise ValueError(f"{where} has unknown key {sorted(unknown)[0]!r}")
        if not is_mac(iface.get("mac")):
            raise ValueError(f"{where}.mac must look like 02:42:0a:58:00:02")
        address, _, prefix = str(iface.get("address", "")).partition("/")
        if (
            not isinstance(iface.get("address"), str)
            or not is_ipv4(address)
            or not prefix.isdigit()
            or not 0 < int(prefix) <= 32
        ):
            raise ValueError(f"{where}.address must be an IPv4 address/prefix like 10.88.0.2/16")
        if "address6" in iface and not is_ipv6_cidr(iface["address6"]):
            raise ValueError(f"{where}.address6 must be an IPv6 address/prefix like fd00:89::2/64")
        if "gateway" in iface:
            if not is_ipv4(iface["gateway"]):
                raise ValueError(f"{where}.gateway must be an IPv4 address")
            gateways += 1
        mtu = iface.get("mtu", 1500)
        if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65535:
            raise ValueError(f"{where}.mtu must be an integer in 68..65535")
    if gateways > 1:
        raise ValueError("network: only one interface may have a gateway")
    relay = network.get("dns_relay", [])
    if not isinstance(relay, list) or len(relay) > 3 or not all(is_ipv4(a) and a.startswith("127.") for a in relay):
        raise ValueError("network.dns_relay must be a list of at most 3 loopback IPv4 addresses")
    return network


def is_ipv4(text: object) -> bool:
    """Dotted-quad IPv4 address (no leading zeros, like ``ipaddress``)."""
    if not isinstance(text, str):
        return False
    parts = text.split(".")
    return len(parts) == 4 and all(
        p.isdigit() and p.isascii() and int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in parts
    )


def is_ipv6_cidr(text: object) -> bool:
    """``address/prefix`` with a global or unique-local IPv6 address and a 1..128 prefix."""
    import socket

    if not isinstance(text, str) or len(text) > 64:
        return False
    address, _, prefix = text.partition("/")
    if not prefix.isascii() or not prefix.isdigit() or not 0 < int(prefix) <= 128:
        return False
    try:
        packed = socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError):
        return False
    return packed[0] != 0xFF and packed[:2] != b"\xfe\x80" and any(packed)


def is_mac(text: object) -> bool:
    """Six colon-separated hex octets, unicast (the first octet's low bit clear)."""
    if not isinstance(text, str) or len(text) != 17:
        return False
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and set(p) <= _HEX for p in parts):
        return False
    return not int(parts[0], 16) & 1


_HEX = set("0123456789abcdefABCDEF")
