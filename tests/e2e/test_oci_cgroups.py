"""Boots VMs: the host cgroup of a vmshim-runtime container, through real podman and ctr.

The engine names the cgroup (``linux.cgroupsPath``); the stand-in (the pid the engine
has), QEMU with every thread and its helpers must be in it with the configured limits, the
engine's own statistics must see the VM's memory, libvirt must not move QEMU back, and the
cgroup must be gone once the engine removed the container. Runs on this host's cgroup v1;
the same code on a v2-only host is covered by tests/integration/test_oci_hostcgroup_host.py
inside tests/e2e/test_v2_only_host.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest

from shim.containers.vm_placement import domain_name
from shim.oci.hostcgroup import HOST_TASKS
from shim.oci.state import record_id
from tests.e2e.oci_engines import (
    BUSYBOX_REF,
    Containerd,
    Podman,
    in_private_mount_namespace,
    make_workdir,
    missing_engines,
    remove_workdir,
)
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.vm,
    pytest.mark.host_root,
    pytest.mark.skipif(missing_engines() is not None, reason=str(missing_engines())),
]

VMSHIM_RUNTIME = shutil.which("vmshim-runtime", path=os.path.dirname(sys.executable)) or "vmshim-runtime"
MIB = 1 << 20
V1 = os.path.isdir("/sys/fs/cgroup/memory")


def memory_dir(cgroups_path: str) -> str:
    return ("/sys/fs/cgroup/memory" if V1 else "/sys/fs/cgroup") + cgroups_path


def knob(cgroups_path: str, controller: str, name: str) -> str:
    base = f"/sys/fs/cgroup/{controller}" if V1 else "/sys/fs/cgroup"
    with open(base + cgroups_path + "/" + name) as f:
        return f.read().strip()


def cgroup_of(pid: int, tid: int | None = None) -> str:
    """The memory cgroup (v2: the unified one) of a process or one of its threads."""
    path = f"/proc/{pid}/task/{tid}/cgroup" if tid else f"/proc/{pid}/cgroup"
    with open(path) as f:
        for line in f:
            _, controllers, where = line.rstrip("\n").split(":", 2)
            if (V1 and "memory" in controllers.split(",")) or (not V1 and controllers == ""):
                return where
    return ""


def qemu_pid(oci_id: str) -> int:
    from shim.vm.libvirt_backend import LibvirtBackend

    pid = LibvirtBackend().qemu_pid(domain_name(record_id(oci_id)))
    assert pid, f"no QEMU for container {oci_id}"
    return pid


def assert_vm_in(cgroups_path: str, standin: int, oci_id: str) -> int:
    """The stand-in and every thread of QEMU are in the cgroup; QEMU's pid."""
    assert cgroup_of(standin) == cgroups_path
    qemu = qemu_pid(oci_id)
    threads = os.listdir(f"/proc/{qemu}/task")
    assert len(threads) > 1
    assert {cgroup_of(qemu, int(t)) for t in threads} == {cgroups_path}
    with open(os.path.join(memory_dir(cgroups_path), "cgroup.procs")) as f:
        assert {standin, qemu} <= {int(p) for p in f.read().split()}
    return qemu


@pytest.fixture(scope="module")
def workdir():
    from shim.guestimage import ensure_guest_image

    ensure_guest_image()
    path = make_workdir()
    yield path
    remove_workdir(path)


