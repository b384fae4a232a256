"""An in-memory :class:`~shim.vm.backend.Backend` for unit tests of the modules above it.

It runs nothing. It records every call and every domain XML it was given, keeps the same
rules as libvirt (one VM per name, transient VMs vanish when they stop, destroy of a
missing VM is a no-op) and lets a test make things happen::

    backend = FakeBackend()
    handle = backend.create(domain)           # backend.created[-1] is the XML
    backend.simulate_exit(handle.name)        # the guest rebooted / QEMU died
    backend.fail_next_create("no memory")     # the next create raises HypervisorError
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from shim.errors import HypervisorError
from shim.vm.backend import DOMAIN_PREFIX, VmHandle, VmNotFound
from shim.vm.domain import Disk, Domain, Filesystem, Interface


@dataclass
class FakeVm:
    domain: Domain
    xml: str
    pid: int
    paused: bool = False
    plugged: dict[str, Interface] = field(default_factory=dict)
    """NICs plugged in while it runs (attach_interface), by MAC."""
    disks: dict[str, Disk] = field(default_factory=dict)
    """Disks plugged in while it runs (attach_disk), by serial."""
    shares: dict[str, Filesystem] = field(default_factory=dict)
    """virtiofs shares plugged in while it runs (attach_filesystem), by tag."""

    @property
    def root(self) -> ET.Element:
        """The domain XML parsed, for assertions (``vm.root.find("memory").text``)."""
        return ET.fromstring(self.xml)


@dataclass
class FakeBackend:
    """Fake hypervisor. ``vms`` holds what is "running"; ``created`` every XML ever
    created, in order; ``calls`` every call as ``(method, name)``."""

    vms: dict[str, FakeVm] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    calls: list[tuple[str, str]] = field(default_factory=list)
    unreachable: str | None = None
    """When set, every call raises HypervisorError as if libvirtd were down."""
    _next_pid: int = field(default=40000, init=False, repr=False)
    _create_failures: list[str] = field(default_factory=list, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _changed: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._changed = threading.Condition(self._lock)

    # --- test controls ------------------------------------------------------------------

    def fail_next_create(self, message: str = "simulated failure") -> None:
        """Make the next :meth:`create` raise HypervisorError with ``message``."""
        self._create_failures.append(message)

    def simulate_exit(self, name: str) -> None:
        """The VM stops by itself (guest rebooted or crashed): it vanishes."""
        with self._changed:
            if name not in self.vms:
                raise KeyError(f"fake backend has no VM {name}")
            del self.vms[name]
            self._changed.notify_all()

    def xml_of(self, name: str) -> str:
        return self.vms[name].xml

    # --- Backend ------------------------------------------------------------------------

    def _check(self, method: str, name: str = "") -> None:
        self.calls.append((method, name))
        if self.unreachable is not None:
            raise HypervisorError(
                f"cannot reach libvirtd at fake:///: {self.unreachable}; "
                f"start it with `libvirtd -d` (scripts/setup does this)"
            )

    def create(self, domain: Domain) -> VmHandle:
        self._check("create", domain.name)
        xml = domain.to_xml()
        with self._changed:
            if self._create_failures:
                raise HypervisorError(f"cannot start VM {domain.name}: {self._create_failures.pop(0)}")
            if domain.name in self.vms:
                raise HypervisorError(f"cannot start VM {domain.name}: a VM of that name is still running")
            self.created.append(xml)
            self._next_pid += 1
            self.vms[domain.name] = FakeVm(domain=domain, xml=xml, pid=self._next_pid)
            self._changed.notify_all()
        return VmHandle.for_domain(domain)

    def destroy(self, name: str, wait: bool = True) -> None:
        self._check("destroy", name)
        with self._changed:
            self.vms.pop(name, None)
            self._changed.notify_all()

    def is_running(self, name: str) -> bool:
        self._check("is_running", name)
        return name in self.vms

    def list_domains(self, prefix: str = DOMAIN_PREFIX) -> list[str]:
        self._check("list_domains", prefix)
        return sorted(n for n in self.vms if n.startswith(prefix))

    def suspend(self, name: str) -> None:
        self._check("suspend", name)
        self._vm(name, "pause").paused = True

    def resume(self, name: str) -> None:
        self._check("resume", name)
        self._vm(name, "resume").paused = False

    def is_paused(self, name: str) -> bool:
        """Fake-only: whether :meth:`suspend` was the last of suspend/resume."""
        return self._vm(name, "inspect").paused

    def qemu_pid(self, name: str) -> int | None:
        self._check("qemu_pid", name)
        vm = self.vms.get(name)
        return vm.pid if vm else None

    def wait_gone(self, name: str, timeout: float = 10.0) -> bool:
        self._check("wait_gone", name)
        with self._changed:
            return self._changed.wait_for(lambda: name not in self.vms, timeout)

    def attach_interface(self, name: str, iface: Interface) -> None:
        self._check("attach_interface", name)
        self._plug(name, iface, "plugged", iface.mac, "a NIC", "a NIC", "a NIC with that MAC")

    def attach_disk(self, name: str, disk: Disk) -> None:
        self._check("attach_disk", name)
        self._plug(name, disk, "disks", disk.serial, "a disk", f"disk {disk.serial}", "a disk with that serial")

    def _plug(self, name: str, device, table: str, key: str, kind: str, what: str, taken: str) -> None:
        """Put *device* in the VM's *table* (``plugged`` NICs by MAC, ``disks`` by serial)
        under *key*, if a hotplug port is free and *key* is not (as libvirt would refuse)."""
        vm = self._vm(name, f"attach {kind} to")
        slots: dict = getattr(vm, table)
        if key in slots or len(vm.plugged) + len(vm.disks) >= vm.domain.hotplug_ports:
            raise HypervisorError(f"cannot plug {what} into VM {name}: no free hotplug port or {taken}")
        slots[key] = device

    def attach_filesystem(self, name: str, fs: Filesystem) -> None:
        self._check("attach_filesystem", name)
        vm = self._vm(name, "attach a share to")
        used = len(vm.disks) + len(vm.plugged) + len(vm.shares)
        if fs.tag in vm.shares or used >= vm.domain.hotplug_ports:
            raise HypervisorError(
                f"cannot plug share {fs.tag} into VM {name}: no free hotplug port or a share with that tag"
            )
        vm.shares[fs.tag] = fs

    def detach_filesystem(self, name: str, tag: str) -> None:
        self._check("detach_filesystem", name)
        vm = self.vms.get(name)
        if vm is not None:
            vm.shares.pop(tag, None)

    def detach_interface(self, name: str, mac: str, timeout: float = 20.0) -> None:
        self._check("detach_interface", name)
        self._vm(name, "detach a NIC from").plugged.pop(mac, None)

    def interface_macs(self, name: str) -> list[str]:
        self._check("interface_macs", name)
        vm = self._vm(name, "list the NICs of")
        return sorted([i.mac for i in vm.domain.interfaces] + list(vm.plugged))

    def save(self, name: str, path: str) -> None:
        """Writes a small stand-in for libvirt's save image (the XML); the VM vanishes."""
        self._check("save", name)
        with self._changed:
            vm = self._vm(name, "save")
            with open(path, "x") as f:
                f.write("fake-save-image\n" + vm.xml)
            del self.vms[name]
            self._changed.notify_all()

    def migrate(self, name: str, dest_uri: str, domain: Domain) -> None:
        """The VM leaves (the destination is not modelled)."""
        self._check("migrate", name)
        with self._changed:
            self._vm(name, "migrate")
            del self.vms[name]
            self._changed.notify_all()

    def restore(self, path: str, domain: Domain) -> VmHandle:
        self._check("restore", domain.name)
        try:
            with open(path) as f:
                ok = f.readline() == "fake-save-image\n"
        except (OSError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise HypervisorError(f"cannot restore VM {domain.name} from {path}: not a save image")
        return self.create(domain)

    def _vm(self, name: str, operation: str) -> FakeVm:
        vm = self.vms.get(name)
        if vm is None:
            raise VmNotFound(name, operation)
        return vm
