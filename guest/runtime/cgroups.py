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

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "vmshim"

V1_CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "net_cls", "blkio",
    "perf_event", "net_prio", "hugetlb", "pids", "rdma", "misc",
})
V2_CONTROLLERS = ("cpu", "io", "memory", "pids")
"""Controllers enabled for containers' cgroups on v2, when the kernel offers them."""


class CgroupError(Exception):
    """A cgroup could not be created, limited, joined or removed; text is for the user."""


def _mounts() -> list[tuple[str, str, str]]:
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
    mounts = _mounts()
    on_root = [fstype for mountpoint, fstype, _ in mounts if mountpoint == root]
    if on_root and on_root[-1] == "cgroup2":
        return 2
    prefix = root.rstrip("/") + "/"
    if any(fstype == "cgroup" and mountpoint.startswith(prefix)
           for mountpoint, fstype, _ in mounts):
        return 1
    return None


def mount_cgroup2(root: str = CGROUP_ROOT) -> None:
    """Mount the unified hierarchy at *root* unless something is mounted there (guest boot)."""
    from guest.runtime import syscalls

    if detect_version(root) is not None:
        return
    os.makedirs(root, exist_ok=True)
    syscalls.mount("cgroup2", root, "cgroup2",
                   syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC, None)


def _v1_hierarchies(root: str) -> list[tuple[str, frozenset]]:
    """(mountpoint, controllers) for each v1 hierarchy under *root* with a real controller."""
    prefix = root.rstrip("/") + "/"
    seen = {}
    for mountpoint, fstype, options in _mounts():
        if fstype != "cgroup" or not mountpoint.startswith(prefix):
            continue
        controllers = frozenset(options.split(",")) & V1_CONTROLLERS
        if controllers and controllers not in seen.values():
            seen[mountpoint] = controllers
    return sorted(seen.items())


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


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
    def create(cls, name: str, *, memory_limit: int = 0, pids_limit: int = 0,
               parent: str = DEFAULT_PARENT, root: str = CGROUP_ROOT) -> Cgroup:
        """Create (or reuse) the cgroup ``<parent>/<name>`` and apply the limits
        (0 = unlimited). Raises CgroupError if no cgroup fs is mounted at *root*, or the
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
            cgroup.set_limits(memory=memory_limit, pids=pids_limit)
        except CgroupError:
            cgroup.remove()
            raise
        return cgroup

    @classmethod
    def _create_v2(cls, name: str, root: str, parent: str, relative: str) -> Cgroup:
        available = set(_read(os.path.join(root, "cgroup.controllers")).split())
        wanted = [c for c in V2_CONTROLLERS if c in available]
        # Enable the controllers in every ancestor's subtree_control, top down.
        level = root
        for part in ([p for p in parent.split("/") if p] if parent else []):
            cls._enable_v2(level, wanted)
            level = os.path.join(level, part)
            os.makedirs(level, exist_ok=True)
        cls._enable_v2(level, wanted)
        path = os.path.join(root, relative)
        os.makedirs(path, exist_ok=True)
        return cls(name, 2, {"unified": path})

    @staticmethod
    def _enable_v2(directory: str, controllers: list[str]) -> None:
        for controller in controllers:
            try:
                _write(os.path.join(directory, "cgroup.subtree_control"), f"+{controller}")
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
                        parent_value = _read(os.path.join(os.path.dirname(level), knob))
                        _write(os.path.join(level, knob), parent_value.strip() or "\n")
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

    def _set(self, controller: str, knob: str, value: str) -> None:
        directory = self.paths.get(controller)
        if directory is None:
            raise CgroupError(f"cannot set {knob}: the {controller} controller is not available")
        try:
            _write(os.path.join(directory, knob), value)
        except OSError as exc:
            raise CgroupError(f"cannot set {knob}={value} in {directory}: {exc.strerror}") from None

    def _try_set(self, controller: str, knob: str, value: str) -> None:
        try:
            self._set(controller, knob, value)
        except CgroupError:
            pass

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
                _write(path, str(pid))
            except OSError as exc:
                raise CgroupError(f"cannot move process {pid or os.getpid()} into "
                                  f"{os.path.dirname(path)}: {exc.strerror}") from None

    def procs(self) -> list[int]:
        """Pids of every process in the cgroup (union over hierarchies); [] once removed."""
        pids = set()
        for path in self._procs_files():
            try:
                pids.update(int(p) for p in _read(path).split())
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
            for line in _read(path).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    # ---- teardown -----------------------------------------------------------------------

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (they still need to be reaped by their parent)."""
        if self.version == 2:
            try:
                _write(os.path.join(self.paths["unified"], "cgroup.kill"), "1")
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
                        raise CgroupError(f"cannot remove cgroup {directory}: processes "
                                          f"{self.procs()} are still in it") from None
                    self.kill()
                    time.sleep(0.01)
