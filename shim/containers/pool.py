"""The warm pool: pre-booted, agent-ready microVMs that ``run``/``start`` take instead of
booting one (``vmshim pool set --size N``; off unless set).

A pooled VM boots with :data:`guest.spec.POOL_CMDLINE_FLAG` on its kernel command line, no
disks and no NIC: its agent says hello and waits for a ``spec`` message
(guest.protocol). A container that takes one (:func:`claim`) gets its layer disks, its
writable disk and its NICs hot-plugged into the VM's spare PCIe root ports, and its
BootConfig plus fresh host entropy sent over the channel; the container's monitor then
owns the domain as if it had booted it. A used VM is never given to anyone else: it
ends with its container.

Who fills it: the **pool keeper**, one forked process like the per-container monitors
(no daemon). ``pool set`` starts it; a ``run`` that took a VM pokes it (SIGUSR1), and
starts a new one if it died. It boots one VM at a time until ``size`` are ready, checks
every CHECK_INTERVAL s that they still run (and that the guest image did not change),
and drains the pool and exits when the size becomes 0 (``pool rm``). Its pid and start
time are recorded in ``keeper.json`` and checked together, never by name; one flock
(``keeper.lock``) keeps a second keeper from running.

Layout, all under ``$VMSHIM_RUN/pool`` (one filesystem with the containers' run
directories, so a claim is one rename)::

    pool.json           the setting: {size, memory_mib, vcpus}
    keeper.json         {pid, start} of the keeper; keeper.lock, keeper.log
    booting/<vmid>/     a VM the keeper is booting: vm.json, agent.sock, console.log
    ready/<vmid>/       agent-ready; claimed by rename(2) into <container run dir>/pooled
    draining/<vmid>/    being destroyed

Claiming is atomic: two runs that pick the same VM both try ``rename(ready/<vmid>,
<their run dir>/pooled)`` and only one succeeds (the other gets ENOENT and tries the next).

Only containers a pooled VM can honour use it (:func:`eligible`): the same guest image,
memory and vCPUs, no ``--os``, devices, bind mounts, volumes, cpuset, bundle rootfs or
user-mode network, and no more hot-plugged devices than the VM has spare ports. The others
boot cold as before.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from shim import paths
from shim.containers.resources import DEFAULT_VM_MIB
from shim.errors import UsageError, VmshimError

POOLED_DIR = "pooled"
"""A claimed VM's directory inside its container's run directory."""
VM_FILE = "vm.json"
DOMAIN_PREFIX = "vmshim-pool-"
HOTPLUG_PORTS = 12
"""Spare PCIe root ports of a pooled VM: its container's layers + writable disk + NICs."""
CHECK_INTERVAL = 5.0
"""How often the keeper checks that its ready VMs still run."""
MAX_SIZE = 64
MAX_META = 64 * 1024
KEEPER_STOP_TIMEOUT = 30.0
ENTROPY_BYTES = 64


class PoolError(VmshimError):
    """The pool cannot do what was asked; the text says why."""


