"""Docker-parity details (issue 21), as a user meets them: stop returns when the container
has stopped, the monitor's title in ps, ps's PORTS column and --format templates, rm -v.
Tests that boot a VM carry the ``vm`` marker."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import termios
import time
import uuid

import pytest

from tests.e2e.test_lifecycle_vm import SLOW_BOOT, err, inspect, ok, wait_until
from tests.e2e.conftest import CLI, vmshim, wait_no_new_domains
from tests.integration.test_registry_interop import registry  # noqa: F401  (fixture)

TRAP = 'trap "exit 0" TERM; echo up; while :; do sleep 0.1; done'


def unique(tag: str) -> str:
    return f"par-{tag}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def names():
    made: list[str] = []
    yield made
    for name in made:
        vmshim("rm", "-f", name)


@pytest.mark.vm
def test_stop_returns_and_start_rm_run_with_the_same_name_follow_at_once(names):
    name = unique("stop")
    names.append(name)
    ok("run", "-d", "--name", name, "busybox", "sh", "-c", TRAP, env=SLOW_BOOT)
    wait_until(lambda: "up" in ok("logs", name), what="the container's first line")
    ok("stop", name)
    assert inspect(name, "{{.State.Status}}") == "exited"
    ok("start", name, env=SLOW_BOOT)  # the old domain's name may still be known to libvirt
    assert inspect(name, "{{.State.Status}}") == "running"
    ok("stop", "-t", "0", name)
    ok("rm", name)
    ok("run", "-d", "--name", name, "busybox", "sh", "-c", TRAP, env=SLOW_BOOT)
    assert inspect(name, "{{.State.Status}}") == "running"


@pytest.mark.host_root
def test_the_monitor_shows_what_it_is_in_ps(names):
    name = unique("title")
    names.append(name)
    cid = ok(
        "run", "-d", "--isolation", "process", "--network", "none", "--name", name, "busybox", "sh", "-c", TRAP
    ).strip()
    pid = int(inspect(name, "{{.State.MonitorPid}}"))
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        args = f.read().rstrip(b"\0").split(b"\0")
    assert args[0].decode() == f"vmshim-monitor {cid[:12]}", args
    with open(f"/proc/{pid}/comm") as f:
        assert f.read().strip() == "vmshim-monitor"


@pytest.mark.vm
def test_ps_shows_published_ports_and_labels(names):
    name = unique("ports")
    names.append(name)
    ok(
        "run",
        "-d",
        "--name",
        name,
        "-p",
        "127.0.0.1::8080",
        "--label",
        "tier=web",
        "busybox",
        "sh",
        "-c",
        TRAP,
        env=SLOW_BOOT,
    )
    bound = json.loads(inspect(name, "{{json .NetworkSettings.Ports}}"))["8080/tcp"][0]
    published = f"{bound['HostIp']}:{bound['HostPort']}->8080/tcp"
    assert (
        ok("ps", "--filter", f"name={name}", "--format", "{{.Names}}|{{.Ports}}|{{.Labels}}").strip()
        == f"{name}|{published}|tier=web"
    )
    table = ok("ps", "--filter", f"name={name}").splitlines()
    assert "PORTS" in table[0] and published in table[1]
    assert json.loads(inspect(name, "{{json .Config.Labels}}")) == {"tier": "web"}


def test_rm_v_removes_the_anonymous_volumes_and_plain_rm_keeps_them(names):
    volumes_before = set(ok("volume", "ls", "-q").split())
    try:
        made = {}
        for tag in ("plain", "with-v"):
            name = unique(tag)
            names.append(name)
            ok("create", "--name", name, "-v", "/data", "-v", f"{name}-named:/named", "busybox")
            mounts = json.loads(inspect(name, "{{json .Mounts}}"))
            made[tag] = {m["Name"] for m in mounts if m["Destination"] == "/data"}
            assert len(made[tag]) == 1 and made[tag] <= set(ok("volume", "ls", "-q").split())
        ok("rm", names[0])
        ok("rm", "-v", names[1])
        left = set(ok("volume", "ls", "-q").split())
        assert made["plain"] <= left, "rm without -v keeps anonymous volumes (as docker does)"
        assert not made["with-v"] & left, "rm -v removes the container's anonymous volumes"
        assert f"{names[1]}-named" in left, "named volumes stay"
    finally:
        for name in names:
            vmshim("rm", "-f", name)
        for volume in set(ok("volume", "ls", "-q").split()) - volumes_before:
            vmshim("volume", "rm", volume)


@pytest.mark.vm
def test_run_and_create_pull_a_missing_image_from_a_real_registry(registry, names):  # noqa: F811
    host, _ = registry
    ref = f"{host}/parity/pulled:{uuid.uuid4().hex[:6]}"
    ok("tag", "busybox", ref)
    ok("push", "-q", ref)
    ok("rmi", ref)
    never = vmshim("create", "--pull", "never", ref)
    assert never.returncode == 125 and "not found" in err(never)
    try:
        proc = vmshim("run", "--rm", ref, "echo", "pulled by run", env=SLOW_BOOT)
        assert proc.returncode == 0, err(proc)
        assert proc.stdout.decode() == "pulled by run\n"  # the pull reports on stderr only
        assert f"Status: Downloaded newer image for {ref}" in err(proc)
        name = unique("pull")
        names.append(name)
        again = vmshim("create", "--name", name, ref)  # in the store now: no pull
        assert again.returncode == 0 and "Status:" not in err(again), err(again)
        always = vmshim("create", "--pull", "always", ref)
        assert always.returncode == 0 and f"Image is up to date for {ref}" in err(always)
        names.append(always.stdout.decode().strip())
    finally:
        for name in names:
            vmshim("rm", "-f", name)
        vmshim("rmi", ref)


def test_run_of_an_image_no_registry_serves_is_one_line_in_seconds():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        host = f"127.0.0.1:{closed.getsockname()[1]}"
    started = time.monotonic()
    proc = vmshim("run", "--rm", f"{host}/nothing/here:1", "true")
    took = time.monotonic() - started
    lines = err(proc).strip().splitlines()
    assert proc.returncode == 125 and len(lines) == 1, err(proc)
    assert "not found in the local store" in lines[0]
    assert f"registry {host} does not answer" in lines[0]
    assert took < 10, f"took {took:.1f} s"


@pytest.mark.host_root
def test_restarting_shows_in_ps_and_inspect_while_the_policy_waits(names):
    name = unique("restart")
    names.append(name)
    ok(
        "run",
        "-d",
        "--restart",
        "always",
        "--isolation",
        "process",
        "--network",
        "none",
        "--name",
        name,
        "busybox",
        "sh",
        "-c",
        "exit 3",
    )

    def waiting_after_a_few_restarts():
        state = json.loads(inspect(name, "{{json .State}}"))
        count = int(inspect(name, "{{.RestartCount}}"))
        return count >= 4 and state["Restarting"] and state["Status"] == "restarting"

    # back-off: 0.1, 0.2, 0.4, 0.8, 1.6 s: by the fourth restart each wait is long enough
    # to be seen by polling
    wait_until(waiting_after_a_few_restarts, timeout=90, what="the restarting state")
    listed = ok("ps", "--filter", f"name={name}")  # no -a: docker lists restarting ones
    assert "Restarting (3)" in listed, listed
    assert ok("ps", "--filter", "status=restarting", "--format", "{{.Names}}").split() == [name]
    ok("stop", name)
    state = json.loads(inspect(name, "{{json .State}}"))
    assert (state["Status"], state["Restarting"]) == ("exited", False)


class Terminal:
    """A CLI process on a real pty: type into it, wait for what it prints."""

    def __init__(self, *args: str):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            CLI + list(args),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env=dict(os.environ, **SLOW_BOOT),
        )
        os.close(slave)
        self.seen = b""

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def expect(self, text: bytes, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not seen; got {self.seen!r}"
            if not select.select([self.master], [], [], left)[0]:
                continue
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"the terminal closed before {text!r}; got {self.seen!r}"
            self.seen += chunk

    def wait_raw(self, timeout: float = 60) -> None:
        """Until the CLI has put the terminal in raw mode (it is then reading it)."""
        wait_until(lambda: not termios.tcgetattr(self.master)[3] & termios.ICANON, timeout, "the terminal in raw mode")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


@pytest.mark.vm
def test_detach_keys_leave_an_it_container_running_and_attach_comes_back(names):
    name = unique("detach")
    names.append(name)
    term = Terminal("run", "-it", "--name", name, "busybox", "sh")
    try:
        term.expect(b"# ")
        term.type(b"echo one $((40+2))\r")
        term.expect(b"one 42")
        term.type(b"\x10\x11")  # Ctrl-P Ctrl-Q
        assert term.proc.wait(timeout=30) == 0
    finally:
        term.close()
    assert inspect(name, "{{.State.Status}}") == "running"
    again = Terminal("attach", "--detach-keys", "ctrl-a,x", name)
    try:
        again.wait_raw()
        again.type(b"echo two $((40+3))\r")
        again.expect(b"two 43")
        again.type(b"\x10\x11")  # not the keys any more: sh gets them
        again.type(b"\x01x")
        assert again.proc.wait(timeout=30) == 0
    finally:
        again.close()
    assert inspect(name, "{{.State.Status}}") == "running"
    assert ok("exec", name, "echo", "alive") == "alive\n"


@pytest.mark.vm
def test_stats_of_a_vm_report_its_own_cgroup_and_qemu_apart(names):
    name = unique("stats")
    names.append(name)
    ok("run", "-d", "--name", name, "busybox", "sh", "-c", TRAP, env=SLOW_BOOT)
    gateway = json.loads(inspect(name, "{{json .NetworkSettings}}"))["Gateway"]
    assert gateway, "the container needs a network to count its traffic"
    ok(
        "exec",
        name,
        "sh",
        "-c",
        f"dd if=/dev/zero of=/big bs=1M count=8 conv=fsync 2>/dev/null; "
        f"timeout 5 wget -q -O /dev/null http://{gateway}:9/ 2>/dev/null; true",
    )  # ARP + SYN out
    # (not wget -T: busybox-static 1.35's wget dies of SIGSEGV with it, before any socket)
    row = json.loads(ok("stats", "--no-stream", "--format", "json", name))
    cgroup, host = row["Cgroup"], row["Host"]
    assert cgroup["block_write_bytes"] >= 8 << 20, cgroup
    assert cgroup["net_tx_bytes"] > 0 and cgroup["net_rx_bytes"] >= 0, cgroup
    assert cgroup["pids"] >= 1 and 0 < cgroup["memory"] < host["Memory"], (cgroup, host)
    assert row["Memory"] == cgroup["memory"] and row["MemoryLimit"] == 256 << 20
    table = ok("stats", "--no-stream", name).splitlines()
    assert "NET I/O" in table[0] and "QEMU MEM" in table[0]


@pytest.mark.vm
def test_cp_into_and_out_of_a_stopped_container(names, tmp_path, domains_before):
    name = unique("cp")
    names.append(name)
    ok("create", "--name", name, "busybox", "cat", "/in.txt")
    src = tmp_path / "in.txt"
    src.write_bytes(b"copied while stopped\n")
    ok("cp", str(src), f"{name}:/in.txt", env=SLOW_BOOT)  # never started: created
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ok("cp", f"{name}:/in.txt", str(out_dir), env=SLOW_BOOT)
    assert (out_dir / "in.txt").read_bytes() == b"copied while stopped\n"
    assert inspect(name, "{{.State.Status}}") == "created"
    started = vmshim("start", "-a", name, env=SLOW_BOOT)  # the file is on its writable layer
    assert started.returncode == 0 and started.stdout == b"copied while stopped\n", err(started)
    ok("cp", f"{name}:/in.txt", str(tmp_path / "after.txt"), env=SLOW_BOOT)  # exited
    assert (tmp_path / "after.txt").read_bytes() == b"copied while stopped\n"
    assert inspect(name, "{{.State.Status}}") == "exited"
    missing = vmshim("cp", f"{name}:/no/such", str(tmp_path), env=SLOW_BOOT)
    assert missing.returncode != 0 and len(err(missing).strip().splitlines()) == 1
    ok("rm", name)
    assert not wait_no_new_domains(domains_before)
