"""OS containers (``vmshim run --os``): the Debian systemd image (images/debian-systemd)
boots its own init in a microVM; systemd's services, ``exec systemctl``, sshd on a
published port, a clean power-off on ``stop`` and a second boot with the files kept.
One VM for the whole scenario (the tests run in order on the module's container)."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest

from tests.e2e.conftest import vmshim
from tests.waiting import wait_until

pytestmark = pytest.mark.vm
NAME = f"os{os.getpid()}"
IMAGE = "debian-systemd:bookworm"
SLOW_BOOT = {"VMSHIM_BOOT_TIMEOUT": "600"}
BOOT_DEADLINE = 600.0  # systemd's boot under TCG with 3 other helpers' VMs: minutes at worst
BOOT_TIMES: list[float] = []


def out(proc) -> str:
    return proc.stdout.decode(errors="replace")


def err(proc) -> str:
    return proc.stderr.decode(errors="replace")


def ok(*args, **kw) -> str:
    proc = vmshim(*args, **kw)
    assert proc.returncode == 0, f"vmshim {' '.join(args)}: {err(proc)}"
    return out(proc)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def system_state() -> str:
    """``systemctl is-system-running`` in the container ('' while exec cannot run yet)."""
    proc = vmshim("exec", NAME, "systemctl", "is-system-running", timeout=120)
    return out(proc).strip()


def wait_booted(since: float) -> str:
    """Wait until systemd says running or degraded; record the boot time. Degraded prints
    the failed units (the test's log says why)."""
    state = wait_until(
        lambda: system_state() in ("running", "degraded") and system_state(),
        timeout=BOOT_DEADLINE,
        what="systemd running or degraded",
        interval=1.0,
    )
    BOOT_TIMES.append(time.monotonic() - since)
    print(f"systemd {state} {BOOT_TIMES[-1]:.1f} s after run/start")
    if state == "degraded":
        print("failed units:", ok("exec", NAME, "systemctl", "--failed", "--no-legend", "--plain"))
    return state


@pytest.fixture(scope="module")
def machine():
    """The OS container, booted; removed at the end."""
    if vmshim("image", "inspect", IMAGE).returncode != 0:
        proc = vmshim("image", "bootstrap", "debian-systemd", timeout=1800)
        if proc.returncode != 0:
            pytest.skip(f"debian-systemd image not available (needs a Debian mirror): {err(proc).strip()}")
    port = free_port()
    started = time.monotonic()
    proc = vmshim("run", "-d", "--os", "--name", NAME, "-p", f"127.0.0.1:{port}:22", IMAGE, env=SLOW_BOOT, timeout=900)
    assert proc.returncode == 0, err(proc)
    try:
        wait_booted(started)
        yield NAME
    finally:
        print("boot times (s):", [round(t, 1) for t in BOOT_TIMES])
        vmshim("rm", "-f", NAME)


def test_init_is_systemd_with_a_delegated_cgroup(machine):
    assert ok("exec", machine, "cat", "/proc/1/comm").strip() == "systemd"
    env = ok("exec", machine, "sh", "-c", "tr '\\0' '\\n' < /proc/1/environ")
    assert "container=vmshim" in env.splitlines()
    mounts = ok("exec", machine, "cat", "/proc/self/mounts")
    assert re.search(r"^cgroup2 /sys/fs/cgroup cgroup2 rw", mounts, re.M), mounts
    assert re.search(r"^tmpfs /run tmpfs", mounts, re.M) and re.search(r"^tmpfs /tmp tmpfs", mounts, re.M)
    # systemd made its own slices below the container's cgroup
    assert "system.slice" in ok("exec", machine, "ls", "/sys/fs/cgroup").split()


def test_exec_systemctl_stops_and_starts_a_unit(machine):
    def state() -> str:
        return out(vmshim("exec", machine, "systemctl", "is-active", "vmshim-hello")).strip()

    assert state() == "active"
    ok("exec", machine, "systemctl", "stop", "vmshim-hello", timeout=120)
    assert state() == "inactive"
    ok("exec", machine, "systemctl", "start", "vmshim-hello", timeout=120)
    assert state() == "active"


def test_top_lists_the_services_and_logs_show_the_console(machine):
    table = ok("top", machine)
    for process in ("/sbin/init", "systemd-journald", "sshd"):
        assert process in table, table
    try:
        wait_until(
            lambda: "hello from" in out(vmshim("logs", machine)),
            timeout=120,
            what="the demo service's line in the log (journald → console)",
        )
    except AssertionError:
        print("log tail:", out(vmshim("logs", "--tail", "30", machine)))
        print(
            out(
                vmshim(
                    "exec",
                    machine,
                    "sh",
                    "-c",
                    "ls -l /dev/console /proc/1/fd/0; "
                    "grep console /proc/self/mountinfo; journalctl -n 10 --no-pager "
                    "-u vmshim-hello -u systemd-journald",
                )
            )
        )
        raise
    stats = json.loads(ok("stats", "--no-stream", "--format", "json", machine).splitlines()[0])
    print("stats:", json.dumps(stats))  # the README's memory figures
    print("free -m in the VM:", ok("exec", machine, "free", "-m"))
    assert stats["Memory"] > 0
    assert int(stats["PIDs"]) >= 5  # the services in systemd's child cgroups count too


def test_ssh_login_on_the_published_port(machine):
    import paramiko

    key = paramiko.RSAKey.generate(2048)
    public = f"{key.get_name()} {key.get_base64()} vmshim-test\n".encode()
    proc = vmshim("exec", "-i", machine, "sh", "-c", "umask 077; cat > /root/.ssh/authorized_keys", input=public)
    assert proc.returncode == 0, err(proc)
    ports = json.loads(ok("inspect", "-f", "{{json .NetworkSettings.Ports}}", machine))
    bound = ports["22/tcp"][0]
    assert bound["HostIp"] == "127.0.0.1"

    def login():
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(
                bound["HostIp"],
                int(bound["HostPort"]),
                username="root",
                pkey=key,
                timeout=30,
                banner_timeout=60,
                auth_timeout=60,
                allow_agent=False,
                look_for_keys=False,
            )
        except (OSError, paramiko.SSHException):
            client.close()
            return None
        return client

    client = wait_until(login, timeout=120, what="an ssh login", interval=2.0)
    try:
        _stdin, stdout, _stderr = client.exec_command("cat /etc/hostname; systemctl is-active ssh", timeout=120)
        text = stdout.read().decode()
    finally:
        client.close()
    assert text.split()[-1] == "active", text
    assert text.split()[0] == ok("inspect", "-f", "{{.Config.Hostname}}", machine).strip()


def test_stop_powers_off_cleanly_and_start_boots_again_with_files_kept(machine):
    ok("exec", machine, "sh", "-c", "echo kept > /root/marker && sync")
    stop_timeout = int(ok("inspect", "-f", "{{.Config.StopTimeout}}", machine).strip() or 30)
    began = time.monotonic()
    ok("stop", machine, timeout=300)
    took = time.monotonic() - began
    print(f"stop took {took:.1f} s (timeout {stop_timeout} s)")
    exit_code = ok("inspect", "-f", "{{.State.ExitCode}}", machine).strip()
    log = ok("logs", machine)
    started = time.monotonic()
    ok("start", machine, env=SLOW_BOOT, timeout=900)
    wait_booted(started)
    journal = out(vmshim("exec", machine, "journalctl", "-b", "-1", "-n", "40", "--no-pager", "-o", "short-monotonic"))
    print("the previous boot's end, from its journal:\n" + journal)
    assert took < stop_timeout, "systemd did not power off before the stop timeout"
    assert exit_code == "0"
    # SIGRTMIN+3 is systemd's halt: in a container, halt.target ends the init
    clean = (
        r"Reached target .*(Power-Off|Power Off|System Halt)|Halting system|"
        r"Powering off|Starting systemd-halt"
    )
    assert re.search(clean, log) or re.search(clean, journal), log[-3000:]
    assert ok("exec", machine, "cat", "/root/marker").strip() == "kept"
