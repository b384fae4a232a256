"""Place a container in its own microVM: config drive, writable disk, domain, boot, agent
handshake; find it again after a monitor restart; pause, kill and tear it down.

The monitor (shim.containers.monitor) is the only user. The guest reboots itself when the
container ends (the domain is destroyed on reboot); :meth:`VmPlacement.teardown` makes
sure the domain is gone and removes the run directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from guest.spec import CONFIG_DRIVE_SERIAL, LAYER_SERIAL_PREFIX, ROOTFS_SHARE_TAG, WRITABLE_SERIAL, BootConfig
from shim import paths
from shim.errors import VmshimError
from shim.containers.netrequest import NetworkRequest
from shim.containers.resources import DEFAULT_VM_MIB
from shim.containers.vm_common import BOOT_TIMEOUT, console_tail
from shim.containers.vm_common import disk_target as _target
from shim.vm.accel import guest_cmdline
from shim.vm.agent_client import AgentClient

if TYPE_CHECKING:  # imported where used at run time
    from shim.containers.engine_network import EngineNetwork
    from shim.containers.networking import ContainerNetwork
    from shim.containers.pool import PooledVm
    from shim.guestimage.image import GuestImage
    from shim.vm.accel import AccelInfo

RW_DISK_SIZE = 8 << 30
"""Apparent size of a container's writable disk (sparse: only what is written is used)."""
GONE_POLL = 0.25
"""How often teardown asks libvirt whether the domain is gone (libvirtd is shared)."""


def agent_socket_for(run_dir: Path, hypervisor: str = "") -> Path:
    """The agent channel's socket: ``agent.sock``, or after ``migrate`` one named after
    the destination (a migrated VM's socket must not share the source's path)."""
    if not hypervisor:
        return Path(run_dir) / "agent.sock"
    import hashlib

    return Path(run_dir) / f"agent-{hashlib.sha256(hypervisor.encode()).hexdigest()[:8]}.sock"


def domain_name(container_id: str) -> str:
    """The libvirt domain of the container's VM: ``vmshim-<short id>``, or the pooled VM
    it took (shim.containers.pool) while that runs."""
    from shim.containers import store
    from shim.containers.pool import claimed

    vm = claimed(store.run_dir_of(container_id))
    return vm.domain if vm is not None else store.domain_name(container_id)


