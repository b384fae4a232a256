"""LibvirtBackend against the real libvirtd (qemu:///system, or VMSHIM_LIBVIRT_URI).

Tests marked ``vm`` boot real microVMs (TCG here, ~1.5 s each): the Debian cloud kernel
and a tiny busybox initramfs generated below, whose /init echoes a line to the serial
console and then either reboots (the domain must vanish) or sleeps.

Kernel: $VMSHIM_TEST_KERNEL, else the guest image's kernel from the state root (the one
scripts/test builds; built here when missing), with the virtio-blk modules of its unpacked
package. The tests skip only when libvirtd is not reachable. Every domain is named
``vmshim-test-*`` and destroyed afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import uuid
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from shim import paths
from shim.errors import HypervisorError
from shim.vm.accel import libvirt_kvm_problem
from shim.vm.backend import VmNotFound
from shim.vm.domain import QEMU_NS, AgentChannel, Disk, Domain, KernelBoot, SerialLog
from shim.vm.libvirt_backend import LibvirtBackend

BUSYBOX = "/bin/busybox"
HELLO = "VMSHIM-TEST-HELLO"
VIRTIO_BLK_MODULES = (
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
)
"""Loaded in this order by /init (the cloud kernel has virtio as modules)."""
REBOOT_INIT = f"""#!/bin/busybox sh
for m in /modules/*.ko; do /bin/busybox insmod $m; done
/bin/busybox mkdir -p /sys
/bin/busybox mount -t sysfs sysfs /sys
for f in /sys/block/*/serial; do /bin/busybox echo "disk $(/bin/busybox cat $f)"; done > /dev/console
/bin/busybox echo {HELLO} cpus=$(/bin/busybox nproc) > /dev/console
/bin/busybox reboot -f
"""
SLEEP_INIT = f"""#!/bin/busybox sh
/bin/busybox echo {HELLO} cpus=$(/bin/busybox nproc) > /dev/console
while :; do /bin/busybox sleep 1000; done
"""
GOLDEN = Path(__file__).parent.parent / "unit" / "golden"


# --- helpers --------------------------------------------------------------------------------


def write_initramfs(path: Path, init_script: str, modules: list[Path] = ()) -> None:
    """A newc cpio with /init (a busybox script), /bin/busybox, /dev/console and the given
    kernel modules as /modules/NN-name.ko; written directly, so no root or mknod needed."""
    entries: list[bytes] = []

    def add(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (len(entries) + 1, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        head = b"070701" + "".join(f"{v:08X}" for v in fields).encode() + name.encode() + b"\0"
        head += b"\0" * (-len(head) % 4)
        entries.append(head + data + b"\0" * (-len(data) % 4))

    add("bin", 0o040755)
    add("dev", 0o040755)
    add("dev/console", 0o020600, rdev=(5, 1))
    add("bin/busybox", 0o100755, Path(BUSYBOX).read_bytes())
    add("init", 0o100755, init_script.encode())
    add("modules", 0o040755)
    for i, module in enumerate(modules):
        add(f"modules/{i:02d}-{module.name}", 0o100644, module.read_bytes())
    add("TRAILER!!!", 0)
    path.write_bytes(b"".join(entries))


def guest_kernel() -> tuple[str, Path | None]:
    """The kernel to boot and its ``lib/modules/<release>`` directory (None if unknown):
    $VMSHIM_TEST_KERNEL (+ $VMSHIM_TEST_KERNEL_MODULES), else the guest image's kernel,
    built in the state root as scripts/test does (cached, so cheap), whose modules sit in
    the unpacked kernel package under ``cache_dir()/kernel``."""
    explicit = os.environ.get("VMSHIM_TEST_KERNEL")
    if explicit:
        modules = os.environ.get("VMSHIM_TEST_KERNEL_MODULES")
        return explicit, Path(modules) if modules else None
    from shim.guestimage import ensure_guest_image

    image = ensure_guest_image()
    found = sorted((paths.cache_dir() / "kernel").glob(f"*/lib/modules/{image.kernel_release}"))
    return str(image.kernel), found[-1] if found else None


def wait_for(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir():
    # QEMU runs as libvirt-qemu: every directory on the way to the kernel, initramfs and
    # disks must be searchable by it (pytest's own tmp dirs are 0700).
    path = Path(tempfile.mkdtemp(prefix="vmshim-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def backend():
    b = LibvirtBackend()
    try:
        b.list_domains()
    except HypervisorError as exc:
        pytest.skip(str(exc))
    problem = libvirt_kvm_problem()
    if problem:
        warnings.warn(problem)
    yield b  # each test destroys only the domains it made (others may run tests too)
    b.close()


@pytest.fixture(scope="module")
def kernel():
    return guest_kernel()


def virtio_blk_modules(modules_dir: Path | None) -> list[Path]:
    """The kernel's virtio-blk modules, or [] if it has none as modules (built in)."""
    if modules_dir is None:
        return []
    found = [modules_dir / "kernel" / m for m in VIRTIO_BLK_MODULES]
    return found if all(p.exists() for p in found) else []


