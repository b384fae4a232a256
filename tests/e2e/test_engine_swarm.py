"""Docker Swarm with ``default-runtime: vmshim`` (boots VMs): two private dockerds
(tests/e2e/dockerd.py), each in a network namespace of its own, the two namespaces joined
by a veth pair (two machines on one wire): a manager and a worker. Every task is a microVM.

- ``--replicas 3`` on the manager: three tasks, each answering the guest's kernel; ``scale
  s=5`` adds two; a task whose QEMU is killed (that pid only) is replaced by Swarm;
- an ``--attachable`` overlay network between two ``--endpoint-mode dnsrr`` services: a
  client task on the manager reaches the server's task on the manager and the one on the
  worker (VXLAN between the two namespaces), by address and by name (docker's embedded
  DNS at 127.0.0.11 in each task's namespace, relayed from the guest by the agent); a runc
  container on the same overlay reaches the VMs too; ``--publish mode=host`` answers on
  each node from that node's task;
- a service with a virtual IP (the default endpoint mode) is unreachable from runc as from
  vmshim when the kernel has no IPVS (this host): Swarm's VIPs and its routing mesh are the
  kernel's IPVS, not the runtime's (docs/oci-runtime.md "Swarm").

Both dockerds use the test run's libvirtd and VMSHIM_ROOT (container ids never collide;
the runtime's own state is under each daemon's exec-root). One module-scoped swarm; at
most 5 VMs at once (TCG).
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

import pytest

from shim.containers.vm_placement import domain_name
from shim.oci.state import record_id
from tests.e2e.dockerd import Dockerd, EngineHost, HostLink, missing_docker
from tests.e2e.oci_engines import image_archive, make_workdir, remove_workdir
from tests.e2e.test_engine_networks import HTTPD, VMSHIM_RUNTIME
from tests.waiting import wait_until

pytestmark = [pytest.mark.host_root]

TIMEOUT = 600
"""Seconds a service may take to converge: each task is a VM booting under TCG."""
NETWORK_TIMEOUT = 60
"""Seconds the overlay may take to carry traffic once both ends run (gossip between the
nodes included); a failure is reported after this, with what the guest saw."""
WHO = "mkdir -p /www && echo hello from $(hostname) on $(uname -r) > /www/index.html && exec httpd -f -p 80 -h /www"
"""A busybox httpd answering its task's hostname (the container id's first 12 digits)
and kernel."""
FETCH = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {0} 80"
"""An HTTP GET with busybox nc, which bounds the wait (``-w``): Debian's busybox-static 1.35
``wget -T N`` dies of SIGSEGV before it opens a socket (on the host, under runc and in
the VMs alike), and without ``-T`` a wget that gets no answer waits far longer."""


def _out(proc) -> str:
    return f"rc={proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"


@dataclass
class Swarm:
    manager: Dockerd
    worker: Dockerd


@pytest.fixture(scope="module")
def guest_kernel():
    from shim.guestimage import ensure_guest_image

    kernel = ensure_guest_image().kernel_release
    assert kernel and kernel != os.uname().release
    return kernel


@pytest.fixture(scope="module")
def swarm():
    """A manager and a worker, each a dockerd whose default runtime is vmshim in a network
    namespace of its own; the swarm's addresses are on the link between the two."""
    if missing_docker() is not None:
        pytest.skip(str(missing_docker()))
    workdir = make_workdir("vmshim-sw-")
    tag = os.getpid() % 100000
    try:
        archive = image_archive(workdir / "busybox.tar")
        with (
            EngineHost(f"vmshim-sw-{os.getpid()}", f"vsw{tag}", "10.213.9") as host_a,
            EngineHost(f"vmshim-sx-{os.getpid()}", f"vsx{tag}", "10.213.10") as host_b,
            HostLink(host_a, host_b, "swl0", "10.213.11") as link,
            Dockerd(workdir / "m", VMSHIM_RUNTIME, host_a, default_runtime="vmshim") as m,
            Dockerd(workdir / "w", VMSHIM_RUNTIME, host_b, default_runtime="vmshim") as w,
        ):
            m.load(archive)
            w.load(archive)
            m.docker("swarm", "init", "--advertise-addr", link.address_a, check=True)
            token = m.docker("swarm", "join-token", "-q", "worker", check=True).stdout.strip()
            w.docker(
                "swarm",
                "join",
                "--token",
                token,
                "--advertise-addr",
                link.address_b,
                f"{link.address_a}:2377",
                check=True,
                timeout=120,
            )
            wait_until(
                lambda: m.docker("node", "ls", "--format", "{{.Status}}").stdout.split() == ["Ready", "Ready"],
                120,
                what="both nodes Ready",
            )
            yield Swarm(m, w)
            w.docker("swarm", "leave", "--force", timeout=120)
            m.docker("swarm", "leave", "--force", timeout=120)
    finally:
        remove_workdir(workdir)


