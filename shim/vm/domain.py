"""libvirt domain XML for a vmshim microVM. The only module that knows that XML.

One dataclass per device, virtinst style: each validates its own fields in
``__post_init__`` (raising ``ValueError`` with a message that names the field) and knows how
to render itself. :class:`Domain` holds them, and :meth:`Domain.to_xml` produces
deterministic, indented XML (same input, same bytes), so golden-file tests can pin it.

Defaults follow the measured recipe in DESIGN.md ("A measured recipe for the guest"):
machine ``pc`` without ``<acpi/>`` (unless there is more than one vCPU; a domain that
takes NICs while it runs is ``q35`` with spare PCIe root ports, see ``hotplug_ports``); under TCG a
``qemu64`` CPU with ``rdrand`` and a 32 MiB translation-block cache; under KVM
``host-passthrough``; no USB, no balloon, no graphics; the serial console goes to a
file; every way the guest stops destroys the domain. The domain is meant to be started
transient (``createXML``): it vanishes when QEMU exits.

Example::

    Domain(name="vmshim-abc", uuid="…", memory_mib=128, vcpus=1, domain_type="qemu",
           boot=KernelBoot(kernel="/…/vmlinuz", initrd="/…/initramfs", cmdline=DEFAULT_CMDLINE),
           disks=[Disk(source="/…/l0.sqfs", target="vda", serial="vmshim-l0", shareable=True)],
           channels=[AgentChannel(socket_path="/run/vmshim/abc/agent.sock")],
           serial=SerialLog(path="/var/lib/vmshim/containers/abc/console.log")).to_xml()
"""

from __future__ import annotations

import re
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from guest.spec import AGENT_PORT_NAME

# --- defaults, all in one place -----------------------------------------------------------

DEFAULT_MACHINE = "pc"
"""``pc`` boots 0.2 s faster than ``q35`` here; ``microvm`` is refused by libvirt 9.0."""
HOTPLUG_MACHINE = "q35"
"""Machine of domains that take NICs while they run (``network connect``): ``pc`` hot-plugs
through ACPI, which the minimal guest kernel (and a domain without ``<acpi/>``) lacks;
q35's ``pcie-root-port``s hot-plug natively (PCIe pciehp)."""
HOTPLUG_PORTS = 4
"""Spare ``pcie-root-port``s of such a domain: how many NICs can be plugged in while it runs."""
HOTPLUG_CMDLINE = "pcie_ports=native"
"""Without ACPI the kernel gets no _OSC grant: this makes it drive the ports' hotplug itself."""
HOTPLUG_QEMU_ARGS = ("-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off")
"""q35 would otherwise claim the root ports for ACPI hotplug (QEMU 6.1+), which the guest
cannot use: native PCIe hotplug it is. Passed through ``<qemu:commandline>`` (libvirt
marks the domain ``custom-argv`` tainted for it)."""
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
DEFAULT_CPU_READBACK = "words"
CPU_READBACKS = (DEFAULT_CPU_READBACK, "per-feature")
"""How libvirt reads back the guest CPU QEMU made, at every start and restore (libvirt's
``qemuProcessFetchGuestCPU``). ``per-feature`` is libvirt's own choice with QEMU >= 4.1: one
``qom-get`` per CPU property, ~400 monitor round trips that took ~0.33 s of every start
here (libvirt 9.0, QEMU 7.2; measured in libvirtd's debug log). ``words`` (the default)
removes libvirt's ``cpu-unavailable-features`` capability bit for the domain through
``<qemu:capabilities>``, so libvirt takes its x86 path instead: two reads, QEMU's
``feature-words`` and ``filtered-features``. The guest's CPU is the same (its CPUID flags
were compared); libvirt documents the override as meant for experiments and marks the
domain ``custom-hypervisor-feature`` tainted. ``VMSHIM_CPU_READBACK=per-feature`` goes back
to libvirt's way (:func:`shim.vm.accel.cpu_readback`)."""
CPU_READBACK_CAPS_REMOVED = ("cpu-unavailable-features",)
DEFAULT_TB_CACHE_MIB = 32
"""TCG translation-block cache; QEMU's default (1 GiB reserved) costs ~28 MiB more per VM.
An idle busybox container fills all 32 MiB, but smaller costs speed (issue 15, interleaved
medians, n=5): 16 MiB saves 16 MiB of PSS and makes `run --rm busybox true` 1.33x slower
and `exec` 2.8x; 8 MiB: 2.4x and 3.6x. So 32 it stays."""
TCG_CPU_MODEL = "qemu64"
TCG_CPU_FEATURES = ("rdrand",)
"""Without rdrand, python in the guest waits ~1.1 s for entropy at boot."""
DEFAULT_CMDLINE = (
    "console=ttyS0 panic=-1 quiet loglevel=0 i8042.noaux i8042.nokbd 8250.nr_uarts=1 "
    "tsc=reliable no_timer_check noreplace-smp cryptomgr.notests random.trust_cpu=on"
)
"""Kernel command line of the measured recipe; callers append their own ``key=value``s."""
DISK_CACHE = "writeback"
"""Host page cache on: layer disks shared by many VMs are cached once, and O_DIRECT
(``cache=none``) fails on tmpfs/overlay hosts. Guest flushes are still honoured."""
DISK_IO = "threads"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
"""QEMU's C virtiofsd (Debian's ``qemu-system-common``)."""

