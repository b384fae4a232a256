"""One container as the runtime sees it: an assembled rootfs, a cgroup, a main process and
the processes exec'ed beside it. The same class serves both placements:

- in the guest, ``guest.init`` mounts the layer disks, builds the overlay and hands the
  result to :class:`Container`;
- on the host (``--isolation process``), :meth:`Container.create` mounts the overlay of
  already-unpacked layer directories itself and :meth:`Container.destroy` takes it down.

It is also the *runtime* the agent loop (``guest.agent.Agent``) calls: ``start`` and
``exec`` return a :class:`~guest.runtime.process.Spawned`. Stdlib only.
"""

from __future__ import annotations

import os
import signal

from guest.runtime import rootfs as rootfs_mod
from guest.runtime.cgroups import Cgroup, CgroupError
from guest.runtime.process import (
    DEFAULT_NAMESPACES,
    Held,
    HeldGone,
    Spawned,
    SpawnError,
    exec_in_container,
    hold_container,
    spawn_container,
)
from guest.spec import BootConfig, Limits, MountSpec, ProcessSpec

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

if TYPE_CHECKING:
    from guest.runtime.member import Member

GUEST_NAMESPACES = ("mnt", "pid", "uts", "ipc", "cgroup")
"""In the VM the container shares the VM's network namespace: the VM is the boundary, and
its NIC is the container's."""
HOST_NAMESPACES = DEFAULT_NAMESPACES + ("cgroup",)


