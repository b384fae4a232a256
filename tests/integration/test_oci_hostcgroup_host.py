"""shim.oci.hostcgroup on this host's real cgroups, as root (v1 here; v2 in the v2-only
Debian VM of tests/e2e/test_v2_only_host.py): a cgroupsPath gets its directories and
limits, a process moves in with every thread (also threads pinned elsewhere, as libvirt
pins vCPU threads), a busy path is refused, and removal leaves nothing.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from shim.oci import hostcgroup
from shim.oci.hostcgroup import CgroupPathError, Hierarchies, HostLimits, VmPlacer

pytestmark = [
    pytest.mark.host_root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups)"),
]

MIB = 1 << 20
THREADS = (
    "import threading, time\n"
    "for _ in range(3): threading.Thread(target=time.sleep, args=(120,), daemon=True).start()\n"
    "print('up', flush=True); time.sleep(120)\n"
)


@pytest.fixture
def top():
    """A fresh top-level name; every directory below it is removed afterwards."""
    name = f"vmshim-itest-{secrets.token_hex(4)}"
    yield name
    hier = Hierarchies.detect()
    for mountpoint in hier.mounts:
        base = os.path.join(mountpoint, name)
        for dirpath, _, _ in sorted(os.walk(base), key=lambda t: -len(t[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
        assert not os.path.exists(base), f"{base} left behind"


@pytest.fixture
def threaded():
    """A process with four threads (stands in for QEMU)."""
    proc = subprocess.Popen([sys.executable, "-c", THREADS], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"up\n"
    yield proc
    proc.kill()
    proc.wait()


def _read(directory: str, knob: str) -> str:
    with open(os.path.join(directory, knob)) as f:
        return f.read().strip()


def test_cgroups_path_gets_limits_and_a_process_with_every_thread(top, threaded):
    target = hostcgroup.parse_path(f"/{top}/ctr-1", "ctr-1")
    limits = hostcgroup.host_limits(
        {
            "memory": {"limit": 300 * MIB, "reservation": 100 * MIB},
            "cpu": {"quota": 50000, "period": 100000, "shares": 512, "cpus": "0", "mems": "0"},
            "pids": {"limit": 100},
        }
    )
    cgroup = hostcgroup.create(target, limits, pid=threaded.pid)
    assert len(os.listdir(f"/proc/{threaded.pid}/task")) >= 4
    assert cgroup.holds(threaded.pid)
    assert threaded.pid in cgroup.procs()
    if cgroup.version == 2:
        directory = cgroup.paths["unified"]
        assert directory.endswith(f"/{top}/ctr-1")
        assert _read(directory, "memory.max") == str(300 * MIB)
        assert _read(directory, "cpu.max") == "50000 100000"
        assert _read(directory, "pids.max") == str(100 + hostcgroup.HOST_TASKS)
        assert _read(directory, "cpuset.cpus") == "0"
        assert _read(directory, "cpu.weight") == "20"  # runc's conversion of 512 shares
    else:
        assert _read(cgroup.paths["memory"], "memory.limit_in_bytes") == str(300 * MIB)
        assert _read(cgroup.paths["cpu"], "cpu.cfs_quota_us") == "50000"
        assert _read(cgroup.paths["cpu"], "cpu.shares") == "512"
        assert _read(cgroup.paths["pids"], "pids.max") == str(100 + hostcgroup.HOST_TASKS)
        assert _read(cgroup.paths["cpuset"], "cpuset.cpus") == "0"
        assert _read(cgroup.paths["cpuset"], "cpuset.mems") == "0"
    # A second container on the same busy path is refused, and leaves the first alone.
    with pytest.raises(CgroupPathError, match="already holds processes"):
        hostcgroup.create(target, HostLimits(), pid=os.getpid())
    assert cgroup.holds(threaded.pid)
    threaded.kill()
    threaded.wait()
    cgroup.remove(wait=5)
    assert not any(os.path.exists(d) for d in cgroup.directories)


def test_placer_moves_a_process_whose_threads_sit_in_other_cgroups(top, threaded):
    """libvirt puts QEMU in its machine cgroup and, on v1, each vCPU thread in a cgroup of
    its own: every thread must end up in the container's cgroup."""
    hier = Hierarchies.detect()
    elsewhere = hostcgroup.create(hostcgroup.parse_path(f"/{top}/libvirt", "x"), HostLimits(), pid=threaded.pid)
    if hier.version == 1:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{threaded.pid}/task"))
        vcpu = hostcgroup.create(hostcgroup.parse_path(f"/{top}/libvirt-vcpu0", "x"), HostLimits())
        for directory in vcpu.directories:
            with open(os.path.join(directory, "tasks"), "w") as f:
                f.write(str(tids[-1]))
    ours = hostcgroup.create(hostcgroup.parse_path(f"/{top}/ctr-2", "ctr-2"), HostLimits())

    class Probe:
        def running_qemu(self, domain):
            return threaded.pid

        def processes(self, domain, qemu_pid):
            return [qemu_pid]

    placer = VmPlacer(ours, "vmshim-test", probe=Probe())
    assert not ours.holds(threaded.pid)
    assert placer.tick()
    assert placer.finish() == [threaded.pid]
    assert ours.holds(threaded.pid)
    assert elsewhere.procs() == []
    threaded.kill()
    threaded.wait()
    deadline = time.monotonic() + 5
    while ours.procs() and time.monotonic() < deadline:
        time.sleep(0.05)
    for group in [ours, elsewhere] + ([vcpu] if hier.version == 1 else []):
        group.remove(wait=5)


def test_a_cgroups_path_through_an_interface_file_is_refused(top):
    hier = Hierarchies.detect()
    knob = "cgroup.procs"
    with pytest.raises(CgroupPathError):
        hostcgroup.create(hostcgroup.parse_path(f"/{knob}/x", "x"), HostLimits(), hierarchies=hier)
    with pytest.raises(CgroupPathError, match="not a cgroup"):
        hostcgroup.create(hostcgroup.parse_path(f"/{knob}", "x"), HostLimits(), hierarchies=hier)
