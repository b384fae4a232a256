"""Limit flags → Resources → cgroup Limits and VM sizing (shim.containers.resources), and
the wire records guest.spec.Limits / MountSpec / ProcessSpec rlimits."""

from __future__ import annotations

import pytest

from guest.spec import BootConfig, Limits, MountSpec, ProcessSpec
from shim.containers import resources as res
from shim.containers.resources import (
    GUEST_OVERHEAD_MIB,
    Resources,
    check_update,
    from_flags,
    parse_bytes,
    parse_cpuset,
    parse_ulimit,
)
from shim.errors import UsageError


@pytest.mark.parametrize(
    "text,value",
    [
        ("64m", 64 << 20),
        ("64M", 64 << 20),
        ("64mb", 64 << 20),
        ("64MiB", 64 << 20),
        ("1g", 1 << 30),
        ("1.5g", 3 << 29),
        ("1024", 1024),
        ("10k", 10240),
        ("2t", 2 << 40),
    ],
)
def test_sizes_like_docker(text, value):
    assert parse_bytes(text, "--memory") == value


@pytest.mark.parametrize("text", ["", "m", "-5m", "64x", "1e3", "sixty"])
def test_bad_sizes_name_the_flag(text):
    with pytest.raises(UsageError, match="--memory"):
        parse_bytes(text, "--memory")


def test_cpuset_parsing_and_formatting():
    assert parse_cpuset("0-2,5") == [0, 1, 2, 5]
    assert res.format_cpuset([5, 0, 1, 2]) == "0-2,5"
    assert from_flags(cpuset_cpus="1,0").cpuset_cpus == "0-1"
    for bad in ("a", "3-1", "1-", ",", "0-99999"):
        with pytest.raises(UsageError):
            parse_cpuset(bad)


def test_ulimits():
    assert parse_ulimit("nofile=1024:2048") == ("nofile", 1024, 2048)
    assert parse_ulimit("nproc=512") == ("nproc", 512, 512)
    assert parse_ulimit("core=-1") == ("core", -1, -1)
    assert parse_ulimit("memlock=unlimited:unlimited") == ("memlock", -1, -1)
    for bad in ("nofile", "bogus=1", "nofile=2:1", "nofile=x"):
        with pytest.raises(UsageError):
            parse_ulimit(bad)
    # A later flag of the same name wins.
    assert from_flags(ulimit=["nofile=1:2", "nofile=3:4"]).ulimits == [["nofile", 3, 4]]


def test_from_flags_and_the_limits_each_placement_applies():
    r = from_flags(
        memory="64m",
        memory_swap="128m",
        memory_reservation="32m",
        cpus="0.5",
        cpu_shares=512,
        cpuset_cpus="0",
        pids_limit=20,
        blkio_weight=300,
        device_read_bps=["/dev/vda:1m", "/dev/vdb:2m"],
        device_write_bps=["/dev/vda:3m"],
        ulimit=["nofile=10:20"],
        oom_score_adj=100,
    )
    assert r.nano_cpus == 500_000_000 and r.cpus == 0.5
    host = r.limits("process")
    assert host == Limits(
        memory=64 << 20,
        memory_swap=128 << 20,
        memory_reservation=32 << 20,
        cpu_quota=50000,
        cpu_period=100000,
        cpu_shares=512,
        cpuset_cpus="0",
        pids=20,
        blkio_weight=300,
        device_read_bps=[["/dev/vda", 1 << 20], ["/dev/vdb", 2 << 20]],
        device_write_bps=[["/dev/vda", 3 << 20]],
    )
    vm = r.limits("vm")
    # In a VM: no cpuset inside (the vCPUs are pinned instead), every rate applies to
    # all of the container's disks, the smallest rate wins.
    assert vm.cpuset_cpus == ""
    assert vm.device_read_bps == [["*", 1 << 20]]
    assert vm.device_write_bps == [["*", 3 << 20]]
    assert r.rlimits() == [["nofile", 10, 20]]
    assert Resources.from_dict(r.to_dict()) == r


