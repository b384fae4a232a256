"""`vmshim run` in the foreground, as a user runs it: real microVMs (marked vm) and the
same image in process isolation."""

from __future__ import annotations

import hashlib
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import fcntl
import time

import pytest

from tests.e2e.conftest import CLI, vmshim, vmshim_domains, wait_no_new_domains
from tests.waiting import wait_until

vm = pytest.mark.vm
ISOLATIONS = [pytest.param("vm", marks=vm), "process"]


def out(proc) -> str:
    return proc.stdout.decode(errors="replace")


def err(proc) -> str:
    return proc.stderr.decode(errors="replace")


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_echo_hello(isolation, domains_before):
    proc = vmshim("run", "--rm", "--isolation", isolation, "busybox", "echo", "hello")
    assert proc.returncode == 0, err(proc)
    assert out(proc) == "hello\n"
    assert not wait_no_new_domains(domains_before)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_exit_code_is_the_containers(isolation):
    proc = vmshim("run", "--rm", "--isolation", isolation, "busybox", "sh", "-c", "exit 7")
    assert proc.returncode == 7, err(proc)


@vm
def test_uname_is_the_guests_kernel(guest_kernel_release):
    proc = vmshim("run", "--rm", "busybox", "uname", "-r")
    assert proc.returncode == 0, err(proc)
    assert out(proc).strip() == guest_kernel_release
    assert guest_kernel_release != os.uname().release


def test_uname_in_process_isolation_is_the_hosts():
    proc = vmshim("run", "--rm", "--isolation", "process", "busybox", "uname", "-r")
    assert proc.returncode == 0, err(proc)
    assert out(proc).strip() == os.uname().release


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_stdin_is_forwarded(isolation):
    proc = vmshim("run", "--rm", "-i", "--isolation", isolation, "busybox", "cat", input=b"abc\n")
    assert proc.returncode == 0, err(proc)
    assert out(proc) == "abc\n"


@vm
def test_ten_mib_of_stdout_arrive_byte_exact():
    script = "head -c 10485760 /dev/urandom > /tmp/data && sha256sum /tmp/data >&2 && cat /tmp/data"
    proc = vmshim("run", "--rm", "busybox", "sh", "-c", script)
    assert proc.returncode == 0, err(proc)
    assert len(proc.stdout) == 10 * 1024 * 1024
    assert hashlib.sha256(proc.stdout).hexdigest() == err(proc).split()[0]


@vm
def test_stdin_of_one_mib_round_trips():
    data = os.urandom(1024 * 1024)
    proc = vmshim("run", "--rm", "-i", "busybox", "cat", input=data)
    assert proc.returncode == 0, err(proc)
    assert proc.stdout == data


@vm
def test_the_container_sees_only_itself():
    script = (
        "ps -o pid,comm > /tmp/ps; hostname; cat /sys/fs/cgroup/cgroup.procs | wc -l; "
        "test -f /sys/fs/cgroup/memory.max && echo own-cgroup; tail -n +2 /tmp/ps"
    )
    proc = vmshim("run", "--rm", "--hostname", "box1", "busybox", "sh", "-c", script)
    assert proc.returncode == 0, err(proc)
    hostname, cgroup_procs, own, *ps = out(proc).splitlines()
    assert [line.split() for line in ps] == [["1", "sh"], ["2", "ps"]]  # no agent, no kthreads
    assert hostname == "box1"
    assert int(cgroup_procs) <= 3  # only the container's processes are in its cgroup
    assert own == "own-cgroup"  # a child cgroup: the root cgroup has no memory.max


@vm
def test_flags_reach_the_process():
    proc = vmshim(
        "run",
        "--rm",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp",
        "-u",
        "1000:1000",
        "busybox",
        "sh",
        "-c",
        'echo "$GREETING"; pwd; id -u; id -g',
    )
    assert proc.returncode == 0, err(proc)
    assert out(proc).splitlines() == ["hi there", "/tmp", "1000", "1000"]


def test_user_name_and_env_file_in_process_isolation(tmp_path):
    env_file = tmp_path / "env"
    env_file.write_text("# comment\nA=1\nB=two words\n")
    proc = vmshim(
        "run",
        "--rm",
        "--isolation",
        "process",
        "--env-file",
        str(env_file),
        "-u",
        "user",
        "--entrypoint",
        "sh",
        "busybox",
        "-c",
        'echo "$A $B"; id -un',
    )
    assert proc.returncode == 0, err(proc)
    assert out(proc).splitlines() == ["1 two words", "user"]


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_missing_command_exits_127(isolation, domains_before):
    proc = vmshim("run", "--rm", "--isolation", isolation, "busybox", "/nope")
    assert proc.returncode == 127
    lines = err(proc).strip().splitlines()
    assert len(lines) == 1 and "/nope" in lines[0] and "no such file" in lines[0]
    assert not wait_no_new_domains(domains_before)


