"""Pod-level resources sizing the sandbox's VM (shim.oci.pod): parsing the pod cgroup's
limits and the CRI annotations, hostile and odd values, symlinks, the sizing rule."""

import os

import pytest

from guest.spec import ProcessSpec

from shim.containers.resources import DEFAULT_VM_MIB, GUEST_OVERHEAD_MIB, Resources
from shim.containers.store import Container

from shim.oci import pod
from shim.oci.hostcgroup import HOST_OVERHEAD_MIB
from shim.oci.pod import (
    MAX_CONTROL_FILE,
    PodLimits,
    cgroup_limits,
    parse_annotations,
    parse_v1,
    parse_v2,
    read_control,
    vm_size,
)

MIB = 1 << 20
V1_UNLIMITED = "9223372036854771712\n"


def test_v2_limits_are_read():
    assert parse_v2("805306368\n", "200000 100000\n") == PodLimits(805306368, 200000, 100000, "cgroup")


@pytest.mark.parametrize(
    "memory_max",
    ["max\n", "", "-1", "0", "12abc", "1e9", "0x100000", "٣٣٣", " ", "9" * 21, str(1 << 62), V1_UNLIMITED, None],
)
def test_v2_odd_memory_is_no_limit(memory_max):
    assert parse_v2(memory_max, None).memory == 0


@pytest.mark.parametrize(
    "cpu_max",
    [
        "max 100000",
        "max",
        "200000",
        "200000 100000 5",
        "200000 0",
        "200000 10",  # period below the kernel's 1 ms
        "200000 2000000",  # above its 1 s
        "-1 100000",
        "abc 100000",
        f"{1 << 60} 100000",
        "",
        None,
    ],
)
def test_v2_odd_cpu_max_is_no_limit(cpu_max):
    limits = parse_v2(None, cpu_max)
    assert (limits.cpu_quota, limits.cpu_period) == (0, 0)
    assert limits.vcpus(64) == 0


def test_v1_limits_are_read_and_unlimited_is_none():
    assert parse_v1("805306368\n", "150000\n", "100000\n") == PodLimits(805306368, 150000, 100000, "cgroup")
    assert parse_v1(V1_UNLIMITED, "-1\n", "100000\n") == PodLimits(0, 0, 0, "cgroup")
    assert parse_v1("garbage", "150000", "junk") == PodLimits(0, 0, 0, "cgroup")


def test_vcpus_round_up_and_are_capped_at_the_hosts():
    assert PodLimits(0, 150000, 100000).vcpus(8) == 2
    assert PodLimits(0, 1000, 100000).vcpus(8) == 1
    assert PodLimits(0, 64 * 100000, 100000).vcpus(2) == 2
    assert PodLimits(0, 64 * 100000, 100000).vcpus(0) == 1


def test_cri_annotations_are_read():
    limits = parse_annotations(
        {
            pod.SANDBOX_MEMORY: "536870912",
            pod.SANDBOX_CPU_QUOTA: "300000",
            pod.SANDBOX_CPU_PERIOD: "100000",
        }
    )
    assert limits == PodLimits(536870912, 300000, 100000, "annotations")


@pytest.mark.parametrize(
    "annotations",
    [
        {},
        {pod.SANDBOX_MEMORY: 536870912},  # not a string
        {pod.SANDBOX_MEMORY: "-536870912"},
        {pod.SANDBOX_MEMORY: "512Mi"},
        {pod.SANDBOX_MEMORY: str(1 << 63)},
        {pod.SANDBOX_CPU_QUOTA: "300000"},  # no period
        {pod.SANDBOX_CPU_QUOTA: "300000", pod.SANDBOX_CPU_PERIOD: "0"},
        {pod.SANDBOX_CPU_QUOTA: "-1", pod.SANDBOX_CPU_PERIOD: "100000"},
        {pod.SANDBOX_CPU_QUOTA: ["300000"], pod.SANDBOX_CPU_PERIOD: "100000"},
    ],
)
def test_odd_cri_annotations_are_no_limit(annotations):
    limits = parse_annotations(annotations)
    assert (limits.memory, limits.cpu_quota, limits.cpu_period) == (0, 0, 0)


def test_annotations_that_are_not_a_mapping_are_none():
    assert parse_annotations(["x"]) == PodLimits()  # type: ignore[arg-type]


def test_a_pod_cgroup_limit_holds_the_whole_vm():
    limits = PodLimits(768 * MIB, 200000, 100000, "cgroup")
    assert vm_size(limits, DEFAULT_VM_MIB, 1, 2) == (768 - HOST_OVERHEAD_MIB, 2)