METADATA_NS = "https://vmshim.dev/xmlns/domain/1"
METADATA_PREFIX = "vmshim"
"""``<metadata>`` holds one ``<vmshim:instance xmlns:vmshim=METADATA_NS>`` element whose
children are the :attr:`Domain.metadata` entries, e.g. ``<vmshim:container-id>``."""

DOMAIN_TYPES = ("qemu", "kvm")
"""``qemu`` = TCG emulation, ``kvm`` = hardware virtualisation (see shim.vm.accel)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_TARGET_RE = re.compile(r"^vd[a-z]{1,2}$")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,20}$")
_PORT_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_META_KEY_RE = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_INTERFACE_TYPES = ("bridge", "user", "ethernet")
_RESERVED_TAP_PREFIXES = ("vnet", "vif", "macvtap", "macvlan")
"""libvirt refuses or reuses tap names with these prefixes (it hands them out itself)."""
_DISK_FORMATS = ("raw", "qcow2")
_DISK_CACHES = ("none", "writeback", "writethrough", "directsync", "unsafe")
_DISK_IOS = ("threads", "native", "io_uring")


def _absolute(what: str, path: str) -> None:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"{what} must be an absolute path, got {path!r}")
    if "\0" in path or "\n" in path:
        raise ValueError(f"{what} must not contain NUL or newline characters")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    """Append ``<tag attrs…>text</tag>`` to parent; attributes keep the given order."""
    elem = ET.SubElement(parent, tag, attrs)
    if text is not None:
        elem.text = text
    return elem


def _element_xml(device) -> str:
    """One device's element alone, indented like :meth:`Domain.to_xml`."""
    holder = ET.Element("devices")
    device.render(holder)
    elem = holder[0]
    ET.indent(elem, space="  ")
    return ET.tostring(elem, encoding="unicode") + "\n"


# --- devices ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class KernelBoot:
    """Direct kernel boot: no bootloader, no boot disk."""

    kernel: str
    initrd: str
    cmdline: str = DEFAULT_CMDLINE

    def __post_init__(self) -> None:
        _absolute("kernel", self.kernel)
        _absolute("initrd", self.initrd)
        if any(c in self.cmdline for c in "\0\n\r") or len(self.cmdline) > 2048:
            raise ValueError("cmdline must be one line of at most 2048 characters")

    def render(self, os_elem: ET.Element) -> None:
        _sub(os_elem, "kernel", self.kernel)
        _sub(os_elem, "initrd", self.initrd)
        _sub(os_elem, "cmdline", self.cmdline)


