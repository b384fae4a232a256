"""OS containers: the image's own init (systemd) as PID 1 of the container. Stdlib only.

Where init runs: in the container's namespaces (mnt, pid, uts, ipc, cgroup) and cgroup,
exactly where an application container's process runs, not as the guest's PID 1. The
agent stays PID 1 of the VM, so ``exec``, ``logs``, ``stats``, ``cp`` and ``stop`` keep
working the way they do for every container, and the same code serves ``--isolation
process`` (where init cannot be anybody's PID 1 but the container's). What an init needs
on top of an application container (``rootfs.setup_mounts(os_init=True)`` and this
module):

- its cgroup delegated: the cgroup namespace makes the container's cgroup its root, and
  cgroup2 is mounted writable at /sys/fs/cgroup, so systemd makes its slices and scopes
  below it (with every controller the guest has);
- /run and /tmp as tmpfs, ``container=vmshim`` in its environment (systemd then knows it
  runs in a container and skips what only a machine's init does);
- a pty as its stdio and /dev/console (systemd writes its status and, in the image of
  images/debian-systemd, journald forwards the journal there): the agent reads its master
  like any ``-t`` container's, so ``logs`` shows the console;
- processes that ``exec`` starts go to the leaf ``<container cgroup>/vmshim.exec``: once
  systemd has enabled controllers for its children, cgroup v2 lets no process join the
  container's cgroup itself (no internal processes);
- a power-off or halt (``systemctl poweroff``, or SIGRTMIN+3: systemd's halt, the stop
  signal) ends with reboot(2) in the container's pid namespace, which the kernel reports
  as init killed by SIGINT (a reboot as SIGHUP): :func:`exit_code` makes the power-off exit code 0.
"""

from __future__ import annotations

import os

from guest.runtime.cgroups import Cgroup, CgroupError
from guest.spec import ProcessSpec

CONTAINER_ENV = "container=vmshim"
EXEC_CGROUP = "vmshim.exec"
EXIT_POWER_OFF = 128 + 2  # SIGINT
EXIT_REBOOT = 128 + 1  # SIGHUP


def init_process(process: ProcessSpec) -> ProcessSpec:
    """*process* with ``container=vmshim`` in its environment (replacing any other
    ``container=``: systemd reads it to know where it runs) and a pty, which becomes the
    container's /dev/console (rootfs.bind_console): without one systemd puts /dev/null
    on its stdio and the log stays empty."""
    env = [e for e in process.env if not e.startswith("container=")] + [CONTAINER_ENV]
    return process.replace(env=env, tty=True)


def exec_cgroup(cgroup: Cgroup | None) -> Cgroup | None:
    """The cgroup an exec'ed process joins in an OS container: the leaf
    ``vmshim.exec`` below the container's (v2; made when missing). v1 (host placement
    only; refused before here) and no cgroup: *cgroup* itself. Raises CgroupError."""
    if cgroup is None or cgroup.version != 2:
        return cgroup
    path = os.path.join(cgroup.paths["unified"], EXEC_CGROUP)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise CgroupError(f"cannot create {path}: {exc.strerror}") from None
    return Cgroup(f"{cgroup.name}/{EXEC_CGROUP}", 2, {"unified": path})


def exit_code(code: int) -> int:
    """The container's exit code when its init ended with *code*: a power-off or halt
    (SIGRTMIN+3) is 0."""
    return 0 if code == EXIT_POWER_OFF else code
