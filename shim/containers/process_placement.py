"""Place a container in plain namespaces on the host (``--isolation process``).

The same squashfs layer disks the VMs use are loop-mounted read-only and stacked with
overlayfs, and the same agent loop and runtime code that run in the guest run here in a
separate host process, the *host agent*, which listens on ``<run dir>/agent.sock`` the
way QEMU's virtio-serial socket does for a VM: a monitor that dies and is replaced
connects again and the agent greets it with a new ``hello``. The conversation after
``hello`` is byte-for-byte the one a VM would have.

Host files (all under the container's run directory unless said otherwise)::

    layers/<i>       loop-mounted layer disks        rootfs/   the overlay
    files/           hostname, hosts, resolv.conf    agent.sock, agent.pid, agent.log
    rw/upper, rw/work  the writable layer (in the container's store directory when it
                       must survive stop/start)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from guest.spec import BootConfig
from shim.containers.netrequest import NetworkRequest
from shim.errors import VmshimError
from shim.vm.agent_client import AgentClient

if TYPE_CHECKING:  # imported where used at run time
    from shim.containers.networking import ContainerNetwork

HELLO_TIMEOUT = 30.0


class ProcessPlacement:
    """One container in host namespaces, as its monitor sees it.

    Precondition: running as root (mounts, namespaces, cgroups)."""

    kind = "process"

    def __init__(
        self,
        boot: BootConfig,
        layer_disks: Sequence[str | Path],
        run_dir: Path,
        *,
        name: str,
        rw_dir: Path | None = None,
        mounts: list | None = None,
        network: NetworkRequest | None = None,
    ):
        from shim.containers.mounts import Attachments

        self.boot_config = boot
        self.network_request = network
        """The container's networking: connected in boot() (the host
        agent joins the network namespace made for it, and the container shares it, as
        in a VM), disconnected in teardown(). None: the container makes its own
        namespace with only lo."""
        self.network: ContainerNetwork | None = None
        self.attachments = Attachments(mounts or [])
        """-v/--mount/--tmpfs (shim.containers.mounts): volumes are leased and loop-mounted
        under ``volumes/`` only while the rootfs is assembled; leases end in teardown()."""
        self.layer_disks = [Path(p) for p in layer_disks]
        self.run_dir = Path(run_dir)
        self.name = name
        self.rw_dir = Path(rw_dir) if rw_dir is not None else self.run_dir / "rw"
        self.agent_socket = self.run_dir / "agent.sock"
        self.pid_file = self.run_dir / "agent.pid"
        self.rootfs = self.run_dir / "rootfs"
        self.agent_pid: int | None = None

    # ---- life -------------------------------------------------------------------------------

    def boot(self, alive=None) -> AgentClient:
        """Mount the rootfs, start the host agent and wait for its hello. Raises
        VmshimError (having undone what was done)."""
        from guest.runtime.container import HOST_NAMESPACES, Container
        from shim.images.layers import mount_layer

        if os.geteuid() != 0:
            raise VmshimError("--isolation process needs root (mounts and namespaces)")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.run_dir, 0o700)  # the rootfs is for root and the container only
            for sub in ("layers", "rootfs", "files"):
                (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
            for sub in ("upper", "work"):
                (self.rw_dir / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.rw_dir, 0o700)  # the container's files: not for other local users
            for index, disk in enumerate(self.layer_disks):
                mount_layer(disk, self.run_dir / "layers" / str(index))
            layer_dirs = [str(self.run_dir / "layers" / str(i)) for i in range(len(self.layer_disks))]
            mounts = self.attachments.for_process(self.run_dir / "volumes")
            namespaces: tuple[str, ...] = HOST_NAMESPACES
            netns = None
            if self.network_request is not None:
                from shim.containers import networking as netc

                self.network, self.boot_config = netc.start(
                    self.boot_config.container_id, self.name, "process", self.network_request, self.boot_config
                )
                if self.network.mode != "none":  # the agent's (made for it, or the host's)
                    namespaces = tuple(n for n in HOST_NAMESPACES if n != "net")
                netns = self.network.netns_path
            try:
                container = Container.create(
                    self.boot_config,
                    lowerdirs=list(reversed(layer_dirs)),
                    upperdir=str(self.rw_dir / "upper"),
                    workdir=str(self.rw_dir / "work"),
                    rootfs=str(self.rootfs),
                    files_dir=str(self.run_dir / "files"),
                    mounts=mounts,
                    namespaces=namespaces,
                )
            except Exception as exc:
                raise VmshimError(f"cannot assemble the container's rootfs: {exc}") from None
            finally:
                self.attachments.unstage()  # the rootfs holds what it bound
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.agent_socket.unlink(missing_ok=True)
            listener.bind(str(self.agent_socket))
            listener.listen(4)
            self.agent_pid = _fork_agent(listener, self.boot_config, container, self.run_dir / "agent.log", netns=netns)
            listener.close()
            start = _start_time(self.agent_pid)
            self.pid_file.write_text(f"{self.agent_pid} {start}\n")
            client = AgentClient.connect_unix(str(self.agent_socket), timeout=5)
            client.handshake(HELLO_TIMEOUT, alive=alive)
            return client
        except BaseException:
            self.kill()
            self.teardown()
            raise

    def reattach(self) -> AgentClient | None:
        """Connect to the host agent a previous monitor started; None when it is gone."""
        from shim.containers.isolation import reattach_agent

        return reattach_agent(self, self.boot_config.container_id, self.network_request, self.agent_socket)

    def _recorded_agent(self) -> int | None:
        """The host agent's pid if it still runs (checked against its start time)."""
        if self.agent_pid is not None and _start_time(self.agent_pid) is not None:
            return self.agent_pid
        try:
            pid_text, start_text = self.pid_file.read_text().split()
            pid, start = int(pid_text), int(start_text)
        except (OSError, ValueError):
            return None
        return pid if _start_time(pid) == start else None

    def running(self) -> bool:
        return self._recorded_agent() is not None

    def _cgroup(self):
        from guest.runtime.cgroups import Cgroup

        return Cgroup.create(self.boot_config.container_id)

    def pause(self) -> None:
        from guest.runtime.cgroups import CgroupError

        try:
            self._cgroup().freeze(True)
        except CgroupError as exc:
            raise VmshimError(f"cannot pause: {exc}") from None

    def resume(self) -> None:
        from guest.runtime.cgroups import CgroupError

        try:
            self._cgroup().freeze(False)
        except CgroupError as exc:
            raise VmshimError(f"cannot unpause: {exc}") from None

    def kill(self) -> None:
        """SIGKILL every process of the container and the host agent. Never raises."""
        try:
            cgroup = self._cgroup()
            try:
                cgroup.freeze(False)
            except Exception:  # noqa: BLE001
                pass
            cgroup.kill()
        except Exception:  # noqa: BLE001
            pass
        pid = self._recorded_agent()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def teardown(self, grace: float = 3.0, timeout: float = 15.0) -> None:
        """After the container ended: wait for the host agent to leave (killing it and
        the container after *grace* s), remove the cgroup, unmount the rootfs and the
        layers, remove the run directory."""
        from guest.runtime import rootfs as rootfs_mod
        from shim.images.layers import umount_layer

        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline:
            _reap_child(self.agent_pid)
            time.sleep(0.02)
        if self.running():
            self.kill()
        end = time.monotonic() + timeout
        while self.agent_pid is not None and _reap_child(self.agent_pid) is None and time.monotonic() < end:
            time.sleep(0.02)
        try:
            self._cgroup().remove()
        except Exception:  # noqa: BLE001
            pass
        if self.rootfs.exists():
            for target in _mounts_below(self.rootfs):
                rootfs_mod.unmount(target, detach=True)
        # Volume staging mounts are detached right after boot; one left by a monitor that
        # died in between must go before the run directory is removed.
        for target in _mounts_below(self.run_dir / "volumes"):
            rootfs_mod.unmount(target, detach=True)
        self.attachments.release()
        layers = self.run_dir / "layers"
        if layers.exists():
            for layer_dir in sorted(layers.iterdir(), reverse=True):
                if os.path.ismount(layer_dir):
                    try:
                        umount_layer(layer_dir)
                    except Exception:  # noqa: BLE001
                        rootfs_mod.unmount(str(layer_dir), detach=True)
        if self.network_request is not None:
            from shim.containers.networking import stop

            stop(self.boot_config.container_id)
            self.network = None
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def forget(self, timeout: float = 10.0) -> None:
        """Nothing outlives teardown on the host side: there is no hypervisor to wait for."""

    def info(self) -> dict:
        return {
            "AgentPid": self._recorded_agent() or 0,
            "Rootfs": str(self.rootfs),
            "AgentSocket": str(self.agent_socket),
        }

    def usage(self) -> dict:
        return self._cgroup().usage()


