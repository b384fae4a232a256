"""Place a container in plain namespaces on the host (``--isolation process``).

The same squashfs layer disks the VMs use are loop-mounted read-only and stacked with
overlayfs, and the same agent loop and runtime code that run in the guest run here in a
forked host process, talking to the CLI over a socketpair. The conversation after
``hello`` is byte-for-byte the one a VM would have.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from pathlib import Path

from guest.spec import BootConfig
from shim.errors import VmshimError
from shim.vm.agent_client import AgentClient

HELLO_TIMEOUT = 30.0


class ProcessPlacement:
    """One container in host namespaces. Call boot() once, then release() exactly once.

    Precondition: running as root (mounts, namespaces, cgroups)."""

    def __init__(self, boot: BootConfig, layer_disks: list[Path], run_dir: Path, *, name: str):
        self.boot_config = boot
        self.layer_disks = layer_disks
        self.run_dir = run_dir
        self.name = name
        self.layer_mounts: list[Path] = []
        self.container = None
        self.agent_pid: int | None = None
        self.client: AgentClient | None = None

    def boot(self) -> AgentClient:
        """Mount the rootfs, fork the host agent and wait for its hello."""
        from guest.runtime.container import Container
        from shim.images.layers import mount_layer

        if os.geteuid() != 0:
            raise VmshimError("--isolation process needs root (mounts and namespaces)")
        for sub in ("layers", "rw/upper", "rw/work", "rootfs", "files"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        for index, disk in enumerate(self.layer_disks):
            target = self.run_dir / "layers" / str(index)
            target.mkdir(exist_ok=True)
            mount_layer(disk, target)
            self.layer_mounts.append(target)
        try:
            self.container = Container.create(
                self.boot_config,
                lowerdirs=[str(p) for p in reversed(self.layer_mounts)],
                upperdir=str(self.run_dir / "rw/upper"), workdir=str(self.run_dir / "rw/work"),
                rootfs=str(self.run_dir / "rootfs"), files_dir=str(self.run_dir / "files"))
        except Exception as exc:
            raise VmshimError(f"cannot assemble the container's rootfs: {exc}") from None
        host_end, agent_end = socket.socketpair()
        self.agent_pid = os.fork()
        if self.agent_pid == 0:  # the host agent: never returns
            host_end.close()
            _agent_main(agent_end, self.boot_config, self.container)
        agent_end.close()
        self.client = AgentClient(host_end)
        self.client.handshake(HELLO_TIMEOUT)
        return self.client

    def abort(self) -> None:
        if self.agent_pid:
            _kill(self.agent_pid, signal.SIGKILL)

    def release(self) -> None:
        """Stop the agent, take the rootfs and layer mounts down, remove the run dir."""
        from shim.images.layers import umount_layer

        if self.client is not None:
            self.client.close()  # the agent sees EOF and ends its loop
        if self.agent_pid:
            try:
                os.waitpid(self.agent_pid, 0)
            except ChildProcessError:
                pass
        if self.container is not None:
            try:
                self.container.destroy()
            except Exception:
                pass
        for target in reversed(self.layer_mounts):
            try:
                umount_layer(target)
            except Exception:
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _agent_main(channel: socket.socket, config: BootConfig, container) -> None:
    """Body of the forked host agent. Leaves the CLI's session so a Ctrl-C at the terminal
    reaches the CLI (which forwards it) and not the agent."""
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        from guest.agent import Agent

        agent = Agent(channel.fileno(), config, container, exit_grace=0.0)
        agent.run()
        agent.kill_all()
        code = 0
    except BaseException as exc:  # report and leave: the CLI sees the channel close
        try:
            sys.stderr.write(f"vmshim host agent: {exc}\n")
        except Exception:
            pass
    finally:
        os._exit(code)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
