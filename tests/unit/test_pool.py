"""The warm pool's logic against fakes (no VM): atomic claims under concurrency, a pooled
VM that died, a dead keeper (by pid and start time), the keeper filling, pruning and
draining, and which containers may use a pooled VM."""

from __future__ import annotations

import os
import threading
import time

import pytest

from guest.spec import LAYER_SERIAL_PREFIX, BootConfig, ProcessSpec
from shim.containers import pool
from shim.containers.netrequest import NetworkRequest
from shim.containers.vm_placement import VmPlacement, domain_name
from shim.vm.fake_backend import FakeBackend
from shim.volumes.specs import MountRequest

KEY = pool.PoolKey(kernel="/g/vmlinuz", initramfs="/g/initramfs", memory_mib=256, vcpus=1, accel="tcg")
CID = "cd" * 32


@pytest.fixture(autouse=True)
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("VMSHIM_RUN", str(tmp_path / "run"))
    return tmp_path


def fake_boot(key, directory, backend):
    """What boot_pooled_vm does, without a guest: a domain and vm.json."""
    from shim.paths import private_dir

    private_dir(directory)
    domain = pool.build_domain(key, directory.name, directory, "console=ttyS0")
    vm = pool.PooledVm(
        vmid=directory.name, domain=domain.name, key=key, ports=pool.HOTPLUG_PORTS, booted_at=time.time(), dir=directory
    )
    pool._write_json(directory / pool.VM_FILE, vm.meta())
    backend.create(domain)
    return vm


def ready_vms(backend, n, key=KEY):
    keeper = pool.Keeper(backend=backend, boot=fake_boot, log=lambda text: None)
    for _ in range(n):
        keeper.fill_one(key)
    return [vm.vmid for vm in pool._vms_in(pool.pool_dir() / "ready")]


def test_concurrent_claims_never_share_a_vm(state):
    backend = FakeBackend()
    ids = ready_vms(backend, 3)
    got: list = []
    barrier = threading.Barrier(8)

    def claimer(i):
        barrier.wait()
        got.append(pool.claim(KEY, state / "run" / f"c{i}", backend))

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [vm.vmid for vm in got if vm is not None]
    assert sorted(taken) == sorted(ids)  # each VM went to exactly one claimer
    assert got.count(None) == 5
    assert not os.listdir(pool.pool_dir() / "ready")
    for vm in got:
        if vm is not None:
            assert vm.dir.name == pool.POOLED_DIR and (vm.dir / pool.VM_FILE).exists()


def test_a_pooled_vm_that_died_is_thrown_away_and_the_next_taken(state):
    backend = FakeBackend()
    first, second = ready_vms(backend, 2)
    backend.simulate_exit(pool.DOMAIN_PREFIX + first)
    vm = pool.claim(KEY, state / "run" / "c", backend)
    assert vm is not None and vm.vmid == second
    assert not (pool.pool_dir() / "ready" / first).exists()
    assert pool.claim(KEY, state / "run" / "d", backend) is None  # dry: boot cold


def test_claim_wants_the_same_key_and_enough_ports(state):
    backend = FakeBackend()
    ready_vms(backend, 1)
    other = pool.PoolKey(**{**KEY.__dict__, "memory_mib": 512})
    assert pool.claim(other, state / "run" / "c", backend) is None
    assert pool.claim(KEY, state / "run" / "c", backend, needs_ports=pool.HOTPLUG_PORTS + 1) is None
    assert pool.claim(KEY, state / "run" / "c", backend) is not None


def test_dead_keeper_is_found_by_pid_and_start_time_and_restarted(state):
    pool.save_config(pool.PoolConfig(size=1))
    spawned = []
    # Nothing recorded: dead; the pool is on, so poke starts one.
    assert pool.keeper_alive() == 0
    assert pool.poke(spawn=lambda: spawned.append(1) or 4242) == 4242
    # A live pid with another start time (pid reused): dead as well.
    pool._write_json(pool.pool_dir() / "keeper.json", {"pid": os.getpid(), "start": 1})
    assert pool.keeper_alive() == 0
    assert pool.poke(spawn=lambda: spawned.append(2) or 4343) == 4343
    # Our own pid and start time: alive (poke would signal it; not here).
    from shim.containers.store import process_start_time

    pool._write_json(pool.pool_dir() / "keeper.json", {"pid": os.getpid(), "start": process_start_time(os.getpid())})
    assert pool.keeper_alive() == os.getpid()
    # The pool off and the keeper dead: nothing is started.
    pool._write_json(pool.pool_dir() / "keeper.json", {"pid": 0, "start": 0})
    pool.save_config(pool.PoolConfig(size=0))
    assert pool.poke(spawn=lambda: spawned.append(3) or 1) == 0
    assert spawned == [1, 2]