def _tasks(d: Dockerd, service: str) -> list[str]:
    """Full ids of *service*'s running containers on *d*'s node."""
    proc = d.docker(
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        f"label=com.docker.swarm.service.name={service}",
        "--filter",
        "status=running",
        timeout=60,
    )
    return proc.stdout.split()


def _converged(d: Dockerd, service: str, n: int) -> list[str] | None:
    ids = _tasks(d, service)
    return ids if len(ids) == n else None


def _qemu_pid(container_id: str) -> int:
    from shim.vm.libvirt_backend import LibvirtBackend

    pid = LibvirtBackend().qemu_pid(domain_name(record_id(container_id)))
    assert pid, f"no QEMU for container {container_id}"
    return pid


def _service(d: Dockerd, *args: str) -> None:
    proc = d.docker("service", "create", "--detach", *args, timeout=120)
    assert proc.returncode == 0, _out(proc) + d.log_tail()


def _remove_services(d: Dockerd, *names: str) -> None:
    d.docker("service", "rm", *names, timeout=120)


def test_swarm_replicas_scale_and_replace_each_task_a_vm(swarm, guest_kernel):
    d = swarm.manager
    _service(d, "--name", "s", "--replicas", "3", "--constraint", "node.role==manager", "busybox", "sh", "-c", HTTPD)
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
    new = wait_until(
        lambda: (lambda now: now if len(now) == 2 and victim not in now else None)(_tasks(d, "s")),
        TIMEOUT,
        what="Swarm replaces the task whose VM was killed",
    )
    replacement = (set(new) - set(ids)).pop()
    out = d.docker("exec", replacement, "uname", "-r", timeout=120)
    assert out.stdout.strip() == guest_kernel, _out(out)
    _remove_services(d, "s")
    wait_until(lambda: not _tasks(d, "s"), TIMEOUT, what="s removed")


def _overlay_ip(d: Dockerd, cid: str) -> str:
    return d.docker(
        "inspect", "-f", '{{(index .NetworkSettings.Networks "ov").IPAddress}}', cid, check=True
    ).stdout.strip()


def _fetch_in(host: EngineHost, url: str) -> str:
    """GET *url* from inside *host*'s namespace ("" when it does not answer yet)."""
    res = subprocess.run(
        host.nsenter("curl", "-sS", "--max-time", "5", url), capture_output=True, text=True, timeout=30
    )
    return res.stdout if res.returncode == 0 else ""


def _body(response: str) -> str:
    """The body of an HTTP response as text mode reads it (CRLF became LF); "" when it is
    not one."""
    return response.partition("\n\n")[2].strip() if response.startswith("HTTP/1.") else ""


def _guest_view(d: Dockerd, cid: str) -> str:
    """What the task's guest sees of its network, for a failure message."""
    out = d.docker("exec", cid, "sh", "-c", "ip -4 addr; ip route; cat /etc/resolv.conf", timeout=60)
    return f"\n--- the client's guest:\n{out.stdout}{out.stderr}"


def _answer(d: Dockerd, cid: str, target: str, timeout: float, what: str) -> str:
    """The body *target* answers to an HTTP GET from task *cid*, retried for *timeout* s;
    fails with *what* and the guest's view of its network."""
    last = ""

    def fetch() -> str:
        nonlocal last
        res = d.docker("exec", cid, "sh", "-c", FETCH.format(target), timeout=60)
        last = _out(res)
        return _body(res.stdout)

    try:
        return wait_until(fetch, timeout, what=what, interval=1)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last try: {last}{_guest_view(d, cid)}") from None


