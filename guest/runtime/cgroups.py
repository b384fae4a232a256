"""One cgroup per container: create, limit, join, watch for OOM kills, remove. Stdlib only.

Two layouts are supported, detected by what is mounted at /sys/fs/cgroup:

- **v2** (the guest; modern hosts): one unified tree. The container's cgroup is
  ``/sys/fs/cgroup/<parent>/<name>``; controllers are enabled in ``cgroup.subtree_control``
  on the way down.
- **v1** (this host: a tmpfs at /sys/fs/cgroup with one mount per hierarchy, plus an
  almost empty v2 ``unified`` mount that is ignored): the container gets
  ``<hierarchy>/<parent>/<name>`` in every hierarchy that has a real controller (memory,
  pids, cpu, …; named hierarchies such as ``name=systemd`` are left alone).

Limits are best effort where the kernel lacks a knob, but a limit the caller asked for
that cannot be written raises CgroupError.
"""

from __future__ import annotations

import errno
import os
import signal
import time

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from collections.abc import Iterable

if TYPE_CHECKING:
    from guest.runtime.devices import Rule
    from guest.spec import Limits

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "vmshim"

V1_CONTROLLERS = frozenset(
    {
        "cpu",
        "cpuacct",
        "cpuset",
        "memory",
        "devices",
        "freezer",
        "net_cls",
        "blkio",
        "perf_event",
        "net_prio",
        "hugetlb",
        "pids",
        "rdma",
        "misc",
    }
)
V2_CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids")
"""Controllers enabled for containers' cgroups on v2, when the kernel offers them."""


class CgroupError(Exception):
    """A cgroup could not be created, limited, joined or removed; text is for the user."""


def read_mounts() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, options) for every mount this process sees, in mount order."""
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                mountpoint = parts[1].replace("\\040", " ")
                out.append((mountpoint, parts[2], parts[3]))
    return out


def detect_version(root: str = CGROUP_ROOT) -> int | None:
    """2 if *root* is a cgroup2 mount, 1 if v1 hierarchies are mounted below it, else None."""
    mounts = read_mounts()
    on_root = [fstype for mountpoint, fstype, _ in mounts if mountpoint == root]
    if on_root and on_root[-1] == "cgroup2":
        return 2
    prefix = root.rstrip("/") + "/"
    if any(fstype == "cgroup" and mountpoint.startswith(prefix) for mountpoint, fstype, _ in mounts):
        return 1
    return None


def mount_cgroup2(root: str = CGROUP_ROOT) -> None:
    """Mount the unified hierarchy at *root* unless something is mounted there (guest boot)."""
    from guest.runtime import syscalls

    if detect_version(root) is not None:
        return
    os.makedirs(root, exist_ok=True)
    # nsdelegate: a container in its own cgroup namespace (every one) cannot write the
    # limits of its namespace's root nor move processes out of it, even as root with a
    # writable cgroup2 mount (what an OS container's init gets).
    syscalls.mount(
        "cgroup2", root, "cgroup2", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC, "nsdelegate"
    )


def prepare_parent(parent: str = DEFAULT_PARENT, root: str = CGROUP_ROOT) -> None:
    """Do now what :meth:`Cgroup.create` does first on v2: create *parent* with the
    controllers enabled down to it, so that creating a container's cgroup later is one
    mkdir (a pooled VM while it waits for its container: guest.init.warm_up). Nothing on
    v1 or without a cgroup mount. Raises OSError."""
    if detect_version(root) == 2:
        Cgroup._prepare_v2(root, parent)


def _v1_hierarchies(root: str) -> list[tuple[str, frozenset[str]]]:
    """(mountpoint, controllers) for each v1 hierarchy under *root* with a real controller."""
    prefix = root.rstrip("/") + "/"
    seen: dict[str, frozenset[str]] = {}
    for mountpoint, fstype, options in read_mounts():
        if fstype != "cgroup" or not mountpoint.startswith(prefix):
            continue
        controllers = frozenset(options.split(",")) & V1_CONTROLLERS
        if controllers and controllers not in seen.values():
            seen[mountpoint] = controllers
    return sorted(seen.items())


def write_file(path: str, value: str) -> None:
    """Write *value* to the control file *path*."""
    with open(path, "w") as f:
        f.write(value)


def read_file(path: str) -> str:
    """The whole text of the control file *path*."""
    with open(path) as f:
        return f.read()


V2_CPU_PERIOD = 100000
"""µs: the CFS period used when none is given (docker's and the kernel's default)."""


def shares_to_weight(shares: int) -> int:
    """cgroup v1 cpu.shares (2..262144) → v2 cpu.weight (1..10000), runc's formula."""
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_to_io_weight(weight: int) -> int:
    """blkio.weight (10..1000) → v2 io.weight (1..10000), runc's formula."""
    weight = min(max(weight, 10), 1000)
    return 1 + ((weight - 10) * 9999) // 990