@dataclass(kw_only=True)
class Disk:
    """A file-backed virtio block device. The guest finds it by ``serial``, not by target
    name (targets are only libvirt's ordering hint; ``vdb`` has shown up as ``vda``).

    Image layers: ``readonly=True, shareable=True`` (one file, many VMs). The writable
    layer: ``readonly=False`` (``discard=True`` lets the guest give freed blocks back).
    """

    source: str
    target: str
    serial: str
    readonly: bool = True
    shareable: bool = False
    format: str = "raw"
    cache: str = DISK_CACHE
    io: str = DISK_IO
    discard: bool = False

    def __post_init__(self) -> None:
        _absolute(f"disk {self.target!r} source", self.source)
        if not _TARGET_RE.match(self.target):
            raise ValueError(f"disk target must look like vda, vdb, …, got {self.target!r}")
        if not _SERIAL_RE.match(self.serial):
            raise ValueError(f"disk serial must be 1-20 characters of [A-Za-z0-9_.+-], got {self.serial!r}")
        if self.format not in _DISK_FORMATS:
            raise ValueError(f"disk format must be one of {_DISK_FORMATS}, got {self.format!r}")
        if self.cache not in _DISK_CACHES:
            raise ValueError(f"disk cache must be one of {_DISK_CACHES}, got {self.cache!r}")
        if self.io not in _DISK_IOS:
            raise ValueError(f"disk io must be one of {_DISK_IOS}, got {self.io!r}")
        if self.io == "native" and self.cache not in ("none", "directsync"):
            raise ValueError("disk io='native' needs cache='none' or 'directsync'")
        if self.discard and self.readonly:
            raise ValueError(f"disk {self.serial!r}: discard makes no sense on a read-only disk")

    def to_xml(self) -> str:
        """The ``<disk>`` element alone (libvirt's attach-device: a pooled VM's disks)."""
        return _element_xml(self)

    def render(self, devices: ET.Element) -> None:
        disk = _sub(devices, "disk", type="file", device="disk")
        driver = {"name": "qemu", "type": self.format, "cache": self.cache, "io": self.io}
        if self.discard:
            driver["discard"] = "unmap"
        _sub(disk, "driver", **driver)
        _sub(disk, "source", file=self.source)
        _sub(disk, "target", dev=self.target, bus="virtio")
        _sub(disk, "serial", self.serial)
        if self.readonly:
            _sub(disk, "readonly")
        if self.shareable:
            _sub(disk, "shareable")


@dataclass(kw_only=True)
class AgentChannel:
    """A virtio-serial port whose host end is a unix socket that QEMU listens on
    (``mode='bind'``); the socket exists when ``createXML`` returns. Its directory must
    exist and be writable by the QEMU user (``libvirt-qemu`` under qemu:///system)."""

    socket_path: str
    name: str = AGENT_PORT_NAME

    def __post_init__(self) -> None:
        _absolute("agent socket", self.socket_path)
        if len(self.socket_path.encode()) > 107:
            raise ValueError(f"agent socket path is longer than 107 bytes: {self.socket_path}")
        if not _PORT_NAME_RE.match(self.name):
            raise ValueError(f"channel name must be 1-64 characters of [A-Za-z0-9_.-], got {self.name!r}")

    def render(self, devices: ET.Element) -> None:
        chan = _sub(devices, "channel", type="unix")
        _sub(chan, "source", mode="bind", path=self.socket_path)
        _sub(chan, "target", type="virtio", name=self.name)


@dataclass(kw_only=True)
class SerialLog:
    """The guest's ttyS0 (kernel console) written to a file on the host. With
    ``append=True`` a restarted container keeps its earlier boot logs."""

    path: str
    append: bool = False

    def __post_init__(self) -> None:
        _absolute("serial log", self.path)

    def render(self, devices: ET.Element) -> None:
        src = {"path": self.path}
        if self.append:
            src["append"] = "on"
        serial = _sub(devices, "serial", type="file")
        _sub(serial, "source", **src)
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="file")
        _sub(console, "source", **src)
        _sub(console, "target", type="serial", port="0")


@dataclass(kw_only=True)
class Vsock:
    """virtio-vsock (needs /dev/vhost-vsock on the host). ``cid=None``: libvirt picks one."""

    cid: int | None = None

    def __post_init__(self) -> None:
        if self.cid is not None and not (3 <= self.cid < 2**32 - 1):
            raise ValueError(f"vsock cid must be in 3..2^32-2, got {self.cid}")

    def render(self, devices: ET.Element) -> None:
        vsock = _sub(devices, "vsock", model="virtio")
        if self.cid is None:
            _sub(vsock, "cid", auto="yes")
        else:
            _sub(vsock, "cid", auto="no", address=str(self.cid))


