"""OS containers (``vmshim run --os``): the image's own init (systemd) as the container's
PID 1. The guest side is guest.runtime.osinit; this module holds the host's decisions.

- What runs: ``--init PATH`` (default ``/sbin/init``) with the run's arguments after it;
  the image's ENTRYPOINT/CMD are not used.
- What it may do: docker's default capabilities plus what systemd-nspawn gives an init
  (:data:`OS_CAPABILITIES`: CAP_SYS_ADMIN for the mounts and namespaces of service
  sandboxing, CAP_SYS_BOOT, CAP_SYS_NICE …), with docker's seccomp profile (it opens the
  matching syscalls for those capabilities). In a VM the VM stays the outer wall.
- How it stops: SIGRTMIN+3 (systemd's halt request: services stopped in order, file
  systems unmounted, then init ends; docker's and podman's signal for systemd), then the
  stop timeout
  (:data:`DEFAULT_STOP_TIMEOUT`, longer than an application's: shutting down services
  takes seconds under TCG), then SIGKILL.
- Where: ``--isolation vm`` always (the VM's kernel mounts cgroup2 with ``nsdelegate``);
  ``--isolation process`` only on a host that can delegate a cgroup safely
  (:func:`delegation_problem`).
"""

from __future__ import annotations

import os

from shim.errors import UsageError

DEFAULT_INIT = "/sbin/init"
STOP_SIGNAL = 34 + 3
"""SIGRTMIN+3 as glibc numbers it (SIGRTMIN is 34: glibc keeps 32 and 33): systemd's
halt request."""
DEFAULT_STOP_TIMEOUT = 30
OS_CAPABILITIES = (
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_PTRACE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TTY_CONFIG",
    "CAP_DAC_READ_SEARCH",
    "CAP_LINUX_IMMUTABLE",
    "CAP_IPC_OWNER",
    "CAP_LEASE",
    "CAP_NET_BROADCAST",
    "CAP_AUDIT_CONTROL",
)
"""Added to docker's default set for an init (systemd-nspawn's set, less nothing)."""


def init_args(init: str | None, command: list[str]) -> list[str]:
    """The init's argv: *init* (default /sbin/init) and *command* as its arguments.
    Raises UsageError for a relative path."""
    path = init or DEFAULT_INIT
    if not path.startswith("/"):
        raise UsageError(f"invalid --init {path!r}: give the init's absolute path in the image (e.g. /sbin/init)")
    return [path, *command]


def delegation_problem(mounts: str, own_cgroup: str, parent_writable: bool) -> str | None:
    """Why this host cannot delegate a cgroup to a container's init safely, or None.

    *mounts* is /proc/self/mounts, *own_cgroup* /proc/self/cgroup, *parent_writable*
    whether the parent of containers' cgroups (/sys/fs/cgroup/vmshim or its root) can be
    written. Safe means: cgroup v2 only (an init given a v2 subtree while controllers sit
    in v1 hierarchies manages nothing, and v1 hierarchies cannot be delegated), the
    unified tree at /sys/fs/cgroup mounted with ``nsdelegate`` (otherwise root in the
    container's cgroup namespace could rewrite its own limits or move out of its cgroup)
    and a writable parent."""
    v1, root_options = [], None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        if parts[2] == "cgroup":
            opts = [o for o in parts[3].split(",") if o not in ("rw", "ro", "nosuid", "nodev", "noexec", "relatime")]
            v1.append(",".join(opts) or parts[1])
        elif parts[2] == "cgroup2" and parts[1] == "/sys/fs/cgroup":
            root_options = parts[3].split(",")
    if v1:
        shown = ", ".join(sorted(v1)[:4]) + (", …" if len(v1) > 4 else "")
        return f"it mounts cgroup v1 hierarchies ({shown}); an init needs a cgroup v2-only host"
    if root_options is None:
        return "no cgroup v2 hierarchy is mounted at /sys/fs/cgroup"
    if "nsdelegate" not in root_options:
        return "its cgroup2 mount has no nsdelegate option (a container could change its own limits)"
    lines = [ln for ln in own_cgroup.splitlines() if ln.strip()]
    if len(lines) != 1 or not lines[0].startswith("0::"):
        return "this process is not in a single cgroup v2 hierarchy"
    if not parent_writable:
        return "the cgroup parent /sys/fs/cgroup/vmshim cannot be written by this user"
    return None


def host_delegation_problem() -> str | None:
    """:func:`delegation_problem` for this host."""
    from guest.runtime.cgroups import CGROUP_ROOT, DEFAULT_PARENT

    try:
        with open("/proc/self/mounts") as f:
            mounts = f.read()
        with open("/proc/self/cgroup") as f:
            own = f.read()
    except OSError as exc:
        return f"cannot read the host's cgroup layout: {exc.strerror}"
    parent = os.path.join(CGROUP_ROOT, DEFAULT_PARENT)
    writable = os.access(parent if os.path.isdir(parent) else CGROUP_ROOT, os.W_OK)
    return delegation_problem(mounts, own, writable)


def check_isolation(isolation: str, problem=host_delegation_problem) -> None:
    """Raise UsageError when an OS container cannot run with *isolation* here."""
    if isolation != "process":
        return
    reason = problem()
    if reason is not None:
        raise UsageError(
            f"--os with --isolation process needs a host that can delegate a "
            f"cgroup to the container's init, and this one cannot: {reason}; "
            "use --isolation vm"
        )