def block_devices(device: str, sys_block: str = "/sys/block") -> list[str]:
    """``MAJ:MIN`` numbers for a Limits device entry: ``"MAJ:MIN"`` itself, the path of a
    block device (its whole disk), or ``"*"``: every virtio disk (``vd*``; in a VM those
    are exactly the container's disks). Raises CgroupError."""
    if device == "*":
        out = []
        try:
            names = sorted(os.listdir(sys_block))
        except OSError:
            names = []
        for name in names:
            if name.startswith("vd"):
                try:
                    out.append(read_file(os.path.join(sys_block, name, "dev")).strip())
                except OSError:
                    pass
        return out
    major, sep, minor = device.partition(":")
    if sep and major.isdigit() and minor.isdigit():
        return [device]
    import stat as stat_mod

    try:
        st = os.stat(device)
    except OSError as exc:
        raise CgroupError(f"cannot limit I/O of {device}: {exc.strerror}") from None
    if not stat_mod.S_ISBLK(st.st_mode):
        raise CgroupError(f"cannot limit I/O of {device}: not a block device")
    return [f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"]


def _mkdir_levels(base: str, relative: str) -> list[str]:
    """Create each level of *relative* under *base*; return the directories made by us."""
    made = []
    path = base
    for part in relative.split("/"):
        path = os.path.join(path, part)
        try:
            os.mkdir(path)
            made.append(path)
        except FileExistsError:
            pass
    return made


class Cgroup:
    """The cgroup of one container (see the module doc for where it lives).

    Build one with :meth:`create`; :meth:`join_self` is called by the process about to
    exec the container (so nothing runs outside it), :meth:`remove` when it is gone.
    """

    def __init__(self, name: str, version: int, paths: dict[str, str]):
        self.name = name
        self.version = version
        self.paths = paths
        """v2: ``{"unified": dir}``; v1: ``{controller: dir}`` for every controller, so
        ``paths["memory"]`` is the memory cgroup (several keys may share a directory)."""

    def __repr__(self) -> str:
        return f"Cgroup({self.name!r}, v{self.version}, {self.path!r})"

    @property
    def path(self) -> str:
        """The main directory: the unified one (v2) or the memory one (v1)."""
        if self.version == 2:
            return self.paths["unified"]
        return self.paths.get("memory") or next(iter(self.paths.values()))

    @property
    def directories(self) -> list[str]:
        return sorted(set(self.paths.values()))

    # ---- creation ---------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        *,
        memory_limit: int = 0,
        pids_limit: int = 0,
        limits: Limits | None = None,
        parent: str = DEFAULT_PARENT,
        root: str = CGROUP_ROOT,
    ) -> Cgroup:
        """Create (or reuse) the cgroup ``<parent>/<name>`` and apply the limits
        (0 = unlimited; *limits*, a guest.spec.Limits, instead of the two shorthands when
        given). Raises CgroupError if no cgroup fs is mounted at *root*, or the
        directories or limits cannot be written."""
        if not name or "/" in name or name in (".", ".."):
            raise CgroupError(f"invalid cgroup name {name!r}")
        version = detect_version(root)
        if version is None:
            raise CgroupError(f"no cgroup filesystem is mounted at {root}")
        relative = f"{parent}/{name}" if parent else name
        try:
            if version == 2:
                cgroup = cls._create_v2(name, root, parent, relative)
            else:
                cgroup = cls._create_v1(name, root, relative)
        except OSError as exc:
            raise CgroupError(f"cannot create cgroup {relative}: {exc}") from None
        try:
            if limits is not None:
                cgroup.apply(limits)
            else:
                cgroup.set_limits(memory=memory_limit, pids=pids_limit)
        except CgroupError:
            cgroup.remove()
            raise
        return cgroup

    @classmethod
    def _create_v2(cls, name: str, root: str, parent: str, relative: str) -> Cgroup:
        cls._prepare_v2(root, parent)
        path = os.path.join(root, relative)
        os.makedirs(path, exist_ok=True)
        return cls(name, 2, {"unified": path})

    @classmethod
    def _prepare_v2(cls, root: str, parent: str) -> None:
        """Create *parent* under *root* with the controllers enabled in every ancestor's
        subtree_control, top down (its own included)."""
        available = set(read_file(os.path.join(root, "cgroup.controllers")).split())
        wanted = [c for c in V2_CONTROLLERS if c in available]
        level = root
        for part in [p for p in parent.split("/") if p] if parent else []:
            cls._enable_v2(level, wanted)
            level = os.path.join(level, part)
            os.makedirs(level, exist_ok=True)
        cls._enable_v2(level, wanted)

    @staticmethod
    def _enable_v2(directory: str, controllers: list[str]) -> None:
        control = os.path.join(directory, "cgroup.subtree_control")
        try:  # every write, even of one enabled already, has the kernel re-apply the subtree's control
            enabled = set(read_file(control).split())
        except OSError:
            enabled = set()
        for controller in controllers:
            if controller in enabled:
                continue
            try:
                write_file(control, f"+{controller}")
            except OSError:
                pass  # e.g. a threaded subtree; the limit write will say what is missing

    @classmethod
    def _create_v1(cls, name: str, root: str, relative: str) -> Cgroup:
        paths = {}
        for mountpoint, controllers in _v1_hierarchies(root):
            made = _mkdir_levels(mountpoint, relative)
            directory = os.path.join(mountpoint, relative)
            if "cpuset" in controllers:
                # A new cpuset is empty and refuses tasks until cpus and mems are set.
                for level in made:
                    for knob in ("cpuset.cpus", "cpuset.mems"):
                        parent_value = read_file(os.path.join(os.path.dirname(level), knob))
                        write_file(os.path.join(level, knob), parent_value.strip() or "\n")
            for controller in controllers:
                paths[controller] = directory
        if not paths:
            raise OSError(errno.ENOENT, "no cgroup v1 hierarchy with a controller", root)
        return cls(name, 1, paths)

    # ---- limits -----------------------------------------------------------------------

    def set_limits(self, *, memory: int = 0, pids: int = 0) -> None:
        """Apply memory (bytes) and pids limits; 0 leaves a limit as it is.
        Raises CgroupError when a requested limit cannot be set."""
        if memory:
            if self.version == 2:
                self._set("unified", "memory.max", str(memory))
                self._try_set("unified", "memory.swap.max", "0")
            else:
                self._set("memory", "memory.limit_in_bytes", str(memory))
                # Also cap memory+swap, so the limit is not just a swap quota.
                self._try_set("memory", "memory.memsw.limit_in_bytes", str(memory))
        if pids:
            self._set("unified" if self.version == 2 else "pids", "pids.max", str(pids))

    def apply(self, limits: Limits) -> None:
        """Apply a guest.spec.Limits: fields left at 0/""/[] are not touched, -1 lifts a
        limit (see Limits). Used at creation and by ``update`` on a running container.
        Raises CgroupError naming the knob that could not be written (the ones before it
        stay applied)."""
        v2 = self.version == 2
        if limits.memory or limits.memory_swap:
            self._apply_memory(limits.memory, limits.memory_swap)
        if limits.memory_reservation:
            value = limits.memory_reservation
            if v2:
                self._set("unified", "memory.low", "max" if value < 0 else str(value))
            else:
                self._set("memory", "memory.soft_limit_in_bytes", str(value))
        if limits.cpu_quota or limits.cpu_period:
            period = limits.cpu_period or V2_CPU_PERIOD
            quota = limits.cpu_quota
            if v2:
                if not quota:  # only the period changes: keep the quota
                    quota_text = self._get("unified", "cpu.max").split()[0]
                else:
                    quota_text = "max" if quota < 0 else str(quota)
                self._set("unified", "cpu.max", f"{quota_text} {period}")
            else:
                self._set("cpu", "cpu.cfs_period_us", str(period))
                if quota:
                    self._set("cpu", "cpu.cfs_quota_us", "-1" if quota < 0 else str(quota))
        if limits.cpu_shares:
            if v2:
                self._set("unified", "cpu.weight", str(shares_to_weight(limits.cpu_shares)))
            else:
                self._set("cpu", "cpu.shares", str(limits.cpu_shares))
        if limits.cpuset_cpus:
            self._set("unified" if v2 else "cpuset", "cpuset.cpus", limits.cpuset_cpus)
        if limits.pids:
            pids_max = "max" if limits.pids < 0 else str(limits.pids)
            self._set("unified" if v2 else "pids", "pids.max", pids_max)
        if limits.blkio_weight:
            self._apply_io_weight(limits.blkio_weight)
        for entries, v2_key, v1_knob in (
            (limits.device_read_bps, "rbps", "blkio.throttle.read_bps_device"),
            (limits.device_write_bps, "wbps", "blkio.throttle.write_bps_device"),
        ):
            for device, rate in entries:
                for number in block_devices(device):
                    if v2:
                        self._set("unified", "io.max", f"{number} {v2_key}={rate if rate > 0 else 'max'}")
                    else:
                        self._set("blkio", v1_knob, f"{number} {rate}")

    def _apply_memory(self, memory: int, swap: int) -> None:
        """memory.max and the swap on top of it (none unless *swap* says so)."""
        if self.version == 2:
            if memory:
                self._set("unified", "memory.max", "max" if memory < 0 else str(memory))
            if swap < 0:
                self._try_set("unified", "memory.swap.max", "max")
            elif swap:
                if memory <= 0:
                    current = self._get("unified", "memory.max").strip()
                    memory = int(current) if current.isdigit() else 0
                self._try_set("unified", "memory.swap.max", str(max(0, swap - memory)))
            elif memory > 0:
                self._try_set("unified", "memory.swap.max", "0")
            return
        # v1: memsw (memory + swap) must never be below the memory limit, so the order of
        # the two writes depends on the direction; try one, then the other.
        writes = []
        if memory:
            writes.append(("memory.limit_in_bytes", "-1" if memory < 0 else str(memory)))
        if swap:
            writes.append(("memory.memsw.limit_in_bytes", "-1" if swap < 0 else str(swap)))
        elif memory:
            # Also cap memory+swap, so the limit is not just a swap quota.
            writes.append(("memory.memsw.limit_in_bytes", "-1" if memory < 0 else str(memory)))
        has_memsw = os.path.exists(
            os.path.join(self.paths.get("memory", "/nonexistent"), "memory.memsw.limit_in_bytes")
        )
        if not has_memsw:  # no swap accounting in this kernel
            writes = [w for w in writes if w[0] != "memory.memsw.limit_in_bytes"]
        try:
            for knob, value in writes:
                self._set("memory", knob, value)
        except CgroupError:
            for knob, value in reversed(writes):
                self._set("memory", knob, value)

    def _apply_io_weight(self, weight: int) -> None:
        if self.version == 2:
            candidates = [
                ("io.weight", f"default {blkio_to_io_weight(weight)}"),
                ("io.bfq.weight", f"default {weight}"),
            ]
            controller = "unified"
        else:
            candidates = [("blkio.weight", str(weight)), ("blkio.bfq.weight", str(weight))]
            controller = "blkio"
        directory = self.paths.get(controller)
        for knob, value in candidates:
            if directory and os.path.exists(os.path.join(directory, knob)):
                self._set(controller, knob, value)
                return
        raise CgroupError(
            "cannot set the block I/O weight: the kernel offers no "
            f"{' or '.join(k for k, _ in candidates)} (no I/O scheduler with "
            "weights is active)"
        )

    def supports_io_weight(self) -> bool:
        """Whether :meth:`apply` can set ``blkio_weight`` here."""
        if self.version == 2:
            directory, knobs = self.paths.get("unified"), ("io.weight", "io.bfq.weight")
        else:
            directory, knobs = self.paths.get("blkio"), ("blkio.weight", "blkio.bfq.weight")
        if not directory:
            return False
        return any(os.path.exists(os.path.join(directory, k)) for k in knobs)

    def _get(self, controller: str, knob: str) -> str:
        directory = self.paths.get(controller)
        if directory is None:
            raise CgroupError(f"cannot read {knob}: the {controller} controller is not available")
        try:
            return read_file(os.path.join(directory, knob))
        except OSError as exc:
            raise CgroupError(f"cannot read {knob} in {directory}: {exc.strerror}") from None

    def _set(self, controller: str, knob: str, value: str) -> None:
        directory = self.paths.get(controller)
        if directory is None:
            raise CgroupError(f"cannot set {knob}: the {controller} controller is not available")
        try:
            write_file(os.path.join(directory, knob), value)
        except OSError as exc:
            raise CgroupError(f"cannot set {knob}={value} in {directory}: {exc.strerror}") from None

    def _try_set(self, controller: str, knob: str, value: str) -> None:
        try:
            self._set(controller, knob, value)
        except CgroupError:
            pass

    # ---- device rules ---------------------------------------------------------------------

    def restrict_devices(self, rules: Iterable[Rule]) -> None:
        """Allow only *rules* (guest.runtime.devices) to the container's processes: the
        v1 devices controller, or an eBPF device program on v2. Raises CgroupError."""
        from guest.runtime import devices

        try:
            if self.version == 2:
                devices.apply_v2(self.paths["unified"], rules)
            elif "devices" in self.paths:
                devices.apply_v1(self.paths["devices"], rules)
            else:
                raise CgroupError("cannot set device rules: the devices cgroup controller is not mounted")
        except devices.DeviceRuleError as exc:
            raise CgroupError(str(exc)) from None

    # ---- membership ---------------------------------------------------------------------

    def _procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.directories]

    def join_self(self) -> None:
        """Move the calling process into the cgroup (in every hierarchy). Writing "0"
        means "the writer", so this works from inside a new pid namespace too."""
        self.add(0)

    def add(self, pid: int) -> None:
        """Move process *pid* (as seen from the caller's pid namespace; 0 = the caller)."""
        for path in self._procs_files():
            try:
                write_file(path, str(pid))
            except OSError as exc:
                raise CgroupError(
                    f"cannot move process {pid or os.getpid()} into {os.path.dirname(path)}: {exc.strerror}"
                ) from None

    def procs(self) -> list[int]:
        """Pids of every process in the cgroup (union over hierarchies); [] once removed."""
        pids: set[int] = set()
        for path in self._procs_files():
            try:
                pids.update(int(p) for p in read_file(path).split())
            except FileNotFoundError:
                pass
        return sorted(pids)

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer killed in this cgroup."""
        if self.version == 2:
            path = os.path.join(self.paths["unified"], "memory.events")
        elif "memory" in self.paths:
            path = os.path.join(self.paths["memory"], "memory.oom_control")
        else:
            return 0
        try:
            for line in read_file(path).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    # ---- pause and usage ----------------------------------------------------------------

    def freeze(self, frozen: bool = True) -> None:
        """Stop (or let run again) every process in the cgroup: ``cgroup.freeze`` on v2,
        the freezer controller on v1. Raises CgroupError when neither is available."""
        if self.version == 2:
            self._set("unified", "cgroup.freeze", "1" if frozen else "0")
        else:
            self._set("freezer", "freezer.state", "FROZEN" if frozen else "THAWED")

    def usage(self) -> dict[str, int | None]:
        """``{"memory": bytes, "memory_limit": bytes or 0, "cpu_ns": ns, "pids": n}``;
        a figure the kernel does not offer is None."""

        def number(controller: str, knob: str) -> int | None:
            directory = self.paths.get(controller)
            if directory is None:
                return None
            try:
                return int(read_file(os.path.join(directory, knob)).split()[0])
            except (OSError, ValueError, IndexError):
                return None

        if self.version == 2:
            memory = number("unified", "memory.current")
            limit = number("unified", "memory.max")  # "max" → None
            cpu = None
            try:
                for line in read_file(os.path.join(self.paths["unified"], "cpu.stat")).splitlines():
                    key, _, value = line.partition(" ")
                    if key == "usage_usec":
                        cpu = int(value) * 1000
            except (OSError, ValueError):
                pass
        else:
            memory = number("memory", "memory.usage_in_bytes")
            limit = number("memory", "memory.limit_in_bytes")
            if limit is not None and limit >= 1 << 60:
                limit = None
            cpu = number("cpuacct", "cpuacct.usage")
        # v2: pids.current counts the whole subtree (an OS container's init keeps its
        # services in child cgroups, so its own cgroup.procs is empty)
        pids = number("unified", "pids.current") if self.version == 2 else None
        return {
            "memory": memory,
            "memory_limit": limit or 0,
            "cpu_ns": cpu,
            "pids": len(self.procs()) if pids is None else pids,
        }

    def details(self) -> dict[str, int]:
        """More of the kernel's accounting, for ``stats``: ``cpu_user_ns``,
        ``cpu_system_ns``, ``cpu_periods``, ``cpu_throttled_periods``,
        ``cpu_throttled_ns``, ``memory_anon``, ``memory_file``, ``memory_peak``,
        ``pids_limit`` (0: none), ``block_read_bytes``, ``block_write_bytes``. A figure
        the kernel does not offer is left out."""

        def table(controller: str, knob: str) -> dict[str, int]:
            directory = self.paths.get(controller)
            out: dict[str, int] = {}
            if directory is None:
                return out
            try:
                for line in read_file(os.path.join(directory, knob)).splitlines():
                    key, _, value = line.partition(" ")
                    if value.strip().lstrip("-").isdigit():
                        out[key] = int(value)
            except OSError:
                pass
            return out

        def single(controller: str, knob: str) -> int | None:
            directory = self.paths.get(controller)
            if directory is None:
                return None
            try:
                text = read_file(os.path.join(directory, knob)).strip()
            except OSError:
                return None
            if text == "max":
                return 0
            return int(text) if text.lstrip("-").isdigit() else None

        out: dict[str, int] = {}
        if self.version == 2:
            cpu = table("unified", "cpu.stat")
            memory = table("unified", "memory.stat")
            pairs = {
                "cpu_user_ns": cpu.get("user_usec", -1) * 1000,
                "cpu_system_ns": cpu.get("system_usec", -1) * 1000,
                "cpu_periods": cpu.get("nr_periods"),
                "cpu_throttled_periods": cpu.get("nr_throttled"),
                "cpu_throttled_ns": cpu.get("throttled_usec", -1) * 1000,
                "memory_anon": memory.get("anon"),
                "memory_file": memory.get("file"),
                "memory_peak": single("unified", "memory.peak"),
                "pids_limit": single("unified", "pids.max"),
                **self._block_io(),
            }
        else:
            cpu = table("cpu", "cpu.stat")
            memory = table("memory", "memory.stat")
            pairs = {
                "cpu_user_ns": single("cpuacct", "cpuacct.usage_user"),
                "cpu_system_ns": single("cpuacct", "cpuacct.usage_sys"),
                "cpu_periods": cpu.get("nr_periods"),
                "cpu_throttled_periods": cpu.get("nr_throttled"),
                "cpu_throttled_ns": cpu.get("throttled_time"),
                "memory_anon": memory.get("total_rss", memory.get("rss")),
                "memory_file": memory.get("total_cache", memory.get("cache")),
                "memory_peak": single("memory", "memory.max_usage_in_bytes"),
                "pids_limit": single("pids", "pids.max"),
                **self._block_io(),
            }
        for key, value in pairs.items():
            if value is not None and value >= 0:
                out[key] = value
        return out

    def _block_io(self) -> dict[str, int]:
        """Bytes read and written on block devices by the cgroup's processes: the sum
        over devices of v2 ``io.stat`` (``rbytes=``/``wbytes=``) or v1
        ``blkio.throttle.io_service_bytes`` (``MAJ:MIN Read|Write N``)."""
        read = written = 0
        if self.version == 2:
            directory, knob = self.paths.get("unified"), "io.stat"
        else:
            directory, knob = self.paths.get("blkio"), "blkio.throttle.io_service_bytes"
        if directory is None:
            return {}
        try:
            text = read_file(os.path.join(directory, knob))
        except OSError:
            return {}
        for line in text.splitlines():
            words = line.split()
            if self.version == 2:
                for word in words[1:]:
                    key, _, value = word.partition("=")
                    if value.isdigit() and key in ("rbytes", "wbytes"):
                        if key == "rbytes":
                            read += int(value)
                        else:
                            written += int(value)
            elif len(words) == 3 and words[2].isdigit():
                if words[1] == "Read":
                    read += int(words[2])
                elif words[1] == "Write":
                    written += int(words[2])
        return {"block_read_bytes": read, "block_write_bytes": written}

    # ---- teardown -----------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (they still need to be reaped by their parent)."""
        if self.version == 2:
            try:
                write_file(os.path.join(self.paths["unified"], "cgroup.kill"), "1")
                return
            except OSError:
                pass  # kernel before 5.14: signal them one by one
        for pid in self.procs():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left in the cgroup and delete its directories (not the shared
        parent). Raises CgroupError if they are still busy after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        for directory in self.directories:
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise CgroupError(f"cannot remove cgroup {directory}: {exc.strerror}") from None
                    if time.monotonic() > deadline:
                        raise CgroupError(
                            f"cannot remove cgroup {directory}: processes {self.procs()} are still in it"
                        ) from None
                    self.kill()
                    time.sleep(0.01)