@dataclass(kw_only=True)
class Filesystem:
    """A host directory shared with virtiofs (bind mounts, OCI bundle rootfs). The guest
    mounts it with ``mount -t virtiofs <tag> <dir>``. A domain with any Filesystem gets
    memfd shared memory, which virtiofs needs."""

    source_dir: str
    tag: str
    queue_size: int = 1024

    def __post_init__(self) -> None:
        _absolute("filesystem source", self.source_dir)
        if not _PORT_NAME_RE.match(self.tag) or len(self.tag) > 36:
            raise ValueError(f"filesystem tag must be 1-36 characters of [A-Za-z0-9_.-], got {self.tag!r}")
        if self.queue_size not in (64, 128, 256, 512, 1024):
            raise ValueError(f"filesystem queue_size must be a power of two 64..1024, got {self.queue_size}")

    def to_xml(self) -> str:
        """The ``<filesystem>`` element alone (libvirt's attach-device: a pod member's
        rootfs plugged into the sandbox's running VM)."""
        return _element_xml(self)

    def render(self, devices: ET.Element) -> None:
        fs = _sub(devices, "filesystem", type="mount", accessmode="passthrough")
        _sub(fs, "driver", type="virtiofs", queue=str(self.queue_size))
        _sub(fs, "binary", path=VIRTIOFSD)
        _sub(fs, "source", dir=self.source_dir)
        _sub(fs, "target", dir=self.tag)


@dataclass(kw_only=True)
class Interface:
    """A virtio NIC. The guest finds it by ``mac`` and configures it itself.

    - ``type='bridge'``: libvirt creates a tap (named ``tap`` if given, at most 15
      characters, not one of libvirt's own prefixes; None: libvirt picks ``vnetN``) and
      enslaves it to the existing Linux bridge ``bridge``; vmshim makes the bridge, its
      address and NAT (shim.network).
    - ``type='user'``: QEMU's user-mode stack (SLIRP): the guest's connections become
      sockets of QEMU on the host (``--network host``, see docs/networking.md); the
      guest is 10.0.2.15/24, the host 10.0.2.2, a DNS forwarder 10.0.2.3.
    - ``type='ethernet'``: an existing tap ``tap`` that vmshim made itself (``managed='no'``:
      libvirt opens it and neither creates nor deletes it). vmshim-runtime uses it for an
      engine's network namespace: the tap is made where libvirtd runs, moved into the
      container's namespace once the domain exists, and tc-redirected to and from the
      engine's interface (shim.network.engine_netns).

    The option ROM is off: with direct kernel boot nothing would use iPXE.
    """

    mac: str
    type: str = "bridge"
    bridge: str | None = None
    tap: str | None = None
    mtu: int | None = None

    def __post_init__(self) -> None:
        if self.type not in _INTERFACE_TYPES:
            raise ValueError(f"interface type must be one of {_INTERFACE_TYPES}, got {self.type!r}")
        if self.type == "bridge":
            if not isinstance(self.bridge, str) or not _IFNAME_RE.match(self.bridge):
                raise ValueError(f"interface bridge must be 1-15 characters of [A-Za-z0-9_.-], got {self.bridge!r}")
        elif self.type == "ethernet":
            if self.bridge is not None or self.tap is None:
                raise ValueError("an ethernet interface has a tap and no bridge")
        elif self.bridge is not None or self.tap is not None:
            raise ValueError("a user interface has no bridge and no tap")
        if not isinstance(self.mac, str) or not _MAC_RE.match(self.mac.lower()) or int(self.mac[:2], 16) & 1:
            raise ValueError(f"interface mac must be a unicast address like 02:42:0a:58:00:02, got {self.mac!r}")
        self.mac = self.mac.lower()
        if self.tap is not None:
            if not _IFNAME_RE.match(self.tap):
                raise ValueError(f"interface tap must be 1-15 characters of [A-Za-z0-9_.-], got {self.tap!r}")
            if self.tap.startswith(_RESERVED_TAP_PREFIXES):
                raise ValueError(
                    f"interface tap {self.tap!r} uses a prefix libvirt reserves ({', '.join(_RESERVED_TAP_PREFIXES)})"
                )
        if self.mtu is not None and (
            isinstance(self.mtu, bool) or not isinstance(self.mtu, int) or not 68 <= self.mtu <= 65535
        ):
            raise ValueError(f"interface mtu must be an integer in 68..65535, got {self.mtu!r}")

    def to_xml(self) -> str:
        """The ``<interface>`` element alone (libvirt's attach-device / detach-device)."""
        return _element_xml(self)

    def render(self, devices: ET.Element) -> None:
        iface = _sub(devices, "interface", type=self.type)
        _sub(iface, "mac", address=self.mac)
        if self.bridge is not None:  # type "bridge" only (__post_init__)
            _sub(iface, "source", bridge=self.bridge)
        if self.tap is not None:  # always for "ethernet", optional for "bridge"
            if self.type == "ethernet":
                _sub(iface, "target", dev=self.tap, managed="no")
            else:
                _sub(iface, "target", dev=self.tap)
        _sub(iface, "model", type="virtio")
        if self.mtu is not None:
            _sub(iface, "mtu", size=str(self.mtu))
        _sub(iface, "rom", enabled="no")


