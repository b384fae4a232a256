"""Resource limits, mounts and volumes of guest.runtime on this host, as root (what
``--isolation process`` runs), on cgroup v1, hybrid or v2-only hosts alike. Every test checks nothing is left behind:
no mounts, no loop devices, no cgroup directories."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from guest.runtime import process
from guest.runtime.cgroups import CgroupError, blkio_to_io_weight, shares_to_weight
from guest.spec import BootConfig, Limits, MountSpec, ProcessSpec
from shim.containers.resources import from_flags
from shim.containers.mounts import Attachments
from shim.volumes.specs import MountRequest
from shim.volumes.store import VolumeStore
from tests.pipes import read_to_end
from tests.waiting import alive, holds_for, wait_until
from tests.integration.test_runtime_host import (  # noqa: F401 - fixture
    BUSYBOX,
    Box,
    Boxes,
    busybox_layer,
)

pytestmark = [
    pytest.mark.host_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts, cgroups)"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]


def _mounts_under(path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line for line in f if str(path) in line.split()[1]]


def _loops_of(directory) -> list[str]:
    out = []
    for name in os.listdir("/sys/block"):
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text()
        except OSError:
            continue
        if str(directory) in backing:
            out.append(name)
    return out


@pytest.fixture
def volumes(tmp_path):
    store = VolumeStore(tmp_path / "volumes")
    yield store
    for _ in range(50):  # loop devices are let go of asynchronously
        if not _loops_of(tmp_path / "volumes"):
            break
        time.sleep(0.1)
    assert _loops_of(tmp_path / "volumes") == []


@pytest.fixture
def make_box(busybox_layer, tmp_path):  # noqa: F811
    boxes = Boxes(busybox_layer, tmp_path)

    def make(*, limits: Limits | None = None, mounts=None, read_only=False, process_spec: ProcessSpec | None = None):
        config = BootConfig(
            container_id=f"test-{secrets.token_hex(4)}",
            token="t",
            hostname="box",
            process=process_spec or ProcessSpec(args=["true"]),
            layer_count=1,
            limits=limits,
            read_only=read_only,
        )
        return boxes.create(config, mounts=mounts)

    yield make
    boxes.close()


def knob(cgroup, v1: tuple[str, str], v2: str) -> str:
    """A cgroup knob's content on either layout: *v1* (controller, file) on v1 and hybrid
    hosts, *v2* (file in the unified directory) on v2-only hosts."""
    if cgroup.version == 2:
        return Path(cgroup.paths["unified"], v2).read_text().strip()
    return Path(cgroup.paths[v1[0]], v1[1]).read_text().strip()


def cpu_quota(cgroup) -> str:
    """The CFS quota in µs as v1 writes it ("-1" for none), on either layout."""
    if cgroup.version == 2:
        quota = knob(cgroup, ("cpu", ""), "cpu.max").split()[0]
        return "-1" if quota == "max" else quota
    return knob(cgroup, ("cpu", "cpu.cfs_quota_us"), "")


# ---- limits ----------------------------------------------------------------------------------


def test_cpus_half_holds_a_busy_loop_near_half_a_cpu(make_box):
    limits = from_flags(cpus="0.5").limits("process")
    box = make_box(limits=limits)
    spawned = box.spawn(["sh", "-c", "while :; do :; done"])
    wait_until(lambda: box.container.stats()["cpu_ns"] > 0, 10, "the busy loop running")
    before, t0 = box.container.stats()["cpu_ns"], time.monotonic()
    holds_for(lambda: alive(spawned.pid), 3, "the busy loop running")  # the window
    after, t1 = box.container.stats()["cpu_ns"], time.monotonic()
    share = (after - before) / ((t1 - t0) * 1e9)
    os.kill(spawned.pid, 9)
    assert 0.4 <= share <= 0.6, share
    assert box.container.stats()["cpu_throttled_periods"] > 0


def test_pids_limit_stops_a_fork_bomb(make_box):
    box = make_box(limits=from_flags(pids_limit=20).limits("process"))
    bomb = (
        "i=0; while [ $i -lt 60 ]; do sleep 30 & i=$((i+1)); done 2>/dev/null; "
        "cat /proc/self/status >/dev/null; echo started $(jobs -p | wc -l)"
    )
    code, out, err = box.run(["sh", "-c", bomb])
    assert len(box.container.cgroup.procs()) <= 20
    assert int(box.container.stats()["pids"]) <= 20
    assert box.container.stats().get("pids_limit") == 20


def test_memory_limit_oom_kill_is_reported(make_box):
    box = make_box(limits=from_flags(memory="64m").limits("process"))
    code, _, _ = box.run(
        ["sh", "-c", "dd if=/dev/zero bs=1M count=200 | cat > /dev/shm/x;head -c 200m /dev/zero | tail"]
    )
    assert code == 137
    assert box.container.oom_killed()
    assert box.container.stats()["oom_kills"] >= 1


def test_update_changes_the_limits_of_a_running_container(make_box):
    box = make_box(limits=from_flags(memory="64m", pids_limit=50, cpus="1").limits("process"))
    spawned = box.spawn(["sleep", "100"])
    cgroup = box.container.cgroup
    box.container.update(from_flags(memory="128m", cpus="0.25", pids_limit=10, cpu_shares=512).limits("process"))
    memory = ("memory", "memory.limit_in_bytes"), "memory.max"
    pids = ("pids", "pids.max"), "pids.max"
    assert knob(cgroup, *memory) == str(128 << 20)
    assert cpu_quota(cgroup) == "25000"
    if cgroup.version == 2:
        assert knob(cgroup, ("cpu", ""), "cpu.weight") == str(shares_to_weight(512))
    else:
        assert knob(cgroup, ("cpu", "cpu.shares"), "") == "512"
    assert knob(cgroup, *pids) == "10"
    box.container.update(Limits(memory=32 << 20))  # lower again: memsw first or after
    assert knob(cgroup, *memory) == str(32 << 20)
    box.container.update(Limits(pids=-1, cpu_quota=-1))
    assert knob(cgroup, *pids) == "max"
    assert cpu_quota(cgroup) == "-1"
    os.kill(spawned.pid, 9)


def test_cpuset_reservation_and_swap(make_box):
    limits = from_flags(memory="64m", memory_swap="96m", memory_reservation="32m", cpuset_cpus="0").limits("process")
    box = make_box(limits=limits)
    cgroup = box.container.cgroup
    code, out, _ = box.run(["cat", "/proc/self/status"])
    assert "Cpus_allowed_list:\t0\n" in out
    if cgroup.version == 2:
        assert knob(cgroup, ("memory", ""), "memory.low") == str(32 << 20)
        if Path(cgroup.paths["unified"], "memory.swap.max").exists():
            assert knob(cgroup, ("memory", ""), "memory.swap.max") == str(32 << 20)  # 96m-64m
        return
    assert knob(cgroup, ("memory", "memory.soft_limit_in_bytes"), "") == str(32 << 20)
    memsw = Path(cgroup.paths["memory"], "memory.memsw.limit_in_bytes")
    if memsw.exists():  # swap accounting is a boot option on v1 kernels
        assert memsw.read_text().strip() == str(96 << 20)


def test_device_read_bps_is_written_for_the_device(make_box, tmp_path):
    """On a loop device the test makes itself: every Linux host has those."""
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        disk = os.stat(loop)
        box = make_box(limits=from_flags(device_read_bps=[f"{loop}:1m"]).limits("process"))
        cgroup = box.container.cgroup
        text = knob(cgroup, ("blkio", "blkio.throttle.read_bps_device"), "io.max")
        expected = "rbps=1048576" if cgroup.version == 2 else "1048576"
        assert f"{os.major(disk.st_rdev)}:{os.minor(disk.st_rdev)} {expected}" in text
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_blkio_weight_is_set_where_the_kernel_has_a_knob(make_box):
    box = make_box()
    cgroup = box.container.cgroup
    if not cgroup.supports_io_weight():
        with pytest.raises(CgroupError, match="weight"):
            box.container.update(Limits(blkio_weight=300))
        return
    box.container.update(Limits(blkio_weight=300))
    if cgroup.version == 2:
        directory = Path(cgroup.paths["unified"])
        values = {"io.weight": str(blkio_to_io_weight(300)), "io.bfq.weight": "300"}
    else:
        directory = Path(cgroup.paths["blkio"])
        values = {"blkio.weight": "300", "blkio.bfq.weight": "300"}
    name = next(n for n in values if (directory / n).exists())
    assert values[name] in (directory / name).read_text()


def test_ulimits_and_oom_score_adj(make_box):
    spec = ProcessSpec(
        args=["sh", "-c", "ulimit -n; ulimit -Hn; cat /proc/self/oom_score_adj"],
        rlimits=[["nofile", 100, 200]],
        oom_score_adj=500,
    )
    box = make_box()
    spawned = box.container.start(spec, stdin=False)
    box.spawned.append(spawned)
    out = read_to_end(spawned.stdout).decode()
    assert process.wait(spawned.pid) == 0
    assert out.split() == ["100", "200", "500"]


def test_raising_a_hard_ulimit_is_applied_or_refused_with_the_reason(make_box):
    """With CAP_SYS_RESOURCE the raised limit holds in the container; without it (this
    sandbox) the refusal names the capability. Neither case is a skip."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit to exceed")
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(ln for ln in status.splitlines() if ln.startswith("CapEff")).split()[1], 16)
    box = make_box()
    spec = ProcessSpec(args=["sh", "-c", f"test $(ulimit -Hn) = {hard + 1}"], rlimits=[["nofile", hard + 1, hard + 1]])
    if cap_eff & (1 << 24):
        spawned = box.container.start(spec, stdin=False)
        box.spawned.append(spawned)
        assert process.wait(spawned.pid) == 0
    else:
        with pytest.raises(process.SpawnError, match="CAP_SYS_RESOURCE"):
            box.container.start(spec, stdin=False)