def test_pids_limit_zero_or_negative_is_unlimited():
    assert from_flags(pids_limit=0).pids_limit == -1
    assert from_flags(pids_limit=-1).limits("vm").pids == -1


def test_vm_sizing():
    assert Resources().vm_memory_mib() == res.DEFAULT_VM_MIB
    assert from_flags(memory="64m").vm_memory_mib() == 64 + GUEST_OVERHEAD_MIB
    assert from_flags(memory="100000k").vm_memory_mib() == 98 + GUEST_OVERHEAD_MIB  # rounded up
    assert Resources().vm_vcpus() == 1
    assert from_flags(cpus="0.5").vm_vcpus() == 1
    assert from_flags(cpus="1.01").vm_vcpus() == 2
    assert from_flags(cpuset_cpus="0-1").vm_vcpus() == 2
    assert from_flags(cpus="2", cpuset_cpus="0").vm_vcpus() == 1
    assert from_flags(cpuset_cpus="0-1").vm_cpuset() == "0-1"
    assert Resources().vm_cpuset() is None


def test_docker_rules_accept_unlimited_swap(monkeypatch):
    monkeypatch.setattr(res, "host_cpus", lambda: {0, 1})
    from_flags(memory="64m", memory_swap="-1").check("vm")


@pytest.mark.parametrize(
    "flags,message",
    [
        ({"memory": "1m"}, "6MiB"),
        ({"memory_swap": "128m"}, "memory limit"),
        ({"memory": "128m", "memory_swap": "64m"}, "at least --memory"),
        ({"memory": "64m", "memory_reservation": "128m"}, "reservation"),
        ({"cpus": "3"}, "only 2 CPUs"),
        ({"cpus": "0.001"}, "0.01"),
        ({"cpuset_cpus": "0,5"}, "CPU 5"),
        ({"cpu_shares": 1}, "262144"),
        ({"blkio_weight": 5}, "10 and 1000"),
        ({"oom_score_adj": 2000}, "-1000"),
    ],
)
def test_docker_rules_refuse(monkeypatch, flags, message):
    monkeypatch.setattr(res, "host_cpus", lambda: {0, 1})  # a host with two CPUs
    with pytest.raises(UsageError, match=message):
        from_flags(**flags).check("vm")


def test_process_isolation_refuses_a_hard_ulimit_it_cannot_raise(monkeypatch):
    import resource

    monkeypatch.setattr(res, "_has_cap_sys_resource", lambda: False)
    monkeypatch.setattr(resource, "getrlimit", lambda _n: (1024, 4096))
    with pytest.raises(UsageError, match="CAP_SYS_RESOURCE"):
        from_flags(ulimit=["nofile=8192"]).check("process")
    from_flags(ulimit=["nofile=100:4096"]).check("process")  # lowering is fine
    from_flags(ulimit=["nofile=8192"]).check("vm")  # root in the guest may


def test_process_isolation_drops_an_io_weight_the_kernel_lacks(monkeypatch):
    monkeypatch.setattr(res, "_host_supports_io_weight", lambda: False)
    r = from_flags(blkio_weight=300)
    warnings = r.check("process")
    assert "discarded" in warnings[0] and r.blkio_weight == 0


def test_update_of_a_running_vm_cannot_grow_it(monkeypatch):
    monkeypatch.setattr(res, "host_cpus", lambda: {0, 1})
    current = from_flags(memory="64m", cpus="1")
    vm_mib = current.vm_memory_mib()
    merged = check_update(
        current, from_flags(memory="32m", cpus="0.5"), isolation="vm", vm_memory_mib=vm_mib, vm_vcpus=1
    )
    assert merged.memory == 32 << 20 and merged.nano_cpus == 500_000_000
    with pytest.raises(UsageError, match="cannot grow"):
        check_update(current, from_flags(memory="65m"), isolation="vm", vm_memory_mib=vm_mib)
    with pytest.raises(UsageError, match="vCPU"):
        check_update(current, from_flags(cpus="2"), isolation="vm", vm_memory_mib=vm_mib)
    with pytest.raises(UsageError, match="running container"):
        check_update(current, from_flags(ulimit=["nofile=1"]), isolation="vm", vm_memory_mib=vm_mib)
    # Process isolation has no VM to outgrow.
    check_update(current, from_flags(memory="1g"), isolation="process")