@dataclass(frozen=True)
class PoolConfig:
    """The setting: how many VMs of which memory size and vCPU count to keep ready."""

    size: int = 0
    memory_mib: int = DEFAULT_VM_MIB
    vcpus: int = 1
    image: str = ""
    """An image reference: its layer disks are plugged into each VM at boot (a *primed*
    pool; only containers of that image take its VMs). Empty: no disks at boot."""
    network: str = ""
    """A network name: each VM boots with a NIC on it (only containers whose first network
    it is take its VMs). Empty: no NIC at boot."""

    def __post_init__(self) -> None:
        for what, text in (("image", self.image), ("network", self.network)):
            if not isinstance(text, str) or len(text) > 255 or any(ord(c) < 0x21 or c == "\x7f" for c in text):
                raise UsageError(f"pool {what} must be a name without spaces or control characters, got {text!r}")
        for name, value, low, high in (
            ("size", self.size, 0, MAX_SIZE),
            ("memory", self.memory_mib, 64, 1 << 20),
            ("cpus", self.vcpus, 1, 64),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UsageError(f"pool {name} must be an integer in {low}..{high}, got {value!r}")


@dataclass(frozen=True)
class PoolKey:
    """What a pooled VM was booted with; a container takes only a VM whose key it matches."""

    kernel: str
    initramfs: str
    memory_mib: int
    vcpus: int
    accel: str
    memory: str = ""
    """shim.vm.memory's setting when it was booted (``ksm=…,fpr=…``): a change of it
    replaces the pool's VMs like a new guest image does."""
    layers: tuple[str, ...] = ()
    """The layer disks plugged in at boot (a primed pool, PoolConfig.image), in the order
    of the image's layers; a container takes the VM only with exactly these layers."""
    network: str = ""
    """The network whose NIC the VM booted with (PoolConfig.network); empty: none."""

    def base(self) -> "PoolKey":
        """The key without what a primed pool adds (what a container's VM shape must match)."""
        return PoolKey(self.kernel, self.initramfs, self.memory_mib, self.vcpus, self.accel, self.memory)

    @classmethod
    def from_dict(cls, data: dict) -> "PoolKey":
        """Raises TypeError, ValueError for a bad one."""
        fields = dict(data)
        layers = fields.pop("layers", [])
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise ValueError("bad layers")
        return cls(**fields, layers=tuple(layers))


@dataclass(frozen=True)
class PooledVm:
    """One VM of the pool (its ``vm.json``) and the directory it is in now."""

    vmid: str
    domain: str
    key: PoolKey
    ports: int
    booted_at: float
    dir: Path
    nic: dict | None = None
    """The NIC plugged in at boot: ``{"tap", "mac", "bridge"}`` (a pool with a network)."""

    @property
    def agent_socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def meta(self) -> dict:
        return {
            "vmid": self.vmid,
            "domain": self.domain,
            "key": asdict(self.key),
            "ports": self.ports,
            "booted_at": self.booted_at,
            "nic": self.nic,
        }

    @classmethod
    def load(cls, directory: Path) -> "PooledVm | None":
        """The VM described in *directory*/vm.json; None when it is missing or bad (a
        pool directory is ours, but a half-written one must not stop a run)."""
        try:
            with open(directory / VM_FILE, "rb") as f:
                data = json.loads(f.read(MAX_META))
            key = PoolKey.from_dict(data["key"])
            nic = data.get("nic")
            if nic is not None and not _good_nic(nic):
                return None
            return cls(
                vmid=str(data["vmid"]),
                domain=str(data["domain"]),
                key=key,
                ports=int(data["ports"]),
                booted_at=float(data["booted_at"]),
                dir=directory,
                nic={k: nic[k] for k in ("tap", "mac", "bridge")} if nic else None,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _good_nic(nic) -> bool:
    """A vm.json ``nic``: interface names (at most 15 characters, no ``/``) and a MAC."""
    import re

    return (
        isinstance(nic, dict)
        and all(isinstance(nic.get(k), str) for k in ("tap", "mac", "bridge"))
        and all(re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", nic[k]) and nic[k] not in (".", "..") for k in ("tap", "bridge"))
        and re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", nic["mac"]) is not None
    )


# ---- where things are ------------------------------------------------------------------------


def pool_dir() -> Path:
    return paths.run_dir() / "pool"


def _sub(name: str) -> Path:
    return paths.private_dir(pool_dir() / name)


def load_config() -> PoolConfig:
    try:
        data = json.loads((pool_dir() / "pool.json").read_text())
        return PoolConfig(
            size=int(data["size"]),
            memory_mib=int(data["memory_mib"]),
            vcpus=int(data["vcpus"]),
            image=str(data.get("image", "")),
            network=str(data.get("network", "")),
        )
    except (OSError, ValueError, KeyError, TypeError, UsageError):
        return PoolConfig()


def save_config(config: PoolConfig) -> None:
    paths.private_dir(pool_dir())
    _write_json(pool_dir() / "pool.json", asdict(config))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def current_key(
    config: PoolConfig | None = None, guest=None, accel: str | None = None, primed: bool = False
) -> PoolKey:
    """The key VMs booted now get (the current guest image); with *primed* (the keeper), also
    the layer disks of the pool's image and its network's name. Raises GuestImageError,
    ImageNotFound, NetworkNotFound."""
    if guest is None:
        from shim.guestimage import ensure_guest_image

        guest = ensure_guest_image()
    if accel is None:
        from shim.vm.accel import detect_accel

        accel = detect_accel().kind
    from shim.vm import memory

    config = config or load_config()
    mem = memory.load()
    layers: tuple[str, ...] = ()
    network = ""
    if primed and config.image:
        from shim.images.layers import layer_disk
        from shim.images.store import ImageStore

        store = ImageStore()
        layers = tuple(str(layer_disk(store, layer)) for layer in store.resolve(config.image).layers)
    if primed and config.network:
        from shim.network.store import NetworkStore

        network = NetworkStore().get(config.network).name
    return PoolKey(
        kernel=str(guest.kernel),
        initramfs=str(guest.initramfs),
        memory_mib=config.memory_mib,
        vcpus=config.vcpus,
        accel=accel,
        memory=f"ksm={int(mem.ksm)},fpr={int(mem.free_page_reporting)}",
        layers=layers,
        network=network,
    )


def listing(backend=None) -> list[dict]:
    """Every VM of the pool with its state (``booting``, ``ready``, or ``dead`` when its
    domain is gone), for ``pool ls``."""
    out = []
    for state in ("booting", "ready"):
        base = pool_dir() / state
        for vm in _vms_in(base):
            alive = True
            if backend is not None:
                try:
                    alive = backend.is_running(vm.domain)
                except VmshimError:
                    pass
            out.append(
                {
                    "id": vm.vmid,
                    "domain": vm.domain,
                    "state": state if alive else "dead",
                    "memory_mib": vm.key.memory_mib,
                    "vcpus": vm.key.vcpus,
                    "layers": len(vm.key.layers),
                    "network": vm.key.network,
                    "age_s": round(max(0.0, time.time() - vm.booted_at), 1),
                }
            )
    return out


def _vms_in(base: Path) -> list[PooledVm]:
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    vms = []
    for name in names:
        vm = PooledVm.load(base / name)
        if vm is not None:
            vms.append(vm)
    vms.sort(key=lambda v: v.booted_at)
    return vms


# ---- claiming ----------------------------------------------------------------------------------


def fits(vm: PooledVm, key: PoolKey, needs_ports: int, layers: tuple[str, ...] = (), network: str = "") -> bool:
    """Whether a container whose VM would be booted with *key* (its base), with image layer
    disks *layers* and first network *network* ("": none), can take *vm*: the same base
    key; a primed VM only with exactly its layers and its network (it has nothing else
    plugged in that the container must not see); enough spare ports for the rest."""
    if vm.key.base() != key.base():
        return False
    if vm.key.layers and vm.key.layers != layers:
        return False
    if vm.key.network and (vm.key.network != network or vm.nic is None):
        return False
    plugged = len(vm.key.layers) + (1 if vm.key.network else 0)
    return vm.ports >= needs_ports - plugged


def nic_on_bridge(nic: dict) -> bool:
    """Whether a pooled VM's tap is still a port of the bridge it was plugged into (a
    network removed and made again meanwhile would leave it off any bridge)."""
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{nic['tap']}/master")) == nic["bridge"]
    except OSError:
        return False


def claim(
    key: PoolKey,
    run_dir: Path,
    backend,
    needs_ports: int = 0,
    layers: tuple[str, ...] = (),
    network: str = "",
) -> PooledVm | None:
    """Take one ready VM that :func:`fits` (*needs_ports*: the disks and NICs the container
    needs, counted as if none were plugged in): move its directory to *run_dir*/pooled
    (atomic: a VM goes to one caller only) and return it there. A VM whose domain is gone
    (or whose NIC left its bridge) is thrown away and the next one tried. None when no VM
    fits (the caller boots cold). Never raises for a pool problem."""
    ready = pool_dir() / "ready"
    target = run_dir / POOLED_DIR
    for vm in _vms_in(ready):
        if not fits(vm, key, needs_ports, layers, network):
            continue
        if target.exists():  # a start before this one left it (its teardown failed)
            shutil.rmtree(target, ignore_errors=True)
        try:
            paths.private_dir(run_dir)
            os.rename(vm.dir, target)
        except FileNotFoundError:
            continue  # another run took it first
        except OSError:
            return None
        taken = PooledVm.load(target)
        if taken is None:
            shutil.rmtree(target, ignore_errors=True)
            continue
        try:
            alive = backend.is_running(taken.domain) and (taken.nic is None or nic_on_bridge(taken.nic))
        except VmshimError:
            alive = False
        if not alive:  # died while waiting (OOM, crash, destroyed by hand), or its NIC is off the bridge
            _discard(taken, backend)
            continue
        return taken
    return None


def claimed(run_dir: Path) -> PooledVm | None:
    """The pooled VM a container's run directory holds (a monitor re-attaching), or None."""
    target = run_dir / POOLED_DIR
    if not (target / VM_FILE).exists():
        return None
    return PooledVm.load(target)


def _discard(vm: PooledVm, backend) -> None:
    """Destroy a pooled VM's domain and remove its directory. Never raises."""
    try:
        backend.destroy(vm.domain, wait=False)
    except Exception:  # noqa: BLE001 - the directory goes anyway
        pass
    shutil.rmtree(vm.dir, ignore_errors=True)


def drain(backend) -> int:
    """Destroy every VM of the pool that nobody took; return how many. Safe against
    concurrent claims (each VM is first renamed out of ready/)."""
    count = 0
    draining = _sub("draining")
    for state in ("ready", "booting"):
        for vm in _vms_in(pool_dir() / state):
            try:
                os.rename(vm.dir, draining / vm.vmid)
            except OSError:
                continue  # claimed meanwhile
            _discard(PooledVm.load(draining / vm.vmid) or vm, backend)
            count += 1
    for leftover in _vms_in(draining):
        _discard(leftover, backend)
    return count


# ---- the keeper: who fills the pool -------------------------------------------------------------


def keeper_record() -> dict:
    try:
        data = json.loads((pool_dir() / "keeper.json").read_text())
        return {"pid": int(data["pid"]), "start": int(data["start"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"pid": 0, "start": 0}


def keeper_alive() -> int:
    """The live keeper's pid (recorded pid with the recorded start time), or 0."""
    from shim.containers.store import process_start_time

    rec = keeper_record()
    if rec["pid"] <= 0:
        return 0
    start = process_start_time(rec["pid"])
    return rec["pid"] if start is not None and start == rec["start"] else 0


def poke(spawn=None) -> int:
    """Tell the keeper to look at the pool now (a VM was taken, or the setting changed);
    start one when it is dead and the pool is on. Returns the keeper's pid (0: none).
    Never raises."""
    try:
        pid = keeper_alive()
        if pid:
            os.kill(pid, signal.SIGUSR1)
            return pid
        if load_config().size > 0:
            return (spawn or spawn_keeper)()
    except (OSError, VmshimError):
        pass
    return 0


def set_pool(config: PoolConfig, backend=None, wait: float = KEEPER_STOP_TIMEOUT) -> int:
    """Save the setting and make the keeper act on it: started (or poked) for a size > 0;
    for 0, the keeper drains the pool and exits (waited for up to *wait* s, then the pool
    is drained here). Returns the keeper's pid (0 after a drain). Raises ImageNotFound,
    NetworkNotFound (nothing saved) for a primed pool whose image or network is not here."""
    if config.size > 0 and (config.image or config.network):
        current_key(config, primed=True)
    save_config(config)
    if config.size > 0:
        return poke()
    pid = keeper_alive()
    if pid:
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while keeper_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    if backend is None:
        from shim.vm.libvirt_backend import LibvirtBackend

        backend = LibvirtBackend()
    drain(backend)  # whatever a dead (or slow) keeper left
    return 0


def spawn_keeper() -> int:
    """Fork the keeper (double fork, new session: it outlives the CLI). Returns its pid
    once it recorded itself; 0 when another keeper holds the lock. Raises PoolError."""
    paths.private_dir(pool_dir())
    parent, child = socket.socketpair()
    from shim.containers.forked import fork_detached

    fork_detached(child, lambda: _keeper_main(child), close_in_child=parent, what="pool keeper")
    parent.settimeout(30)
    try:
        data = parent.recv(64)
    except OSError as exc:
        raise PoolError(f"the pool keeper did not start ({exc}); see {pool_dir() / 'keeper.log'}") from None
    finally:
        parent.close()
    try:
        return int(data.decode() or "0")
    except ValueError:
        return 0


def _keeper_main(sock) -> None:  # pragma: no cover - runs in the forked child
    from shim.containers.forked import redirect_stdio
    from shim.containers.store import process_start_time
    from shim.proctitle import set_process_title

    os.chdir("/")
    os.umask(0o022)
    log_fd = os.open(pool_dir() / "keeper.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    redirect_stdio(log_fd, keep=sock.fileno())
    lock = os.open(pool_dir() / "keeper.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sock.sendall(str(keeper_alive()).encode())
        os._exit(0)
    set_process_title("vmshim-pool-keeper")
    me = os.getpid()
    _write_json(pool_dir() / "keeper.json", {"pid": me, "start": process_start_time(me)})
    sock.sendall(str(me).encode())
    sock.close()
    Keeper().serve()


class Keeper:
    """The keeper's loop (see the module doc). *backend* and *boot* are replaceable for
    tests: ``boot(key, directory) -> PooledVm`` boots one VM in *directory* (agent-ready
    when it returns) or raises VmshimError."""

    def __init__(self, backend=None, boot=None, log=None):
        if backend is None:
            from shim.vm.libvirt_backend import LibvirtBackend

            backend = LibvirtBackend()
        self.backend = backend
        self.boot = boot or boot_pooled_vm
        self.log = log or (lambda text: print(time.strftime("%H:%M:%S"), text, flush=True))
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.failures = 0

    def serve(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: self._stop())
        self._stopping = False
        self.log(f"keeper {os.getpid()} up")
        for vm in _vms_in(pool_dir() / "booting"):  # a dead keeper's half-booted VMs
            _discard(vm, self.backend)
        while not self._stopping:
            if not self.step():
                break
        self.log("keeper exits")

    def _stop(self) -> None:
        self._stopping = True

    def step(self) -> bool:
        """One round: prune, then boot one VM or wait. False when the keeper should end
        (the pool was turned off: it is drained)."""
        config = load_config()
        if config.size == 0:
            self.log(f"pool off: drained {drain(self.backend)} VMs")
            return False
        try:
            key = current_key(config, primed=True)
        except VmshimError as exc:
            self.log(f"cannot boot pooled VMs: {exc}")
            self._wait(CHECK_INTERVAL * 6)
            return True
        ready = self.prune(key)
        for extra in ready[config.size :]:  # the size went down: the oldest go
            self._drop(extra, "the pool is smaller now")
        if len(ready) < config.size:
            self.fill_one(key)
        else:
            self._wait(CHECK_INTERVAL)
        return True

    def prune(self, key: PoolKey) -> list[PooledVm]:
        """Throw away ready VMs that died or were booted with another key; return the rest."""
        keep = []
        for vm in _vms_in(pool_dir() / "ready"):
            try:
                alive = (
                    vm.key == key and self.backend.is_running(vm.domain) and (vm.nic is None or nic_on_bridge(vm.nic))
                )
            except VmshimError:
                keep.append(vm)  # libvirtd away: look again later
                continue
            if alive:
                keep.append(vm)
                continue
            self._drop(
                vm,
                "its domain is gone (or its NIC left its bridge)"
                if vm.key == key
                else "it was booted with another guest image, image, network, memory size or vCPU count",
            )
        return keep

    def _drop(self, vm: PooledVm, why: str) -> None:
        draining = _sub("draining") / vm.vmid
        try:
            os.rename(vm.dir, draining)
        except OSError:
            return  # claimed meanwhile
        self.log(f"dropping pooled VM {vm.vmid}: {why}")
        _discard(PooledVm.load(draining) or vm, self.backend)

    def fill_one(self, key: PoolKey) -> None:
        vmid = secrets.token_hex(6)
        directory = _sub("booting") / vmid
        began = time.monotonic()
        try:
            vm = self.boot(key, directory, self.backend)
        except VmshimError as exc:
            self.failures += 1
            self.log(f"booting pooled VM {vmid} failed: {exc}")
            shutil.rmtree(directory, ignore_errors=True)
            self._wait(min(60.0, 2.0 ** min(self.failures, 6)))
            return
        self.failures = 0
        try:
            os.rename(directory, _sub("ready") / vmid)
        except OSError as exc:
            self.log(f"cannot publish pooled VM {vmid}: {exc}")
            _discard(vm, self.backend)
            return
        self.log(f"pooled VM {vmid} ready in {time.monotonic() - began:.1f} s")

    def _wait(self, timeout: float) -> None:
        """Sleep until poked (a signal) or *timeout* s."""
        import select

        try:
            if select.select([self._wake_r], [], [], timeout)[0]:
                while os.read(self._wake_r, 256):
                    pass
        except (InterruptedError, BlockingIOError):
            pass


def build_domain(
    key: PoolKey,
    vmid: str,
    directory: Path,
    cmdline: str,
    domain_uuid: str | None = None,
    nic: dict | None = None,
    cpu_readback: str = "words",
):
    """The domain of one pooled VM (pure): q35 with HOTPLUG_PORTS spare root ports, the
    agent channel and console; a primed pool's layer disks (*key*.layers, read-only, with
    the serials a container's layers have) and *nic* (``{"tap", "mac", "bridge"}``), else
    no disk and no NIC; *cmdline* (shim.vm.accel.guest_cmdline's) gets the pool flag;
    *cpu_readback*: shim.vm.accel.cpu_readback's."""
    from guest.spec import LAYER_SERIAL_PREFIX
    from shim.containers.vm_common import disk_target
    from shim.vm import domain as dom

    return dom.Domain(
        name=DOMAIN_PREFIX + vmid,
        uuid=domain_uuid or str(uuid.uuid4()),
        memory_mib=key.memory_mib,
        vcpus=key.vcpus,
        domain_type="kvm" if key.accel == "kvm" else "qemu",
        boot=dom.KernelBoot(kernel=key.kernel, initrd=key.initramfs, cmdline=f"{cmdline} {_pool_flag()}"),
        channels=[dom.AgentChannel(socket_path=str(directory / "agent.sock"))],
        serial=dom.SerialLog(path=str(directory / "console.log")),
        disks=[
            dom.Disk(
                source=path, target=disk_target(i), serial=f"{LAYER_SERIAL_PREFIX}{i}", readonly=True, shareable=True
            )
            for i, path in enumerate(key.layers)
        ],
        interfaces=[dom.Interface(mac=nic["mac"], bridge=nic["bridge"], tap=nic["tap"])] if nic else [],
        machine=dom.HOTPLUG_MACHINE,
        hotplug_ports=HOTPLUG_PORTS,
        metadata={"pool-vm": vmid},
        balloon=dom.Balloon() if "fpr=1" in key.memory else None,
        share_pages="ksm=1" in key.memory,
        cpu_readback=cpu_readback,
    )


def _pool_flag() -> str:
    from guest.spec import POOL_CMDLINE_FLAG

    return POOL_CMDLINE_FLAG


POOL_TAP_PREFIX = "vmp"
"""A pooled VM's tap: ``vmp`` + 11 hex digits of its id + ``0`` (15 characters)."""


def pool_nic(network: str, vmid: str) -> dict:
    """The NIC a VM of a pool with *network* boots with: the network made live here (its
    bridge), a tap named after the VM and a random locally administered MAC (``0e:…``:
    never one of the ``02:42:…`` MACs containers get from their addresses). The guest
    leaves it down until a container's spec configures it. Raises NetworkError,
    NetworkNotFound."""
    from shim.containers.networking import materialize
    from shim.network.store import NetworkStore

    store = NetworkStore()
    with store.locked():
        net = store.get(network)
        materialize(store, net)
    mac = "0e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
    return {"tap": f"{POOL_TAP_PREFIX}{vmid[:11]}0", "mac": mac, "bridge": net.bridge}


def boot_pooled_vm(key: PoolKey, directory: Path, backend) -> PooledVm:
    """Boot one pooled VM in *directory* and wait for its agent's hello (then let go of
    the channel: the agent waits for the next host). Raises VmshimError; a VM that was
    created is destroyed again first."""
    from shim.containers.vm_common import BOOT_TIMEOUT, console_tail
    from shim.guestimage import ensure_guest_image
    from shim.vm.agent_client import AgentClient

    from shim.vm.accel import cpu_readback, guest_cmdline

    guest = ensure_guest_image()
    paths.private_dir(directory)
    vmid = directory.name
    nic = pool_nic(key.network, vmid) if key.network else None
    domain = build_domain(
        key, vmid, directory, guest_cmdline(guest.cmdline, key.accel), nic=nic, cpu_readback=cpu_readback()
    )
    vm = PooledVm(
        vmid=vmid, domain=domain.name, key=key, ports=HOTPLUG_PORTS, booted_at=time.time(), dir=directory, nic=nic
    )
    _write_json(directory / VM_FILE, vm.meta())
    backend.create(domain)
    try:
        client = AgentClient.connect_unix(str(vm.agent_socket), timeout=10)
        try:

            def problem() -> str | None:
                if backend.is_running(domain.name):
                    return None
                tail = console_tail(vm.console_log)
                return "the pooled VM stopped before its agent answered" + (f"; console: {tail}" if tail else "")

            client.handshake(BOOT_TIMEOUT, alive=problem)
        finally:
            client.close()
    except BaseException:
        _discard(vm, backend)
        raise
    return vm


# ---- a container taking a pooled VM -------------------------------------------------------------


def eligible(placement, key: PoolKey) -> str | None:
    """Why *placement* (a shim.containers.vm_placement.VmPlacement) cannot use a VM of the
    pool booted with *key*; None when it can."""
    boot = placement.boot_config
    if placement.memory_mib != key.memory_mib:
        return f"memory {placement.memory_mib} MiB, the pool's is {key.memory_mib} MiB"
    if placement.vcpus != key.vcpus:
        return f"{placement.vcpus} vCPUs, the pool's have {key.vcpus}"
    if boot.os or boot.devices or placement.rootfs_dir or placement.cpuset:
        return "--os, --device, a bundle rootfs or --cpuset-cpus"
    if any(m.type != "tmpfs" for m in placement.attachments.requests):
        return "bind mounts or volumes"
    networks = _networks(placement)
    if networks and networks[0] in ("host",) or any(":" in n for n in networks):
        return "a host or container network"
    if devices_needed(placement) > HOTPLUG_PORTS:
        return f"more than {HOTPLUG_PORTS} disks and NICs"
    return None


def devices_needed(placement) -> int:
    """Disks and NICs a container needs hot-plugged into a pooled VM."""
    networks = [n for n in _networks(placement) if n != "none"]
    return len(placement.layer_disks) + (placement.rw_disk is not None) + len(networks)


def _networks(placement) -> list[str]:
    request = placement.network_request  # shim.containers.netrequest.NetworkRequest or None
    return list(request.networks) if request is not None else []


def first_network(placement) -> str:
    """The network a pooled VM's boot-time NIC may serve for *placement*: its first one, in
    bridge mode and without ``--mac-address`` (that MAC is the container's own); "": none."""
    request = placement.network_request
    if request is None or request.mode != "bridge" or request.mac or not request.networks:
        return ""
    return str(request.networks[0])


def take(placement, key: PoolKey, backend) -> PooledVm | None:
    """Claim a pooled VM for *placement* if the pool is on and one fits. None: boot cold
    (also with ``VMSHIM_POOL=off`` in the environment: ``vmshim bench`` times cold starts
    so); the keeper is poked then, the pool may have run dry. A VM taken is replaced once
    the container started (the monitor pokes the keeper, shim.containers.monitor
    POOL_REFILL_DELAY): a boot now would share the CPUs with this start."""
    if os.environ.get("VMSHIM_POOL") == "off" or load_config().size == 0:
        return None
    if eligible(placement, key) is not None:
        return None
    vm = claim(
        key,
        placement.run_dir,
        backend,
        needs_ports=devices_needed(placement),
        layers=tuple(str(p) for p in placement.layer_disks),
        network=first_network(placement),
    )
    if vm is None:
        poke()
    return vm


def _layers_to_plug(placement, vm: PooledVm) -> list:
    """The layer disks *vm* still needs: none for a primed VM (it booted with them, see
    :func:`fits`), else all of *placement*'s."""
    return [] if vm.key.layers else list(placement.layer_disks)


def plug_disks(placement, vm: PooledVm) -> None:
    """Hot-plug *placement*'s layer disks and writable disk into the claimed *vm*. First,
    before the network is set up: the guest's PCIe hotplug of a device takes ~0.2 s
    under TCG and runs meanwhile. Raises PoolError, HypervisorError."""
    from guest.spec import LAYER_SERIAL_PREFIX, WRITABLE_SERIAL
    from shim.containers.vm_common import disk_target as _target
    from shim.vm import domain as dom

    layers = _layers_to_plug(placement, vm)
    if len(layers) + (placement.rw_disk is not None) > vm.ports:
        raise PoolError(f"the container needs more disks than a pooled VM's {vm.ports} ports")
    for index, path in enumerate(layers):
        placement.backend.attach_disk(
            vm.domain,
            dom.Disk(
                source=str(path),
                target=_target(index),
                serial=f"{LAYER_SERIAL_PREFIX}{index}",
                readonly=True,
                shareable=True,
            ),
        )
    if placement.rw_disk is not None:
        placement.backend.attach_disk(
            vm.domain,
            dom.Disk(
                source=str(placement.rw_disk),
                target=_target(len(placement.layer_disks)),
                serial=WRITABLE_SERIAL,
                readonly=False,
            ),
        )


def adopt(placement, vm: PooledVm, client, alive=None):
    """Turn the claimed *vm*, its disks plugged (:func:`plug_disks`), into *placement*'s
    container: greet its agent on *client* (connected right after the claim, so that the
    agent's poll for its next host, every 50 ms, ran meanwhile), send the spec and fresh
    entropy, then hot-plug the NICs (the guest sets up its hostname and cgroup meanwhile,
    and waits for them). Returns *client* (``start`` comes next). Raises VmshimError; the
    caller closes *client* and kills the VM then."""
    from guest import protocol
    from shim.containers.vm_common import BOOT_TIMEOUT

    interfaces = placement.network.domain_interfaces() if placement.network is not None else []
    if any(i.type != "bridge" for i in interfaces):
        raise PoolError("a pooled VM takes bridge NICs only")
    if vm.nic is not None:  # plugged in at boot: the container's first endpoint took it
        if not interfaces or interfaces[0].tap != vm.nic["tap"] or interfaces[0].mac != vm.nic["mac"]:
            raise PoolError("the pooled VM's NIC is not the container's first endpoint")
        interfaces = interfaces[1:]
    layers = _layers_to_plug(placement, vm)
    if len(layers) + (placement.rw_disk is not None) + len(interfaces) > vm.ports:
        raise PoolError(f"the container needs more devices than a pooled VM's {vm.ports} ports")
    client.handshake(BOOT_TIMEOUT, alive=alive)
    client.send(protocol.SPEC, config=placement.boot_config.to_dict(), entropy=secrets.token_hex(ENTROPY_BYTES))
    for iface in interfaces:
        placement.backend.attach_interface(vm.domain, iface)
    return client