def test_keeper_fills_prunes_and_drains(state, monkeypatch):
    backend = FakeBackend()
    monkeypatch.setattr(pool, "current_key", lambda config=None, guest=None, accel=None, primed=False: KEY)
    keeper = pool.Keeper(backend=backend, boot=fake_boot, log=lambda text: None)
    keeper._wait = lambda timeout: None
    pool.save_config(pool.PoolConfig(size=2))
    for _ in range(4):
        assert keeper.step()
    ready = pool._vms_in(pool.pool_dir() / "ready")
    assert len(ready) == 2 and len(backend.vms) == 2
    backend.simulate_exit(ready[0].domain)  # a pooled VM died
    assert keeper.step()
    assert len(pool._vms_in(pool.pool_dir() / "ready")) == 2  # replaced
    assert ready[0].vmid not in {v.vmid for v in pool._vms_in(pool.pool_dir() / "ready")}
    pool.save_config(pool.PoolConfig(size=1))
    assert keeper.step()
    assert len(pool._vms_in(pool.pool_dir() / "ready")) == 1 and len(backend.vms) == 1
    pool.save_config(pool.PoolConfig(size=0))
    assert not keeper.step()  # drained, the keeper ends
    assert backend.vms == {}
    assert pool.listing(backend) == []


def test_keeper_backs_off_after_a_failed_boot(state, monkeypatch):
    monkeypatch.setattr(pool, "current_key", lambda config=None, guest=None, accel=None, primed=False: KEY)

    def broken(key, directory, backend):
        raise pool.PoolError("no guest")

    waits = []
    keeper = pool.Keeper(backend=FakeBackend(), boot=broken, log=lambda text: None)
    keeper._wait = waits.append
    pool.save_config(pool.PoolConfig(size=1))
    keeper.step()
    keeper.step()
    assert waits == [2.0, 4.0] and not os.listdir(pool.pool_dir() / "booting")


def _placement(state, **kw):
    boot = BootConfig(
        container_id=CID,
        token="t",
        hostname="h",
        process=ProcessSpec(args=["true"]),
        layer_count=1,
        **kw.pop("boot", {}),
    )
    return VmPlacement(
        boot,
        [state / "l0.sqfs"],
        state / "run" / CID[:12],
        name="web",
        backend=FakeBackend(),
        network=NetworkRequest(networks=["bridge"]),
        **kw,
    )


def test_which_containers_may_use_a_pooled_vm(state):
    assert pool.eligible(_placement(state), KEY) is None
    assert "memory" in pool.eligible(_placement(state, memory_mib=512), KEY)
    assert "vCPUs" in pool.eligible(_placement(state, vcpus=2), KEY)
    assert pool.eligible(_placement(state, boot={"os": True}), KEY)
    assert pool.eligible(_placement(state, cpuset="0"), KEY)
    assert pool.eligible(_placement(state, mounts=[MountRequest(type="bind", source="/srv", target="/srv")]), KEY)
    assert pool.eligible(_placement(state, mounts=[MountRequest(type="tmpfs", source="", target="/t")]), KEY) is None
    host = _placement(state)
    host.network_request = NetworkRequest(networks=["host"])
    assert pool.eligible(host, KEY)
    many = _placement(state)
    many.layer_disks = [state / f"l{i}" for i in range(pool.HOTPLUG_PORTS)]
    assert "more than" in pool.eligible(many, KEY)


def test_a_claimed_vm_names_the_containers_domain_and_socket(state):
    backend = FakeBackend()
    ready_vms(backend, 1)
    run_dir = state / "run" / CID[:12]
    assert domain_name(CID) == f"vmshim-{CID[:12]}"
    vm = pool.claim(KEY, run_dir, backend)
    assert domain_name(CID) == vm.domain
    again = _placement(state)  # a new monitor re-attaching
    assert again.domain == vm.domain and again.agent_socket == run_dir / "pooled" / "agent.sock"
    assert again.pooled is not None