@vm
def test_unknown_user_is_a_clear_error(domains_before):
    proc = vmshim("run", "--rm", "-u", "nosuchuser", "busybox", "true")
    assert proc.returncode != 0
    lines = err(proc).strip().splitlines()
    assert len(lines) == 1 and "nosuchuser" in lines[0]
    assert not wait_no_new_domains(domains_before)


def test_unknown_image_is_one_clear_line(domains_before):
    proc = vmshim("run", "--rm", "no-such-image:1.0", "true")
    assert proc.returncode == 125
    lines = err(proc).strip().splitlines()
    assert len(lines) == 1 and "no-such-image" in lines[0] and "not found" in lines[0]
    assert "Traceback" not in err(proc)
    assert vmshim_domains_unchanged(domains_before)


def vmshim_domains_unchanged(before) -> bool:
    from tests.e2e.conftest import vmshim_domains

    return vmshim_domains() == before


@pytest.mark.parametrize("bad", ["=x", "", "A B=1"])
def test_malformed_env_is_one_clear_line(bad):
    proc = vmshim("run", "--rm", "-e", bad, "busybox", "true")
    assert proc.returncode == 125
    lines = err(proc).strip().splitlines()
    assert len(lines) == 1 and "invalid -e" in lines[0]


def test_bad_isolation_flag():
    proc = vmshim("run", "--rm", "--isolation", "container", "busybox", "true")
    assert proc.returncode != 0 and "isolation" in err(proc)


def test_libvirtd_not_reachable_is_one_clear_line(tmp_path):
    proc = vmshim(
        "run", "--rm", "busybox", "true", env={"VMSHIM_LIBVIRT_URI": f"qemu:///system?socket={tmp_path}/no.sock"}
    )
    assert proc.returncode == 125
    lines = err(proc).strip().splitlines()
    assert len(lines) == 1 and "libvirtd" in lines[0], err(proc)
    assert "Traceback" not in err(proc)


def _spawn(args, **kw):
    return subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@vm
def test_sigint_mid_run_is_forwarded_and_leaves_nothing(domains_before):
    script = 'trap "echo got-int; exit 3" INT; echo ready; while true; do sleep 0.2; done'
    proc = _spawn(["run", "--rm", "busybox", "sh", "-c", script])
    try:
        _read_fd_until(proc.stdout.fileno(), b"ready", 120)
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert b"got-int" in rest, stderr
    assert proc.returncode == 3
    assert not wait_no_new_domains(domains_before)


@vm
def test_sigint_during_boot_tears_the_vm_down(domains_before):
    from shim import paths

    proc = _spawn(["run", "--rm", "busybox", "sh", "-c", "echo started; sleep 100"])
    # Inside the boot: the domain exists (createXML returned) and its serial console is
    # open; the agent writes "ready at" there once the container is assembled.
    found = wait_until(
        lambda: vmshim_domains() - domains_before or proc.poll() is not None,
        60,
        "the container's domain",
        interval=0.05,
    )
    assert proc.poll() is None, "vmshim run ended before its domain was seen"
    [domain] = found
    console_log = paths.root() / "run" / domain.removeprefix("vmshim-") / "console.log"
    console = open(
        wait_until(lambda: console_log if console_log.exists() else None, 30, "the serial console log", interval=0.02),
        "rb",
    )
    try:
        proc.send_signal(signal.SIGINT)
        seen_at_signal = console.read()  # the open file outlives the teardown's unlink
    finally:
        console.close()
    out, _ = proc.communicate(timeout=60)
    assert b"vmshim-agent: ready at" not in seen_at_signal, seen_at_signal[-500:]  # booting
    assert b"started" not in out  # the process never ran
    assert proc.returncode == 130
    assert not wait_no_new_domains(domains_before)


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_tty_under_a_real_pty(isolation):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    proc = subprocess.Popen(
        CLI
        + [
            "run",
            "--rm",
            "-it",
            "--isolation",
            isolation,
            "busybox",
            "sh",
            "-c",
            "tty; stty size; read line; echo got:$line",
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    try:
        seen = _read_fd_until(master, b"33 101", 120)
        os.write(master, b"typed\r")
        seen += _read_fd_until(master, b"got:typed", 30)
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
    assert b"/dev/pts/" in seen


def _read_fd_until(fd: int, marker: bytes, timeout: float) -> bytes:
    """Read *fd* (a pipe or a pty master) until *marker* shows up; return all read."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"did not see {marker!r}; got {seen!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, f"{fd} closed before {marker!r}; got {seen!r}"
            seen += chunk
    return seen