def test_swarm_overlay_dnsrr_between_vms_on_two_nodes(swarm, guest_kernel):
    m, w = swarm.manager, swarm.worker
    m.docker("network", "create", "-d", "overlay", "--attachable", "ov", check=True)
    _service(
        m,
        "--name",
        "web",
        "--network",
        "ov",
        "--endpoint-mode",
        "dnsrr",
        "--publish",
        "mode=host,target=80,published=18090",
        "--replicas",
        "2",
        "--replicas-max-per-node",
        "1",
        "busybox",
        "sh",
        "-c",
        WHO,
    )
    _service(
        m,
        "--name",
        "cli",
        "--network",
        "ov",
        "--endpoint-mode",
        "dnsrr",
        "--constraint",
        "node.role==manager",
        "busybox",
        "sleep",
        "3600",
    )
    try:
        here = wait_until(lambda: _converged(m, "web", 1), TIMEOUT, what="web's manager task")[0]
        there = wait_until(lambda: _converged(w, "web", 1), TIMEOUT, what="web's worker task")[0]
        cli = wait_until(lambda: _converged(m, "cli", 1), TIMEOUT, what="cli running")[0]
        assert _qemu_pid(here) != _qemu_pid(there)  # both VMs, on the shared libvirtd
        ips = {_overlay_ip(m, here): here, _overlay_ip(w, there): there}

        # DNS: the guest's query goes up the agent channel to 127.0.0.11 in cli's namespace
        def resolved() -> bool:
            out = m.docker("exec", cli, "nslookup", "web", "127.0.0.11", timeout=60).stdout
            return all(ip in out for ip in ips)

        try:
            wait_until(
                resolved,
                NETWORK_TIMEOUT,
                what="web's two task addresses from docker's embedded DNS (relayed by the agent)",
                interval=1,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}{_guest_view(m, cli)}") from None

        for ip, cid in ips.items():
            where = "the same node" if cid == here else "the other node (VXLAN)"
            body = _answer(m, cli, ip, NETWORK_TIMEOUT, f"web's task on {where} at {ip}")
            assert body == f"hello from {cid[:12]} on {guest_kernel}"
        body = _answer(m, cli, "web", NETWORK_TIMEOUT, "web by name")
        assert body in {f"hello from {cid[:12]} on {guest_kernel}" for cid in ips.values()}

        # runc on the same overlay (an attachable network takes plain containers) reaches
        # the worker's VM as the VMs do
        there_ip = _overlay_ip(w, there)
        res = m.docker(
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--network",
            "ov",
            "busybox",
            "sh",
            "-c",
            FETCH.format(there_ip),
            timeout=120,
        )
        assert _body(res.stdout) == f"hello from {there[:12]} on {guest_kernel}", _out(res)

        # --publish mode=host (no routing mesh): each node answers with its own task
        for d, cid in ((m, here), (w, there)):
            answer = wait_until(
                lambda d=d: _fetch_in(d.host, "http://127.0.0.1:18090/"),
                NETWORK_TIMEOUT,
                what="the mode=host published port",
            )
            assert answer.strip() == f"hello from {cid[:12]} on {guest_kernel}"
    finally:
        _remove_services(m, "web", "cli")
        wait_until(
            lambda: not (_tasks(m, "web") or _tasks(w, "web") or _tasks(m, "cli")), TIMEOUT, what="web and cli removed"
        )
        m.docker("network", "rm", "ov", timeout=120)


def test_swarm_vip_needs_ipvs_with_runc_as_with_vmshim(swarm, guest_kernel):
    """The default endpoint mode gives the service a virtual IP that only IPVS answers
    (dockerd programs it in each client's namespace). Without IPVS in the kernel (this
    host), a runc client on the overlay reaches the service's VM at its task address but
    not at the VIP: the limit is the kernel's, not vmshim's."""
    m = swarm.manager
    ipvs = os.path.exists("/proc/net/ip_vs")
    m.docker("network", "create", "-d", "overlay", "--attachable", "ovv", check=True)
    _service(m, "--name", "vip", "--network", "ovv", "--constraint", "node.role==manager", "busybox", "sh", "-c", WHO)
    try:
        task = wait_until(lambda: _converged(m, "vip", 1), TIMEOUT, what="vip's task")[0]
        vip = (
            m.docker("service", "inspect", "-f", "{{range .Endpoint.VirtualIPs}}{{.Addr}} {{end}}", "vip", check=True)
            .stdout.split()[0]
            .split("/")[0]
        )
        task_ip = m.docker(
            "inspect", "-f", '{{(index .NetworkSettings.Networks "ovv").IPAddress}}', task, check=True
        ).stdout.strip()
        assert vip != task_ip
        script = f"{FETCH.format(task_ip)}; echo; echo ---; {FETCH.format(vip)}"
        res = m.docker(
            "run", "--rm", "--runtime", "runc", "--network", "ovv", "busybox", "sh", "-c", script, timeout=120
        )
        direct, _, through_vip = res.stdout.partition("\n---\n")
        assert _body(direct) == f"hello from {task[:12]} on {guest_kernel}", _out(res)
        if ipvs:
            assert _body(through_vip) == f"hello from {task[:12]} on {guest_kernel}", _out(res)
        else:
            assert not through_vip.startswith("HTTP/1."), _out(res)  # here: no route to host
    finally:
        _remove_services(m, "vip")
        wait_until(lambda: not _tasks(m, "vip"), TIMEOUT, what="vip removed")
        m.docker("network", "rm", "ovv", timeout=120)