def test_take_boots_cold_when_the_pool_is_off(state):
    backend = FakeBackend()
    ready_vms(backend, 1)
    p = _placement(state)
    assert pool.take(p, KEY, backend) is None  # no pool.json: off
    pool.save_config(pool.PoolConfig(size=1))
    pool._write_json(pool.pool_dir() / "keeper.json", {"pid": 0, "start": 0})
    spawned = []
    original = pool.spawn_keeper
    try:
        pool.spawn_keeper = lambda: spawned.append(1) or 1
        assert pool.take(p, KEY, backend) is not None
        assert spawned == []  # a VM taken is replaced after its container started (the monitor pokes)
        assert pool.take(p, KEY, backend) is None  # the pool ran dry: boot cold, and poke now
    finally:
        pool.spawn_keeper = original
    assert spawned == [1]  # the keeper was dead: the run started a new one


def test_pool_config_is_checked():
    with pytest.raises(pool.UsageError):
        pool.PoolConfig(size=-1)
    with pytest.raises(pool.UsageError):
        pool.PoolConfig(size=1, memory_mib=8)
    assert pool.load_config() == pool.PoolConfig()


def test_vm_json_garbage_is_skipped(state):
    bad = pool.pool_dir() / "ready" / "deadbeef0000"
    bad.mkdir(parents=True)
    (bad / pool.VM_FILE).write_text("{not json")
    assert pool.claim(KEY, state / "run" / "c", FakeBackend()) is None


def test_a_stale_pooled_directory_does_not_name_a_cold_boot(state, monkeypatch):
    """A start whose run directory still holds an earlier start's pooled VM (its monitor
    died with it) boots cold under the container's own domain name."""
    from types import SimpleNamespace

    backend = FakeBackend()
    ready_vms(backend, 1)
    run_dir = state / "run" / CID[:12]
    vm = pool.claim(KEY, run_dir, backend)
    backend.simulate_exit(vm.domain)
    p = _placement(state)
    p.network_request = None
    assert p.pooled is not None
    guest = SimpleNamespace(kernel=state / "k", initramfs=state / "i", cmdline="x")
    monkeypatch.setattr("shim.guestimage.ensure_guest_image", lambda: guest)
    from shim.vm.accel import AccelInfo

    monkeypatch.setattr("shim.vm.accel.detect_accel", lambda: AccelInfo("tcg", "t"))
    monkeypatch.setattr("shim.vm.configdrive.build_config_drive", lambda boot, path: None)
    from shim.errors import AgentError
    from shim.vm.agent_client import AgentClient

    def no_agent(path, timeout=0):
        raise AgentError("no agent here")

    monkeypatch.setattr(AgentClient, "connect_unix", no_agent)
    with pytest.raises(AgentError, match="agent"):
        p.boot()  # the fake VM never says hello; the domain it made is what matters
    assert f"<name>vmshim-{CID[:12]}</name>" in p.backend.created[-1]
    assert not (run_dir / pool.POOLED_DIR).exists() and p.domain == f"vmshim-{CID[:12]}"


def test_adopt_plugs_disks_first_and_nics_after_the_spec(state):
    """The order that lets the guest work while devices arrive: the disks are plugged
    before the network is made (plug_disks), the spec goes out before the NICs."""
    import socket

    from guest import protocol
    from shim.vm.agent_client import AgentClient
    from shim.vm.domain import Interface

    backend = FakeBackend()
    ready_vms(backend, 1)
    p = _placement(state)
    p._backend = backend
    vm = pool.claim(KEY, p.run_dir, backend)
    events: list[str] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(vm.agent_socket))
    listener.listen(1)

    def fake_agent() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(protocol.encode(protocol.HELLO, protocol=protocol.PROTOCOL_VERSION, agent="fake"))
            reader = protocol.FrameReader()
            while not events or events[-1] != "spec":
                data = conn.recv(65536)
                if not data:
                    return
                events.extend(m.type for m in reader.feed(data))

    agent = threading.Thread(target=fake_agent)
    agent.start()

    class Net:
        def domain_interfaces(self):
            return [Interface(type="bridge", bridge="vmshim0", mac="52:54:00:00:00:01")]

    plug_nic = backend.attach_interface

    def attach_interface(name, iface):
        agent.join(10)  # the fake agent ends once it has the spec
        events.append("nic")
        plug_nic(name, iface)

    backend.attach_interface = attach_interface  # type: ignore[method-assign]
    pool.plug_disks(p, vm)
    assert [c for c in backend.calls if c[0].startswith("attach")] == [("attach_disk", vm.domain)]
    p.network = Net()
    client = AgentClient.connect_unix(str(vm.agent_socket), timeout=10)
    assert pool.adopt(p, vm, client) is client
    client.close()
    listener.close()
    assert events == ["spec", "nic"]