def test_a_cri_sandbox_memory_is_the_containers_and_the_guest_overhead_comes_on_top():
    limits = PodLimits(512 * MIB, 0, 0, "annotations")
    assert vm_size(limits, DEFAULT_VM_MIB, 1, 2) == (512 + GUEST_OVERHEAD_MIB, 0)


def test_pod_limits_smaller_than_the_containers_own_leave_it():
    assert vm_size(PodLimits(300 * MIB, 100000, 100000, "cgroup"), 1024, 2, 8) == (0, 0)
    # too small for a VM at all: the container's own size stands
    assert vm_size(PodLimits(64 * MIB, 0, 0, "cgroup"), DEFAULT_VM_MIB, 1, 8) == (0, 0)
    assert vm_size(PodLimits(), DEFAULT_VM_MIB, 1, 8) == (0, 0)


def test_the_record_takes_the_larger_of_its_own_and_the_pods_size():
    rec = Container(
        id="a" * 64,
        name="a",
        image="",
        image_id="",
        isolation="vm",
        process=ProcessSpec(args=["true"]),
        hostname="a",
        token="t" * 32,
        layer_disks=[],
    )
    assert (rec.vm_memory_mib, rec.vm_vcpus) == (DEFAULT_VM_MIB, 1)
    rec.pod_vm_mib, rec.pod_vcpus = 640, 2
    assert (rec.vm_memory_mib, rec.vm_vcpus) == (640, 2)
    assert Container.from_dict(rec.to_dict()).vm_memory_mib == 640
    rec.resources = Resources(memory=1024 * MIB, nano_cpus=3 * 10**9)
    assert (rec.vm_memory_mib, rec.vm_vcpus) == (1024 + GUEST_OVERHEAD_MIB, 3)


def _write(directory, name, text):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "w") as f:
        f.write(text)


def test_v2_pod_cgroup_is_read(tmp_path):
    parent = tmp_path / "pod"
    _write(parent, "memory.max", "805306368\n")
    _write(parent, "cpu.max", "200000 100000\n")
    assert cgroup_limits(2, [(frozenset(), str(parent))]) == PodLimits(805306368, 200000, 100000, "cgroup")


def test_v1_pod_cgroup_is_read_from_each_controllers_hierarchy(tmp_path):
    memory, cpu = tmp_path / "memory" / "pod", tmp_path / "cpu,cpuacct" / "pod"
    _write(memory, "memory.limit_in_bytes", "805306368\n")
    _write(cpu, "cpu.cfs_quota_us", "200000\n")
    _write(cpu, "cpu.cfs_period_us", "100000\n")
    parents = [
        (frozenset({"cpuset"}), str(tmp_path / "cpuset" / "pod")),  # absent: nothing read
        (frozenset({"memory"}), str(memory)),
        (frozenset({"cpu", "cpuacct"}), str(cpu)),
    ]
    assert cgroup_limits(1, parents) == PodLimits(805306368, 200000, 100000, "cgroup")
    assert cgroup_limits(1, []) == PodLimits(0, 0, 0, "cgroup")


def test_a_symlinked_pod_cgroup_or_control_file_is_not_followed(tmp_path):
    real = tmp_path / "real"
    _write(real, "memory.max", "805306368\n")
    _write(real, "cpu.max", "200000 100000\n")
    os.symlink(real, tmp_path / "link")
    assert cgroup_limits(2, [(frozenset(), str(tmp_path / "link"))]).memory == 0
    # a symlink higher up the path
    os.makedirs(real / "child")
    _write(real / "child", "memory.max", "805306368\n")
    assert cgroup_limits(2, [(frozenset(), str(tmp_path / "link" / "child"))]).memory == 0
    # the control file itself a symlink
    pod_dir = tmp_path / "pod"
    os.makedirs(pod_dir)
    os.symlink(real / "memory.max", pod_dir / "memory.max")
    assert cgroup_limits(2, [(frozenset(), str(pod_dir))]).memory == 0


def test_control_files_are_read_bounded_and_only_when_regular(tmp_path):
    big = tmp_path / "memory.max"
    big.write_text("8" * 100_000)
    assert len(read_control(str(big)) or "") == MAX_CONTROL_FILE
    assert parse_v2(read_control(str(big)), None).memory == 0
    os.mkfifo(tmp_path / "fifo")
    assert read_control(str(tmp_path / "fifo")) is None  # no blocking on a fifo
    assert read_control(str(tmp_path / "absent")) is None