def make_rw_disk(path: Path, size: int = RW_DISK_SIZE) -> None:
    """Create the sparse ext4 file that becomes a container's writable layer (the guest
    mounts it by its serial, WRITABLE_SERIAL). Inode tables are written now (a few MiB)
    so the guest kernel has no lazy-init work to do under TCG. Raises VmshimError."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(fd, 0o600)  # container data: libvirt chowns it to QEMU's user
        f.truncate(size)
    res = subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",
            "-N",
            "65536",
            "-L",
            "vmshim-rw",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=1,nodiscard",
            str(tmp),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise VmshimError(
            f"cannot make the writable disk {path}: {(res.stderr or res.stdout).strip() or 'mkfs.ext4 failed'}"
        )
    os.replace(tmp, path)


class VmPlacement:
    """One container's microVM, as its monitor sees it.

    *run_dir* holds the agent socket, console log and config drive; *rw_disk* is the
    writable layer (None: the guest keeps it in RAM).
    """

    kind = "vm"

    def __init__(
        self,
        boot: BootConfig,
        layer_disks: Sequence[str | Path],
        run_dir: Path,
        *,
        name: str,
        memory_mib: int = DEFAULT_VM_MIB,
        vcpus: int = 1,
        rw_disk: Path | None = None,
        backend=None,
        cpuset: str | None = None,
        mounts: list | None = None,
        network: NetworkRequest | None = None,
        rootfs_dir: str = "",
        engine_netns: dict | None = None,
        hypervisor: str = "",
    ):
        from shim.containers.mounts import Attachments

        self.boot_config = boot
        self.network_request = network
        """The container's networking (None: no NIC): connected in
        boot(), disconnected in teardown() once the VM is gone."""
        self.network: ContainerNetwork | None = None
        self.engine_netns = engine_netns
        """vmshim-runtime: the namespace an engine prepared (Container.engine_netns); the
        VM's NICs are plugged into its interfaces (shim.containers.engine_network)."""
        self._engine: EngineNetwork | None = None
        self.cpuset = cpuset
        self.attachments = Attachments(mounts or [])
        """-v/--mount/--tmpfs (shim.containers.mounts): leased in boot(), let go of in
        teardown() once the VM is gone."""
        self._volume_disks: list = []
        self._shares: list = []
        self.rootfs_dir = rootfs_dir
        """A host directory shared as the whole rootfs (vmshim-runtime's bundles); "" for
        an image's layers."""
        self.layer_disks = [Path(p) for p in layer_disks]
        self.run_dir = Path(run_dir)
        self.name = name
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.rw_disk = rw_disk
        self.domain = f"vmshim-{boot.container_id[:12]}"
        self.console_log = self.run_dir / "console.log"
        self.agent_socket = agent_socket_for(self.run_dir, hypervisor)
        self._backend = backend
        self.accel: AccelInfo | None = None
        self.guest: GuestImage | None = None
        """The guest image this VM booted (shim.guestimage.GuestImage), once it did."""
        self.template: dict | None = None
        """A snapshot template this container starts from (shim.containers.template)."""
        self.template_error = ""
        """Why starting from :attr:`template` failed (then it booted cold)."""
        self.pool_ok = True
        """Whether :meth:`boot` may take a VM of the warm pool (False: a VM that will be saved
        as a snapshot template must be this placement's own domain)."""
        self.send_before_hello: list[tuple[str, bytes, dict]] = []
        """Messages (type, payload, fields) sent to the agent right after connecting to a
        VM this placement created or restored, before its ``hello`` is read: a restored
        template's ``identity`` (shim.containers.template), which the agent then handles
        right behind its hello instead of a round trip later."""
        self.pooled: PooledVm | None = None
        """The shim.containers.pool.PooledVm this container took (None: booted cold)."""
        from shim.containers.pool import claimed

        vm = claimed(self.run_dir)  # a monitor re-attaching to a pooled VM
        if vm is not None:
            self._use_pooled(vm)

    def _use_pooled(self, vm) -> None:
        self.pooled = vm
        self.domain = vm.domain
        self.console_log = vm.console_log
        self.agent_socket = vm.agent_socket

    @property
    def backend(self):
        if self._backend is None:
            from shim.vm.libvirt_backend import LibvirtBackend

            self._backend = LibvirtBackend()
        return self._backend

    def build_domain(self, guest, accel, memory=None, cpu_readback: str = "words"):
        """The domain description for this container (pure: no side effects);
        *memory*: shim.vm.memory.MemorySettings (None: the defaults); *cpu_readback*:
        shim.vm.accel.cpu_readback's."""
        from shim.vm import domain as dom
        from shim.vm.memory import MemorySettings

        memory = memory or MemorySettings()

        disks = [
            dom.Disk(
                source=str(path), target=_target(i), serial=f"{LAYER_SERIAL_PREFIX}{i}", readonly=True, shareable=True
            )
            for i, path in enumerate(self.layer_disks)
        ]
        disks.append(
            dom.Disk(
                source=str(self.run_dir / "config.iso"),
                target=_target(len(disks)),
                serial=CONFIG_DRIVE_SERIAL,
                readonly=True,
            )
        )
        if self.rw_disk is not None:
            disks.append(
                dom.Disk(source=str(self.rw_disk), target=_target(len(disks)), serial=WRITABLE_SERIAL, readonly=False)
            )
        disks += self._volume_disks  # made by boot() (volume leases)
        interfaces = self.network.domain_interfaces() if self.network is not None else []
        if self._engine is not None:
            interfaces += self._engine.interfaces()
        # On bridge networks `network connect` may plug more NICs in while it runs.
        hotplug = any(i.type in ("bridge", "ethernet") for i in interfaces)
        return dom.Domain(
            name=self.domain,
            uuid=str(uuid.UUID(self.boot_config.container_id[:32])),
            memory_mib=self.memory_mib,
            vcpus=self.vcpus,
            domain_type="kvm" if accel.kind == "kvm" else "qemu",
            boot=dom.KernelBoot(
                kernel=str(guest.kernel), initrd=str(guest.initramfs), cmdline=guest_cmdline(guest.cmdline, accel.kind)
            ),
            disks=disks,
            channels=[dom.AgentChannel(socket_path=str(self.agent_socket))],
            serial=dom.SerialLog(path=str(self.console_log)),
            interfaces=interfaces,
            machine=dom.HOTPLUG_MACHINE if hotplug else dom.DEFAULT_MACHINE,
            hotplug_ports=dom.HOTPLUG_PORTS if hotplug else 0,
            metadata={"container-id": self.boot_config.container_id, "name": self.name},
            filesystems=self._rootfs_shares() + list(self._shares),
            cpuset=self.cpuset,
            balloon=dom.Balloon() if memory.free_page_reporting else None,
            share_pages=memory.ksm,
            cpu_readback=cpu_readback,
        )

    @property
    def dns_relay(self):
        """The DNS relay into the engine's network namespace (engine_network.DnsRelay), or
        None."""
        return self._engine.dns if self._engine is not None else None

    def engine_watch(self):
        """A socket that turns readable when the engine changes the container's network
        namespace (EngineNetwork.watch_socket), or None. Raises OSError."""
        return self._engine.watch_socket() if self._engine is not None else None

    def follow_engine_links(self) -> list[dict]:
        """Follow the engine's changes to the namespace since: unplug the NICs of the
        interfaces that went away (``docker network disconnect``), plug one in for each
        new one (``docker network connect``); the new ones' ``netconf`` entries. Raises
        NetworkError, HypervisorError."""
        if self._engine is None:
            return []
        new, gone = self._engine.changes()
        for link in gone:
            self._engine.unplug(link, self._request_unplug)
        return [
            self._engine.plug(link, lambda iface: self.backend.attach_interface(self.domain, iface)) for link in new
        ]

    def _request_unplug(self, mac: str) -> None:
        """Ask for NIC *mac* to leave the VM without waiting: the guest's PCIe hotplug
        driver lets go ~5 s later, and the monitor must not stall that long."""
        from shim.errors import HypervisorError

        try:
            self.backend.detach_interface(self.domain, mac, 0.0)
        except HypervisorError:
            pass  # "did not let go within 0 s": on its way out (its tap is gone already)

    def _rootfs_shares(self) -> list:
        from shim.vm.domain import Filesystem

        if not self.rootfs_dir:
            return []
        return [Filesystem(source_dir=self.rootfs_dir, tag=ROOTFS_SHARE_TAG)]

    # ---- life -------------------------------------------------------------------------------

    def boot(self, alive=None) -> AgentClient:
        """Create the VM and wait for the agent's hello. *alive* (optional) is asked about
        every 0.2 s while waiting; a string it returns aborts the boot with that text.
        Raises HypervisorError, GuestImageError or AgentError (with the console's last
        lines); a VM that was created is destroyed again before raising.

        With a :attr:`template` (shim.containers.template), the VM is a restored copy of
        it instead, given this container's identity; if that fails it boots cold. A VM of
        the warm pool is taken when one fits, unless :attr:`pool_ok` is False."""
        if self.template is not None:
            from shim.containers import template as templates

            try:
                return templates.restore_into(self, self.template, alive)
            except VmshimError as exc:
                self.template_error = str(exc)
                self.template = None
                self.backend.wait_gone(self.domain, 10.0)
        return self._launch(self.backend.create, alive, pooled_ok=self.pool_ok)

    def save(self, image: Path) -> None:
        """Write the VM's memory and device state to *image* and end the VM (the
        writable disk and volumes stay as they are; shim.containers.checkpoint keeps a
        copy of the writable disk). Raises HypervisorError (the VM is left as it was)."""
        self.backend.save(self.domain, str(image))

    def restore(self, image: Path, alive=None) -> AgentClient:
        """Like :meth:`boot`, from a file :meth:`save` wrote: the same disks, volumes and
        config drive come back at the same places, the domain is restored running and
        the agent (which saw its host go away before the save) says hello again."""
        return self._launch(lambda domain: self.backend.restore(str(image), domain), alive)

    def migrate(self, uri: str) -> None:
        """Live-migrate the VM to the libvirt at *uri* (same disks, same paths: storage
        shared with this host); from then on this placement asks that libvirt. Raises
        HypervisorError (the VM runs on here)."""
        from shim.guestimage import ensure_guest_image
        from shim.vm.accel import cpu_readback, detect_accel
        from shim.vm.libvirt_backend import LibvirtBackend
        from shim.vm import memory

        # The destination's agent socket gets a path of its own: when the source VM ends,
        # its libvirt removes the socket path it made.
        old = self.agent_socket
        self.agent_socket = agent_socket_for(self.run_dir, uri)
        try:
            domain = self.build_domain(
                ensure_guest_image(), self.accel or detect_accel(), memory.load(), cpu_readback()
            )
            self.backend.migrate(self.domain, uri, domain)
        except BaseException:
            self.agent_socket = old
            raise
        self._backend = LibvirtBackend(uri)

    def _launch(self, create, alive, pooled_ok: bool = False) -> AgentClient:
        """Boot (*create*: the backend's create, or a restore of a saved image) and wait
        for the agent; *pooled_ok*: a fresh boot may take a warm VM from the pool instead
        (never a restore: its memory must be the saved one)."""
        from shim.guestimage import ensure_guest_image
        from shim.vm.accel import cpu_readback, detect_accel
        from shim.vm.configdrive import build_config_drive

        guest = ensure_guest_image()
        self.guest = guest
        self.accel = detect_accel()
        readback = cpu_readback()  # a bad VMSHIM_CPU_READBACK fails before anything is made
        paths.private_dir(self.run_dir)
        from shim.containers import pool

        if self.pooled is not None:  # a pooled VM an earlier start left behind: long gone
            shutil.rmtree(self.pooled.dir, ignore_errors=True)
            self.pooled = None
            self.domain = f"vmshim-{self.boot_config.container_id[:12]}"
            self.console_log = self.run_dir / "console.log"
            self.agent_socket = self.run_dir / "agent.sock"
        self.console_log.unlink(missing_ok=True)

        vm = pool.take(self, pool.current_key(guest=guest, accel=self.accel.kind), self.backend) if pooled_ok else None
        if vm is not None:
            return self._boot_pooled(vm, alive)
        if self.attachments.requests:
            first = len(self.layer_disks) + 1 + (self.rw_disk is not None)
            specs, self._volume_disks, self._shares = self.attachments.for_vm(
                first, _target, share_dir=self.run_dir / "shares"
            )
            self.boot_config = self.boot_config.replace(mounts=specs)
        try:
            if self.network_request is not None:
                from shim.containers import networking as netc

                self.network, self.boot_config = netc.start(
                    self.boot_config.container_id, self.name, "vm", self.network_request, self.boot_config
                )
            if self.engine_netns is not None:
                from shim.containers.engine_network import EngineNetwork

                self._engine = EngineNetwork(self.engine_netns, self.boot_config.container_id)
                self.boot_config = self.boot_config.replace(network=self._engine.prepare())
            build_config_drive(self.boot_config, self.run_dir / "config.iso")
            from shim.vm import memory

            domain = self.build_domain(guest, self.accel, memory.load(), readback)
            create(domain)
        except BaseException:
            self.attachments.release()
            self._disconnect()
            raise
        try:
            if self._engine is not None:
                self._engine.wire()
            client = AgentClient.connect_unix(str(self.agent_socket), timeout=10)
            for kind, payload, fields in self.send_before_hello:
                client.send(kind, payload, **fields)
            client.handshake(BOOT_TIMEOUT, alive=lambda: self._vm_problem() or (alive and alive()))
        except BaseException:
            self.kill()
            raise
        return client

    def _boot_pooled(self, vm, alive=None) -> AgentClient:
        """Make the claimed pooled VM *vm* this container's (shim.containers.pool.adopt).
        Raises like boot(); the VM is killed again on failure."""
        from shim.containers import pool

        self._use_pooled(vm)
        client = None
        try:
            client = AgentClient.connect_unix(str(vm.agent_socket), timeout=10)
            if self.attachments.requests:  # tmpfs only (pool.eligible)
                specs, _, _ = self.attachments.for_vm(0, _target, share_dir=self.run_dir / "shares")
                self.boot_config = self.boot_config.replace(mounts=specs)
            pool.plug_disks(self, vm)  # the guest's hotplug runs while the network is made
            if self.network_request is not None:
                from shim.containers import networking as netc

                self.network, self.boot_config = netc.start(
                    self.boot_config.container_id,
                    self.name,
                    "vm",
                    self.network_request,
                    self.boot_config,
                    first_nic=(vm.nic["tap"], vm.nic["mac"]) if vm.nic is not None else None,
                )
            return pool.adopt(self, vm, client, alive=lambda: self._vm_problem() or (alive and alive()))
        except BaseException:
            if client is not None:
                client.close()
            self.kill()
            raise

    def reattach(self) -> AgentClient | None:
        """Connect to the channel of the VM a previous monitor ran; None when that VM is
        gone. The agent says hello on its own (once the VM runs, if it is paused)."""
        from shim.containers.isolation import reattach_agent

        return reattach_agent(self, self.boot_config.container_id, self.network_request, self.agent_socket)

    def running(self) -> bool:
        """Whether the VM's QEMU is alive (running or paused). Raises HypervisorError."""
        return self.backend.is_running(self.domain)

    def _vm_problem(self) -> str | None:
        if self.running():
            return None
        tail = console_tail(self.console_log)
        return "the microVM stopped before its agent answered" + (
            f"; console: {tail}" if tail else f"; see {self.console_log}"
        )

    def pause(self) -> None:
        self.backend.suspend(self.domain)

    def resume(self) -> None:
        self.backend.resume(self.domain)

    def kill(self) -> None:
        """End the VM now (QEMU is told to exit; no guest shutdown). Never raises."""
        try:
            self.backend.destroy(self.domain, wait=False)
        except Exception:  # noqa: BLE001 - teardown goes on; teardown() checks again
            pass

    def teardown(self, grace: float = 3.0, timeout: float = 15.0) -> None:
        """After the container ended: give the guest *grace* s to power off by itself,
        then kill it; wait (up to *timeout* s) until its QEMU is gone; remove the run
        directory. Libvirt forgets the domain 1-2 s later here: nobody waits for that (the
        next create of the same name does, if it comes that soon). Tolerates libvirtd
        being away for a while (it retries)."""
        deadline = time.monotonic() + grace
        killed = False
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if not self.running():
                    break
                elif not killed and time.monotonic() >= deadline:
                    self.kill()
                    killed = True
            except VmshimError:
                pass  # libvirtd restarting: ask again
            time.sleep(GONE_POLL)
        # QEMU is gone (or, after the timeout, still holds its OFD locks on the volume
        # images, which the next lease checks for): the volumes are free again.
        self.attachments.release()
        _detach_below(self.run_dir / "shares")  # read-only views a dead monitor left
        self._disconnect()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def forget(self, timeout: float = 10.0) -> None:
        """Wait (up to *timeout* s) until libvirt has forgotten the ended VM, so that a
        removal leaves no domain behind. Never raises."""
        try:
            self.backend.wait_gone(self.domain, timeout)
        except Exception:  # noqa: BLE001 - the removal goes on; the reaper checks again
            pass

    def _disconnect(self) -> None:
        """Give the container's addresses, published ports and names back. Never raises."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self.network_request is not None:
            from shim.containers.networking import stop

            stop(self.boot_config.container_id)
            self.network = None

    def info(self) -> dict:
        """What inspect shows about the VM."""
        pid = None
        try:
            pid = self.backend.qemu_pid(self.domain)
        except Exception:  # noqa: BLE001
            pass
        return {
            "Domain": self.domain,
            "QemuPid": pid or 0,
            "ConsoleLog": str(self.console_log),
            "AgentSocket": str(self.agent_socket),
        }

    def usage(self) -> dict:
        """Host-side usage of the VM: QEMU's CPU time and resident memory."""
        pid = self.backend.qemu_pid(self.domain)
        return process_usage(pid, self.memory_mib << 20)


def process_usage(pid: int | None, limit: int) -> dict:
    """``{"cpu_ns", "memory", "memory_limit", "pids"}`` of one host process (QEMU)."""
    if not pid:
        return {"cpu_ns": None, "memory": None, "memory_limit": limit, "pids": 0}
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = memory = None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            rest = f.read().rsplit(b")", 1)[1].split()
        cpu = (int(rest[11]) + int(rest[12])) * 1_000_000_000 // ticks
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    memory = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu_ns": cpu, "memory": memory, "memory_limit": limit, "pids": 1}


def _detach_below(path: Path) -> None:
    """Lazily unmount every mount at or below *path* (deepest first)."""
    prefix = str(path).rstrip("/")
    try:
        with open("/proc/self/mountinfo") as f:
            targets = {line.split()[4].replace("\\040", " ") for line in f}
    except OSError:
        return
    from guest.runtime import rootfs as rootfs_mod

    for target in sorted((t for t in targets if t == prefix or t.startswith(prefix + "/")), key=len, reverse=True):
        try:
            rootfs_mod.unmount(target, detach=True)
        except OSError:
            pass
