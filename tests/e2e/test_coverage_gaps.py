"""Behaviour the first version shipped without an end-to-end test: the limits that only a
running VM can show (swap, reservation, shares, io weight and rates, vCPUs and their
pinning), the restart policies `always` and `unless-stopped`, `--volumes-from`,
`volume prune`, and UDP through a published port.

VM boots are kept to one container per check; the CLI is run as a user runs it."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from guest.runtime.cgroups import blkio_to_io_weight, shares_to_weight
from tests.e2e.conftest import vmshim
from tests.e2e.test_limits_volumes import (  # noqa: F401 - fixtures
    err,
    inspect,
    names,
    ok,
    volume_names,
)
from tests.waiting import wait_until

vm = pytest.mark.vm
KERNEL_CONFIG = Path(__file__).resolve().parents[2] / "kernels" / "microvm-x86_64.config"


def _domain_xml(name: str) -> ET.Element:
    import libvirt

    from shim import paths

    conn = libvirt.open(paths.libvirt_uri())
    try:
        return ET.fromstring(conn.lookupByName(inspect(name)["Vmshim"]["Domain"]).XMLDesc(0))
    finally:
        conn.close()


# ---- limits inside a running VM ------------------------------------------------------------


@vm
def test_vm_limits_reach_the_guest_cgroup_and_size_the_vm(names):
    name = names("limits")
    ok(
        "run",
        "-d",
        "--name",
        name,
        "-m",
        "128m",
        "--memory-swap",
        "192m",
        "--memory-reservation",
        "64m",
        "--cpus",
        "1.5",
        "--cpuset-cpus",
        "0,1",
        "--cpu-shares",
        "512",
        "--device-read-bps",
        "/dev/vda:1m",
        "--device-write-bps",
        "/dev/vda:2m",
        "busybox",
        "sleep",
        "600",
    )
    knobs = ("memory.max", "memory.swap.max", "memory.low", "cpu.max", "cpu.weight")
    seen = ok(
        "exec",
        name,
        "sh",
        "-c",
        "cd /sys/fs/cgroup; for k in " + " ".join(knobs) + "; do echo $k=$(cat $k); done; "
        "echo io=$(cat io.max | tr '\\n' ';'); echo nproc=$(nproc)",
    )
    values = dict(line.split("=", 1) for line in seen.splitlines())
    assert values["memory.max"] == str(128 << 20)
    assert values["memory.swap.max"] == str(64 << 20)  # --memory-swap is memory plus swap
    assert values["memory.low"] == str(64 << 20)
    assert values["cpu.max"] == "150000 100000"
    assert values["cpu.weight"] == str(shares_to_weight(512))
    rates = [entry for entry in values["io"].split(";") if entry]
    assert rates and all("rbps=1048576" in e and "wbps=2097152" in e for e in rates), rates
    assert values["nproc"] == "2"  # ceil(--cpus 1.5) vCPUs
    domain = _domain_xml(name)
    vcpu = domain.find("vcpu")
    assert vcpu.text == "2" and vcpu.get("cpuset") in ("0,1", "0-1")
    memory_kib = int(domain.find("memory").text)
    assert memory_kib // 1024 > 128  # the limit plus what the guest itself needs


@vm
def test_vm_blkio_weight_is_applied_or_refused_clearly(names, guest_kernel_release):
    name = names("weight")
    proc = vmshim(
        "run",
        "--rm",
        "--name",
        name,
        "--blkio-weight",
        "300",
        "busybox",
        "sh",
        "-c",
        "cat /sys/fs/cgroup/io.weight 2>/dev/null || cat /sys/fs/cgroup/io.bfq.weight",
    )
    if guest_kernel_release.endswith("-vmshim"):  # the minimal kernel: iocost's io.weight
        assert "CONFIG_BLK_CGROUP_IOCOST=y" in KERNEL_CONFIG.read_text()
        assert proc.returncode == 0, err(proc)
    if proc.returncode == 0:
        text = proc.stdout.decode()
        assert f"default {blkio_to_io_weight(300)}" in text or "default 300" in text, text
    else:  # the guest kernel has no io weight knob: one clear line saying so
        assert "weight" in err(proc) and len(err(proc).strip().splitlines()) == 1, err(proc)


# ---- restart policies -----------------------------------------------------------------------


@vm
def test_restart_always_restarts_a_clean_exit_until_stopped(names):
    name = names("always")
    ok("run", "-d", "--name", name, "--restart", "always", "busybox", "sh", "-c", "echo run; sleep 1")
    wait_until(lambda: inspect(name)["RestartCount"] >= 2, 240, "two restarts of a clean exit")
    ok("stop", "-t", "2", name)
    state = inspect(name)
    assert state["State"]["Status"] == "exited"
    count = state["RestartCount"]
    # A stopped container stays stopped: its policy does not bring it back.
    proc = vmshim("wait", name, timeout=30)
    assert proc.returncode == 0
    assert inspect(name)["RestartCount"] == count and inspect(name)["State"]["Status"] == "exited"
    assert ok("logs", name).count("run") >= 3


def test_restart_unless_stopped_in_process_isolation(names):
    name = names("unless")
    ok(
        "run",
        "-d",
        "--isolation",
        "process",
        "--name",
        name,
        "--restart",
        "unless-stopped",
        "busybox",
        "sh",
        "-c",
        "exit 3",
    )
    wait_until(lambda: inspect(name)["RestartCount"] >= 2, 60, "two restarts")
    assert inspect(name)["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    ok("stop", "-t", "1", name)
    assert inspect(name)["State"]["Status"] == "exited"


# ---- volumes -----------------------------------------------------------------------------


def test_volumes_from_shares_the_other_containers_volumes(names, volume_names, tmp_path):
    source, volume = names("vsrc"), volume_names("vf")
    bind = tmp_path / "bind"
    bind.mkdir()
    ok(
        "create",
        "--isolation",
        "process",
        "--name",
        source,
        "-v",
        f"{volume}:/data",
        "-v",
        f"{bind}:/bind",
        "busybox",
        "true",
    )
    assert (
        ok(
            "run",
            "--rm",
            "--isolation",
            "process",
            "--volumes-from",
            source,
            "busybox",
            "sh",
            "-c",
            "echo via-from > /data/f; echo b > /bind/g; cat /data/f",
        )
        == "via-from\n"
    )
    assert (bind / "g").read_text() == "b\n"
    assert ok("run", "--rm", "--isolation", "process", "-v", f"{volume}:/v", "busybox", "cat", "/v/f") == "via-from\n"
    proc = vmshim(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--volumes-from",
        f"{source}:ro",
        "busybox",
        "sh",
        "-c",
        "echo no > /data/f",
    )
    assert proc.returncode != 0
    proc = vmshim("run", "--rm", "--volumes-from", "no-such-container", "busybox", "true")
    assert proc.returncode != 0 and "no-such-container" in err(proc)


@vm
def test_volumes_from_in_a_vm_mounts_the_volume_disk_and_the_bind_with_its_mode(names, volume_names, tmp_path):
    """In a VM the named volume arrives as its own disk (ext4) and the bind over virtiofs,
    read-only as the source container has it."""
    source, volume = names("vmsrc"), volume_names("vmvf")
    bind = tmp_path / "bind"
    bind.mkdir()
    (bind / "h").write_text("from the host\n")
    ok("create", "--name", source, "-v", f"{volume}:/data", "-v", f"{bind}:/bind:ro", "busybox", "true")
    seen = ok(
        "run",
        "--rm",
        "--volumes-from",
        source,
        "busybox",
        "sh",
        "-c",
        "echo vm > /data/f && cat /data/f /bind/h; "
        "echo x > /bind/y 2>/dev/null || echo bind-ro; "
        "grep -E ' /(data|bind) ' /proc/mounts | cut -d' ' -f2,3,4",
    )
    lines = seen.splitlines()
    assert lines[:3] == ["vm", "from the host", "bind-ro"], seen
    mounts = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert mounts["/data"][0] == "ext4" and mounts["/data"][1].startswith("rw"), mounts
    assert mounts["/bind"][0] == "virtiofs" and mounts["/bind"][1].startswith("ro"), mounts
    assert not (bind / "y").exists()
    assert volume in ok("volume", "ls", "-q").split()


def test_volume_prune_removes_only_unused_volumes(names, volume_names):
    used, unused, anonymous_owner = volume_names("used"), volume_names("unused"), names("anon")
    ok("volume", "create", used)
    ok("volume", "create", unused)
    ok("create", "--isolation", "process", "--name", names("user"), "-v", f"{used}:/d", "busybox", "true")
    ok("create", "--isolation", "process", "--name", anonymous_owner, "-v", "/anon", "busybox", "true")
    anonymous = next(m["Name"] for m in inspect(anonymous_owner)["Mounts"] if m["Destination"] == "/anon")
    ok("rm", anonymous_owner)  # without -v its anonymous volume stays, unused
    pruned = ok("volume", "prune", "-f")
    listed = ok("volume", "ls", "-q").split()
    assert anonymous in pruned and anonymous not in listed  # anonymous and unused: gone
    assert unused in listed and used in listed  # named volumes stay without -a
    pruned = ok("volume", "prune", "-a", "-f")
    listed = ok("volume", "ls", "-q").split()
    assert unused in pruned and unused not in listed
    assert used in listed and used not in pruned  # a container still references it


# ---- UDP through a published port ------------------------------------------------------------

UDP_ECHO = (
    "const s=require('dgram').createSocket('udp4');"
    "s.on('message',(m,r)=>s.send(Buffer.concat([Buffer.from('echo:'),m]),r.port,r.address));"
    "s.bind(5353,()=>console.log('listening'))"
)


@vm
def test_udp_published_port_carries_datagrams_both_ways(names):
    if "node" not in ok("images"):
        pytest.skip("node image not available (needs a Debian mirror)")
    name = names("udp")
    ok("run", "-d", "--name", name, "-p", "127.0.0.1::5353/udp", "node:18-bookworm", "node", "-e", UDP_ECHO)
    wait_until(lambda: "listening" in ok("logs", name), 120, "the UDP server listening")
    host, port = ok("port", name, "5353/udp").strip().rsplit(":", 1)
    assert host == "127.0.0.1"

    def exchange() -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            s.sendto(b"ping", (host, int(port)))
            try:
                return s.recv(100)
            except OSError:
                return b""

    assert wait_until(exchange, 30, "a UDP answer") == b"echo:ping"
