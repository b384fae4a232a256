"""PID 1 of the guest: prepare the VM, assemble the container's rootfs, serve the host,
power off. ``main()`` is called by /init in the initramfs. Stdlib only.

Boot, in order (each phase timed; one summary line on the console when ready, every
phase as it happens with ``vmshim.debug`` on the kernel command line, everything on
failure)::

    /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /run, /tmp
    kernel modules      /lib/modules/vmshim-modules.txt, one path per line, in order
    hello               virtio-serial port org.vmshim.agent → guest.agent.Agent.greet()
    config drive        disk with serial vmshim-config → /run/vmshim/config (iso9660, ro;
                        unmounted again once config.json is read)
                        → config.json → BootConfig
                        (a pooled VM, ``vmshim.pool`` on the kernel command line, has no
                        config drive: it waits for the host's ``spec`` message instead,
                        mixes the entropy in it into the RNG, and its disks and NICs
                        are hot-plugged: see wait_for_container)
    layers              vmshim-l0 … vmshim-l<N-1> → /run/vmshim/layers/<i> (squashfs, ro)
    writable layer      tmpfs, or the ext4 disk vmshim-rw → /run/vmshim/rw/{upper,work}
    rootfs              overlay → /run/vmshim/rootfs
    network             lo, and each NIC (found by MAC) with the address, gateway and MTU
                        of the config's ``network`` (guest.runtime.network)
    cgroup              cgroup2 at /sys/fs/cgroup, /sys/fs/cgroup/vmshim/<container_id>
    mounts              the config's ``mounts``: virtiofs shares and volume disks (serials
                        vmshim-v<i>) → /run/vmshim/mounts/<i>, bound into the rootfs
                        with tmpfs mounts (guest.runtime.mounts); ``read_only`` root
    agent loop          guest.agent.Agent.run() on the same port

When the agent loop ends (main process exited and reported, or ``shutdown``), or anything
fails (printed on the console and sent to the host as ``error`` when the channel can be
opened), the filesystems are unmounted, synced, and the VM is ended with
``reboot(RB_AUTOBOOT)``: without ACPI a power-off only halts, and the domain is defined
with on_reboot=destroy. PID 1 never returns and never hangs.

Imports are kept few and late: every module costs time under TCG.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # no typing import at run time: it costs the guest boot time

if TYPE_CHECKING:  # imported where used: boot time counts
    from guest.runtime.cgroups import Cgroup
    from guest.runtime.container import Container
    from guest.spec import BootConfig, MountSpec, ProcessSpec

RUN = "/run/vmshim"
CONFIG_MOUNT = RUN + "/config"
CONFIG_FILE = "config.json"
LAYERS_DIR = RUN + "/layers"
EMPTY_LOWER = RUN + "/empty"
RW_DIR = RUN + "/rw"
ROOTFS = RUN + "/rootfs"
FILES_DIR = RUN + "/files"
MOUNTS_DIR = RUN + "/mounts"
REHEARSAL_DIR = RUN + "/rehearsal"
REHEARSAL_ID = "0" * 64
"""The throwaway container of :func:`rehearse` (its cgroup's name)."""
REHEARSAL_TIMEOUT = 10.0
"""Seconds the rehearsal's ``/bin/true`` may run (an image's own) before it is killed."""
MODULES_LIST = "/lib/modules/vmshim-modules.txt"
DISK_TIMEOUT = 10.0
"""Seconds to wait for a disk to show up in /sys/block (probing is asynchronous)."""
PREFIX = "vmshim-agent: "
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


class BootError(Exception):
    """A boot step failed; the text says which and why (printed and sent to the host)."""


class Console:
    """Progress and errors on /dev/console (the serial log): quiet unless asked or failing."""

    def __init__(self) -> None:
        self.fd = 2
        self.verbose = False
        self.pooled = False
        self.phases: list[tuple[str, float]] = []  # (name, ms since boot at its end)

    def open(self) -> None:
        try:
            self.fd = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            self.fd = 2

    def write(self, text: str) -> None:
        data = "".join(PREFIX + line + "\n" for line in text.splitlines()).encode(errors="replace")
        try:
            os.write(self.fd, data)
        except OSError:
            pass

    def log(self, text: str) -> None:
        """Always printed: something the operator should see."""
        self.write(text)

    def trace(self, text: str) -> None:
        """Printed with vmshim.debug only."""
        if self.verbose:
            self.write(text)

    def phase(self, name: str) -> None:
        """Mark the end of a boot phase."""
        stamp = time.monotonic() * 1000  # CLOCK_MONOTONIC: time since the guest booted
        self.phases.append((name, stamp))
        if self.verbose:
            self.write(f"{name} done at {stamp:.0f} ms")

    def summary(self) -> str:
        parts, last = [], None
        for name, stamp in self.phases:
            if last is not None:
                parts.append(f"{name} {stamp - last:.0f}")
            last = stamp
        total = self.phases[-1][1] if self.phases else time.monotonic() * 1000
        return f"ready at {total:.0f} ms since boot ({', '.join(parts)} ms)"


console = Console()


# ---- phases -----------------------------------------------------------------------------


def leave_initramfs() -> None:
    """Make "/" a bind mount of the initramfs instead of the initramfs mount itself.

    pivot_root(2) refuses to move the initramfs ("rootfs", a mount without a parent), so
    containers could not pivot away from it. Bind the root onto /.root, move that onto
    "/" and chroot into it: the root is now a mount with a parent (rootfs underneath),
    which pivot_root accepts, and nothing was copied.
    """
    from guest.runtime import syscalls as sc

    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == "/":
                if fields[fields.index("-") + 1] != "rootfs":
                    return  # a real root filesystem: nothing to do
                break
    os.makedirs("/.root", exist_ok=True)
    sc.mount("/", "/.root", None, sc.MS_BIND | sc.MS_REC, None)
    os.chdir("/.root")
    sc.mount("/.root", "/", None, sc.MS_MOVE, None)
    os.chroot(".")
    os.chdir("/")


def mount_basics() -> None:
    """The API filesystems PID 1 must provide. Already-mounted ones are left alone."""
    from guest.runtime import syscalls as sc

    nosuid_nodev_noexec = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    table = [
        ("proc", "/proc", "proc", nosuid_nodev_noexec, None),
        ("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None),
        ("devtmpfs", "/dev", "devtmpfs", sc.MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev_noexec, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"),
    ]
    for source, target, fstype, flags, data in table:
        if target == "/sys":  # /proc is there: now the root can be made pivotable
            leave_initramfs()
        os.makedirs(target, exist_ok=True)
        try:
            sc.mount(source, target, fstype, flags, data)
        except OSError as exc:
            if exc.errno != 16:  # EBUSY: the kernel mounted it already (devtmpfs.mount)
                raise BootError(f"cannot mount {fstype} on {target}: {exc.strerror}") from None
    console.open()
    try:
        with open("/proc/cmdline") as f:
            words = f.read().split()
        console.verbose = "vmshim.debug" in words
        from guest.spec import POOL_CMDLINE_FLAG

        console.pooled = POOL_CMDLINE_FLAG in words
    except OSError:
        pass


def load_modules(list_path: str | None = None) -> None:
    """Load each module named in *list_path* (MODULES_LIST; absolute paths, or relative
    to /lib/modules/<release>), in order. Already loaded or built in: fine. A module that
    fails is reported on the console and skipped: what needs it fails later, clearly.
    A kernel without module support (the minimal kernel: all built in) loads nothing."""
    if not os.path.exists("/proc/modules"):
        return
    try:
        with open(list_path or MODULES_LIST) as f:
            names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return
    from guest.runtime import syscalls

    base = f"/lib/modules/{os.uname().release}"
    for name in names:
        path = name if name.startswith("/") else os.path.join(base, name)
        begin = time.monotonic()
        try:  # plain .ko files: the image builder decompresses them
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                syscalls.finit_module(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno != 17:  # EEXIST: loaded already
                console.log(f"cannot load module {path}: {exc.strerror}")
        if console.verbose:
            console.write(f"module {os.path.basename(path)}: {(time.monotonic() - begin) * 1000:.0f} ms")


def find_disks() -> dict[str, str]:
    """``{serial: /dev/<name>}`` for every block device that has a serial."""
    disks: dict[str, str] = {}
    try:
        names = os.listdir("/sys/block")
    except FileNotFoundError:
        return disks
    for name in names:
        try:
            with open(f"/sys/block/{name}/serial") as f:
                serial = f.read().strip()
        except OSError:
            continue
        if serial:
            disks[serial] = f"/dev/{name}"
    return disks


def wait_for_disks(serials: list[str], timeout: float | None = None) -> dict[str, str]:
    """Wait until a disk with each serial (and its /dev node) exists; return them.
    Raises BootError naming the missing ones after *timeout* (DISK_TIMEOUT) seconds."""
    timeout = DISK_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    while True:
        disks = find_disks()
        missing = [s for s in serials if s not in disks or not os.path.exists(disks[s])]
        if not missing:
            return {s: disks[s] for s in serials}
        if time.monotonic() > deadline:
            raise BootError(
                f"no disk with serial {', '.join(missing)} appeared within "
                f"{timeout:.0f} s (found: {', '.join(sorted(disks)) or 'none'})"
            )
        time.sleep(0.005)


def read_config(device: str) -> BootConfig:
    """Mount the config drive read-only, read and validate config.json, unmount it."""
    import json

    from guest.runtime import syscalls
    from guest.spec import BootConfig

    os.makedirs(CONFIG_MOUNT, exist_ok=True)
    fstype = filesystem_type(device)  # iso9660 as the host makes it
    try:
        syscalls.mount(device, CONFIG_MOUNT, fstype, syscalls.MS_RDONLY, None)
    except OSError as exc:
        raise BootError(f"cannot mount the config drive {device} ({fstype}): {exc.strerror}") from None
    try:
        with open(os.path.join(CONFIG_MOUNT, CONFIG_FILE), "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise BootError(f"the config drive has no {CONFIG_FILE}: {exc.strerror}") from None
    finally:
        try:
            syscalls.umount2(CONFIG_MOUNT, 0)
        except OSError:
            pass
    try:
        return BootConfig.from_dict(json.loads(raw))
    except ValueError as exc:
        raise BootError(f"bad {CONFIG_FILE} on the config drive: {exc}") from None


def filesystem_type(device: str) -> str:
    """squashfs, erofs, ext4 or iso9660, from the superblock magic. Raises BootError."""
    with open(device, "rb") as f:
        head = f.read(32774)
    if head[:4] == b"hsqs":
        return "squashfs"
    if head[1024:1028] == b"\xe2\xe1\xf5\xe0":
        return "erofs"
    if head[1080:1082] == b"\x53\xef":
        return "ext4"
    if head[32769:32774] == b"CD001":
        return "iso9660"
    raise BootError(f"{device} holds no filesystem vmshim knows (squashfs, erofs, ext4, iso9660)")


PREMOUNTED: dict[int, str] = {}
"""Layer index -> device: the layers a primed pooled VM mounted while it waited."""


def premount_layers() -> None:
    """A pooled VM primed for an image (its layer disks plugged in at boot): mount them
    read-only where :func:`mount_rootfs` would, while the VM waits for its container.
    Failures are only reported: mount_rootfs mounts what is not premounted."""
    from guest.runtime import syscalls
    from guest.spec import LAYER_SERIAL_PREFIX

    for serial, device in sorted(find_disks().items()):
        index = serial[len(LAYER_SERIAL_PREFIX) :]
        if not serial.startswith(LAYER_SERIAL_PREFIX) or not index.isdigit():
            continue
        target = f"{LAYERS_DIR}/{int(index)}"
        try:
            os.makedirs(target, exist_ok=True)
            syscalls.mount(device, target, filesystem_type(device), syscalls.MS_RDONLY, None)
        except (OSError, BootError) as exc:
            console.log(f"cannot premount layer {index} ({device}): {exc}")
            continue
        PREMOUNTED[int(index)] = device
    console.phase("premount")


def mount_rootfs(config: BootConfig, disks: dict[str, str]) -> str:
    """Mount the layers and the writable layer, stack them at ROOTFS; return ROOTFS."""
    from guest.runtime import rootfs, syscalls
    from guest.spec import LAYER_SERIAL_PREFIX, WRITABLE_SERIAL

    if config.rootfs_share:  # an OCI bundle's rootfs, shared by the host as it is
        from guest.runtime import mounts

        try:
            return mounts.mount_virtiofs(config.rootfs_share, ROOTFS, False)
        except mounts.MountError as exc:
            raise BootError(f"cannot mount the bundle's rootfs: {exc}") from None
    lowerdirs: list[str] = []
    for index in range(config.layer_count):
        device = disks[f"{LAYER_SERIAL_PREFIX}{index}"]
        target = f"{LAYERS_DIR}/{index}"
        if PREMOUNTED.get(index) == device:
            lowerdirs.insert(0, target)
            continue
        os.makedirs(target, exist_ok=True)
        fstype = filesystem_type(device)
        try:
            syscalls.mount(device, target, fstype, syscalls.MS_RDONLY, None)
        except OSError as exc:
            raise BootError(f"cannot mount layer {index} ({device}, {fstype}): {exc.strerror}") from None
        lowerdirs.insert(0, target)  # topmost first
    if not lowerdirs:  # an image with no layers (FROM scratch, nothing added)
        os.makedirs(EMPTY_LOWER, exist_ok=True)
        lowerdirs.append(EMPTY_LOWER)

    os.makedirs(RW_DIR, exist_ok=True)
    if config.writable == "disk":
        device = disks[WRITABLE_SERIAL]
        try:
            syscalls.mount(device, RW_DIR, "ext4", 0, None)
        except OSError as exc:
            raise BootError(f"cannot mount the writable disk {device} (ext4): {exc.strerror}") from None
    else:
        syscalls.mount("tmpfs", RW_DIR, "tmpfs", 0, "mode=0755")
    console.phase("layers")
    try:
        rootfs.mount_overlay(lowerdirs, f"{RW_DIR}/upper", f"{RW_DIR}/work", ROOTFS)
    except rootfs.RootfsError as exc:
        raise BootError(str(exc)) from None
    return ROOTFS


PREUP: list[str] = []
"""NICs a pooled VM brought up while it waited (IPv6 off on them until the spec)."""


def _set_ipv6(name: str, on: bool) -> None:
    """Turn IPv6 on or off for NIC *name*. Raises OSError."""
    with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
        f.write("0" if on else "1")


def preup_nics() -> None:
    """A pooled VM booted with a NIC (a pool with a network): bring its link up while the
    VM waits, so that the container does not wait for virtio-net to open. It gets no
    address, and IPv6 stays off on it, so nothing is sent on the bridge before the
    container's spec (and the host's anti-spoofing rules for it) arrives."""
    import socket

    from guest.runtime.network import SYS_NET, _set_up

    try:
        names = sorted(n for n in os.listdir(SYS_NET) if n != "lo")
    except OSError:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                _set_ipv6(name, False)
                _set_up(sock.fileno(), name)
            except OSError as exc:
                console.log(f"cannot bring {name} up early: {exc}")
                continue
            PREUP.append(name)
    console.phase("nics up")


def bring_up_network(config: BootConfig) -> None:
    """lo and the VM's NICs as the host planned them (guest.runtime.network)."""
    from guest.runtime.network import NetworkError, configure

    for name in PREUP:  # as a cold VM's NIC: IPv6 on (a link-local address, maybe address6)
        try:
            _set_ipv6(name, True)
        except OSError as exc:
            raise BootError(f"cannot turn IPv6 back on for {name}: {exc.strerror}") from None
    try:
        names = configure(config.network)
    except NetworkError as exc:
        raise BootError(f"cannot set up the network: {exc}") from None
    console.phase("network")
    console.trace(f"network: {', '.join(names)} up")


def make_cgroup(config: BootConfig) -> Cgroup | None:
    """cgroup2 at /sys/fs/cgroup and the container's group. Without limits to enforce, a
    failure is only reported; with limits it is fatal."""
    from guest.runtime.cgroups import Cgroup, CgroupError, mount_cgroup2

    limits = config.cgroup_limits()
    try:
        mount_cgroup2()
        return Cgroup.create(config.container_id, limits=limits)
    except (OSError, CgroupError) as exc:
        if not limits.is_empty() or not config.privileged:  # the device rules need it
            raise BootError(f"cannot set up the container's cgroup: {exc}") from None
        console.log(f"running without a cgroup: {exc}")
        return None


# ---- the end ----------------------------------------------------------------------------


def tell_host(channel: int | None, hello_sent: bool, message: str) -> None:
    """Best effort, bounded: send ``error`` (after a ``hello`` if none was sent)."""
    import select

    from guest import protocol
    from guest.agent import AGENT_VERSION, open_port

    try:
        if channel is None:
            channel = open_port(timeout=1.0)
        data = b""
        if not hello_sent:
            data += protocol.encode(
                protocol.HELLO,
                protocol=protocol.PROTOCOL_VERSION,
                agent=AGENT_VERSION,
                uptime=round(time.monotonic(), 3),
            )
        data += protocol.encode(protocol.ERROR, message=message[:4000])
        os.set_blocking(channel, False)
        view = memoryview(data)
        deadline = time.monotonic() + 3.0
        while view and time.monotonic() < deadline:
            select.select([], [channel], [], 0.05)
            try:
                view = view[os.write(channel, view) :]
            except BlockingIOError:
                continue
    except Exception as exc:  # noqa: BLE001 - already failing; the console has the story
        console.log(f"could not tell the host: {exc}")


def apply_sysctls(sysctl: dict[str, str]) -> None:
    """The container's sysctls (OCI ``linux.sysctl``), in the VM's own kernel. Raises
    BootError naming the first that cannot be set."""
    for key, value in sysctl.items():
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            raise BootError(f"cannot set sysctl {key}={value}: {exc.strerror}") from None


def overcommit_memory() -> None:
    """vm.overcommit_memory=1: allocations succeed as they would on a big host. The VM is
    sized to the container's limit plus what the guest needs, so without this a large
    malloc fails ("out of memory") where docker's container would meet its cgroup's OOM
    killer (exit 137, OOMKilled). PID 1 (the agent) is never chosen by the OOM killer."""
    try:
        with open("/proc/sys/vm/overcommit_memory", "w") as f:
            f.write("1")
    except OSError as exc:
        console.log(f"cannot set vm.overcommit_memory: {exc.strerror}")


_staged_volumes: list[str] = []
"""Where volume disks are mounted (guest.runtime.mounts.mount_volume), for power_off."""


def stage_mounts(config: BootConfig, disks: dict[str, str]) -> list[tuple[MountSpec, str | None]]:
    """Make each mount's source available under MOUNTS_DIR: virtiofs shares (tag =
    ``source``) and volume disks (serial = ``source``). Returns ``(MountSpec, source
    path)`` pairs for the Container (None for tmpfs). Raises BootError."""
    if not config.mounts:
        return []
    from guest.runtime import mounts

    out = []
    for index, spec in enumerate(config.mounts):
        stage = f"{MOUNTS_DIR}/{index}"
        try:
            if spec.type == "bind":
                source = mounts.mount_virtiofs(spec.source, stage, spec.readonly)
                if spec.subpath:  # one file (or directory) of the shared directory
                    source = mounts.inside_share(source, spec.subpath)
            elif spec.type == "volume":
                source = mounts.mount_volume(disks[spec.source], stage, spec.readonly)
                _staged_volumes.append(stage)
            else:
                source = None
        except mounts.MountError as exc:
            raise BootError(f"cannot prepare the mount on {spec.target}: {exc}") from None
        out.append((spec, source))
    console.phase("mounts")
    return out


def power_off() -> None:
    """Unmount what can be, sync, and end the VM. Never returns."""
    try:
        from guest.runtime import syscalls

        if _staged_volumes:
            from guest.runtime.mounts import sync_volumes

            sync_volumes(_staged_volumes)
        for target in (ROOTFS, RW_DIR):
            try:
                syscalls.umount2(target, 0)
            except OSError:
                try:  # busy: at least make the writable disk consistent
                    syscalls.mount(None, target, None, syscalls.MS_REMOUNT | syscalls.MS_RDONLY, None)
                except OSError:
                    pass
        syscalls.sync()
        syscalls.reboot(syscalls.RB_AUTOBOOT)
    except BaseException as exc:  # noqa: BLE001
        console.log(f"reboot failed: {exc}")
    os._exit(1)  # PID 1 exiting panics the kernel; with panic=-1 that reboots too


# ---- main -------------------------------------------------------------------------------


def prepare_vm() -> None:
    """What the VM needs before the agent can talk: API filesystems and kernel modules."""
    mount_basics()
    console.phase("mounts")
    load_modules()
    console.phase("modules")


def reseed_rng(entropy: bytes) -> None:
    """Mix the host's fresh *entropy* into the kernel's pool (credited) and make the
    CRNG reseed from it now, so a pooled VM's container shares no RNG state with its
    siblings booted from the same image. Raises BootError."""
    import fcntl
    import struct

    if not entropy:
        raise BootError("the host sent no entropy for this container")
    try:
        with open("/dev/urandom", "wb", buffering=0) as f:
            fcntl.ioctl(f, RNDADDENTROPY, struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy)
            fcntl.ioctl(f, RNDRESEEDCRNG)
    except OSError as exc:
        raise BootError(f"cannot reseed the RNG: {exc.strerror}") from None


def _default_process(args: list[str]) -> ProcessSpec:
    """*args* with docker's default capabilities and seccomp filter (what a container gets
    without --cap-add, --cap-drop, --privileged or a profile)."""
    from guest.spec import DEFAULT_CAPABILITIES, ProcessSpec

    caps = list(DEFAULT_CAPABILITIES)
    return ProcessSpec(
        args=args, seccomp="default", capabilities={"bounding": caps, "effective": caps, "permitted": caps}
    )


def warm_up() -> None:
    """A pooled VM, while it waits for its container: import what assembling one needs,
    compile docker's default seccomp filter (cached by bounding set), mount cgroup2 and
    make the containers' parent group with its controllers enabled, and load the device
    cgroup program of docker's default rules (used by a container without ``--device``
    and not privileged), so that this time is not the container's. Failures are only
    reported: the container does the same work again and fails clearly if it must."""
    try:
        from guest.runtime import cgroups, container, devices, mounts, network, rootfs  # noqa: F401
        from guest.runtime.process import prepare_filters

        prepare_filters(_default_process(["true"]))
    except Exception as exc:  # noqa: BLE001
        console.log(f"warm-up failed: {exc}")
    try:  # make_cgroup finds both done
        cgroups.mount_cgroup2()
        cgroups.prepare_parent()
    except Exception as exc:  # noqa: BLE001
        console.log(f"warm-up failed: cgroup: {exc}")
    try:  # Container's restrict_devices attaches it
        devices.preload(devices.rules_for(()))
    except Exception as exc:  # noqa: BLE001
        console.log(f"warm-up failed: device rules: {exc}")
    console.phase("warm-up")


def rehearse() -> None:
    """A pooled VM, while it waits: assemble, start and take down a throwaway container
    the way :func:`prepare_container` and the agent's ``start`` do it (overlay, cgroup with
    its device program, /etc files, namespaces, mounts, pivot_root, seccomp, capabilities,
    exec of ``/bin/true``, exit). Under TCG the first run of a kernel or interpreter path
    costs its translation, and most of a pooled container's start was that; this pays it
    before the container arrives. Nothing of it stays: its process has exited and been
    reaped, its cgroup, mounts and files are gone before the VM says hello. Its root is
    an overlay of the premounted layers (the image's ``/bin/true``) or of the guest's own
    root. Unlike a container it has a network namespace of its own: the image's binary
    runs before any anti-spoofing rule guards the VM's NIC, so it must not reach it. It
    is killed after REHEARSAL_TIMEOUT s. Failures are only reported: the container does
    all of it again."""
    import select
    import shutil
    import signal

    from guest.runtime import rootfs, syscalls
    from guest.runtime.cgroups import Cgroup
    from guest.runtime.container import GUEST_NAMESPACES, Container
    from guest.runtime.process import SpawnError, wait
    from guest.spec import BootConfig

    process = _default_process(["/bin/true"])
    config = BootConfig(container_id=REHEARSAL_ID, token="0" * 32, hostname="rehearsal", process=process, layer_count=0)
    root, rw = f"{REHEARSAL_DIR}/root", f"{REHEARSAL_DIR}/rw"
    lowerdirs = [f"{LAYERS_DIR}/{index}" for index in sorted(PREMOUNTED, reverse=True)] or ["/"]
    cgroup = None
    try:
        os.makedirs(rw, exist_ok=True)
        syscalls.mount("tmpfs", rw, "tmpfs", 0, "mode=0755")
        rootfs.mount_overlay(lowerdirs, f"{rw}/upper", f"{rw}/work", root)
        cgroup = Cgroup.create(config.container_id, limits=config.cgroup_limits())
        container = Container(
            config, root, files_dir=f"{REHEARSAL_DIR}/files", cgroup=cgroup, namespaces=(*GUEST_NAMESPACES, "net")
        )
        spawned = container.start(process, stdin=False)
        spawned.close()
        exited = os.pidfd_open(spawned.pid)
        try:
            if not select.select([exited], [], [], REHEARSAL_TIMEOUT)[0]:
                console.log("rehearsal: /bin/true did not end; killed")
                os.kill(spawned.pid, signal.SIGKILL)
        finally:
            os.close(exited)
        wait(spawned.pid)
    except SpawnError as exc:  # an image without /bin/true: all but the exec was rehearsed
        console.trace(f"rehearsal: {exc}")
    except Exception as exc:  # noqa: BLE001
        console.log(f"rehearsal failed: {exc}")
    finally:
        if cgroup is not None:
            try:
                cgroup.remove()
            except Exception as exc:  # noqa: BLE001
                console.log(f"rehearsal: cannot remove its cgroup: {exc}")
        for target in (root, rw):
            try:
                syscalls.umount2(target, syscalls.MNT_DETACH)
            except OSError:
                pass
        shutil.rmtree(REHEARSAL_DIR, ignore_errors=True)
    console.phase("rehearsal")


def prepare_container(config: BootConfig | None = None) -> tuple[BootConfig, Container]:
    """Config drive (unless *config* is given: a pooled VM's spec), hostname, lo, cgroup,
    layers, overlay, network; returns (config, Container).

    The work that needs no disk or NIC comes before waiting for them: a pooled VM's are
    hot-plugged while it runs (the guest's PCIe hotplug takes ~0.2 s a device under TCG),
    and a cold VM's are there already. The cgroup waits with them when its limits name
    block devices (``--device-read-bps``)."""
    from guest.spec import CONFIG_DRIVE_SERIAL, LAYER_SERIAL_PREFIX, WRITABLE_SERIAL

    disks: dict[str, str] = {}
    if config is None:
        disks = wait_for_disks([CONFIG_DRIVE_SERIAL])
        config = read_config(disks[CONFIG_DRIVE_SERIAL])
    console.phase("config")
    wanted = [f"{LAYER_SERIAL_PREFIX}{i}" for i in range(config.layer_count)]
    if config.writable == "disk":
        wanted.append(WRITABLE_SERIAL)
    wanted += [m.source for m in config.mounts if m.type == "volume"]

    from guest.runtime import syscalls
    from guest.runtime.container import GUEST_NAMESPACES, Container
    from guest.runtime.process import loopback_up

    console.phase("import runtime")
    syscalls.sethostname(config.hostname)
    has_nics = bool(config.network.get("interfaces"))
    if not has_nics:
        try:
            loopback_up()
        except OSError as exc:
            console.log(f"cannot bring up lo: {exc}")
    limits = config.cgroup_limits()
    cgroup = None
    early_cgroup = not (limits.device_read_bps or limits.device_write_bps)
    if early_cgroup:
        cgroup = make_cgroup(config)
    overcommit_memory()
    console.phase("cgroup")
    disks.update(wait_for_disks(wanted))
    console.phase("disks")
    root = mount_rootfs(config, disks)
    console.phase("overlay")
    if has_nics:
        bring_up_network(config)
    if not early_cgroup:
        cgroup = make_cgroup(config)
    if config.sysctl:
        apply_sysctls(config.sysctl)
    sources = stage_mounts(config, disks)
    try:
        container = Container(
            config, root, files_dir=FILES_DIR, cgroup=cgroup, namespaces=GUEST_NAMESPACES, mounts=sources
        )
    except Exception as exc:  # noqa: BLE001 - MountError; the host reads the text
        if type(exc).__name__ not in ("MountError", "CgroupError"):
            raise
        raise BootError(str(exc)) from None
    if not config.rootfs_share:
        container.upperdir = f"{RW_DIR}/upper"  # what the agent's ``diff`` reads
    console.phase("container")
    from guest.runtime.process import SpawnError, prepare_filters

    try:  # a cold VM does it while the host's ``start`` is on its way; a template saves it
        prepare_filters(config.process)
    except SpawnError as exc:
        console.trace(f"seccomp: {exc} (reported at the start)")
    console.phase("filters")
    return config, container


def main() -> None:
    """PID 1's entry point. Never returns: the VM ends with it.

    ``hello`` goes out as soon as the port is open; the container is assembled while the
    host's ``start`` is on its way (a failure there reaches the host as ``error``)."""
    channel = None
    agent = None
    try:
        prepare_vm()
        from guest.agent import Agent, open_port

        console.phase("import agent")
        channel = open_port()
        console.phase("port")
        agent = Agent(channel, None, None, reconnect=True, reap_orphans=True, log=console.log, trace=console.trace)
        spec = None
        if console.pooled:
            # hello only once the VM is ready and about to serve the channel: a host that
            # took it meanwhile (the keeper gone, the claimer connected) must get a hello of
            # its own, and the agent sees the keeper leave only while it reads the port.
            warm_up()
            premount_layers()
            preup_nics()
            rehearse()
            agent.greet()
            console.phase("hello")
            got = agent.wait_for_spec()
            if got is None:  # drained (``shutdown``) before anyone took it
                return power_off()
            spec, entropy = got
            reseed_rng(entropy)
            console.phase("spec")
        else:
            agent.greet()
            console.phase("hello")
        config, container = prepare_container(spec)
        agent.attach(config, container)
        console.write(console.summary())
        code = agent.run()
        if console.verbose:
            console.write(f"container exited with {code}")
        agent.kill_all()
    except BaseException as exc:  # noqa: BLE001 - PID 1 must end the VM, not die
        import traceback

        for name, stamp in console.phases:
            console.write(f"{name} done at {stamp:.0f} ms")
        console.write("FATAL: " + "".join(traceback.format_exception(exc)).rstrip())
        message = str(exc) if isinstance(exc, BootError) else f"agent failure: {exc!r}"
        tell_host(channel, agent is not None and agent.hello_sent, message)
    power_off()


if __name__ == "__main__":
    if os.getpid() != 1:
        sys.exit("guest.init must run as PID 1 in the guest")
    main()