@dataclass(kw_only=True)
class Balloon:
    """virtio-balloon for free page reporting only: the guest reports the pages it freed
    and QEMU hands them back to the host (no inflation, no target; see shim.vm.memory)."""

    free_page_reporting: bool = True

    def render(self, devices: ET.Element) -> None:
        attrs = {"model": "virtio"}
        if self.free_page_reporting:
            attrs["freePageReporting"] = "on"
        _sub(devices, "memballoon", **attrs)


@dataclass(kw_only=True)
class Rng:
    """virtio-rng fed from the host's /dev/urandom. Not needed with the recipe's rdrand +
    ``random.trust_cpu=on``; there for kernels or CPUs without that."""

    def render(self, devices: ET.Element) -> None:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")


# --- the domain ---------------------------------------------------------------------------


@dataclass(kw_only=True)
class Domain:
    """A whole microVM. Preconditions checked here (ValueError): a libvirt-safe ``name``,
    a UUID, ``memory_mib`` and ``vcpus`` > 0, ``domain_type`` in :data:`DOMAIN_TYPES`,
    distinct disk targets and serials, metadata keys usable as XML names."""

    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    domain_type: str
    boot: KernelBoot
    disks: list[Disk] = field(default_factory=list)
    channels: list[AgentChannel] = field(default_factory=list)
    serial: SerialLog | None = None
    filesystems: list[Filesystem] = field(default_factory=list)
    interfaces: list[Interface] = field(default_factory=list)
    """Empty: the VM has no NIC at all (``--network none``: the guest has only ``lo``)."""
    vsock: Vsock | None = None
    rng: Rng | None = None
    machine: str = DEFAULT_MACHINE
    tb_cache_mib: int | None = DEFAULT_TB_CACHE_MIB
    """Only rendered for ``domain_type='qemu'`` (TCG); ignored under KVM."""
    acpi: bool | None = None
    """None (the default) means: ACPI only when ``vcpus > 1``. Without ACPI the guest
    boots faster (busybox /init: -0.16 s; python agent hello: -0.7 s), but the distro
    cloud kernel has no MP-table parser (``CONFIG_X86_MPPARSE`` is off), so without ACPI
    it brings up only one CPU whatever ``vcpus`` says."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Our own key/values (``container-id`` …), kept by libvirt in ``<metadata>``."""
    cpuset: str | None = None
    """Host CPUs the vCPU threads may run on (``--cpuset-cpus``: ``0-1,3``); None: any."""
    balloon: Balloon | None = None
    """None: ``<memballoon model='none'/>`` (the measured recipe)."""
    share_pages: bool | None = None
    """False: ``<nosharepages/>`` (KSM never merges this guest's RAM); True or None:
    QEMU's default (mergeable, if the host runs KSM). See shim.vm.memory."""
    hotplug_ports: int = 0
    """Spare PCIe root ports for NICs plugged in while the domain runs (0: none). Needs
    ``machine=HOTPLUG_MACHINE``; adds :data:`HOTPLUG_CMDLINE` to the kernel command line
    and :data:`HOTPLUG_QEMU_ARGS` to QEMU's."""
    cpu_readback: str = DEFAULT_CPU_READBACK
    """One of :data:`CPU_READBACKS`: how libvirt reads back the guest CPU at start."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(
                f"domain name must be 1-64 characters of [A-Za-z0-9_.+-] "
                f"starting with a letter or digit, got {self.name!r}"
            )
        try:
            self.uuid = str(uuidlib.UUID(str(self.uuid)))
        except ValueError:
            raise ValueError(f"domain uuid is not a UUID: {self.uuid!r}") from None
        if isinstance(self.memory_mib, bool) or not isinstance(self.memory_mib, int) or self.memory_mib <= 0:
            raise ValueError(f"memory_mib must be a positive integer, got {self.memory_mib!r}")
        if isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= 255:
            raise ValueError(f"vcpus must be an integer in 1..255, got {self.vcpus!r}")
        if self.cpuset is not None and not re.match(r"^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$", self.cpuset):
            raise ValueError(f"cpuset must look like 0-1,3, got {self.cpuset!r}")
        if self.domain_type not in DOMAIN_TYPES:
            raise ValueError(f"domain_type must be one of {DOMAIN_TYPES}, got {self.domain_type!r}")
        if not isinstance(self.boot, KernelBoot):
            raise ValueError("boot must be a KernelBoot")
        if not re.match(r"^[a-z0-9][a-z0-9.-]*$", self.machine):
            raise ValueError(f"machine type looks wrong: {self.machine!r}")
        if (
            isinstance(self.hotplug_ports, bool)
            or not isinstance(self.hotplug_ports, int)
            or not 0 <= self.hotplug_ports <= 16
        ):
            raise ValueError(f"hotplug_ports must be an integer in 0..16, got {self.hotplug_ports!r}")
        if self.cpu_readback not in CPU_READBACKS:
            raise ValueError(f"cpu_readback must be one of {CPU_READBACKS}, got {self.cpu_readback!r}")
        if self.hotplug_ports and self.machine != HOTPLUG_MACHINE:
            raise ValueError(f"hotplug_ports needs machine {HOTPLUG_MACHINE!r}, got {self.machine!r}")
        if self.tb_cache_mib is not None and (
            isinstance(self.tb_cache_mib, bool) or not isinstance(self.tb_cache_mib, int) or self.tb_cache_mib <= 0
        ):
            raise ValueError(f"tb_cache_mib must be a positive integer or None, got {self.tb_cache_mib!r}")
        for what, values in (
            ("target", [d.target for d in self.disks]),
            ("serial", [d.serial for d in self.disks]),
            ("channel name", [c.name for c in self.channels]),
            ("channel socket", [c.socket_path for c in self.channels]),
            ("filesystem tag", [f.tag for f in self.filesystems]),
            ("interface mac", [i.mac for i in self.interfaces]),
            ("interface tap", [i.tap for i in self.interfaces if i.tap]),
        ):
            dups = sorted({v for v in values if values.count(v) > 1})
            if dups:
                raise ValueError(f"two devices share the {what} {dups[0]!r}")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not _META_KEY_RE.match(key):
                raise ValueError(f"metadata key must match [a-z][a-z0-9-]*, got {key!r}")
            if not isinstance(value, str) or "\0" in value:
                raise ValueError(f"metadata value for {key!r} must be a string without NUL")

    @property
    def pcie_devices(self) -> int:
        """The devices that take a PCIe slot of their own (each virtio device; the
        channels share one virtio-serial controller)."""
        return (
            len(self.disks)
            + len(self.filesystems)
            + len(self.interfaces)
            + bool(self.channels)
            + (self.vsock is not None)
            + (self.rng is not None)
            + (self.balloon is not None)
        )

    @property
    def is_tcg(self) -> bool:
        return self.domain_type == "qemu"

    @property
    def wants_acpi(self) -> bool:
        return self.acpi if self.acpi is not None else self.vcpus > 1

    def to_element(self) -> ET.Element:
        dom = ET.Element("domain", {"type": self.domain_type})
        if self.hotplug_ports or self.cpu_readback == "words":
            dom.set("xmlns:qemu", QEMU_NS)
        _sub(dom, "name", self.name)
        _sub(dom, "uuid", self.uuid)
        if self.metadata:
            meta = _sub(dom, "metadata")
            inst = _sub(meta, f"{METADATA_PREFIX}:instance", **{f"xmlns:{METADATA_PREFIX}": METADATA_NS})
            for key in sorted(self.metadata):
                _sub(inst, f"{METADATA_PREFIX}:{key}", self.metadata[key])
        _sub(dom, "memory", str(self.memory_mib), unit="MiB")
        if self.filesystems or self.share_pages is False:
            backing = _sub(dom, "memoryBacking")
            if self.share_pages is False:
                _sub(backing, "nosharepages")
            if self.filesystems:
                _sub(backing, "source", type="memfd")
                _sub(backing, "access", mode="shared")
        vcpu = _sub(dom, "vcpu", str(self.vcpus), placement="static")
        if self.cpuset is not None:
            vcpu.set("cpuset", self.cpuset)

        os_elem = _sub(dom, "os")
        _sub(os_elem, "type", "hvm", arch="x86_64", machine=self.machine)
        boot = self.boot
        if self.hotplug_ports and HOTPLUG_CMDLINE not in boot.cmdline.split():
            boot = KernelBoot(kernel=boot.kernel, initrd=boot.initrd, cmdline=f"{boot.cmdline} {HOTPLUG_CMDLINE}")
        boot.render(os_elem)

        # No <acpi/> unless needed (see ``acpi``): the guest boots 0.7 s faster, and it is
        # stopped with the reboot syscall anyway (a power-off without ACPI only halts).
        tb_cache = self.tb_cache_mib if self.is_tcg else None
        if self.wants_acpi or tb_cache is not None:
            features = _sub(dom, "features")
            if self.wants_acpi:
                _sub(features, "acpi")
            if tb_cache is not None:
                _sub(_sub(features, "tcg"), "tb-cache", str(tb_cache), unit="MiB")

        if self.is_tcg:
            # host-passthrough is refused under TCG; qemu64 + rdrand is the measured choice.
            cpu = _sub(dom, "cpu", mode="custom", match="exact", check="none")
            _sub(cpu, "model", TCG_CPU_MODEL, fallback="forbid")
            for feature in TCG_CPU_FEATURES:
                _sub(cpu, "feature", policy="require", name=feature)
        else:
            _sub(dom, "cpu", mode="host-passthrough", check="none")

        _sub(dom, "clock", offset="utc")
        for event in ("on_poweroff", "on_reboot", "on_crash"):
            _sub(dom, event, "destroy")

        devices = _sub(dom, "devices")
        for disk in self.disks:
            disk.render(devices)
        for fs in self.filesystems:
            fs.render(devices)
        for iface in self.interfaces:
            iface.render(devices)
        _sub(devices, "controller", type="usb", model="none")
        if self.hotplug_ports:
            # libvirt puts each PCIe device of the domain into a free root port first:
            # one per device, and hotplug_ports more stay empty.
            _sub(devices, "controller", type="pci", index="0", model="pcie-root")
            for index in range(1, 1 + self.pcie_devices + self.hotplug_ports):
                _sub(devices, "controller", type="pci", index=str(index), model="pcie-root-port")
        for chan in self.channels:
            chan.render(devices)
        if self.serial is not None:
            self.serial.render(devices)
        if self.vsock is not None:
            self.vsock.render(devices)
        if self.rng is not None:
            self.rng.render(devices)
        if self.balloon is not None:
            self.balloon.render(devices)
        else:
            _sub(devices, "memballoon", model="none")
        if self.hotplug_ports:
            argv = _sub(dom, "qemu:commandline")
            for arg in HOTPLUG_QEMU_ARGS:
                _sub(argv, "qemu:arg", value=arg)
        if self.cpu_readback == "words":
            caps = _sub(dom, "qemu:capabilities")
            for capability in CPU_READBACK_CAPS_REMOVED:
                _sub(caps, "qemu:del", capability=capability)
        return dom

    def to_xml(self) -> str:
        """The domain as pretty-printed XML text (2-space indent, trailing newline)."""
        elem = self.to_element()
        ET.indent(elem, space="  ")
        return ET.tostring(elem, encoding="unicode") + "\n"


def disk_target(index: int) -> str:
    """``vda`` for 0, ``vdb`` for 1, … ``vdz``, ``vdaa`` …: virtio target names in order."""
    if not 0 <= index < 26 + 26 * 26:
        raise ValueError(f"disk index out of range: {index}")
    if index < 26:
        return "vd" + chr(ord("a") + index)
    index -= 26
    return "vd" + chr(ord("a") + index // 26) + chr(ord("a") + index % 26)
