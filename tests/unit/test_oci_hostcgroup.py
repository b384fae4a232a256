"""shim.oci.hostcgroup with fakes: where a cgroupsPath goes (cgroupfs v1/v2, systemd),
hostile paths refused with one error, limits, VM sizing, and finding the VM's helpers."""

from __future__ import annotations

import json
import os

import pytest

from shim.oci import hostcgroup
from shim.oci.hostcgroup import CgroupPathError, Hierarchies, Target, parse_path

MIB = 1 << 20


# ---- parse_path ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, path",
    [
        ("/libpod_parent/libpod-abc", "/libpod_parent/libpod-abc"),
        ("//kubepods///pod1/c1/", "/kubepods/pod1/c1"),
        ("mine/c1", "mine/c1"),
        (None, "/vmshim-runtime/" + hostcgroup.default_name("ctr")),
        ("", "/vmshim-runtime/" + hostcgroup.default_name("ctr")),
    ],
)
def test_cgroupfs_paths(value, path):
    assert parse_path(value, "ctr") == Target("cgroupfs", path)


def test_default_names_differ_per_root_and_stay_valid():
    one, two = (hostcgroup.default_name("c1", r) for r in ("/run/a", "/run/b"))
    assert one != two and one.startswith("c1-") and len(one) == 11
    long_id = hostcgroup.default_name("x+" * 500, "/r")
    assert len(long_id) <= 255 and "+" not in long_id
    parse_path(None, "x+" * 500, systemd=True, root="/r")


@pytest.mark.parametrize(
    "value, slice_name, unit, path",
    [
        ("machine.slice:libpod:abc", "machine.slice", "libpod-abc.scope", "machine.slice/libpod-abc.scope"),
        (
            "kubepods-burstable-pod1.slice:cri-containerd:c1",
            "kubepods-burstable-pod1.slice",
            "cri-containerd-c1.scope",
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-c1.scope",
        ),
        (":runc:x", "system.slice", "runc-x.scope", "system.slice/runc-x.scope"),
        ("-.slice::x", "-.slice", "x.scope", "x.scope"),
        (
            None,
            "system.slice",
            f"vmshim-runtime-{hostcgroup.default_name('ctr')}.scope",
            f"system.slice/vmshim-runtime-{hostcgroup.default_name('ctr')}.scope",
        ),
    ],
)
def test_systemd_paths(value, slice_name, unit, path):
    assert parse_path(value, "ctr", systemd=True) == Target("systemd", path, slice_name, unit)


@pytest.mark.parametrize(
    "value, needle",
    [
        ("../../etc", "'..'"),
        ("/a/../../b", "'..'"),
        ("/a/./b", "'.'"),
        ("/", "root cgroup"),
        ("///", "root cgroup"),
        ("/a\nb", "control characters"),
        ("/a\x00b", "control characters"),
        ("/" + "x" * 300, "longer than 255"),
        ("/a" * 3000, "longer than 4096"),
        (42, "must be a string"),
        (["/a"], "must be a string"),
    ],
)
def test_hostile_cgroupfs_paths_are_refused_with_one_error(value, needle):
    with pytest.raises(CgroupPathError, match=needle) as info:
        parse_path(value, "ctr")
    assert "\n" not in str(info.value).replace("\\n", "")


@pytest.mark.parametrize(
    "value, needle",
    [
        ("machine.slice:libpod", "slice:prefix:name"),
        ("/a/b", "slice:prefix:name"),
        ("a:b:c:d", "slice:prefix:name"),
        ("machine:p:n", "not a slice name"),
        ("a--b.slice:p:n", "not a slice name"),
        ("-a.slice:p:n", "not a slice name"),
        ("a.slice:p:../../x", "not a systemd unit name"),
        ("a/b.slice:p:n", "not a systemd unit name"),
        ("a.slice:p/q:n", "not a systemd unit name"),
        ("a.slice:p:", "name is empty"),
        ("a.slice:p:n.slice", "name a scope"),
    ],
)
def test_hostile_systemd_paths_are_refused(value, needle):
    with pytest.raises(CgroupPathError, match=needle):
        parse_path(value, "ctr", systemd=True)


# ---- hierarchies ---------------------------------------------------------------------------