# ---- mounts ----------------------------------------------------------------------------------


def test_bind_mounts_rw_and_ro_and_tmpfs(make_box, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello").write_text("from the host\n")
    mounts = [
        (MountSpec(type="bind", source=str(shared), target="/data"), str(shared)),
        (MountSpec(type="bind", source=str(shared), target="/ro", readonly=True), str(shared)),
        (MountSpec(type="tmpfs", target="/scratch", options="size=1m,mode=1777"), None),
    ]
    box = make_box(mounts=mounts)
    main = box.spawn(["sleep", "100"])
    script = (
        "cat /data/hello; echo back > /data/from-container; "
        "echo x > /ro/nope 2>/dev/null || echo ro-refused; "
        "grep ' /scratch ' /proc/mounts; "
        "dd if=/dev/zero of=/scratch/big bs=1k count=2048 2>/dev/null || echo tmpfs-full"
    )
    code, out, err = box.run(["sh", "-c", script])
    assert code == 0, err
    assert "from the host" in out and "ro-refused" in out and "tmpfs-full" in out
    assert "size=1024k" in out and "noexec" in out
    assert (shared / "from-container").read_text() == "back\n"
    (shared / "later").write_text("live\n")
    code, out, _ = box.run(["cat", "/data/later"])
    assert out == "live\n"
    os.kill(main.pid, 9)


def test_a_bind_inside_a_tmpfs_given_before_it_is_not_hidden(make_box, tmp_path):
    """``-v DIR:/scratch/data --tmpfs /scratch``: the tmpfs goes first, as in docker; in
    the order given it would cover the bind."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello").write_text("from the host\n")
    mounts = [
        (MountSpec(type="bind", source=str(shared), target="/scratch/data"), str(shared)),
        (MountSpec(type="tmpfs", target="/scratch"), None),
    ]
    box = make_box(mounts=mounts)
    code, out, err = box.run(["sh", "-c", "cat /scratch/data/hello; grep -c ' /scratch' /proc/mounts"])
    assert code == 0, err
    assert out.split("\n")[:2] == ["from the host", "2"]


def test_read_only_root_with_a_writable_tmpfs(make_box):
    mounts = [(MountSpec(type="tmpfs", target="/tmp"), None)]
    box = make_box(mounts=mounts, read_only=True)
    code, out, _ = box.run(["sh", "-c", "touch /x 2>/dev/null || echo root-ro; touch /tmp/x && echo tmp-rw"])
    assert out.split() == ["root-ro", "tmp-rw"]


def test_mount_target_symlink_stays_inside_the_rootfs(make_box, tmp_path, busybox_layer):  # noqa: F811
    shared = tmp_path / "s"
    shared.mkdir()
    box = make_box()
    # A symlink in the container's rootfs pointing outside: the mount must land inside.
    os.symlink("/../../../../../../tmp", box.container.rootfs + "/escape")
    from guest.runtime.mounts import mount_one

    target = mount_one(
        box.container.rootfs, MountSpec(type="bind", source=str(shared), target="/escape/x"), str(shared)
    )
    try:
        assert target.startswith(box.container.rootfs + "/")
    finally:
        subprocess.run(["umount", target], check=True)


def test_named_volume_persists_and_copies_image_content(make_box, volumes, tmp_path):
    volumes.create("data1", size=64 << 20)
    requests = [MountRequest(type="volume", source="data1", target="/etc")]
    attachments = Attachments(requests, store=volumes)
    items = attachments.for_process(tmp_path / "stage")
    try:
        box = make_box(mounts=items)
    finally:
        attachments.unstage()
    assert not (tmp_path / "stage" / "0").exists()
    code, out, err = box.run(["sh", "-c", "cat /etc/passwd | head -1; echo kept > /etc/note; sync"])
    assert code == 0, err
    assert out.startswith("root:")  # docker copies the image's /etc into a new volume
    box.container.destroy()
    attachments.release()
    # A second container sees the data.
    attachments = Attachments([MountRequest(type="volume", source="data1", target="/v", readonly=True)], store=volumes)
    items = attachments.for_process(tmp_path / "stage2")
    try:
        box2 = make_box(mounts=items)
    finally:
        attachments.unstage()
    code, out, _ = box2.run(["sh", "-c", "cat /v/note; echo x > /v/y 2>/dev/null || echo ro"])
    assert out.split() == ["kept", "ro"]
    box2.container.destroy()
    attachments.release()


def test_a_volume_in_use_read_write_is_refused_to_another(make_box, volumes, tmp_path):
    volumes.create("busy", size=64 << 20)
    first = Attachments([MountRequest(type="volume", source="busy", target="/v")], store=volumes)
    items = first.for_process(tmp_path / "stage")
    try:
        box = make_box(mounts=items)
    finally:
        first.unstage()
    from shim.errors import VolumeInUse

    with pytest.raises(VolumeInUse, match="read-write by one container"):
        volumes.acquire("busy", readonly=False, timeout=0.3)
    with pytest.raises(VolumeInUse):
        volumes.acquire("busy", readonly=True, timeout=0.3)
    # A lease lost while the volume is still mounted (a dead monitor) is noticed too.
    first.release()
    with pytest.raises(VolumeInUse, match="backed by it"):
        volumes.acquire("busy", readonly=False, timeout=0.3)
    box.container.destroy()
    volumes.acquire("busy", readonly=False, timeout=5).release()
