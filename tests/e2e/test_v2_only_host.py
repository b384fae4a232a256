"""The host-side process-isolation tests on a cgroup **v2-only** Debian 12 host, for real.

This machine mounts cgroup v1 controllers (with an empty v2 ``unified`` mount); a stock
Debian 12 host mounts only cgroup2. The guest of a vmshim VM is exactly that: its only
cgroup mount is cgroup2. So the ``hostsuite`` image (images/hostsuite: Debian bookworm with
python3, pytest and busybox-static) runs here as a privileged VM container, with this tree
mounted read-only at its own path, and runs the host cgroup tests of tests/integration
inside it, as root of that "host". One VM, about a minute under TCG.

Left out (and why): the tests that need loop devices (named volumes, device rates on a
loop device, guest.init with loop disks): the minimal guest kernel has no loop driver.
They still run on this machine's own (v1) host in the normal suite.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import vmshim

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
IMAGE = "hostsuite:bookworm"
HOST_TESTS = [
    "tests/integration/test_limits_mounts_host.py",
    "tests/integration/test_runtime_host.py",
    "tests/integration/test_oci_hostcgroup_host.py",
]
NEEDS_LOOP = ["volume", "device_read_bps", "test_init_"]
"""-k words of the tests that make loop devices (no loop driver in the minimal kernel)."""


def test_host_cgroup_tests_pass_inside_a_v2_only_debian_vm(base_images):
    vmshim("image", "bootstrap", "hostsuite", check=True, timeout=900)
    mounts = ["-v", f"{REPO}:{REPO}:ro"]
    if not VENV.is_relative_to(REPO):
        mounts += ["-v", f"{VENV}:{VENV}:ro"]
    deselect = " and ".join(f"not {word}" for word in NEEDS_LOOP)
    # A systemd host keeps its processes in leaf cgroups (the root is exempt from
    # "no internal processes"); the container's cgroup is not a root, so the runner moves
    # itself into a leaf first, as a service's process would be.
    script = (
        "set -e; echo MOUNTS; grep -E ' cgroup2? ' /proc/self/mounts; echo END; "
        "mkdir /sys/fs/cgroup/runner; echo $$ > /sys/fs/cgroup/runner/cgroup.procs; "
        f"cd {REPO}; exec {VENV}/bin/python -m pytest -p no:cacheprovider -q -rA "
        f"-k '{deselect}' {' '.join(HOST_TESTS)}"
    )
    started = time.monotonic()
    proc = vmshim(
        "run",
        "--rm",
        "--privileged",
        "--network",
        "none",
        "-m",
        "1g",
        "--tmpfs",
        "/tmp:exec,size=768m",
        "-e",
        "VMSHIM_STRICT_SKIPS=1",
        "-e",
        "PYTHONDONTWRITEBYTECODE=1",
        *mounts,
        IMAGE,
        "sh",
        "-c",
        script,
        timeout=900,
    )
    took = time.monotonic() - started
    out = proc.stdout.decode(errors="replace")
    print(f"v2-only host tests in a VM: {took:.0f} s\n{out}")
    assert proc.returncode == 0, out[-4000:] + proc.stderr.decode(errors="replace")
    mounts_seen = out.split("MOUNTS\n", 1)[1].split("END\n", 1)[0].splitlines()
    assert mounts_seen and all(line.split()[2] == "cgroup2" for line in mounts_seen), mounts_seen
    # The tests that read host cgroups really ran (and passed) on the v2 layout.
    passed = set(re.findall(r"^PASSED (\S+)", out, re.M))
    for name in (
        "test_cgroup_membership_and_limits",
        "test_update_changes_the_limits_of_a",
        "test_cpuset_reservation_and_swap",
        "test_pids_limit_stops_a_fork_bomb",
        "test_memory_limit_oom_kill_is_reported",
        "test_cpus_half_holds",
        # vmshim-runtime's host cgroup (cgroupsPath) on v2
        "test_cgroups_path_gets_limits_and_a_process_with_every_thread",
        "test_placer_moves_a_process_whose_threads_sit_in_other_cgroups",
    ):
        assert any(name in nodeid for nodeid in passed), (name, sorted(passed))
    assert not re.search(r"^(FAILED|ERROR) ", out, re.M)