V1_MOUNTS = [
    ("/sys/fs/cgroup", "tmpfs", "rw"),
    ("/sys/fs/cgroup/cpu", "cgroup", "rw,relatime,cpu"),
    ("/sys/fs/cgroup/cpuacct", "cgroup", "rw,cpuacct"),
    ("/sys/fs/cgroup/memory", "cgroup", "rw,memory"),
    ("/sys/fs/cgroup/pids", "cgroup", "rw,pids"),
    ("/sys/fs/cgroup/systemd", "cgroup", "rw,name=systemd"),
    ("/sys/fs/cgroup/unified", "cgroup2", "rw"),
]
OWN_V1 = hostcgroup.read_own_cgroups(
    "9:name=systemd:/\n4:memory:/process_api/e0f2\n3:pids:/\n2:cpuacct:/\n1:cpu:/\n0::/\n"
)


def test_v1_hybrid_layout_uses_controller_hierarchies_only():
    hier = Hierarchies.detect(mounts=V1_MOUNTS, own=OWN_V1)
    assert hier.version == 1
    assert sorted(hier.mounts) == [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/cpuacct",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
    ]
    absolute = hier.directories(parse_path("/p/c", "c"))
    assert absolute["/sys/fs/cgroup/memory"] == "/sys/fs/cgroup/memory/p/c"
    relative = hier.directories(parse_path("p/c", "c"))
    assert relative["/sys/fs/cgroup/memory"] == "/sys/fs/cgroup/memory/process_api/e0f2/p/c"
    assert relative["/sys/fs/cgroup/pids"] == "/sys/fs/cgroup/pids/p/c"


def test_v2_layout_and_relative_paths():
    mounts = [("/sys/fs/cgroup", "cgroup2", "rw,nsdelegate")]
    own = hostcgroup.read_own_cgroups("0::/system.slice/engine.service\n")
    hier = Hierarchies.detect(mounts=mounts, own=own)
    assert hier.version == 2
    assert hier.directories(parse_path("c", "c")) == {"/sys/fs/cgroup": "/sys/fs/cgroup/system.slice/engine.service/c"}
    scope = parse_path("machine.slice:libpod:x", "x", systemd=True)
    assert hier.directories(scope) == {"/sys/fs/cgroup": "/sys/fs/cgroup/machine.slice/libpod-x.scope"}


def test_no_cgroup_filesystem_is_one_error():
    with pytest.raises(CgroupPathError, match="no cgroup filesystem"):
        Hierarchies.detect(mounts=[("/", "ext4", "rw")], own={})


# ---- limits --------------------------------------------------------------------------------


def test_host_limits_from_linux_resources():
    out = hostcgroup.host_limits(
        {
            "memory": {"limit": 512 * MIB, "swap": 1024 * MIB, "reservation": -1},
            "cpu": {"quota": 50000, "period": 100000, "shares": 1024, "cpus": "0-1", "mems": "0"},
            "pids": {"limit": 100},
            "blockIO": {"weight": 300},
            "unified": {"memory.high": "400M"},
        }
    )
    limits = out.limits
    assert (limits.memory, limits.memory_swap, limits.memory_reservation) == (512 * MIB, 1024 * MIB, 0)
    assert (limits.cpu_quota, limits.cpu_period, limits.cpu_shares) == (50000, 100000, 1024)
    assert (limits.cpuset_cpus, out.cpuset_mems) == ("0-1", "0")
    assert limits.pids == 100 + hostcgroup.HOST_TASKS
    assert limits.blkio_weight == 300
    assert out.unified == {"memory.high": "400M"}
    assert hostcgroup.host_limits(None).limits.is_empty()


@pytest.mark.parametrize(
    "resources, needle",
    [
        ({"memory": {"limit": "1g"}}, "memory.limit must be an integer"),
        ({"memory": {"limit": -5}}, "out of range"),
        ({"cpu": {"cpus": "0;rm -rf /"}}, "cpu.cpus"),
        ({"cpu": "x"}, "cpu must be an object"),
        ({"unified": {"../../release_agent": "x"}}, "not a controller's cgroup file"),
        ({"unified": {"cgroup.procs": "1"}}, "not a controller's cgroup file"),
        ({"unified": {"memory.max": "1\n2"}}, "one-line"),
    ],
)
def test_bad_resources_are_refused(resources, needle):
    with pytest.raises(CgroupPathError, match=needle):
        hostcgroup.host_limits(resources)


def test_vm_sizing_fits_the_memory_limit():
    vm_mib, inside = hostcgroup.vm_sizing(512 * MIB, 96)
    assert vm_mib == 512 - hostcgroup.HOST_OVERHEAD_MIB
    assert inside == (vm_mib - 96) * MIB
    with pytest.raises(CgroupPathError, match="too small for a VM.*at least"):
        hostcgroup.vm_sizing(200 * MIB, 96)


# ---- creating in a fake tree ---------------------------------------------------------------


