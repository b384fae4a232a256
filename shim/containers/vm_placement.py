"""Place a container in its own microVM: config drive, domain, boot, agent handshake.

Teardown never blocks the user's command: the guest reboots itself when the container
ends (the domain is set to be destroyed on reboot) and a detached reaper makes sure the
domain is gone and removes the run directory.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from guest.spec import CONFIG_DRIVE_SERIAL, LAYER_SERIAL_PREFIX, BootConfig
from shim.vm.agent_client import AgentClient

BOOT_TIMEOUT = float(os.environ.get("VMSHIM_BOOT_TIMEOUT", "90"))
"""Seconds from domain creation to the agent's hello (TCG on a busy host can be slow)."""


def domain_name(container_id: str) -> str:
    return f"vmshim-{container_id[:12]}"


def console_tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of the serial console log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail)


class VmPlacement:
    """One container's microVM. Call boot() once, then release() exactly once."""

    def __init__(self, boot: BootConfig, layer_disks: list[Path], run_dir: Path, *,
                 name: str, memory_mib: int = 256, vcpus: int = 1, backend=None):
        self.boot_config = boot
        self.layer_disks = layer_disks
        self.run_dir = run_dir
        self.name = name
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.domain = domain_name(boot.container_id)
        self.console_log = run_dir / "console.log"
        self.agent_socket = run_dir / "agent.sock"
        self._backend = backend
        self._created = False
        self.client: AgentClient | None = None
        self.accel = None

    @property
    def backend(self):
        if self._backend is None:
            from shim.vm.libvirt_backend import LibvirtBackend

            self._backend = LibvirtBackend()
        return self._backend

    def build_domain(self, guest, accel):
        """The domain description for this container (pure: no side effects)."""
        from shim.vm import domain as dom

        disks = [
            dom.Disk(source=str(path), target=_target(i), serial=f"{LAYER_SERIAL_PREFIX}{i}",
                     readonly=True, shareable=True)
            for i, path in enumerate(self.layer_disks)
        ]
        disks.append(dom.Disk(source=str(self.run_dir / "config.iso"),
                              target=_target(len(disks)), serial=CONFIG_DRIVE_SERIAL,
                              readonly=True))
        return dom.Domain(
            name=self.domain,
            uuid=str(uuid.UUID(self.boot_config.container_id[:32])),
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            domain_type="kvm" if accel.kind == "kvm" else "qemu",
            boot=dom.KernelBoot(kernel=str(guest.kernel), initrd=str(guest.initramfs),
                                cmdline=guest.cmdline),
            disks=disks,
            channels=[dom.AgentChannel(socket_path=str(self.agent_socket))],
            serial=dom.SerialLog(path=str(self.console_log)),
            metadata={"container-id": self.boot_config.container_id, "name": self.name},
        )

    def boot(self) -> AgentClient:
        """Create the VM and wait for the agent's hello. Raises HypervisorError,
        GuestImageError or AgentError (with the console's last lines)."""
        from shim.guestimage import ensure_guest_image
        from shim.vm.accel import detect_accel
        from shim.vm.configdrive import build_config_drive

        guest = ensure_guest_image()
        self.accel = detect_accel()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o755)
        build_config_drive(self.boot_config, self.run_dir / "config.iso")
        domain = self.build_domain(guest, self.accel)
        self.backend.create(domain)
        self._created = True
        self.client = AgentClient.connect_unix(str(self.agent_socket), timeout=10)
        self.client.handshake(BOOT_TIMEOUT, alive=self._vm_problem)
        return self.client

    def _vm_problem(self) -> str | None:
        if self.backend.is_running(self.domain):
            return None
        tail = console_tail(self.console_log)
        return ("the microVM stopped before its agent answered"
                + (f"; console: {tail}" if tail else f"; see {self.console_log}"))

    def abort(self) -> None:
        """Stop the VM now (errors, Ctrl-C before the process ran)."""
        if self._created:
            try:
                self.backend.destroy(self.domain)
            except Exception:
                pass

    def release(self) -> None:
        """Close the channel and hand the rest of the teardown to a detached reaper."""
        if self.client is not None:
            self.client.close()
        if not self._created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        from shim.containers import reaper

        reaper.spawn(self.domain, str(self.run_dir))


def _target(index: int) -> str:
    """vda, vdb, … vdz, vdaa, … (libvirt's naming)."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "vd" + letters
