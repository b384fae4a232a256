"""Engines' networks through vmshim-runtime (boots VMs): the engine prepares the container's
network namespace on the host as it does for runc, and the VM is plugged into it.

- a private dockerd (tests/e2e/dockerd.py) in a network namespace of its own: on the
  default bridge the guest's kernel answers, outbound reaches a server on the test
  namespace's address, ``-p 127.0.0.1:P:80`` reaches a busybox httpd in the VM; on a user
  network two vmshim containers reach each other by name (docker's embedded DNS at
  127.0.0.11, relayed from the guest over the agent channel);
- podman with its default network (CNI's bridge on this host) and ``-p``, outbound too.

The image is the busybox ``vmshim save`` exports, loaded into each engine: no registry.
Preconditions: root, docker.io and podman installed (skipped otherwise), run the way
scripts/lib/test-in-namespace runs the suite (private mount namespace, a network
namespace of its own with libvirtd in it).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest

from tests.e2e.dockerd import Dockerd, EngineHost, missing_docker
from tests.e2e.oci_engines import (
    BUSYBOX_REF,
    Podman,
    make_workdir,
    missing_engines,
    remove_workdir,
)
from tests.waiting import wait_until

VMSHIM_RUNTIME = shutil.which("vmshim-runtime", path=os.path.dirname(sys.executable)) or "vmshim-runtime"
HTTPD = "mkdir -p /www && echo hello from $(uname -r) > /www/index.html && exec httpd -f -p 80 -h /www"
"""A busybox httpd answering its kernel release."""

pytestmark = [pytest.mark.host_root]


def _out(proc) -> str:
    return f"rc={proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"


@pytest.fixture(scope="module")
def workdir():
    path = make_workdir("vmshim-en-")
    yield path
    remove_workdir(path)


@pytest.fixture(scope="module")
def outside_server():
    """An HTTP server on the test namespace's side of every EngineHost's veth (it listens
    on all addresses of the test namespace): what "outbound" reaches."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = f"outside says hi to {self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _fetch_in(host: EngineHost, url: str) -> str:
    """GET *url* from inside *host*'s namespace ("" when it does not answer yet)."""
    res = subprocess.run(
        host.nsenter("curl", "-sS", "--max-time", "5", url), capture_output=True, text=True, timeout=30
    )
    return res.stdout if res.returncode == 0 else ""


# --- dockerd --------------------------------------------------------------------------------


@contextlib.contextmanager
def _engine_host(why_not: str | None, tag: str, prefix: str):
    """The EngineHost (see EngineHost.of_this_run) for an engine; skips the tests that
    need it with *why_not*, the engine's reason it cannot run here."""
    if why_not is not None:
        pytest.skip(why_not)
    with EngineHost.of_this_run(tag, prefix) as host:
        yield host


@pytest.fixture(scope="module")
def dockerd(workdir, busybox_archive):
    """dockerd in its EngineHost (``docker_host``)."""
    with (
        _engine_host(missing_docker(), "dk", "10.213.7") as host,
        Dockerd(workdir / "d", VMSHIM_RUNTIME, host) as engine,
    ):
        engine.load(busybox_archive)
        yield engine


@pytest.fixture(scope="module")
def docker_host(dockerd):
    return dockerd.host


def test_docker_default_bridge_guest_kernel_and_outbound(dockerd, docker_host, guest_kernel, outside_server):
    url = f"http://{docker_host.gateway}:{outside_server}/"
    proc = dockerd.docker(
        "run",
        "--rm",
        "--runtime",
        "vmshim",
        "busybox",
        "sh",
        "-c",
        f"uname -r; cat /sys/class/net/eth0/address; wget -qO- {url}",
    )
    assert proc.returncode == 0, _out(proc) + dockerd.log_tail()
    kernel, mac, answer = proc.stdout.splitlines()[:3]
    assert kernel == guest_kernel
    assert mac.startswith("02:42:")  # docker's MAC, given to the guest's NIC
    # the guest's connection was NATed by docker's bridge out of the engine host
    assert answer == f"outside says hi to {docker_host.address}"


def test_docker_published_port_answers_from_the_vm(dockerd, docker_host, guest_kernel):
    proc = dockerd.docker("run", "-d", "--runtime", "vmshim", "-p", "127.0.0.1:18080:80", "busybox", "sh", "-c", HTTPD)
    assert proc.returncode == 0, _out(proc) + dockerd.log_tail()
    cid = proc.stdout.strip()
    try:
        answer = wait_until(
            lambda: _fetch_in(docker_host, "http://127.0.0.1:18080/"), 180, "the published port to answer"
        )
        assert answer == f"hello from {guest_kernel}\n"
    finally:
        dockerd.docker("rm", "-f", cid)


def test_docker_user_network_names_resolve_between_vms(dockerd, guest_kernel):
    dockerd.docker("network", "create", "vmnet", check=True)
    try:
        proc = dockerd.docker(
            "run", "-d", "--runtime", "vmshim", "--network", "vmnet", "--name", "web", "busybox", "sh", "-c", HTTPD
        )
        assert proc.returncode == 0, _out(proc) + dockerd.log_tail()

        def fetch() -> str:
            res = dockerd.docker(
                "run",
                "--rm",
                "--runtime",
                "vmshim",
                "--network",
                "vmnet",
                "busybox",
                "sh",
                "-c",
                "nslookup web 127.0.0.11 >&2; wget -qO- http://web/",
            )
            return res.stdout if res.returncode == 0 else ""

        assert wait_until(fetch, 240, "web by name from another VM", interval=1) == f"hello from {guest_kernel}\n"
    finally:
        dockerd.docker("rm", "-f", "web")
        dockerd.docker("network", "rm", "vmnet")


def test_docker_single_file_binds_do_not_share_the_container_directory(dockerd):
    """Hostile guest: docker binds /etc/hosts, /etc/resolv.conf and /etc/hostname as single
    files out of /var/lib/docker/containers/<id>/, next to config.v2.json (the env's
    secrets). Root in the container (CAP_SYS_ADMIN) mounts every virtiofs share of the VM
    itself: each holds one file, never that directory."""
    script = (
        "for t in 0 1 2 3 4 5 6 7; do mkdir -p /m/$t; "
        "mount -t virtiofs vmshim-b$t /m/$t 2>/dev/null && echo mounted $t; done; "
        "ls -laR /m"
    )
    proc = dockerd.docker(
        "run",
        "--rm",
        "--runtime",
        "vmshim",
        "--cap-add",
        "SYS_ADMIN",
        "--security-opt",
        "seccomp=unconfined",
        "-e",
        "PASSWORD=hunter2",
        "busybox",
        "sh",
        "-c",
        script,
    )
    assert proc.returncode == 0, _out(proc)
    assert "mounted 0" in proc.stdout  # the guest's root can reach the shares…
    for sibling in ("config.v2.json", "hostconfig.json", "resolv.conf.hash", "mounts"):
        assert sibling not in proc.stdout  # …and sees nothing but the bound files


def test_docker_network_connect_follows_into_the_running_vm(dockerd):
    """The interface docker adds to the running container's namespace gets a tap and a NIC
    hot-plugged into the VM; the guest takes its address and reaches that network; after
    disconnect the NIC leaves the VM."""
    dockerd.docker("network", "create", "--subnet", "10.77.0.0/24", "late", check=True)
    try:
        proc = dockerd.docker("run", "-d", "--runtime", "vmshim", "--name", "joiner", "busybox", "sleep", "1d")
        assert proc.returncode == 0, _out(proc) + dockerd.log_tail()
        dockerd.docker("network", "connect", "late", "joiner", check=True)
        ip = dockerd.docker(
            "inspect", "-f", "{{.NetworkSettings.Networks.late.IPAddress}}", "joiner", check=True
        ).stdout.strip()
        assert ip.startswith("10.77.0.")
        wait_until(
            lambda: f"inet {ip}/24" in dockerd.docker("exec", "joiner", "ip", "-4", "-o", "addr").stdout,
            120,
            "the connected network's address in the guest",
            interval=1,
        )
        proc = dockerd.docker("exec", "joiner", "ping", "-c", "1", "-W", "5", "10.77.0.1")
        assert proc.returncode == 0, _out(proc)
        # and disconnect takes that NIC out of the VM again
        dockerd.docker("network", "disconnect", "late", "joiner", check=True)
        wait_until(
            lambda: f"inet {ip}/24" not in dockerd.docker("exec", "joiner", "ip", "-4", "-o", "addr").stdout,
            120,
            "the disconnected network's NIC to leave the guest",
            interval=1,
        )
        proc = dockerd.docker("exec", "joiner", "true")
        assert proc.returncode == 0, _out(proc)
    finally:
        dockerd.docker("rm", "-f", "joiner")
        dockerd.docker("network", "rm", "late")


# --- podman ---------------------------------------------------------------------------------


class NetPodman(Podman):
    """Podman (tests.e2e.oci_engines) run inside an EngineHost, with its default network."""

    def __init__(self, runtime: str, workdir, host: EngineHost):
        super().__init__(runtime, workdir)
        self.host = host

    def command(self, *args: str) -> list[str]:
        return self.host.nsenter(*super().command(*args))


@pytest.fixture(scope="module")
def podman(workdir, busybox_archive):
    """podman in its EngineHost (``podman_host``)."""
    with (
        _engine_host(missing_engines(), "pm", "10.213.8") as host,
        NetPodman(VMSHIM_RUNTIME, workdir / "p", host) as engine,
    ):
        assert engine.load(busybox_archive) == BUSYBOX_REF
        yield engine


@pytest.fixture(scope="module")
def podman_host(podman):
    return podman.host


def test_podman_default_network_port_and_outbound(podman, podman_host, guest_kernel, outside_server):
    common = ["--pull", "never", "--cgroup-parent", "/" + podman.cgroup_parent]
    proc = podman.podman("run", "-d", *common, "-p", "127.0.0.1:18081:80", BUSYBOX_REF, "sh", "-c", HTTPD, timeout=300)
    assert proc.returncode == 0, _out(proc)
    answer = wait_until(
        lambda: _fetch_in(podman_host, "http://127.0.0.1:18081/"), 180, "podman's published port to answer"
    )
    assert answer == f"hello from {guest_kernel}\n"
    url = f"http://{podman_host.gateway}:{outside_server}/"
    proc = podman.podman("run", "--rm", *common, BUSYBOX_REF, "wget", "-qO-", url, timeout=300)
    assert proc.returncode == 0, _out(proc)
    assert proc.stdout == f"outside says hi to {podman_host.address}\n"


# --- vmshim bench ---------------------------------------------------------------------------


def test_bench_engine_network_vmshim_next_to_runc(tmp_path):
    """`vmshim bench --only engine_network`: round trip and throughput on dockerd's bridge,
    --runtime vmshim next to runc, both measured (its own dockerd, removed after)."""
    import json

    from tests.e2e.conftest import vmshim

    if missing_docker() is not None:
        pytest.skip(str(missing_docker()))
    out = tmp_path / "bench"
    proc = vmshim("bench", "--runs", "2", "--only", "engine_network", "--output", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    print(proc.stdout.decode(errors="replace"))  # the table, in the log
    figures = json.loads((out / "results.json").read_text())["figures"]
    for name in ("engine_rtt", "engine_throughput"):
        for subject in ("oci", "runc"):
            result = figures[name]["subjects"][subject]
            assert len(result.get("samples", [])) == 2, (name, subject, result)
    assert not [p for p in os.listdir("/run/netns") if p.startswith("vmshim-bench-")]


def _qemus_of(*oci_ids: str) -> list[int]:
    """The QEMU processes running the VMs of these vmshim-runtime containers (by domain
    name, ``-name guest=vmshim-<record id>``; other VMs on the machine are not counted)."""
    from shim.oci.state import record_id

    names = {f"guest=vmshim-{record_id(i)[:12]}".encode() for i in oci_ids}
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and b"qemu-system" in argv[0] and any(a.split(b",")[0] in names for a in argv):
                out.append(int(entry))
    return out


def _host_boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


POD_HTTPD = "mkdir -p /www && cat /proc/sys/kernel/random/boot_id > /www/index.html && exec httpd -f -p 80 -h /www"
"""A busybox httpd answering its kernel's boot id."""


@pytest.fixture(scope="module")
def pod_infra(podman) -> str:
    """The pods' infra image: busybox whose command sleeps (podman 4.3's --infra-command
    takes one word, and this host has no catatonit for podman's own pause image)."""
    proc = podman.podman("create", "--name", "infra-src", BUSYBOX_REF, "sleep", "1000000")
    assert proc.returncode == 0, _out(proc)
    proc = podman.podman("commit", "--change", 'CMD ["sleep","1000000"]', "infra-src", "localhost/vmshim-pod-infra")
    assert proc.returncode == 0, _out(proc)
    podman.podman("rm", "infra-src", check=True)
    return "localhost/vmshim-pod-infra"


_UNLIMITED_POD: dict[str, int] = {}
"""MemTotal (kB) and nproc a member of the pod without limits saw (the test above)."""
POD_SIZE = "grep MemTotal /proc/meminfo; nproc"


def _vm_size_seen(podman, container: str) -> dict[str, int]:
    """The VM's size as a pod member sees it: MemTotal in kB and nproc."""
    proc = podman.podman("exec", container, "sh", "-c", POD_SIZE, timeout=120)
    assert proc.returncode == 0, _out(proc)
    words = proc.stdout.split()
    assert len(words) == 4 and words[0] == "MemTotal:" and words[2] == "kB", _out(proc)
    return {"memtotal_kb": int(words[1]), "nproc": int(words[3])}


def test_podman_pod_members_share_the_sandboxs_vm(podman, podman_host, pod_infra):
    """``podman pod create -p``: the infra container boots the pod's VM; members (``--pod``)
    run inside it with their own rootfs and process, sharing its localhost: one QEMU, one
    guest kernel (its boot id) for all, and the published port answers from the host."""
    common = ["--pull", "never"]
    infra = ""
    proc = podman.podman(
        "pod",
        "create",
        "--name",
        "vpod",
        "-p",
        "127.0.0.1:18082:80",
        "--cgroup-parent",
        "/" + podman.cgroup_parent,
        "--infra-image",
        pod_infra,
        timeout=120,
    )
    assert proc.returncode == 0, _out(proc)
    try:
        proc = podman.podman(
            "run", "-d", *common, "--pod", "vpod", "--name", "web", BUSYBOX_REF, "sh", "-c", POD_HTTPD, timeout=300
        )
        assert proc.returncode == 0, _out(proc)
        infra = podman.podman("pod", "inspect", "--format", "{{.InfraContainerID}}", "vpod").stdout.strip()
        proc = podman.podman("exec", infra, "cat", "/proc/sys/kernel/random/boot_id")
        assert proc.returncode == 0, _out(proc)
        sandbox_boot = proc.stdout.strip()
        assert sandbox_boot and sandbox_boot != _host_boot_id()
        proc = podman.podman(
            "run",
            *common,
            "--pod",
            "vpod",
            "--name",
            "client",
            BUSYBOX_REF,
            "sh",
            "-c",
            "test ! -e /www || exit 8; cat /proc/sys/kernel/random/boot_id; echo $$; "
            "for i in $(seq 60); do wget -qO- http://127.0.0.1/ && exit 0; sleep 1; done; "
            "exit 9",
            timeout=300,
        )
        assert proc.returncode == 0, _out(proc)
        client_boot, client_pid, served = proc.stdout.split()
        # the member's own pid namespace and rootfs (no /www of the web member's); the
        # same guest kernel as the sandbox and the web member, whose httpd it reached over
        # the pod's localhost
        assert client_pid == "1"
        assert client_boot == sandbox_boot == served
        answer = wait_until(
            lambda: _fetch_in(podman_host, "http://127.0.0.1:18082/"), 120, "the pod's published port to answer"
        )
        assert answer.strip() == sandbox_boot
        ids = [podman.podman("inspect", "--format", "{{.Id}}", name).stdout.strip() for name in ("web", "client")]
        pod_qemus = _qemus_of(infra, *ids)
        assert len(pod_qemus) == 1 and pod_qemus == _qemus_of(infra), "the pod must run in one VM, the sandbox's"
        podman.podman("rm", "client", check=True)
        # exec into a member: its rootfs (/www), its pid namespace (PID 1 is its httpd)
        # and cgroup, the pod's kernel; stdin in, exit status out
        proc = podman.podman(
            "exec",
            "-i",
            "web",
            "sh",
            "-c",
            'test "$(cat /proc/self/cgroup)" = "$(cat /proc/1/cgroup)" || exit 3; '
            "cat /proc/1/comm; cat /www/index.html; cat; exit 7",
            input="from-stdin\n",
            timeout=120,
        )
        assert proc.returncode == 7, _out(proc)
        assert proc.stdout.split() == ["httpd", sandbox_boot, "from-stdin"], _out(proc)
        proc = podman.podman("exec", infra, "test", "-e", "/www")
        assert proc.returncode == 1, "an exec into the sandbox stays in the sandbox: " + _out(proc)
        _UNLIMITED_POD.update(_vm_size_seen(podman, "web"))
        # podman's pod shares uts and ipc: the member is in the sandbox's, not the VM's
        # own nor one of its own; its mount and pid namespaces stay its own
        show = "for ns in uts ipc mnt pid; do readlink /proc/self/ns/$ns; done"
        in_web = podman.podman("exec", "web", "sh", "-c", show, check=True).stdout.split()
        in_infra = podman.podman("exec", infra, "sh", "-c", show, check=True).stdout.split()
        assert in_web[:2] == in_infra[:2], (in_web, in_infra)
        assert in_web[2] != in_infra[2] and in_web[3] != in_infra[3], (in_web, in_infra)
        # pause a member: its cgroup in the VM is frozen (its httpd does not answer over
        # the pod's localhost) while the sandbox runs on; unpause thaws it
        proc = podman.podman("pause", "web", timeout=120)
        assert proc.returncode == 0, _out(proc)
        assert podman.podman("inspect", "--format", "{{.State.Status}}", "web").stdout.strip() == "paused"
        # (busybox's timeout, not wget -T, whose alarm handler crashes with SIGSEGV)
        fetch = "timeout 5 wget -qO- http://127.0.0.1/"
        proc = podman.podman("exec", infra, "sh", "-c", fetch, timeout=120)
        assert proc.returncode != 0 and sandbox_boot not in proc.stdout, "a paused member must not serve: " + _out(proc)
        proc = podman.podman("unpause", "web", timeout=120)
        assert proc.returncode == 0, _out(proc)
        assert podman.podman("inspect", "--format", "{{.State.Status}}", "web").stdout.strip() == "running"
        proc = podman.podman(
            "exec",
            infra,
            "sh",
            "-c",
            f"for i in $(seq 30); do {fetch} && exit 0; sleep 1; done; exit 9",
            timeout=120,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == sandbox_boot, _out(proc)
        proc = podman.podman("stop", "--time", "2", "web", timeout=120)
        assert proc.returncode == 0, _out(proc)
        status = podman.podman("inspect", "--format", "{{.State.Status}}", "web").stdout
        assert status.strip() == "exited"
        proc = podman.podman("exec", infra, "true")
        assert proc.returncode == 0, "the sandbox outlives its members: " + _out(proc)
    finally:
        proc = podman.podman("pod", "rm", "--force", "vpod", timeout=300)
        assert proc.returncode == 0, _out(proc)
    wait_until(lambda: not _qemus_of(infra), 60, "the pod's VM to go")


def test_podman_pod_limits_size_the_sandboxs_vm(podman, pod_infra):
    """``podman pod create --memory --cpus`` puts the limits on the pod's cgroup, not on the
    infra container: the sandbox's VM is sized from them, so a member sees more memory and
    vCPUs than in a pod without limits (the test above; the default VM has 256 MiB and 1
    vCPU) and the VM with its host side fits in the pod's memory limit."""
    from shim.containers.resources import DEFAULT_VM_MIB, host_cpus

    limit_mib, cpus = 768, min(2, len(host_cpus()))
    infra = ""
    proc = podman.podman(
        "pod",
        "create",
        "--name",
        "bigpod",
        "--memory",
        f"{limit_mib}m",
        "--cpus",
        str(cpus),
        "--cgroup-parent",
        "/" + podman.cgroup_parent,
        "--infra-image",
        pod_infra,
        timeout=120,
    )
    assert proc.returncode == 0, _out(proc)
    try:
        infra = podman.podman("pod", "inspect", "--format", "{{.InfraContainerID}}", "bigpod").stdout.strip()
        # the limit is the pod's, not the infra container's own
        own = podman.podman("inspect", "--format", "{{.HostConfig.Memory}}", infra).stdout.strip()
        assert own in ("0", ""), own
        proc = podman.podman(
            "run", "-d", "--pull", "never", "--pod", "bigpod", "--name", "big", BUSYBOX_REF, "sleep", "600", timeout=300
        )
        assert proc.returncode == 0, _out(proc)
        seen = _vm_size_seen(podman, "big")
        assert seen["nproc"] == cpus, seen
        # the VM is the limit less its host side (shim.oci.hostcgroup.HOST_OVERHEAD_MIB);
        # MemTotal is that less what the guest kernel reserves
        assert DEFAULT_VM_MIB * 1024 < seen["memtotal_kb"] <= limit_mib * 1024, seen
        if _UNLIMITED_POD:
            assert seen["memtotal_kb"] > _UNLIMITED_POD["memtotal_kb"] + 200 * 1024, (seen, _UNLIMITED_POD)
            assert seen["nproc"] >= _UNLIMITED_POD["nproc"], (seen, _UNLIMITED_POD)
        if cpus > 1:
            assert seen["nproc"] > (_UNLIMITED_POD or {"nproc": 1})["nproc"], (seen, _UNLIMITED_POD)
    finally:
        proc = podman.podman("pod", "rm", "--force", "bigpod", timeout=300)
        assert proc.returncode == 0, _out(proc)
    wait_until(lambda: not _qemus_of(infra), 60, "the pod's VM to go")