def _fake_v2(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    return str(root), Hierarchies(2, {str(root): frozenset()}, {"": "/"})


def test_create_v2_writes_limits_and_enables_controllers(tmp_path):
    root, hier = _fake_v2(tmp_path)
    limits = hostcgroup.host_limits(
        {"memory": {"limit": 300 * MIB}, "cpu": {"quota": 20000, "shares": 2}, "pids": {"limit": 10}}
    )
    cgroup = hostcgroup.create(parse_path("/a/b", "b"), limits, hierarchies=hier)
    leaf = os.path.join(root, "a", "b")
    assert cgroup.paths == {"unified": leaf} and cgroup.made == [leaf]
    assert open(os.path.join(leaf, "memory.max")).read() == str(300 * MIB)
    assert open(os.path.join(leaf, "cpu.max")).read() == "20000 100000"
    assert open(os.path.join(leaf, "cpu.weight")).read() == "1"
    assert open(os.path.join(leaf, "pids.max")).read() == str(10 + hostcgroup.HOST_TASKS)
    assert os.path.exists(os.path.join(root, "a", "cgroup.subtree_control"))
    again = hostcgroup.HostCgroup.from_dict(json.loads(json.dumps(cgroup.to_dict())))
    assert again == cgroup


def test_create_v1_gives_new_cpusets_their_parents_cpus(tmp_path):
    mounts = {}
    for name in ("cpuset", "memory"):
        (tmp_path / name).mkdir()
        mounts[str(tmp_path / name)] = frozenset({name})
    (tmp_path / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (tmp_path / "cpuset" / "cpuset.mems").write_text("0\n")
    hier = Hierarchies(1, mounts, {})
    cgroup = hostcgroup.create(parse_path("/p/c", "c"), hostcgroup.HostLimits(), hierarchies=hier)
    assert cgroup.paths["memory"] == str(tmp_path / "memory" / "p" / "c")
    assert (tmp_path / "cpuset" / "p" / "cpuset.cpus").read_text() == "0-1"
    assert (tmp_path / "cpuset" / "p" / "c" / "cpuset.mems").read_text() == "0"


def test_unified_keys_need_v2(tmp_path):
    (tmp_path / "memory").mkdir()
    hier = Hierarchies(1, {str(tmp_path / "memory"): frozenset({"memory"})}, {})
    limits = hostcgroup.host_limits({"unified": {"memory.high": "1G"}})
    with pytest.raises(CgroupPathError, match="needs cgroup v2"):
        hostcgroup.create(parse_path("/x", "x"), limits, hierarchies=hier)
    assert not (tmp_path / "memory" / "x").exists()


def test_systemd_scope_is_started_with_the_stand_in(tmp_path):
    root, hier = _fake_v2(tmp_path)
    calls = []
    target = parse_path("machine.slice:libpod:abc", "abc", systemd=True)
    cgroup = hostcgroup.create(
        target,
        hostcgroup.HostLimits(),
        hierarchies=hier,
        pid=4242,
        systemd_start=lambda t, pid, props: calls.append((t.unit, t.slice, pid, props)),
    )
    assert calls == [("libpod-abc.scope", "machine.slice", 4242, [])]
    assert cgroup.paths["unified"] == os.path.join(root, "machine.slice", "libpod-abc.scope")
    assert (cgroup.manager, cgroup.unit) == ("systemd", "libpod-abc.scope")


def test_systemd_without_systemd_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(hostcgroup, "systemd_running", lambda: False)
    with pytest.raises(CgroupPathError, match="systemd is not running.*cgroupfs"):
        hostcgroup.systemd_start_scope(parse_path("a.slice:p:n", "n", systemd=True), 1)


# ---- the VM's processes --------------------------------------------------------------------


def test_vm_processes_are_qemu_the_domains_helpers_and_their_children(tmp_path):
    proc = tmp_path / "proc"
    pid_dir = tmp_path / "run"
    pid_dir.mkdir()
    for pid, ppid in ((100, 1), (200, 1), (201, 200), (202, 201), (300, 1), (400, 100)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(f"{pid} (x) y) S {ppid} 0 0\n")
    (pid_dir / "vmshim-abc.pid").write_text("100")
    (pid_dir / "3-vmshim-abc-fs0-virtiofsd.pid").write_text("200\n")
    (pid_dir / "4-vmshim-abcd-fs0-virtiofsd.pid").write_text("300\n")  # another VM
    (pid_dir / "5-vmshim-abc-fs1-virtiofsd.pid").write_text("999\n")  # gone
    (pid_dir / "6-vmshim-abc-junk.pid").write_text("not a pid\n")
    assert hostcgroup.vm_processes("vmshim-abc", 100, str(pid_dir), str(proc)) == [100, 200, 201, 202, 400]


def test_create_refuses_a_hostile_cgroups_path_and_keeps_nothing(tmp_path):
    from shim.oci import runtime
    from shim.oci.state import RuntimeStore

    (tmp_path / "b" / "rootfs").mkdir(parents=True)
    (tmp_path / "b" / "config.json").write_text(
        json.dumps(
            {
                "ociVersion": "1.0.2",
                "root": {"path": "rootfs"},
                "process": {"args": ["sh"], "cwd": "/"},
                "linux": {"cgroupsPath": "../../../etc"},
            }
        )
    )
    rt = RuntimeStore(tmp_path / "root")
    with pytest.raises(CgroupPathError, match=r"cgroupsPath '\.\./\.\./\.\./etc'"):
        runtime.create(rt, "evil", str(tmp_path / "b"))
    assert rt.ids() == [] and not rt.exists("evil")


def test_scope_properties_carry_the_limits():
    limits = hostcgroup.host_limits(
        {
            "memory": {"limit": 512 * MIB},
            "pids": {"limit": 10},
            "cpu": {"quota": 50000, "period": 100000, "shares": 1024},
        }
    )
    assert hostcgroup.unit_properties(limits, 2) == [
        "MemoryMax",
        "t",
        str(512 * MIB),
        "TasksMax",
        "t",
        str(10 + hostcgroup.HOST_TASKS),
        "CPUQuotaPerSecUSec",
        "t",
        "500000",
        "CPUWeight",
        "t",
        "39",
    ]
    assert hostcgroup.unit_properties(limits, 1)[0] == "MemoryLimit"


def test_start_scope_asks_systemd_over_dbus(monkeypatch):
    seen = []
    monkeypatch.setattr(hostcgroup, "systemd_running", lambda: True)
    monkeypatch.setattr(hostcgroup, "_unit_active", lambda unit: True)

    def busctl(*args):
        seen.append(args)
        return hostcgroup.subprocess.CompletedProcess(args, 0, 'o "/job/1"', "")

    monkeypatch.setattr(hostcgroup, "_busctl", busctl)
    target = parse_path("machine.slice:libpod:abc", "abc", systemd=True)
    hostcgroup.systemd_start_scope(target, 77, ["TasksMax", "t", "300"])
    (args,) = seen
    assert args[:5] == ("StartTransientUnit", "ssa(sv)a(sa(sv))", "libpod-abc.scope", "fail", "5")
    assert ("PIDs", "au", "1", "77") == args[11:15]
    assert args[-4:] == ("TasksMax", "t", "300", "0")


class _Probe:
    def __init__(self, pid):
        self.pid = pid

    def running_qemu(self, domain):
        return self.pid

    def processes(self, domain, qemu_pid):
        return [qemu_pid] if qemu_pid else []


class _Cgroup:
    def __init__(self):
        self.added = []
        self.directories = ["/fake"]

    def add(self, pid):
        self.added.append(pid)

    def holds(self, pid):
        return pid in self.added


def test_placer_waits_for_a_running_domain_and_tolerates_one_that_ended():
    probe, cgroup = _Probe(None), _Cgroup()
    placer = hostcgroup.VmPlacer(cgroup, "vmshim-x", probe=probe)
    assert not placer.tick() and cgroup.added == []
    probe.pid = os.getpid()
    assert placer.tick() and cgroup.added == [os.getpid()]
    assert placer.finish() == [os.getpid()]
    probe.pid = None  # the container's process ended at once: the VM is already gone
    assert placer.finish() == [os.getpid()]


def test_placer_moves_again_what_libvirt_placed_back_and_gives_up_after_a_bound(monkeypatch):
    """On a busy host libvirt may put a QEMU thread back once after the move: finish
    moves it again instead of failing the start; one that never stays fails, boundedly."""
    monkeypatch.setattr(hostcgroup, "PLACE_RETRY", 0.0)

    class _Sticky(_Cgroup):
        def __init__(self, takes):
            super().__init__()
            self.takes = takes  # how many moves until it stays

        def holds(self, pid):
            return self.added.count(pid) >= self.takes

    pid = os.getpid()
    cgroup = _Sticky(takes=3)
    placer = hostcgroup.VmPlacer(cgroup, "vmshim-x", probe=_Probe(pid))
    assert placer.finish() == [pid] and cgroup.added.count(pid) == 3
    never = _Sticky(takes=10**6)
    with pytest.raises(hostcgroup.CgroupPathError, match="did not stay"):
        hostcgroup.VmPlacer(never, "vmshim-x", probe=_Probe(pid)).finish()
    assert never.added.count(pid) <= hostcgroup.PLACE_ATTEMPTS + 1