# ---- the wire records ----------------------------------------------------------------------


def test_limits_round_trip_and_validation():
    limits = Limits(memory=1, pids=-1, cpuset_cpus="0-1", device_read_bps=[["*", 5]])
    assert limits.to_dict() == {"memory": 1, "pids": -1, "cpuset_cpus": "0-1", "device_read_bps": [["*", 5]]}
    assert Limits.from_dict(limits.to_dict()) == limits
    assert Limits().is_empty() and Limits().to_dict() == {}
    for bad in (
        {"memory": "1"},
        {"memory": True},
        {"pids": -2},
        {"nope": 1},
        {"cpuset_cpus": "0;1"},
        {"device_read_bps": [["x"]]},
        [],
    ):
        with pytest.raises(ValueError):
            Limits.from_dict(bad)


def test_boot_config_carries_limits_mounts_and_read_only():
    config = BootConfig(
        container_id="c",
        token="t",
        hostname="h",
        layer_count=0,
        process=ProcessSpec(args=["x"], rlimits=[["nofile", 1, 2]], oom_score_adj=-5),
        limits=Limits(memory=5),
        read_only=True,
        mounts=[MountSpec(type="volume", source="vmshim-v0", target="/d", copy_up=True)],
    )
    data = config.to_dict()
    assert BootConfig.from_dict(data) == config
    plain = BootConfig(
        container_id="c",
        token="t",
        hostname="h",
        layer_count=0,
        process=ProcessSpec(args=["x"]),
        memory_limit=7,
        pids_limit=3,
    )
    # An older reader never sees the new fields when they are not used.
    assert not {"limits", "mounts", "read_only"} & set(plain.to_dict())
    assert "rlimits" not in plain.to_dict()["process"]
    assert plain.cgroup_limits() == Limits(memory=7, pids=3)
    assert config.cgroup_limits() == Limits(memory=5)


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "nfs", "target": "/x"},
        {"type": "bind", "target": "x"},
        {"type": "bind", "target": "/x", "readonly": "yes"},
        {"type": "tmpfs", "target": "/x", "options": 5},
    ],
)
def test_mount_spec_validation(bad):
    with pytest.raises(ValueError):
        MountSpec.from_dict(bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"args": ["x"], "rlimits": [["nofile", 1]]},
        {"args": ["x"], "rlimits": [["bogus", 1, 1]]},
        {"args": ["x"], "oom_score_adj": 5000},
        {"args": ["x"], "oom_score_adj": "1"},
    ],
)
def test_process_limits_validation(bad):
    with pytest.raises(ValueError):
        ProcessSpec.from_dict(bad)


def test_cgroup_conversions():
    from guest.runtime.cgroups import blkio_to_io_weight, shares_to_weight

    assert shares_to_weight(1024) == 39  # runc's figures
    assert shares_to_weight(2) == 1 and shares_to_weight(262144) == 10000
    assert blkio_to_io_weight(10) == 1 and blkio_to_io_weight(1000) == 10000
    assert blkio_to_io_weight(500) == 4950


def test_block_devices(tmp_path):
    from guest.runtime.cgroups import CgroupError, block_devices

    for name, dev in (("vda", "254:0"), ("vdb", "254:16"), ("loop0", "7:0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dev").write_text(dev + "\n")
    assert block_devices("*", str(tmp_path)) == ["254:0", "254:16"]
    assert block_devices("8:0") == ["8:0"]
    with pytest.raises(CgroupError):
        block_devices("/nonexistent/dev")
    with pytest.raises(CgroupError, match="not a block device"):
        block_devices("/dev/null")
