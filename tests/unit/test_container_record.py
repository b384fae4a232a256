"""The container record (issue #17): typed values, one way to and from state.json, and the
records the previous code wrote (schema 1: no ``schema``, ``memory_mib`` stored) still load
and show the same ``inspect`` and ``ps`` documents.

golden/state_v1.json was written by the code before the typed record (its store, its
``run`` helpers); golden/state_v1_views.json is what that code's ``inspect_data`` and
``ps_entry`` made of it (``LogPath`` blanked, the state root written ``$ROOT``, ``ps``'s
clock-dependent columns left out)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from guest.spec import ProcessSpec
from shim.containers import limits
from shim.containers.inspect import inspect_data
from shim.containers.listing import ps_entry
from shim.containers.logs import LogLimits
from shim.containers.netrequest import NetworkRequest
from shim.containers.resources import DEFAULT_VM_MIB, GUEST_OVERHEAD_MIB, Resources, from_flags
from shim.containers.store import SCHEMA_VERSION, Container, ContainerStore
from shim.errors import VmshimError
from shim.network.ports import PortMapping
from shim.volumes.specs import MountRequest

GOLDEN = Path(__file__).parent / "golden"
OLD_ID = "5f2c0123456789ab" + "0123456789abcdef" * 3


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSHIM_ROOT", str(tmp_path))
    return ContainerStore(tmp_path / "containers")


def put(store: ContainerStore, cid: str, data: dict | str) -> None:
    """A state.json as some earlier vmshim left it."""
    d = store.dir(cid)
    d.mkdir(parents=True)
    (d / "lock").touch()
    (d / "state.json").write_text(data if isinstance(data, str) else json.dumps(data))


def old_record(store: ContainerStore) -> Container:
    d = store.dir(OLD_ID)
    d.mkdir(parents=True)
    (d / "lock").touch()
    shutil.copy(GOLDEN / "state_v1.json", d / "state.json")
    return store.load(OLD_ID)


def test_a_record_of_the_previous_code_loads_typed(store):
    rec = old_record(store)
    assert rec.process == ProcessSpec(
        args=["nginx", "-g", "daemon off;"],
        env=["PATH=/usr/bin:/bin", "A=1"],
        cwd="/srv",
        user="101:101",
        rlimits=[["nofile", 1024, 2048]],
        capabilities={"bounding": ["CAP_CHOWN", "CAP_NET_BIND_SERVICE"]},
        seccomp="default",
    )
    assert rec.resources == Resources(
        memory=64 << 20, nano_cpus=1_500_000_000, pids_limit=100, ulimits=[["nofile", 1024, 2048]]
    )
    assert [(m.type, m.source[:4], m.target, m.readonly, m.anonymous) for m in rec.mounts] == [
        ("volume", "bbbb", "/cache", False, True),
        ("volume", "data", "/data", True, False),
        ("bind", "/srv", "/www", False, False),
        ("tmpfs", "", "/run", False, False),
    ]
    assert all(isinstance(m, MountRequest) for m in rec.mounts)
    assert isinstance(rec.network, NetworkRequest)
    assert rec.network.networks == ["bridge"] and rec.network.add_hosts == [("db", "10.1.2.3")]
    assert rec.network.publish == [
        PortMapping(container_port=80, host_port=8080),
        PortMapping(container_port=53, protocol="udp", host_ip="127.0.0.1"),
    ]
    assert rec.log == LogLimits(max_size=1 << 20, max_files=2)
    assert (rec.state.status, rec.state.exit_code, rec.state.restart_count) == ("exited", 137, 2)
    # The old file stored memory_mib 160; the record now derives it from the limit.
    assert json.loads((GOLDEN / "state_v1.json").read_text())["memory_mib"] == 160
    assert rec.vm_memory_mib == 64 + GUEST_OVERHEAD_MIB == 160
    assert rec.vm_vcpus == 2


def test_an_old_record_shows_the_same_inspect_and_ps_documents(store):
    rec = old_record(store)
    root = store.root.parent  # $VMSHIM_ROOT: the volumes' Source paths are under it
    expected = json.loads((GOLDEN / "state_v1_views.json").read_text().replace("$ROOT", str(root)))
    doc = inspect_data(rec)
    assert doc.pop("LogPath") == str(store.log_path(OLD_ID))
    ps = ps_entry(rec)
    del ps["Status"], ps["CreatedAt"]
    # Through JSON, as the CLI prints them (tuples and lists print alike).
    assert json.loads(json.dumps(doc)) == {k: v for k, v in expected["inspect"].items() if k != "LogPath"}
    assert json.loads(json.dumps(ps)) == expected["ps"]


def test_an_old_record_saved_again_keeps_its_shape_but_memory_mib(store):
    old = json.loads((GOLDEN / "state_v1.json").read_text())
    rec = old_record(store)
    store.save(rec)
    new = json.loads((store.dir(OLD_ID) / "state.json").read_text())
    assert new.pop("schema") == SCHEMA_VERSION == 2
    assert "memory_mib" not in new
    del old["memory_mib"]
    assert new == old


def test_the_record_round_trips_through_state_json(store):
    rec = Container(
        id="e" * 64,
        name="rt",
        image="busybox",
        image_id="sha256:x",
        isolation="process",
        process=ProcessSpec(args=["sh", "-c", "sleep 9"], env=["A=1"], tty=True, umask=0o22),
        hostname="e" * 12,
        token="t" * 32,
        layer_disks=["/l/0.sqfs"],
        resources=from_flags(memory="300m", cpus="3", ulimit=["nproc=10:20"], device_read_bps=["/dev/vda:1mb"]),
        mounts=[
            MountRequest(type="tmpfs", target="/t", options="size=1m"),
            MountRequest(type="volume", source="v", target="/v", readonly=True),
        ],
        network=NetworkRequest(
            networks=["net1", "net2"],
            endpoint_config={"net1": {"aliases": ["a"], "ip": "10.9.0.5"}},
            publish=[PortMapping(container_port=80, host_port=8080)],
            dns=["10.0.0.53"],
            add_hosts=[("h", "10.0.0.1")],
        ),
        log=LogLimits(max_size=1 << 20, max_files=5),
        labels={"k": "v"},
        healthcheck={"Test": ["CMD", "true"]},
        sysctl={"net.ipv4.ip_forward": "1"},
    )
    rec.state.status, rec.state.pid = "running", 42
    store.create(rec)
    text = (store.dir(rec.id) / "state.json").read_text()
    back = store.load(rec.id)
    assert json.loads(json.dumps(back.to_dict())) == json.loads(text)
    assert back.process == rec.process and back.mounts == rec.mounts
    assert back.network == rec.network and back.log == rec.log
    assert back.resources.to_dict() == json.loads(json.dumps(rec.resources.to_dict()))
    assert back.vm_memory_mib == 300 + GUEST_OVERHEAD_MIB and back.vm_vcpus == 3
    assert (back.state.status, back.state.pid) == ("running", 42)
    data = json.loads(text)
    assert data["schema"] == SCHEMA_VERSION and "memory_mib" not in data


def test_a_record_from_before_networking_and_limits_loads_with_defaults(store):
    put(
        store,
        "f" * 64,
        {
            "id": "f" * 64,
            "name": "old",
            "image": "busybox",
            "image_id": "sha256:x",
            "isolation": "vm",
            "process": {"args": ["true"]},
            "hostname": "f" * 12,
            "token": "t",
            "layer_disks": [],
            "memory_mib": 256,
            "state": {"status": "exited"},
        },
    )
    rec = store.load("f" * 64)
    assert rec.network is None and rec.mounts == [] and rec.resources == Resources()
    assert rec.log == LogLimits() and rec.vm_memory_mib == DEFAULT_VM_MIB == 256
    assert rec.process == ProcessSpec(args=["true"]) and rec.status.value == "exited"


@pytest.mark.parametrize(
    "change, text",
    [
        ({"schema": 3}, "schema 3"),
        ({"schema": "2"}, "schema '2'"),
        ({"process": ["true"]}, "process must be a JSON object"),
        ({"process": {"args": []}}, "process.args"),
        ({"mounts": {"type": "tmpfs"}}, "mounts must be a list"),
        ({"mounts": ["/x"]}, "mounts must be a list"),
        ({"resources": [1]}, "resources must be a JSON object"),
        ({"resources": {"no_such_limit": 1, "memory": 1}}, None),  # unknown limits are dropped
        ({"network": "bridge"}, "network must be a JSON object"),
        ({"network": {"publish": ["80"]}}, "malformed container record"),
        ({"state": []}, "state must be a JSON object"),
        ({"state": {"status": "exited"}, "name": None, "id": None, "token": None}, None),
    ],
)
def test_a_malformed_record_is_refused_in_one_line(store, change, text):
    base = json.loads((GOLDEN / "state_v1.json").read_text())
    put(store, OLD_ID, {**base, **change})
    if text is None:
        store.load(OLD_ID)
        return
    with pytest.raises(VmshimError) as info:
        store.load(OLD_ID)
    message = str(info.value)
    assert text in message and "\n" not in message and "unreadable" in message


def test_a_record_without_a_required_field_is_unreadable_not_a_crash(store):
    base = json.loads((GOLDEN / "state_v1.json").read_text())
    del base["token"]
    put(store, OLD_ID, base)
    with pytest.raises(VmshimError, match="unreadable"):
        store.load(OLD_ID)


def test_update_of_a_stopped_vm_resizes_it_through_resources_alone(store):
    old_record(store)
    limits.update(OLD_ID, from_flags(memory="200m"), store=store)
    rec = store.load(OLD_ID)
    assert rec.resources.memory == 200 << 20 and rec.vm_memory_mib == 200 + GUEST_OVERHEAD_MIB
    data = json.loads((store.dir(OLD_ID) / "state.json").read_text())
    assert "memory_mib" not in data and data["resources"]["memory"] == 200 << 20


@pytest.mark.parametrize("limit_mib", [0, 300, 301, 512, 1000, 4096])
def test_a_runtime_records_vm_size_is_what_size_vm_chose(limit_mib):
    """vmshim-runtime stores only the guest's limits; the VM size derived from them must be
    the one hostcgroup.size_vm fitted into the engine's memory limit."""
    from shim.oci.hostcgroup import size_vm

    vm_mib, guest = size_vm(Resources(memory=limit_mib << 20))
    assert isinstance(guest, Resources) and guest.vm_memory_mib() == vm_mib