def network_io(pid: int) -> dict[str, int]:
    """``net_rx_bytes``/``net_tx_bytes``: the sum over the interfaces (but ``lo``) of the
    network namespace *pid* is in (/proc/PID/net/dev); {} when it cannot be read."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            lines = f.read().splitlines()[2:]
    except OSError:
        return {}
    rx = tx = 0
    for line in lines:
        name, _, numbers = line.partition(":")
        fields = numbers.split()
        if name.strip() == "lo" or len(fields) < 9:
            continue
        if fields[0].isdigit() and fields[8].isdigit():
            rx += int(fields[0])
            tx += int(fields[8])
    return {"net_rx_bytes": rx, "net_tx_bytes": tx}


class Container:
    """A container whose rootfs is mounted at *rootfs*.

    Preconditions: *rootfs* is assembled (overlay mounted); *files_dir* is a directory
    of ours where /etc/hostname, /etc/hosts and /etc/resolv.conf are written (they are
    bind-mounted into the container, see :func:`rootfs.prepare_rootfs`).

    *mounts*: ``(MountSpec, source)`` pairs whose sources the placement made available
    (see guest.runtime.mounts); they are mounted into the rootfs here, and then, with
    ``config.read_only``, the rootfs is made read-only. Raises MountError.
    """

    def __init__(
        self,
        config: BootConfig,
        rootfs: str,
        *,
        files_dir: str,
        cgroup: Cgroup | None = None,
        namespaces: Iterable[str] = HOST_NAMESPACES,
        mounts: list[tuple[MountSpec, str | None]] | None = None,
        join: tuple[int, tuple[str, ...]] | None = None,
    ) -> None:
        self.config = config
        self.rootfs = rootfs
        self.files_dir = files_dir
        self.cgroup = cgroup
        self.namespaces = tuple(namespaces)
        self.join = join
        """(pid, names): namespaces of another process the main process joins instead
        of making them (a pod member sharing its sandbox's uts and ipc)."""
        self.main: Spawned | None = None
        self.held: Held | None = None
        """The main process made up to its execve before it is known (:meth:`hold`)."""
        self.took_held = False
        """Whether :meth:`start` gave the process to the held one."""
        self.owns_rootfs = False
        if cgroup is not None and not config.privileged:
            from guest.runtime import devices

            cgroup.restrict_devices(devices.rules_for(config.devices))
        self.upperdir: str | None = None
        """The overlay's upper directory (the container's changes), for :meth:`diff`;
        set by :meth:`create`, and by the guest's init for a VM."""
        self.binds = rootfs_mod.prepare_rootfs(rootfs, config.hostname, config.hosts, config.resolv_conf, files_dir)
        if mounts or config.read_only:
            from guest.runtime import mounts as mounts_mod

            mounts_mod.assemble(rootfs, list(mounts or []), read_only=config.read_only)

    def set_identity(self, config: BootConfig) -> None:
        """A VM restored from a snapshot template becomes this container (the agent's
        ``identity``): the hostname and /etc files its processes will see. Precondition:
        no process was started yet."""
        self.config = config
        binds = rootfs_mod.prepare_rootfs(
            self.rootfs,
            config.hostname,
            config.hosts,
            config.resolv_conf,
            self.files_dir,
            in_place=self.held is not None,  # the held process has the files bind-mounted
        )
        if binds != self.binds and self.held is not None:
            self.held.release()  # it has other files mounted than these: start anew
            self.held = None
        self.binds = binds
        if os.getpid() == 1:  # the VM's own name too (never the host's)
            from guest.runtime import syscalls

            try:
                syscalls.sethostname(config.hostname)
            except OSError:
                pass

    # ---- host placement: assemble and take down ---------------------------------------

    @classmethod
    def create(
        cls,
        config: BootConfig,
        *,
        lowerdirs: list[str],
        upperdir: str,
        workdir: str,
        rootfs: str,
        files_dir: str,
        namespaces: Iterable[str] = HOST_NAMESPACES,
        use_cgroup: bool = True,
        mounts: list[tuple[MountSpec, str | None]] | None = None,
    ) -> Container:
        """Mount the overlay (*lowerdirs* topmost first) at *rootfs*, create the cgroup
        ``vmshim/<container_id>`` with the config's limits, make the *mounts* (see the
        class) and return the Container. Raises RootfsError, CgroupError or MountError
        (having undone what was done)."""
        from guest.runtime.syscalls import MS_NODEV, MS_NOSUID

        # On the host: no setuid file or device node of an image or a container works
        # for anyone outside the container (the container's own view clears both flags).
        rootfs_mod.mount_overlay(lowerdirs, upperdir, workdir, rootfs, flags=MS_NOSUID | MS_NODEV)
        cgroup = None
        try:
            if use_cgroup:
                cgroup = Cgroup.create(config.container_id, limits=config.cgroup_limits())
            container = cls(config, rootfs, files_dir=files_dir, cgroup=cgroup, namespaces=namespaces, mounts=mounts)
        except BaseException:
            if cgroup is not None:
                cgroup.remove()
            rootfs_mod.unmount(rootfs, detach=True)
            raise
        container.owns_rootfs = True
        container.upperdir = upperdir or None
        return container

    def destroy(self) -> None:
        """Kill whatever still runs in the container, remove its cgroup and (if
        :meth:`create` mounted it) unmount the rootfs. Idempotent. The caller must still
        reap the main process if it has not (its status is not needed any more)."""
        if self.held is not None:
            self.held.release()
            self.held = None
        if self.main is not None:
            try:
                os.kill(self.main.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        errors = []
        if self.cgroup is not None:
            try:
                self.cgroup.remove()
            except CgroupError as exc:
                errors.append(str(exc))
        if self.owns_rootfs:
            rootfs_mod.unmount(self.rootfs, detach=True)
            self.owns_rootfs = False
        if errors:
            raise CgroupError("; ".join(errors))

    # ---- the agent's runtime interface ----------------------------------------------------

    def hold(self) -> None:
        """Make the main process up to its execve now, before it is known: cgroup,
        namespaces, mounts and root (guest.runtime.process.hold_container). :meth:`start`
        then only hands it the process. A snapshot template's VM is saved so (issue 15).
        Raises SpawnError (an OS container, a pod member, user namespaces: not held)."""
        if self.main is not None or self.held is not None:
            raise SpawnError("the container's process was already started or held")
        if self.config.os or self.join is not None:
            raise SpawnError("an OS container or a pod member's process is not held")
        self.held = hold_container(
            self.rootfs,
            self.config.process,
            self.config.hostname,
            self.cgroup,
            namespaces=self.namespaces,
            hosts_files=self.binds,
            masked_paths=self.config.masked_paths,
            readonly_paths=self.config.readonly_paths,
            privileged=self.config.privileged,
            devices=self.config.devices,
        )

    def start(self, process: ProcessSpec, *, stdin: bool, rows: int = 24, cols: int = 80) -> Spawned:
        """Start the main process (PID 1 of the container). Raises SpawnError."""
        if self.main is not None:
            raise SpawnError("the container's process was already started")
        held, self.held = self.held, None
        if held is not None:
            try:
                self.main = held.go(process, hostname=self.config.hostname, stdin=stdin, rows=rows, cols=cols)
                self.took_held = True
                return self.main
            except HeldGone:
                held.release()  # nothing of it ran: the usual way below
        if self.config.os:
            from guest.runtime import osinit

            process = osinit.init_process(process)
        self.main = spawn_container(
            self.rootfs,
            process,
            self.config.hostname,
            self.cgroup,
            namespaces=self.namespaces,
            hosts_files=self.binds,
            stdin=stdin,
            rows=rows,
            cols=cols,
            masked_paths=self.config.masked_paths,
            readonly_paths=self.config.readonly_paths,
            privileged=self.config.privileged,
            devices=self.config.devices,
            os_init=self.config.os,
            join=self.join,
        )
        return self.main

    def _exec_cgroup(self) -> Cgroup | None:
        """Where exec'ed processes go: the container's cgroup, or in an OS container
        its ``vmshim.exec`` leaf (guest.runtime.osinit). Raises SpawnError."""
        if not self.config.os:
            return self.cgroup
        from guest.runtime import osinit

        try:
            return osinit.exec_cgroup(self.cgroup)
        except CgroupError as exc:
            raise SpawnError(str(exc)) from None

    def exec(self, process: ProcessSpec, *, stdin: bool, rows: int = 24, cols: int = 80) -> Spawned:
        """Start another process in the running container's namespaces and cgroup."""
        if self.main is None:
            raise SpawnError("the container is not running")
        return exec_in_container(
            self.main.pid,
            process,
            hostname=self.config.hostname,
            cgroup=self._exec_cgroup(),
            namespaces=self.namespaces + (self.join[1] if self.join else ()),
            stdin=stdin,
            rows=rows,
            cols=cols,
        )

    def start_member(self, config: BootConfig, *, stdin: bool, rows: int = 24, cols: int = 80) -> Member:
        """Run a pod member beside the running container (guest.runtime.member), in new
        namespaces but the VM's network. Returns a Member whose ``spawned`` is its
        process. Raises SpawnError, MemberError, MountError, CgroupError."""
        from guest.runtime.member import start_member

        if "net" in self.namespaces:
            raise SpawnError("pod members share a VM's network: only a VM runs them")
        if self.main is None:
            raise SpawnError("the container is not running")
        main_pid = self.main.pid

        def make(member_config: BootConfig, rootfs: str, files_dir: str) -> Container:
            shared = tuple(name for name in member_config.sandbox_namespaces if name in self.namespaces)
            namespaces = tuple(name for name in self.namespaces if name not in shared)
            join = (main_pid, shared) if shared else None
            limits = member_config.cgroup_limits()
            try:
                cgroup = Cgroup.create(member_config.container_id, limits=limits)
            except (OSError, CgroupError) as exc:
                if not limits.is_empty() or not member_config.privileged:
                    raise SpawnError(f"cannot make the pod member's cgroup: {exc}") from None
                cgroup = None
            try:
                return Container(
                    member_config, rootfs, files_dir=files_dir, cgroup=cgroup, namespaces=namespaces, join=join
                )
            except BaseException:
                if cgroup is not None:
                    cgroup.remove()
                raise

        return start_member(config, make, stdin=stdin, rows=rows, cols=cols)

    def builtin(self, name: str, args: list[str], *, stdin: bool) -> Spawned:
        """Run the agent's helper *name* (guest.runtime.builtins) in the running
        container, as root in its namespaces and cgroup; before the main process started
        (``cp`` with a stopped container: the host booted the VM for it alone), in new
        namespaces of its own on the same rootfs. Raises SpawnError (bad name or
        arguments: 125)."""
        from guest.runtime import builtins

        func = builtins.prepare(name, args)
        process = ProcessSpec(args=["vmshim-" + name], env=[], cwd="/", user="0:0")
        if self.main is None:
            return spawn_container(
                self.rootfs,
                process,
                self.config.hostname,
                self.cgroup,
                namespaces=self.namespaces,
                hosts_files=self.binds,
                stdin=stdin,
                masked_paths=self.config.masked_paths,
                readonly_paths=self.config.readonly_paths,
                builtin=func,
            )
        return exec_in_container(
            self.main.pid,
            process,
            hostname=self.config.hostname,
            cgroup=self._exec_cgroup(),
            namespaces=self.namespaces,
            stdin=stdin,
            builtin=func,
        )

    def diff(self) -> Spawned:
        """Start writing the container's changes as an OCI layer tar to the returned
        process's stdout (guest.runtime.diff). Precondition: the main process has exited
        (its pid namespace, and so every process in it, is gone: the tree holds still).
        Raises SpawnError."""
        from guest.runtime import diff

        if not self.upperdir:
            raise SpawnError("this container has no writable layer to diff")
        return diff.spawn(self.upperdir)

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer struck in the container's cgroup."""
        return self.cgroup is not None and self.cgroup.oom_kills() > 0

    # ---- limits and usage (the agent's ``update`` and ``stats``) ------------------------

    def update(self, limits: Limits) -> None:
        """Change the limits of the running container's cgroup (a guest.spec.Limits;
        unset fields stay). Raises CgroupError."""
        if self.cgroup is None:
            raise CgroupError("the container has no cgroup to change")
        self.cgroup.apply(limits)

    def netconf(self, interfaces: list[dict[str, Any]], resolv_conf: str | None = None) -> list[str]:
        """Bring up NICs plugged into the running VM (entries checked by
        guest.spec.check_network), waiting up to HOTPLUG_TIMEOUT s for each to appear;
        return their names. *resolv_conf*: rewrite the container's /etc/resolv.conf (in
        place: it is bind-mounted from files_dir). Only where the container shares the
        agent's network namespace (the VM); raises NetworkError otherwise or on failure."""
        from guest.runtime.network import HOTPLUG_TIMEOUT, NetworkError, configure

        if "net" in self.namespaces:
            raise NetworkError("the container has a network namespace of its own: its host plugs interfaces into it")
        names = configure({"interfaces": interfaces}, timeout=HOTPLUG_TIMEOUT)
        if resolv_conf is not None:
            path = os.path.join(self.files_dir, "resolv.conf")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "w") as f:
                    f.write(resolv_conf)
            except OSError as exc:
                raise NetworkError(f"cannot rewrite resolv.conf: {exc.strerror}") from None
        return names

    def stats(self) -> dict[str, int | None]:
        """The container cgroup's usage now (see Cgroup.usage) plus ``oom_kills`` and the
        kernel's ``memory.stat`` / ``cpu.stat`` figures the host shows. Raises
        CgroupError when there is no cgroup."""
        if self.cgroup is None:
            raise CgroupError("the container has no cgroup")
        out: dict[str, int | None] = dict(self.cgroup.usage())
        out["oom_kills"] = self.cgroup.oom_kills()
        out.update(self.cgroup.details())
        if self.main is not None:
            out.update(network_io(self.main.pid))
        return out