@pytest.fixture(scope="module")
def initrds(workdir, kernel):
    out = {}
    modules = virtio_blk_modules(kernel[1])
    assert modules or kernel[1] is None, f"no virtio-blk modules under {kernel[1]}"
    for kind, script in (("reboot", REBOOT_INIT), ("sleep", SLEEP_INIT)):
        out[kind] = workdir / f"initrd-{kind}.cpio"
        write_initramfs(out[kind], script, modules if kind == "reboot" else [])
    out["has_virtio_blk"] = bool(modules)
    return out


@pytest.fixture
def make_domain(workdir, kernel, initrds, backend):
    made: list[str] = []

    def make(tag: str, init: str = "sleep", **overrides) -> Domain:
        name = f"vmshim-test-{tag}-{uuid.uuid4().hex[:6]}"
        d = workdir / name
        d.mkdir()
        args = dict(
            name=name,
            uuid=str(uuid.uuid4()),
            memory_mib=128,
            vcpus=1,
            domain_type="qemu",
            boot=KernelBoot(kernel=kernel[0], initrd=str(initrds[init])),
            channels=[AgentChannel(socket_path=str(d / "agent.sock"))],
            serial=SerialLog(path=str(d / "console.log")),
            metadata={"container-id": tag},
        )
        args.update(overrides)
        made.append(name)
        return Domain(**args)

    yield make
    for name in made:
        backend.destroy(name)


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.vm
def test_vm_boots_logs_and_vanishes_after_guest_reboot(backend, make_domain, workdir, initrds):
    layer, writable = workdir / "layer.img", workdir / "rw.img"
    layer.write_bytes(b"\0" * 65536)
    with open(writable, "wb") as f:
        f.truncate(1 << 20)
    domain = make_domain(
        "reboot",
        init="reboot",
        disks=[
            Disk(source=str(layer), target="vda", serial="vmshim-l0", shareable=True),
            Disk(source=str(writable), target="vdb", serial="vmshim-rw", readonly=False, discard=True),
        ],
    )
    start = time.monotonic()
    handle = backend.create(domain)
    created = time.monotonic() - start
    assert handle.name == domain.name and handle.uuid == domain.uuid
    assert os.path.exists(handle.agent_socket), "agent socket must exist when create returns"
    assert domain.name in backend.list_domains()
    assert wait_for(lambda: HELLO in read(handle.serial_log), 10), read(handle.serial_log)
    hello = time.monotonic() - start
    log = read(handle.serial_log)
    if initrds["has_virtio_blk"]:  # the guest sees both disks, by serial
        assert "disk vmshim-l0" in log and "disk vmshim-rw" in log, log
    assert wait_for(lambda: domain.name not in backend.list_domains(), 10, 0.05), (
        "the domain should vanish after the guest rebooted (on_reboot=destroy)"
    )
    gone = time.monotonic() - start
    assert not backend.is_running(domain.name)
    print(f"\ncreateXML {created:.2f}s, serial hello {hello:.2f}s, gone {gone:.2f}s")


@pytest.mark.vm
def test_running_vm_pid_suspend_resume_and_destroy(backend, make_domain):
    domain = make_domain("life")
    handle = backend.create(domain)
    assert backend.is_running(domain.name)
    pid = backend.qemu_pid(domain.name)
    assert pid and f"guest={domain.name}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert wait_for(lambda: HELLO in read(handle.serial_log), 10)

    backend.suspend(domain.name)
    backend.suspend(domain.name)  # idempotent
    assert backend.is_running(domain.name)  # paused is still alive
    backend.resume(domain.name)
    backend.resume(domain.name)

    start = time.monotonic()
    backend.destroy(domain.name)
    took = time.monotonic() - start
    assert not backend.is_running(domain.name)
    assert domain.name not in backend.list_domains()
    assert backend.qemu_pid(domain.name) is None
    print(f"\ndestroy(wait=True) {took:.2f}s")

    backend.destroy(domain.name)  # gone: no-op
    with pytest.raises(VmNotFound, match=f"cannot pause VM {domain.name}: no such VM"):
        backend.suspend(domain.name)


