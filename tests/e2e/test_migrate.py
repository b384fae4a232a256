"""Live migration (issue 15) between two libvirt daemons on this machine: the suite's own,
and a second one in a network namespace (and mount namespace: its own /run/libvirt,
/var/lib/libvirt, /etc/libvirt) of this test's, joined by a veth, listening on TCP. The
disks are the same files (shared storage). A container counting in memory moves, keeps
its counter, answers exec and logs, and leaves no domain on the source. Boots one
microVM (marked vm)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import err, ok, out, vmshim, vmshim_domains
from tests.waiting import alive, wait_until

pytestmark = pytest.mark.vm
PREFIX = f"mg{os.getpid()}"
NS = f"vmshim-mig-{os.getpid()}"
HOST_A, HOST_B = "10.254.77.1", "10.254.77.2"
URI_B = f"qemu+tcp://{HOST_B}/system"
COUNTER = "i=0; while true; do echo tick $i; i=$((i+1)); sleep 1; done"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def domains_on_b() -> list[str]:
    proc = subprocess.run(["virsh", "-c", URI_B, "list", "--name"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [n for n in proc.stdout.split() if n.startswith("vmshim-")]


@pytest.fixture(scope="module")
def second_host(tmp_path_factory):
    """libvirtd (and virtlogd) 'on host B': own namespaces, TCP without auth on B's veth
    address only; stopped and the namespace deleted at the end."""
    conf = tmp_path_factory.mktemp("libvirt-b")
    etc = conf / "etc"
    shutil.copytree("/etc/libvirt", etc, symlinks=True)
    shutil.rmtree(etc / "qemu" / "networks" / "autostart", ignore_errors=True)
    (etc / "libvirtd.conf").write_text(f'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\nlisten_addr = "{HOST_B}"\n')
    pids = [conf / "virtlogd.pid", conf / "libvirtd.pid"]
    _sh("ip", "netns", "add", NS)
    try:
        _sh("ip", "link", "add", "vmigA", "type", "veth", "peer", "name", "vmigB", "netns", NS)
        _sh("ip", "addr", "add", f"{HOST_A}/30", "dev", "vmigA")
        _sh("ip", "link", "set", "vmigA", "up")
        script = f"""set -e
ip link set lo up
ip addr add {HOST_B}/30 dev vmigB
ip link set vmigB up
for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt; do
  mkdir -p $d; mount -t tmpfs -o mode=0755 tmpfs $d
done
mkdir -p /var/lib/libvirt/qemu /var/lib/libvirt/images
mount --bind {etc} /etc/libvirt
virtlogd -d -p {pids[0]}
libvirtd -d --listen -p {pids[1]}
"""
        _sh("unshare", "--mount", "--propagation", "private", "nsenter", f"--net=/run/netns/{NS}", "bash", "-c", script)
        wait_until(
            lambda: subprocess.run(["virsh", "-c", URI_B, "uri"], capture_output=True).returncode == 0,
            30,
            "libvirtd on host B",
        )
        yield URI_B
    finally:
        for pid_file in reversed(pids):
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                continue
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda pid=pid: not alive(pid), 30, f"daemon {pid} to end")
        subprocess.run(["ip", "netns", "delete", NS], capture_output=True)


def ticks(name: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+)", out(vmshim("logs", name)))]


def test_running_container_moves_to_another_libvirt(second_host):
    name = f"{PREFIX}-count"
    proc = vmshim(
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        name,
        "busybox",
        "sh",
        "-c",
        COUNTER,
        env={"VMSHIM_BOOT_TIMEOUT": "600"},
    )
    assert proc.returncode == 0, err(proc)
    cid = ok("inspect", "-f", "{{.Id}}", name).strip()
    domain = f"vmshim-{cid[:12]}"
    try:
        wait_until(lambda: len(ticks(name)) >= 3, 300, "the counter's first ticks")
        assert domain in vmshim_domains()
        began = time.monotonic()
        ok("migrate", name, second_host, timeout=600)
        took = time.monotonic() - began
        assert domain not in vmshim_domains(), "the source still has the domain"
        on_b = domains_on_b()
        assert on_b == [domain], (
            subprocess.run(["virsh", "-c", URI_B, "list", "--all"], capture_output=True, text=True).stdout
            + (Path(os.environ["VMSHIM_ROOT"]) / "containers" / cid / "monitor.log").read_text()
        )
        assert ok("inspect", "-f", "{{.State.Status}}", name).strip() == "running"
        before = ticks(name)[-1]
        wait_until(lambda: ticks(name)[-1] > before + 2, 120, "ticks after the move")
        seen = ticks(name)
        assert seen.count(0) == 1 and seen == sorted(seen), seen[-10:]
        assert ok("exec", name, "echo", "here").strip() == "here"
        print(f"migration took {took:.2f} s")
    finally:
        vmshim("rm", "-f", name)
    wait_until(lambda: domains_on_b() == [], 30, "host B to forget the domain")
    assert domain not in vmshim_domains()
