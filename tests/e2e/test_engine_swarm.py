"""Docker Swarm with ``default-runtime: vmshim`` (boots VMs): one private dockerd
(tests/e2e/dockerd.py) in a network namespace of its own, made a single-node swarm; every
task of a service is a microVM.

- ``--replicas 3``: three tasks, each answering the guest's kernel; ``scale s=5`` adds two;
  a task whose QEMU is killed (that pid only) is replaced by Swarm;
- an attachable overlay network carrying traffic between two ``--endpoint-mode dnsrr``
  services, the server published with ``mode=host`` (no ingress: this kernel has no IPVS,
  see docs/oci-runtime.md "Swarm").

One module-scoped swarm; at most 5 VMs at once (TCG).
"""

from __future__ import annotations

import os
import signal

import pytest

from shim.containers.vm_placement import domain_name
from shim.oci.state import record_id
from tests.e2e.dockerd import Dockerd, EngineHost, missing_docker
from tests.e2e.oci_engines import image_archive, make_workdir, remove_workdir
from tests.e2e.test_engine_networks import HTTPD, VMSHIM_RUNTIME
from tests.waiting import wait_until

pytestmark = [pytest.mark.host_root]

TIMEOUT = 600
"""Seconds a service may take to converge: each task is a VM booting under TCG."""


def _out(proc) -> str:
    return f"rc={proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"


@pytest.fixture(scope="module")
def guest_kernel():
    from shim.guestimage import ensure_guest_image

    kernel = ensure_guest_image().kernel_release
    assert kernel and kernel != os.uname().release
    return kernel


@pytest.fixture(scope="module")
def swarm():
    """A single-node swarm on a dockerd whose default runtime is vmshim."""
    if missing_docker() is not None:
        pytest.skip(str(missing_docker()))
    workdir = make_workdir("vmshim-sw-")
    try:
        archive = image_archive(workdir / "busybox.tar")
        with EngineHost(f"vmshim-sw-{os.getpid()}", f"vsw{os.getpid() % 100000}",
                        "10.213.9") as host, \
                Dockerd(workdir / "d", VMSHIM_RUNTIME, host, default_runtime="vmshim") as d:
            d.load(archive)
            d.docker("swarm", "init", "--advertise-addr", host.address, check=True)
            yield d
            d.docker("swarm", "leave", "--force", timeout=120)
    finally:
        remove_workdir(workdir)


def _tasks(d: Dockerd, service: str) -> list[str]:
    """Full ids of *service*'s running containers."""
    proc = d.docker("ps", "-q", "--no-trunc", "--filter",
                    f"label=com.docker.swarm.service.name={service}", "--filter",
                    "status=running", timeout=60)
    return proc.stdout.split()


def _converged(d: Dockerd, service: str, n: int) -> list[str] | None:
    ids = _tasks(d, service)
    return ids if len(ids) == n else None


def _qemu_pid(container_id: str) -> int:
    from shim.vm.libvirt_backend import LibvirtBackend

    pid = LibvirtBackend().qemu_pid(domain_name(record_id(container_id)))
    assert pid, f"no QEMU for container {container_id}"
    return pid


def test_swarm_replicas_scale_and_replace_each_task_a_vm(swarm, guest_kernel):
    d = swarm
    proc = d.docker("service", "create", "--detach", "--name", "s", "--replicas", "3",
                    "busybox", "sh", "-c", HTTPD, timeout=120)
    assert proc.returncode == 0, _out(proc) + d.log_tail()
    ids = wait_until(lambda: _converged(d, "s", 3), TIMEOUT, what="3 tasks of s running")
    qemus = set()
    for cid in ids:
        out = d.docker("exec", cid, "uname", "-r", timeout=120)
        assert out.stdout.strip() == guest_kernel, _out(out)
        qemus.add(_qemu_pid(cid))
    assert len(qemus) == 3  # each task its own VM

    proc = d.docker("service", "scale", "--detach", "s=5", timeout=120)
    assert proc.returncode == 0, _out(proc)
    ids = wait_until(lambda: _converged(d, "s", 5), TIMEOUT, what="5 tasks of s running")
    assert len({_qemu_pid(c) for c in ids}) == 5

    proc = d.docker("service", "scale", "--detach", "s=2", timeout=120)
    assert proc.returncode == 0, _out(proc)
    ids = wait_until(lambda: _converged(d, "s", 2), TIMEOUT, what="s back to 2 tasks")
    victim = ids[0]
    os.kill(_qemu_pid(victim), signal.SIGKILL)  # that QEMU only
    new = wait_until(lambda: (lambda now: now if len(now) == 2 and victim not in now else None)(
        _tasks(d, "s")), TIMEOUT, what="Swarm replaces the task whose VM was killed")
    replacement = (set(new) - set(ids)).pop()
    out = d.docker("exec", replacement, "uname", "-r", timeout=120)
    assert out.stdout.strip() == guest_kernel, _out(out)
    d.docker("service", "rm", "s", check=True, timeout=120)
    wait_until(lambda: not _tasks(d, "s"), TIMEOUT, what="s removed")