@pytest.mark.vm
def test_destroy_without_waiting_then_reuse_the_name(backend, make_domain):
    domain = make_domain("nowait")
    backend.create(domain)
    start = time.monotonic()
    backend.destroy(domain.name, wait=False)
    took = time.monotonic() - start
    assert took < 0.5, f"destroy(wait=False) blocked for {took:.2f}s"
    assert wait_for(lambda: not backend.is_running(domain.name), 2)
    again = dataclasses.replace(domain, uuid=str(uuid.uuid4()))
    backend.create(again)  # waits for libvirt to forget the old one if needed
    assert backend.is_running(domain.name)
    backend.destroy(domain.name)
    assert backend.wait_gone(domain.name, 10)
    print(f"\ndestroy(wait=False) {took * 1000:.1f}ms")


@pytest.mark.vm
def test_two_vcpus_come_up(backend, make_domain):
    # The cloud kernel needs ACPI for SMP (no MP-table parser); Domain turns it on.
    domain = make_domain("smp", vcpus=2)
    handle = backend.create(domain)
    assert wait_for(lambda: HELLO in read(handle.serial_log), 10)
    assert f"{HELLO} cpus=2" in read(handle.serial_log)


@pytest.mark.vm
def test_the_guest_cpu_read_back_by_feature_words_is_the_one_libvirt_reads_per_feature(backend, make_domain):
    """The default readback (shim.vm.domain.CPU_READBACKS) keeps its override in the live
    domain and yields the same live <cpu> as libvirt's own per-property walk."""
    live = {}
    conn = libvirt.open(paths.libvirt_uri())
    try:
        for readback in ("words", "per-feature"):
            domain = make_domain(f"cpu-{readback}", cpu_readback=readback)
            backend.create(domain)
            root = ET.fromstring(conn.lookupByName(domain.name).XMLDesc(0))
            backend.destroy(domain.name)
            dels = root.findall(f"{{{QEMU_NS}}}capabilities/{{{QEMU_NS}}}del")
            assert [d.get("capability") for d in dels] == (["cpu-unavailable-features"] if readback == "words" else [])
            live[readback] = ET.tostring(root.find("cpu"), encoding="unicode")
    finally:
        conn.close()
    assert 'name="rdrand"' in live["words"]
    assert live["words"] == live["per-feature"]


@pytest.mark.vm
def test_destroy_of_a_missing_domain_is_a_noop(backend):
    backend.destroy("vmshim-test-never-existed")
    backend.destroy("vmshim-test-never-existed", wait=False)
    assert not backend.is_running("vmshim-test-never-existed")
    assert backend.qemu_pid("vmshim-test-never-existed") is None


@pytest.mark.vm
def test_failed_start_is_one_clear_line(backend, make_domain, workdir):
    domain = make_domain(
        "broken", boot=KernelBoot(kernel=str(workdir / "no-such-vmlinuz"), initrd=str(workdir / "no-such-initrd"))
    )
    with pytest.raises(HypervisorError) as info:
        backend.create(domain)
    message = str(info.value)
    assert message.startswith(f"cannot start VM {domain.name}: ") and "\n" not in message
    assert domain.name not in backend.list_domains()


@pytest.mark.vm
@pytest.mark.parametrize("golden", sorted(p.name for p in GOLDEN.glob("*.xml")))
def test_golden_xml_is_valid_for_libvirt(backend, golden):
    """Define (with schema validation) and undefine each golden domain; nothing boots."""
    root = ET.fromstring((GOLDEN / golden).read_text())
    name = f"vmshim-test-golden-{golden.removesuffix('.xml').replace('_', '-')}"
    root.find("name").text = name
    root.find("uuid").text = str(uuid.uuid4())
    conn = libvirt.open(paths.libvirt_uri())
    try:
        dom = conn.defineXMLFlags(ET.tostring(root, encoding="unicode"), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        try:
            live = ET.fromstring(dom.XMLDesc(0))
            assert live.find("devices/controller[@type='usb']").get("model") == "none"
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_unreachable_libvirtd_gives_one_line_and_prints_nothing(capfd):
    backend = LibvirtBackend("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
    with pytest.raises(HypervisorError) as info:
        backend.list_domains()
    message = str(info.value)
    assert message.startswith("cannot reach libvirtd at qemu+unix:///system?socket=/nonexistent/libvirt-sock: ")
    assert "start it with `libvirtd -d`" in message and "\n" not in message
    out, err = capfd.readouterr()
    assert "libvirt" not in err and out == ""
