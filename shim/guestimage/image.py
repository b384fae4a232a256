"""A built guest image (:class:`GuestImage`) and the bare QEMU command that boots one
(:func:`boot_floor_command`, the floor every vmshim boot is measured against)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shim.guestimage.inputs import CMDLINE


@dataclass(frozen=True)
class GuestImage:
    """A built guest image, ready to boot: ``-kernel kernel -initrd initramfs -append cmdline``."""

    kernel: Path
    initramfs: Path
    kernel_release: str
    manifest: dict
    cmdline: str = CMDLINE


def boot_floor_command(
    image: GuestImage, sock: str, serial_log: str, config_drive: str | None = None, accel_kind: str = "tcg"
) -> list[str]:
    """The bare QEMU command that boots *image* with the agent port on unix socket *sock*
    (QEMU listens; connect after starting) and the console written to *serial_log*.

    Same kernel, initramfs, cmdline and CPU model as the libvirt domains, none of libvirt:
    the floor that every vmshim boot is measured against. QEMU exits when the guest reboots.
    *accel_kind* (``tcg`` or ``kvm``) picks the accelerator and the kernel arguments that go
    with it (:func:`shim.vm.accel.guest_cmdline`), as for the containers' domains.
    *config_drive* (an ISO from ``shim.vm.configdrive``) is attached read-only as a virtio
    disk with serial ``vmshim-config``; the agent waits for it before saying hello.
    """
    from shim.vm.accel import guest_cmdline

    accel = "kvm" if accel_kind == "kvm" else "tcg,tb-size=32"
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-M",
        "pc",
        "-cpu",
        "qemu64,+rdrand",
        "-smp",
        "1",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initramfs),
        "-append",
        guest_cmdline(image.cmdline, accel_kind),
        "-serial",
        f"file:{serial_log}",
        "-chardev",
        f"socket,id=agent,path={sock},server=on,wait=off",
        "-device",
        "virtio-serial-pci",
        "-device",
        "virtserialport,chardev=agent,name=org.vmshim.agent",
    ]
    if config_drive:
        from guest.spec import CONFIG_DRIVE_SERIAL

        cmd += [
            "-drive",
            f"file={config_drive},if=none,id=config,format=raw,readonly=on",
            "-device",
            f"virtio-blk-pci,drive=config,serial={CONFIG_DRIVE_SERIAL}",
        ]
    return cmd