# ---- a primed pool (pool set --image/--network): layers and a NIC plugged in at boot ----------

LAYERS = ("/s/layers/a.sqfs", "/s/layers/b.sqfs")
PRIMED = pool.PoolKey(**{**KEY.__dict__, "layers": LAYERS, "network": "bridge"})


def primed_boot(key, directory, backend):
    """fake_boot with the NIC a primed VM gets (pool_nic without a bridge to make)."""
    from shim.paths import private_dir

    private_dir(directory)
    nic = {"tap": f"vmp{directory.name[:11]}0", "mac": "0e:00:00:00:00:01", "bridge": "vmshim0"}
    domain = pool.build_domain(key, directory.name, directory, "console=ttyS0", nic=nic)
    vm = pool.PooledVm(
        vmid=directory.name,
        domain=domain.name,
        key=key,
        ports=pool.HOTPLUG_PORTS,
        booted_at=time.time(),
        dir=directory,
        nic=nic,
    )
    pool._write_json(directory / pool.VM_FILE, vm.meta())
    backend.create(domain)
    return vm


def primed_vm(state, backend):
    keeper = pool.Keeper(backend=backend, boot=primed_boot, log=lambda text: None)
    keeper.fill_one(PRIMED)
    (vm,) = pool._vms_in(pool.pool_dir() / "ready")
    return vm


def test_a_primed_vm_boots_with_the_images_layers_and_a_nic(state):
    backend = FakeBackend()
    vm = primed_vm(state, backend)
    import xml.etree.ElementTree as ET

    devices = ET.fromstring(backend.created[-1]).find("devices")
    disks = devices.findall("disk")
    assert [d.find("source").get("file") for d in disks] == list(LAYERS)
    assert [d.findtext("serial") for d in disks] == [f"{LAYER_SERIAL_PREFIX}{i}" for i in range(2)]
    assert all(d.find("readonly") is not None and d.find("shareable") is not None for d in disks)
    (nic,) = devices.findall("interface")
    assert nic.find("target").get("dev") == vm.nic["tap"]
    assert nic.find("mac").get("address") == vm.nic["mac"] and nic.find("source").get("bridge") == vm.nic["bridge"]
    loaded = pool.PooledVm.load(vm.dir)
    assert loaded == vm and loaded.key.layers == LAYERS  # vm.json round trip (a tuple again)


def test_a_primed_vm_goes_only_to_a_container_of_its_image_and_network(state, monkeypatch):
    monkeypatch.setattr(pool, "nic_on_bridge", lambda nic: True)
    backend = FakeBackend()
    primed_vm(state, backend)
    run_dir = state / "run" / "c"
    assert pool.claim(KEY, run_dir, backend) is None  # no layers, no network
    assert pool.claim(KEY, run_dir, backend, layers=LAYERS) is None  # no network
    assert pool.claim(KEY, run_dir, backend, layers=LAYERS[:1], network="bridge") is None  # other image
    assert pool.claim(KEY, run_dir, backend, layers=LAYERS, network="other") is None  # other network
    other = pool.PoolKey(**{**KEY.__dict__, "vcpus": 2})
    assert pool.claim(other, run_dir, backend, layers=LAYERS, network="bridge") is None
    # what is plugged in counts against the ports the container needs
    too_many, just_enough = pool.HOTPLUG_PORTS + 4, pool.HOTPLUG_PORTS + 3
    assert pool.claim(KEY, run_dir, backend, needs_ports=too_many, layers=LAYERS, network="bridge") is None
    vm = pool.claim(KEY, run_dir, backend, needs_ports=just_enough, layers=LAYERS, network="bridge")
    assert vm is not None and vm.nic is not None


def test_a_plain_vm_still_takes_any_container(state):
    backend = FakeBackend()
    ready_vms(backend, 1)
    assert pool.claim(KEY, state / "run" / "c", backend, layers=LAYERS, network="bridge") is not None