def _mounts_below(path: Path) -> list[str]:
    """Mount points at or below *path*, deepest first."""
    prefix = str(path).rstrip("/")
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                target = line.split()[4].replace("\\040", " ")
                if target == prefix or target.startswith(prefix + "/"):
                    found.append(target)
    except OSError:
        pass
    return sorted(set(found), key=len, reverse=True)


def _start_time(pid: int) -> int | None:
    from shim.containers.store import process_start_time

    return process_start_time(pid)


def _reap_child(pid: int | None) -> int | None:
    """Reap *pid* if it is our child and exited; its status, else None."""
    if pid is None:
        return 0
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0  # not ours (a previous monitor started it) or already reaped
    return status if done else None


def _fork_agent(
    listener: socket.socket, config: BootConfig, container, log_path: Path, netns: Path | None = None
) -> int:
    """Fork the host agent (its own session, stdio on *log_path*, in the network
    namespace at *netns* if given); return its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        if netns is not None:
            from guest.runtime import syscalls

            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            syscalls.setns(fd, syscalls.CLONE_NEWNET)
            os.close(fd)
        from shim.containers.forked import redirect_stdio

        redirect_stdio(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640), keep=listener.fileno())
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        from guest.agent import Agent

        def log(text: str) -> None:
            sys.stderr.write(f"vmshim host agent: {text}\n")

        listener.setblocking(False)
        agent = Agent(-1, config, container, listener=listener, exit_grace=0.0, log=log)
        agent.run()
        agent.kill_all()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - report and leave: the monitor sees EOF
        try:
            sys.stderr.write(f"vmshim host agent: {exc!r}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
    finally:
        os._exit(code)
