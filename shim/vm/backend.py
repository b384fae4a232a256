"""The hypervisor behind one interface: what the rest of vmshim may ask of a VM.

:class:`Backend` is implemented by :class:`shim.vm.libvirt_backend.LibvirtBackend` (the real
one) and :class:`shim.vm.fake_backend.FakeBackend` (in memory, for unit tests). Nothing
outside ``shim/vm/`` imports libvirt.

Every VM is a *transient* domain: it exists while its QEMU runs and vanishes when QEMU
exits (guest reboot, crash, destroy). There is nothing to undefine.

Errors: every method raises :class:`shim.errors.HypervisorError` (one line, what to do) when
the hypervisor cannot be reached or refuses; :class:`VmNotFound`, a subclass, when the named
VM does not exist and the operation needs it to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from shim.errors import HypervisorError
from shim.vm.domain import Disk, Domain, Filesystem, Interface

DOMAIN_PREFIX = "vmshim-"
"""Every domain vmshim creates is named ``vmshim-<something>``; others are not ours."""


class VmNotFound(HypervisorError):
    """The named VM does not exist (it was never started, or it has already stopped)."""

    def __init__(self, name: str, operation: str = ""):
        what = f"cannot {operation} VM {name}" if operation else f"VM {name}"
        super().__init__(f"{what}: no such VM (it is not running)")
        self.name = name


@dataclass(frozen=True)
class VmHandle:
    """What :meth:`Backend.create` returns: enough to talk to and find the VM again."""

    name: str
    uuid: str
    agent_socket: str | None
    """Host end of the agent's virtio-serial port; it exists when ``create`` returns."""
    serial_log: str | None
    """File receiving the guest's serial console (kernel messages, early agent errors)."""

    @classmethod
    def for_domain(cls, domain: Domain) -> "VmHandle":
        return cls(
            name=domain.name,
            uuid=domain.uuid,
            agent_socket=domain.channels[0].socket_path if domain.channels else None,
            serial_log=domain.serial.path if domain.serial else None,
        )


@runtime_checkable
class Backend(Protocol):
    """A hypervisor that runs :class:`Domain`\\ s."""

    def create(self, domain: Domain) -> VmHandle:
        """Start ``domain`` as a transient VM; returns once QEMU runs (the agent socket
        exists then; the guest is still booting). Preconditions: no VM of that name, the
        directories of the agent socket and serial log exist. Raises HypervisorError."""
        ...

    def destroy(self, name: str, wait: bool = True) -> None:
        """Stop the VM at once (no guest shutdown); a no-op when it does not exist.

        ``wait=True`` returns when the hypervisor has forgotten the VM (here ~1.2-1.6 s,
        because reaping QEMU is slow on these hosts). ``wait=False`` only tells QEMU to
        exit (SIGTERM: a clean QEMU exit, disks flushed) and returns at once; the name
        stays taken until the hypervisor notices (:meth:`wait_gone`). Raises
        HypervisorError."""
        ...

    def is_running(self, name: str) -> bool:
        """True while the VM's QEMU is alive (running or paused); False when the VM does
        not exist or its QEMU has exited but is not yet reaped. Raises HypervisorError."""
        ...

    def list_domains(self, prefix: str = DOMAIN_PREFIX) -> list[str]:
        """Names of the existing VMs that start with ``prefix``, sorted."""
        ...

    def suspend(self, name: str) -> None:
        """Pause every vCPU (the guest's memory stays). Raises VmNotFound."""
        ...

    def resume(self, name: str) -> None:
        """Undo :meth:`suspend`. Raises VmNotFound."""
        ...

    def qemu_pid(self, name: str) -> int | None:
        """PID of the VM's QEMU process on this host, or None (no such VM, or the
        hypervisor is remote)."""
        ...

    def wait_gone(self, name: str, timeout: float = 10.0) -> bool:
        """Poll until the hypervisor no longer knows ``name``; False after ``timeout`` s."""
        ...

    def attach_interface(self, name: str, iface: Interface) -> None:
        """Plug the NIC *iface* into the running VM (it needs a free hotplug port, see
        Domain.hotplug_ports). Raises VmNotFound, HypervisorError."""
        ...

    def attach_disk(self, name: str, disk: Disk) -> None:
        """Plug the virtio disk *disk* into the running VM (a pooled VM taking its
        container's layers; it needs a free hotplug port). Raises VmNotFound,
        HypervisorError."""
        ...

    def attach_filesystem(self, name: str, fs: Filesystem) -> None:
        """Plug the virtiofs share *fs* into the running VM (libvirt starts its
        virtiofsd; it needs a free hotplug port and a domain with shared memory). Raises
        VmNotFound, HypervisorError."""
        ...

    def detach_filesystem(self, name: str, tag: str) -> None:
        """Ask for the virtiofs share *tag* to leave the running VM (no wait). A no-op
        when the VM or the share is gone. Raises HypervisorError."""
        ...

    def detach_interface(self, name: str, mac: str, timeout: float = 20.0) -> None:
        """Unplug the NIC with *mac* from the running VM and wait (up to *timeout* s)
        until the guest let go of it. A no-op when the VM has no such NIC. Raises
        VmNotFound, HypervisorError (also when the guest does not let go in time)."""
        ...

    def interface_macs(self, name: str) -> list[str]:
        """MACs of the running VM's NICs now (live configuration). Raises VmNotFound."""
        ...

    def save(self, name: str, path: str) -> None:
        """Write the VM's memory and device state to *path* (a new file) and end the VM
        (libvirt's virDomainSaveFlags). Its disks are not in the file: they must be
        given back unchanged to :meth:`restore`. Raises VmNotFound, HypervisorError
        (the VM is left as it was, running or paused)."""
        ...

    def migrate(self, name: str, dest_uri: str, domain: Domain) -> None:
        """Move the running VM to the hypervisor at *dest_uri* (libvirt live migration;
        the disks are where they are: shared storage), as *domain* there; it is gone here
        when this returns. Raises VmNotFound, HypervisorError (it runs on here then)."""
        ...

    def restore(self, path: str, domain: Domain) -> VmHandle:
        """Start a VM from a file :meth:`save` wrote, with *domain* as its description
        (same devices; paths may differ); it runs when this returns. Raises
        HypervisorError (no VM is left behind)."""
        ...