def test_a_primed_vm_whose_nic_left_its_bridge_is_thrown_away(state, monkeypatch):
    monkeypatch.setattr(pool, "nic_on_bridge", lambda nic: False)  # its network was made again
    backend = FakeBackend()
    vm = primed_vm(state, backend)
    assert pool.claim(KEY, state / "run" / "c", backend, layers=LAYERS, network="bridge") is None
    assert vm.domain not in backend.vms and not os.listdir(pool.pool_dir() / "ready")


def test_nic_on_bridge_reads_the_taps_master_without_trusting_a_missing_one():
    assert pool.nic_on_bridge({"tap": "vmpnosuchtap00", "mac": "0e:00:00:00:00:01", "bridge": "x"}) is False
    assert pool.nic_on_bridge({"tap": "../../../etc", "mac": "0e:00:00:00:00:01", "bridge": "etc"}) is False


def test_the_container_of_a_primed_vm_needs_its_first_network_without_a_mac(state):
    p = _placement(state)
    assert pool.first_network(p) == "bridge"
    p.network_request = NetworkRequest(networks=["bridge"], mac="02:00:00:00:00:09")
    assert pool.first_network(p) == ""  # its own MAC: never the pooled NIC's
    p.network_request = NetworkRequest(networks=["none"])
    assert pool.first_network(p) == ""
    p.network_request = None
    assert pool.first_network(p) == ""


def test_a_primed_vm_gets_no_layer_disk_plugged_and_keeps_its_nic(state, monkeypatch):
    from shim.vm.domain import Interface

    monkeypatch.setattr(pool, "nic_on_bridge", lambda nic: True)
    backend = FakeBackend()
    primed_vm(state, backend)
    p = _placement(state)
    p._backend = backend
    p.layer_disks = [type(state)(x) for x in LAYERS]
    vm = pool.claim(KEY, p.run_dir, backend, layers=LAYERS, network="bridge")
    pool.plug_disks(p, vm)
    assert not [c for c in backend.calls if c[0] == "attach_disk"]

    class Net:
        def __init__(self, mac):
            self.mac = mac

        def domain_interfaces(self):
            return [Interface(type="bridge", bridge="vmshim0", mac=self.mac, tap=vm.nic["tap"])]

    class Client:
        def handshake(self, timeout, alive=None):
            pass

        def send(self, *a, **kw):
            pass

    p.network = Net(vm.nic["mac"])
    pool.adopt(p, vm, Client())
    assert not [c for c in backend.calls if c[0] == "attach_interface"]
    p.network = Net("02:42:0a:00:00:05")  # an endpoint that is not the pooled NIC
    with pytest.raises(pool.PoolError, match="NIC"):
        pool.adopt(p, vm, Client())


def test_primed_pool_config_refuses_odd_names(state):
    for bad in ("busy box", "x\n", "a\x7f", "n" * 300):
        with pytest.raises(pool.UsageError):
            pool.PoolConfig(size=1, image=bad)
        with pytest.raises(pool.UsageError):
            pool.PoolConfig(size=1, network=bad)
    pool.save_config(pool.PoolConfig(size=1, image="busybox", network="bridge"))
    assert pool.load_config() == pool.PoolConfig(size=1, image="busybox", network="bridge")


def test_a_vm_json_with_a_bad_nic_or_layers_is_skipped(state):
    backend = FakeBackend()
    vm = primed_vm(state, backend)
    import json

    meta = json.loads((vm.dir / pool.VM_FILE).read_text())
    good = {"tap": "vmp0123456789a0", "mac": "0e:00:00:00:00:01", "bridge": "vmshim0"}
    for nic in (
        {"tap": 1},
        "x",
        {"tap": "t", "mac": "m"},
        {**good, "tap": "../../etc"},
        {**good, "bridge": ".."},
        {**good, "tap": "a" * 16},
        {**good, "mac": "0e:00:00:00:00:01\n"},
    ):
        (vm.dir / pool.VM_FILE).write_text(json.dumps({**meta, "nic": nic}))
        assert pool.PooledVm.load(vm.dir) is None
    (vm.dir / pool.VM_FILE).write_text(json.dumps({**meta, "key": {**meta["key"], "layers": "abc"}}))
    assert pool.PooledVm.load(vm.dir) is None