def test_podman_vm_is_in_its_cgroup_with_limits_and_stats(workdir, busybox_archive):
    with Podman(VMSHIM_RUNTIME, workdir / "p") as podman:
        assert podman.load(busybox_archive) == BUSYBOX_REF
        proc = podman.podman(
            "run",
            "-d",
            *podman.run_args(),
            "--name",
            "cg",
            "--memory",
            "512m",
            "--pids-limit",
            "100",
            BUSYBOX_REF,
            "sleep",
            "600",
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        oci_id = proc.stdout.strip()
        config = podman.podman("inspect", "--format", "{{.OCIConfigPath}}", "cg").stdout.strip()
        with open(config) as f:
            cgroups_path = json.load(f)["linux"]["cgroupsPath"]
        assert cgroups_path.startswith(f"/{podman.cgroup_parent}/")
        standin = int(podman.podman("inspect", "--format", "{{.State.Pid}}", "cg").stdout)
        qemu = assert_vm_in(cgroups_path, standin, oci_id)
        if V1:
            assert knob(cgroups_path, "memory", "memory.limit_in_bytes") == str(512 * MIB)
        else:
            assert knob(cgroups_path, "memory", "memory.max") == str(512 * MIB)
        assert knob(cgroups_path, "pids", "pids.max") == str(100 + HOST_TASKS)
        usage = int(knob(cgroups_path, "memory", "memory.usage_in_bytes" if V1 else "memory.current"))
        print(f"host cgroup memory with a 512m container: {usage / MIB:.0f} MiB")

        stats = podman.podman("stats", "--no-stream", "--format", "json", "cg", timeout=60)
        assert stats.returncode == 0, stats.stderr
        print(stats.stdout)
        entry = json.loads(stats.stdout)[0]
        mem = next(v for k, v in entry.items() if k.lower().replace("_", "") == "memusage")
        number = float(re.match(r"\s*([0-9.]+)", mem).group(1))
        assert number > 0, entry

        # An exec goes through the VM again; libvirt has not moved QEMU back meanwhile.
        res = podman.podman("exec", "cg", "true", timeout=120)
        assert res.returncode == 0, res.stderr
        assert all(cgroup_of(qemu, int(t)) == cgroups_path for t in os.listdir(f"/proc/{qemu}/task"))

        assert podman.podman("rm", "-f", "-t", "0", "cg", timeout=120).returncode == 0
        wait_until(lambda: not os.path.exists(memory_dir(cgroups_path)), 30, "the container's cgroup is removed")
        assert not os.path.exists(f"/proc/{qemu}") or cgroup_of(qemu) != cgroups_path

        # The VM is sized to fit the limit: a process going over the container's memory is
        # killed by the guest's OOM killer; the host's never kills the VM.
        script = "dd if=/dev/zero of=/big/f bs=64M count=4 2>/dev/null; echo rc=$?; sleep 600"
        proc = podman.podman(
            "run",
            "-d",
            *podman.run_args(),
            "--name",
            "oom",
            "--memory",
            "300m",
            "--tmpfs",
            "/big:size=256m",
            BUSYBOX_REF,
            "sh",
            "-c",
            script,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        oci_id = proc.stdout.strip()
        config = podman.podman("inspect", "--format", "{{.OCIConfigPath}}", "oom").stdout.strip()
        with open(config) as f:
            cgroups_path = json.load(f)["linux"]["cgroupsPath"]
        logs = wait_until(lambda: "rc=" in (out := podman.podman("logs", "oom").stdout) and out, 180, "dd ends")
        assert "rc=137" in logs, logs
        qemu = qemu_pid(oci_id)
        assert cgroup_of(qemu) == cgroups_path
        if V1:
            peak = int(knob(cgroups_path, "memory", "memory.max_usage_in_bytes"))
            oom = knob(cgroups_path, "memory", "memory.oom_control")
            assert "oom_kill 0" in oom, oom
        else:
            peak = int(knob(cgroups_path, "memory", "memory.peak"))
            assert "oom_kill 0" in knob(cgroups_path, "memory", "memory.events")
        print(f"host cgroup peak with a 300m container that hit its limit: {peak / MIB:.0f} MiB")
        assert peak <= 300 * MIB
        assert podman.podman("rm", "-f", "-t", "0", "oom", timeout=120).returncode == 0


def test_ctr_task_metrics_see_the_vm(workdir, busybox_archive):
    if not in_private_mount_namespace():
        pytest.skip("containerd needs a private mount namespace (scripts/test makes one)")
    with Containerd(workdir / "c", VMSHIM_RUNTIME) as containerd:
        assert containerd.import_image(busybox_archive) == BUSYBOX_REF
        proc = containerd.ctr(
            "run",
            "-d",
            *containerd.run_args(),
            "--memory-limit",
            str(384 * MIB),
            BUSYBOX_REF,
            "h-cg",
            "sleep",
            "600",
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        cgroups_path = f"/{containerd.namespace}/h-cg"
        try:
            pid = int(re.search(r"^h-cg\s+(\d+)", containerd.ctr("task", "ls").stdout, re.M).group(1))
            assert_vm_in(cgroups_path, pid, "h-cg")
            metrics = containerd.ctr("task", "metrics", "h-cg", timeout=60)
            assert metrics.returncode == 0, metrics.stderr
            print(metrics.stdout)
            usage = re.search(r"^memory\.usage(?:_in_bytes)?\s+(\d+)", metrics.stdout, re.M)
            assert usage and int(usage.group(1)) > 0, metrics.stdout
        finally:
            containerd.ctr("task", "kill", "--signal", "SIGKILL", "h-cg")
            wait_until(lambda: "STOPPED" in containerd.ctr("task", "ls").stdout, 60, "the task stops")
            containerd.ctr("task", "delete", "h-cg")
            containerd.ctr("container", "delete", "h-cg")
        wait_until(lambda: not os.path.exists(memory_dir(cgroups_path)), 30, "the container's cgroup is removed")
