"""Golden-file tests of the generated libvirt domain XML (no libvirt needed).

The representative domains below are rendered and compared byte for byte with
tests/unit/golden/<name>.xml. After an intended change to shim/vm/domain.py, regenerate
them and review the diff:

    VMSHIM_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_domain_xml.py

That libvirt accepts these files is checked by tests/integration/test_libvirt_backend.py.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from guest.spec import AGENT_PORT_NAME, CONFIG_DRIVE_SERIAL, LAYER_SERIAL_PREFIX, WRITABLE_SERIAL
from shim.vm.domain import (
    DEFAULT_CMDLINE,
    HOTPLUG_MACHINE,
    HOTPLUG_PORTS,
    METADATA_NS,
    QEMU_NS,
    AgentChannel,
    Balloon,
    Disk,
    Domain,
    Filesystem,
    Interface,
    KernelBoot,
    Rng,
    SerialLog,
    Vsock,
    disk_target,
)

GOLDEN = Path(__file__).parent / "golden"
UUID = "6f1c2a34-5b6d-4e7f-8091-a2b3c4d5e6f7"
GUEST = "/var/lib/vmshim/guest/0123abcd"
CTR = "/var/lib/vmshim/containers/c0ffee"
RUN = "/var/lib/vmshim/run/c0ffee"


def _boot() -> KernelBoot:
    return KernelBoot(
        kernel=f"{GUEST}/vmlinuz", initrd=f"{GUEST}/initramfs", cmdline=DEFAULT_CMDLINE + " vmshim.token=abc"
    )


def _container_disks() -> list[Disk]:
    layers = [
        Disk(
            source=f"/var/lib/vmshim/layers/{digest}.sqfs",
            target=disk_target(i),
            serial=f"{LAYER_SERIAL_PREFIX}{i}",
            readonly=True,
            shareable=True,
        )
        for i, digest in enumerate(("aaaa", "bbbb"))
    ]
    config = Disk(source=f"{CTR}/config.iso", target=disk_target(2), serial=CONFIG_DRIVE_SERIAL)
    writable = Disk(
        source=f"{CTR}/rw.ext4", target=disk_target(3), serial=WRITABLE_SERIAL, readonly=False, discard=True
    )
    return [*layers, config, writable]


def _common(**overrides) -> dict:
    base = dict(
        name="vmshim-c0ffee",
        uuid=UUID,
        boot=_boot(),
        disks=_container_disks(),
        channels=[AgentChannel(socket_path=f"{RUN}/agent.sock")],
        serial=SerialLog(path=f"{CTR}/console.log"),
        metadata={"container-id": "c0ffee", "image": "docker.io/library/busybox:1.36"},
    )
    base.update(overrides)
    return base


DOMAINS = {
    # The everyday case: TCG, two image layers, config drive, writable disk.
    "tcg_container": lambda: Domain(memory_mib=128, vcpus=1, domain_type="qemu", **_common()),
    # The same on a KVM host, bigger.
    "kvm_container": lambda: Domain(memory_mib=512, vcpus=2, domain_type="kvm", **_common()),
    # Nothing but a kernel.
    "minimal": lambda: Domain(name="vmshim-min", uuid=UUID, memory_mib=64, vcpus=1, domain_type="qemu", boot=_boot()),
    # An OCI bundle's rootfs over virtiofs, vsock transport, virtio-rng, appended log.
    "tcg_bundle": lambda: Domain(
        memory_mib=256,
        vcpus=1,
        domain_type="qemu",
        tb_cache_mib=64,
        **_common(
            disks=[Disk(source=f"{CTR}/config.iso", target="vda", serial=CONFIG_DRIVE_SERIAL)],
            filesystems=[Filesystem(source_dir=f"{CTR}/bundle/rootfs", tag="rootfs")],
            vsock=Vsock(),
            rng=Rng(),
            serial=SerialLog(path=f"{CTR}/console.log", append=True),
        ),
    ),
    # On the default NAT network and a user-defined one (two NICs on two bridges).
    "tcg_networked": lambda: Domain(
        memory_mib=128,
        vcpus=1,
        domain_type="qemu",
        **_common(
            interfaces=[
                Interface(bridge="vmshim0", mac="02:42:0a:58:00:02", tap="vmtc0ffee0"),
                Interface(bridge="vmsbr1a2b3c4d5e", mac="02:42:0A:59:00:07", mtu=1400),
            ]
        ),
    ),
    # On a bridge network: q35 with spare PCIe root ports, so `network connect` can plug
    # NICs into it while it runs (native PCIe hotplug, forced on by cmdline and -global).
    "tcg_hotplug": lambda: Domain(
        memory_mib=128,
        vcpus=1,
        domain_type="qemu",
        machine=HOTPLUG_MACHINE,
        hotplug_ports=HOTPLUG_PORTS,
        **_common(interfaces=[Interface(bridge="vmshim0", mac="02:42:0a:58:00:02", tap="vmtc0ffee0")]),
    ),
    # vmshim-runtime in an engine's network namespace: a tap vmshim made (managed='no'),
    # with the MAC and MTU of the engine's veth; q35 so `docker network connect` can plug more.
    "tcg_engine_netns": lambda: Domain(
        memory_mib=128,
        vcpus=1,
        domain_type="qemu",
        machine=HOTPLUG_MACHINE,
        hotplug_ports=HOTPLUG_PORTS,
        **_common(interfaces=[Interface(type="ethernet", mac="02:42:ac:11:00:02", tap="vmnc0ffee00", mtu=1450)]),
    ),
    # A pooled VM (shim.containers.pool): no disks, no NIC, spare ports for all of them,
    # and the pool flag on the kernel command line.
    "tcg_pool": lambda: _pool_domain(),
    # shim.vm.memory: free page reporting's balloon, and KSM kept away (nosharepages)
    # next to the memfd backing a virtiofs share needs.
    "tcg_memory": lambda: Domain(
        memory_mib=256,
        vcpus=1,
        domain_type="qemu",
        balloon=Balloon(),
        share_pages=False,
        **_common(filesystems=[Filesystem(source_dir=f"{CTR}/share", tag="vmshim-s0")]),
    ),
    # --network host: QEMU's user-mode networking.
    "tcg_user_network": lambda: Domain(
        memory_mib=128,
        vcpus=1,
        domain_type="qemu",
        **_common(interfaces=[Interface(type="user", mac="02:42:0a:00:02:0f")]),
    ),
}


def _pool_domain() -> Domain:
    from shim.containers.pool import PoolKey, build_domain

    key = PoolKey(kernel=f"{GUEST}/vmlinuz", initramfs=f"{GUEST}/initramfs", memory_mib=256, vcpus=1, accel="tcg")
    return build_domain(
        key, "0123456789ab", Path("/var/lib/vmshim/run/pool/booting/0123456789ab"), DEFAULT_CMDLINE, domain_uuid=UUID
    )


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_domain_xml_matches_golden_file(name):
    xml = DOMAINS[name]().to_xml()
    path = GOLDEN / f"{name}.xml"
    if os.environ.get("VMSHIM_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(xml)
    assert path.exists(), f"{path} missing: run with VMSHIM_UPDATE_GOLDEN=1 to create it"
    assert xml == path.read_text(), (
        f"{name}: XML differs from {path}; if intended, regenerate with "
        f"VMSHIM_UPDATE_GOLDEN=1 pytest {Path(__file__).relative_to(Path.cwd())}"
    )


def test_xml_is_deterministic():
    assert DOMAINS["tcg_container"]().to_xml() == DOMAINS["tcg_container"]().to_xml()


def test_tcg_recipe():
    root = ET.fromstring(DOMAINS["tcg_container"]().to_xml())
    assert root.get("type") == "qemu"
    assert root.find("os/type").get("machine") == "pc"
    assert root.find("features/acpi") is None
    assert root.find("features/tcg/tb-cache").text == "32"
    cpu = root.find("cpu")
    assert (cpu.get("mode"), cpu.find("model").text) == ("custom", "qemu64")
    assert cpu.find("feature").attrib == {"policy": "require", "name": "rdrand"}
    assert [root.find(e).text for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    devices = root.find("devices")
    assert devices.find("controller[@type='usb']").get("model") == "none"
    assert devices.find("memballoon").get("model") == "none"
    for absent in ("graphics", "video", "input", "emulator", "interface"):
        assert devices.find(absent) is None
    assert devices.find("serial").get("type") == "file"
    assert devices.find("channel/target").get("name") == AGENT_PORT_NAME


def test_kvm_uses_host_cpu_and_no_tcg_features():
    root = ET.fromstring(DOMAINS["kvm_container"]().to_xml())
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.find("features/tcg") is None
    assert root.find("vcpu").text == "2"


def test_acpi_only_with_more_than_one_vcpu():
    # The cloud kernel has no MP-table parser: without ACPI it brings up one CPU only.
    assert _domain(vcpus=1).to_element().find("features/acpi") is None
    assert _domain(vcpus=2).to_element().find("features/acpi") is not None
    assert _domain(vcpus=1, acpi=True).to_element().find("features/acpi") is not None
    assert _domain(vcpus=2, acpi=False).to_element().find("features/acpi") is None
    assert _domain(domain_type="kvm").to_element().find("features") is None


def test_disks_carry_serials_and_flags():
    root = ET.fromstring(DOMAINS["tcg_container"]().to_xml())
    disks = {d.find("serial").text: d for d in root.findall("devices/disk")}
    assert list(disks) == ["vmshim-l0", "vmshim-l1", CONFIG_DRIVE_SERIAL, WRITABLE_SERIAL]
    for serial in ("vmshim-l0", "vmshim-l1"):
        assert disks[serial].find("readonly") is not None
        assert disks[serial].find("shareable") is not None
    assert disks[CONFIG_DRIVE_SERIAL].find("readonly") is not None
    assert disks[CONFIG_DRIVE_SERIAL].find("shareable") is None
    rw = disks[WRITABLE_SERIAL]
    assert rw.find("readonly") is None
    assert rw.find("driver").get("discard") == "unmap"
    assert all(d.find("target").get("bus") == "virtio" for d in disks.values())


def test_metadata_in_own_namespace():
    root = ET.fromstring(DOMAINS["tcg_container"]().to_xml())
    inst = root.find(f"metadata/{{{METADATA_NS}}}instance")
    assert inst.find(f"{{{METADATA_NS}}}container-id").text == "c0ffee"


def test_virtiofs_adds_shared_memfd_memory():
    root = ET.fromstring(DOMAINS["tcg_bundle"]().to_xml())
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    assert root.find("devices/filesystem/target").get("dir") == "rootfs"
    assert root.find("features/tcg/tb-cache").text == "64"


def test_interfaces_are_bridged_virtio_nics_without_option_rom():
    root = ET.fromstring(DOMAINS["tcg_networked"]().to_xml())
    nics = root.findall("devices/interface")
    assert [n.get("type") for n in nics] == ["bridge", "bridge"]
    assert [n.find("source").get("bridge") for n in nics] == ["vmshim0", "vmsbr1a2b3c4d5e"]
    assert [n.find("mac").get("address") for n in nics] == ["02:42:0a:58:00:02", "02:42:0a:59:00:07"]
    assert nics[0].find("target").get("dev") == "vmtc0ffee0"
    assert nics[1].find("target") is None
    assert all(n.find("model").get("type") == "virtio" for n in nics)
    assert all(n.find("rom").get("enabled") == "no" for n in nics)
    assert nics[1].find("mtu").get("size") == "1400"
    user = ET.fromstring(DOMAINS["tcg_user_network"]().to_xml()).find("devices/interface")
    assert user.get("type") == "user" and user.find("source") is None
    assert user.find("mac").get("address") == "02:42:0a:00:02:0f"
    # No interface at all unless asked: --network none means only lo in the guest.
    assert ET.fromstring(DOMAINS["tcg_container"]().to_xml()).find("devices/interface") is None


def test_uuid_is_normalised():
    dom = Domain(name="vmshim-x", uuid=UUID.upper(), memory_mib=64, vcpus=1, domain_type="qemu", boot=_boot())
    assert dom.uuid == UUID


def test_disk_target_names():
    assert [disk_target(i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]
    with pytest.raises(ValueError):
        disk_target(-1)


def _domain(**overrides) -> Domain:
    args = dict(name="vmshim-x", uuid=UUID, memory_mib=64, vcpus=1, domain_type="qemu", boot=_boot())
    args.update(overrides)
    return Domain(**args)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "bad/name"}, "domain name"),
        ({"name": ""}, "domain name"),
        ({"name": "x" * 65}, "domain name"),
        ({"uuid": "not-a-uuid"}, "not a UUID"),
        ({"memory_mib": 0}, "memory_mib"),
        ({"memory_mib": True}, "memory_mib"),
        ({"vcpus": 0}, "vcpus"),
        ({"domain_type": "xen"}, "domain_type"),
        ({"tb_cache_mib": 0}, "tb_cache_mib"),
        ({"metadata": {"Bad Key": "v"}}, "metadata key"),
        (
            {"disks": [Disk(source="/a", target="vda", serial="s1"), Disk(source="/b", target="vda", serial="s2")]},
            "target 'vda'",
        ),
        (
            {"disks": [Disk(source="/a", target="vda", serial="s1"), Disk(source="/b", target="vdb", serial="s1")]},
            "serial 's1'",
        ),
        (
            {
                "interfaces": [
                    Interface(bridge="b0", mac="02:00:00:00:00:01"),
                    Interface(bridge="b1", mac="02:00:00:00:00:01"),
                ]
            },
            "mac '02:00",
        ),
        (
            {
                "interfaces": [
                    Interface(bridge="b0", mac="02:00:00:00:00:01", tap="t0"),
                    Interface(bridge="b1", mac="02:00:00:00:00:02", tap="t0"),
                ]
            },
            "tap 't0'",
        ),
    ],
)
def test_domain_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        _domain(**overrides)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: KernelBoot(kernel="vmlinuz", initrd="/i"), "kernel must be an absolute path"),
        (lambda: KernelBoot(kernel="/k", initrd="/i", cmdline="a\nb"), "cmdline"),
        (lambda: Disk(source="rel.sqfs", target="vda", serial="s"), "absolute path"),
        (lambda: Disk(source="/a", target="sda", serial="s"), "disk target"),
        (lambda: Disk(source="/a", target="vda", serial="x" * 21), "disk serial"),
        (lambda: Disk(source="/a", target="vda", serial="s", format="vmdk"), "disk format"),
        (lambda: Disk(source="/a", target="vda", serial="s", discard=True), "read-only"),
        (lambda: Disk(source="/a", target="vda", serial="s", io="native"), "cache='none'"),
        (lambda: AgentChannel(socket_path="agent.sock"), "absolute path"),
        (lambda: AgentChannel(socket_path="/" + "s" * 120), "107 bytes"),
        (lambda: AgentChannel(socket_path="/a.sock", name="bad name"), "channel name"),
        (lambda: SerialLog(path="console.log"), "absolute path"),
        (lambda: Vsock(cid=2), "cid"),
        (lambda: Filesystem(source_dir="/d", tag="a b"), "tag"),
        (lambda: Interface(bridge="a-bridge-name-too-long", mac="02:00:00:00:00:01"), "bridge"),
        (lambda: Interface(mac="02:00:00:00:00:01"), "bridge"),
        (lambda: Interface(type="tap", bridge="b", mac="02:00:00:00:00:01"), "type"),
        (lambda: Interface(type="user", bridge="b", mac="02:00:00:00:00:01"), "no bridge"),
        (lambda: Interface(bridge="br0", mac="02:00:00:00:00"), "mac"),
        (lambda: Interface(bridge="br0", mac="01:00:5e:00:00:01"), "unicast"),
        (lambda: Interface(bridge="br0", mac="02:00:00:00:00:01", tap="vnet0"), "reserves"),
        (lambda: Interface(bridge="br0", mac="02:00:00:00:00:01", tap="a b"), "tap"),
        (lambda: Interface(bridge="br0", mac="02:00:00:00:00:01", mtu=10), "mtu"),
        (lambda: Interface(type="ethernet", mac="02:00:00:00:00:01"), "has a tap"),
        (lambda: Interface(type="ethernet", bridge="b", tap="t0", mac="02:00:00:00:00:01"), "no bridge"),
        (lambda: Interface(type="ethernet", tap="vnet3", mac="02:00:00:00:00:01"), "reserves"),
    ],
)
def test_device_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_serial_of_twenty_characters_is_accepted():
    disk = Disk(source="/a", target="vda", serial="x" * 20)
    xml = Domain(
        name="vmshim-min", uuid=UUID, memory_mib=64, vcpus=1, domain_type="qemu", boot=_boot(), disks=[disk]
    ).to_xml()
    assert ET.fromstring(xml).find("devices/disk/serial").text == "x" * 20


def test_hotplug_domain_is_q35_with_spare_root_ports_and_native_pcie_hotplug():
    root = ET.fromstring(DOMAINS["tcg_hotplug"]().to_xml())
    assert root.find("os/type").get("machine") == "q35"
    assert root.find("os/cmdline").text.split()[-1] == "pcie_ports=native"
    assert root.find("devices/controller[@index='0']").get("model") == "pcie-root"
    ports = root.findall("devices/controller[@model='pcie-root-port']")
    # One per device (4 disks, 1 NIC, the agent's virtio-serial), then the spare ones.
    assert len(ports) == 6 + HOTPLUG_PORTS
    args = [a.get("value") for a in root.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args == ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    plain = ET.fromstring(DOMAINS["tcg_networked"]().to_xml())
    assert plain.find("os/type").get("machine") == "pc"
    assert not plain.findall("devices/controller[@type='pci']")


def test_hotplug_needs_q35():
    with pytest.raises(ValueError, match="hotplug_ports needs machine 'q35'"):
        Domain(memory_mib=128, vcpus=1, domain_type="qemu", hotplug_ports=2, **_common())


def test_an_interface_renders_alone_for_attach_device():
    xml = Interface(bridge="vmsbr1a2b3c4d5e", mac="02:42:0a:59:00:03", tap="vmtc0ffee1").to_xml()
    assert xml == (
        '<interface type="bridge">\n'
        '  <mac address="02:42:0a:59:00:03" />\n'
        '  <source bridge="vmsbr1a2b3c4d5e" />\n'
        '  <target dev="vmtc0ffee1" />\n'
        '  <model type="virtio" />\n'
        '  <rom enabled="no" />\n'
        "</interface>\n"
    )


def test_a_filesystem_alone_for_attach_device():
    import xml.etree.ElementTree as ET

    from shim.vm.domain import Filesystem

    fs = ET.fromstring(Filesystem(source_dir="/srv/rootfs", tag="vmshim-m0123").to_xml())
    assert fs.tag == "filesystem" and fs.get("accessmode") == "passthrough"
    assert fs.find("driver").get("type") == "virtiofs"
    assert fs.find("source").get("dir") == "/srv/rootfs"
    assert fs.find("target").get("dir") == "vmshim-m0123"


def test_libvirt_reads_the_guest_cpu_back_by_feature_words_unless_told_otherwise():
    """``words`` drops libvirt's cpu-unavailable-features bit (its x86 two-read path instead
    of one qom-get per CPU property); ``per-feature`` leaves libvirt alone."""
    caps = f"{{{QEMU_NS}}}capabilities/{{{QEMU_NS}}}del"
    for name in ("tcg_container", "kvm_container", "tcg_hotplug"):
        root = ET.fromstring(DOMAINS[name]().to_xml())
        assert [d.get("capability") for d in root.findall(caps)] == ["cpu-unavailable-features"], name
    plain = Domain(memory_mib=128, vcpus=1, domain_type="qemu", cpu_readback="per-feature", **_common())
    xml = plain.to_xml()
    assert "qemu:" not in xml and QEMU_NS not in xml
    hotplug = Domain(
        memory_mib=128,
        vcpus=1,
        domain_type="qemu",
        machine=HOTPLUG_MACHINE,
        hotplug_ports=2,
        cpu_readback="per-feature",
        **_common(),
    )
    root = ET.fromstring(hotplug.to_xml())
    assert root.find(f"{{{QEMU_NS}}}commandline") is not None and not root.findall(caps)
    with pytest.raises(ValueError, match="cpu_readback must be one of"):
        Domain(memory_mib=128, vcpus=1, domain_type="qemu", cpu_readback="none", **_common())
